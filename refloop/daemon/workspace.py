"""The coordinator's workspace: the worklist, the referral page, bulk actions and the weekly review.

Server-rendered like the dashboard (no external script, style or font; every action a plain form with
post/redirect/get, so keyboard and no-script use work). Every filter of a view is in its URL, so a view can
be bookmarked or sent; the owner defaults to the signed-in person (``http.user_header`` from a trusted
proxy: :mod:`refloop.daemon.identity`), else everyone. The worklist query is
:mod:`refloop.store.worklist_view`, the same one ``GET /api/worklist`` and ``refloop worklist`` use.

Times are shown in the clinic's time zone as words a person reads ("Tue 8 Dec 14:05"), each with its ISO
form on hover (``<time title>``). Every action goes through :func:`refloop.store.alerts.act`, so it is on the
referral's timeline and in the audit log with the person who did it.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo

from aiohttp import web
from jinja2 import Environment, FileSystemLoader, select_autoescape
from sqlalchemy import func, select

from refloop.config.windows import level_name, windows_from_settings
from refloop.daemon import identity
from refloop.store import alerts, audit, outbox, weekly
from refloop.store import referrals as repo
from refloop.store import report_queries as rq
from refloop.store import worklist_view as wv
from refloop.store.models import Message as Journal
from refloop.store.models import Outcome

if TYPE_CHECKING:
    from sqlalchemy import Connection, Engine

    from refloop.config import Settings
    from refloop.daemon.app import AppContext

_HERE = Path(__file__).parent
BULK_ACTIONS: Final = ("acknowledge", "snooze", "assign")
PAGE_SIZE: Final = 50

STATUS_WORDS: Final = {
    "sent": "Sent, waiting to be booked", "scheduled": "Booked, waiting for the visit",
    "no_show": "Missed the appointment, waiting to be rebooked", "completed": "Seen, waiting for the consult note",
    "closed": "Closed: the consult note is back", "cancelled": "Cancelled", "declined": "Declined by the specialist",
    "expired": "Expired",
}
STAGE_WORDS: Final = {"scheduling": "Booking", "visit": "Visit", "rebooking": "Rebooking after a no-show",
                      "note": "Consult note"}
#: The stage each open status waits on (the first one the stall clock runs for that status).
STATUS_STAGE: Final = {"sent": "scheduling", "scheduled": "visit", "no_show": "rebooking", "completed": "note"}
EVENT_WORDS: Final = {"alert_acknowledge": "acknowledged the alert", "alert_snooze": "snoozed the alert",
                      "alert_assign": "assigned the alert", "alert_note": "added a note",
                      "alert_hold": "put the referral on hold", "alert_close": "closed the referral"}


def _moment(value: Any) -> datetime | None:
    if value in (None, ""):
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _days_words(days: float) -> str:
    """A duration as a person says it: "3 h", "5 days", "6 weeks"."""
    if days < 1:
        return f"{max(round(days * 24), 0)} h"
    if days < 21:
        return f"{days:.0f} day{'s' if round(days) != 1 else ''}" if days >= 1.5 else "1 day"
    return f"{days / 7:.0f} weeks"


def environment(zone: ZoneInfo, now: Callable[[], datetime]) -> Environment:
    env = Environment(loader=FileSystemLoader(_HERE / "templates"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)

    def local(value: Any, fmt: str = "%a %-d %b %Y %H:%M") -> str:
        moment = _moment(value)
        return "–" if moment is None else moment.astimezone(zone).strftime(fmt)

    def short(value: Any) -> str:
        """Day, month and time; the year too when it is not this year's (old stalls are a year back)."""
        moment = _moment(value)
        if moment is None:
            return "–"
        local_moment = moment.astimezone(zone)
        same_year = local_moment.year == now().astimezone(zone).year
        return local_moment.strftime("%-d %b %H:%M" if same_year else "%-d %b %Y %H:%M")

    def iso(value: Any) -> str:
        moment = _moment(value)
        return "" if moment is None else moment.astimezone(zone).isoformat()

    env.filters.update(local=local, short=short, iso=iso, days=_days_words,
                       status_words=lambda s: STATUS_WORDS.get(s, s),
                       stage_words=lambda s: STAGE_WORDS.get(s, s), q=lambda d: urlencode(d),
                       event_words=lambda s: s.replace("_", " "))
    env.globals["zone"] = str(zone)
    return env


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location})


def _local_url(value: str, default: str) -> str:
    """Only same-site paths are followed after a form (no open redirect through ``back=``)."""
    return value if value.startswith("/") and not value.startswith("//") else default


def _parse_until(value: str, zone: ZoneInfo) -> datetime | None:
    """A date or date-time from a form, in the clinic's zone; a bare date means 08:00 local that day."""
    text = value.strip()
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    if len(text) == 10:
        moment = moment.replace(hour=8)
    return moment if moment.tzinfo else moment.replace(tzinfo=zone)


def add_routes(app: web.Application, server: AppContext) -> None:
    """Register ``/worklist`` (+ ``.csv``, bulk), ``/referrals/{id}`` (+ actions), ``/weekly``, ``/leaks.csv``
    and ``GET /api/worklist`` (+ ``/counts``)."""
    settings = server.settings
    zone = wv.clinic_zone(settings)
    env = environment(zone, server.clock.now)

    def engine() -> Engine:
        assert server.engine is not None
        return server.engine

    def actor(req: web.Request, kind: str = "dashboard") -> str:
        return identity.actor(req, f"{kind}@{req.remote or 'unknown'}")

    def filters(req: web.Request) -> wv.Filters:
        return wv.Filters.from_query(req.query, default_owner=str(req.get(identity.REQUEST_KEY, "")))

    # -- worklist ----------------------------------------------------------------------------------
    def _worklist(f: wv.Filters, after: str) -> dict[str, Any]:
        now = server.clock.now()
        with engine().connect() as conn:
            p = wv.page(conn, settings, now, f, after=after, limit=PAGE_SIZE)
            facets = wv.facets(conn)
            dead = conn.execute(select(func.count()).select_from(outbox.OUTBOX).where(
                outbox.OUTBOX.c.status == outbox.DEAD)).scalar_one()  # one ix_outbox_due range
            failed = conn.execute(select(func.count()).select_from(Journal).where(
                Journal.outcome == Outcome.FAILED)).scalar_one()  # one ix_messages_outcome_id range
        return {"page": p, "facets": facets, "dead": dead, "failed": failed}

    async def worklist_page(req: web.Request) -> web.Response:
        try:
            f = filters(req)
            ctx = await asyncio.to_thread(_worklist, f, req.query.get("after", ""))
        except ValueError as exc:
            return web.Response(text=f"bad filter: {exc}", status=400)
        query = f.query()
        html = env.get_template("worklist.html").render(
            f=f, query=query, person=req.get(identity.REQUEST_KEY, ""), flash=req.query.get("done", ""),
            sorts=wv.SORTS, statuses=list(wv.STATUSES), stages=list(STAGE_WORDS), priorities=wv.PRIORITIES,
            modes=wv.MODES, here=f"/worklist?{urlencode(query)}", bulk_actions=BULK_ACTIONS,
            first=not req.query.get("after"), **ctx)
        return web.Response(text=html, content_type="text/html")

    def _csv_rows(f: wv.Filters) -> str:
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(wv.COLUMNS), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        with engine().connect() as conn:
            for row in wv.iterate(conn, settings, server.clock.now(), f):
                writer.writerow(row)
        return out.getvalue()

    async def worklist_csv(req: web.Request) -> web.Response:
        try:
            f = filters(req)
        except ValueError as exc:
            return web.Response(text=f"bad filter: {exc}", status=400)
        body = await asyncio.to_thread(_csv_rows, f)
        return web.Response(text=body, content_type="text/csv", charset="utf-8",
                            headers={"Content-Disposition": 'attachment; filename="worklist.csv"'})

    def _bulk(ids: list[int], action: str, form: dict[str, str], who: str) -> str:
        until = _parse_until(form.get("until", ""), zone)
        done, failed = 0, 0
        with engine().begin() as conn:  # all or nothing: a half-applied bulk assign is worse than none
            for alert_id in ids:
                try:
                    alerts.act(conn, settings, alert_id, action, server.clock.now(), actor=who,
                               owner=form.get("owner", ""), until=until, note=form.get("note", ""))
                    done += 1
                except alerts.ActionError as exc:
                    if exc.status == 400:
                        raise
                    failed += 1
        return f"{action}: {done} alert{'s' if done != 1 else ''}" + (f", {failed} not found" if failed else "")

    async def bulk(req: web.Request) -> web.StreamResponse:
        form = await req.post()
        back = _local_url(str(form.get("back", "")), "/worklist")
        action = str(form.get("action", ""))
        ids = sorted({int(str(v)) for v in form.getall("alert", []) if str(v).isdigit()})
        if action not in BULK_ACTIONS:
            done = f"error: bulk action must be one of {', '.join(BULK_ACTIONS)}"
        elif not ids:
            done = "error: select at least one row"
        else:
            try:
                done = await asyncio.to_thread(_bulk, ids, action, {k: str(v) for k, v in form.items()}, actor(req))
            except alerts.ActionError as exc:
                done = f"error: {exc} (nothing changed)"
            except ValueError:
                done = "error: until must be a date (nothing changed)"
        sep = "&" if "?" in back else "?"
        return _see_other(f"{back}{sep}done={quote(done[:160])}")

    # -- referral page --------------------------------------------------------------------------------
    def _referral(key: str, who: str) -> dict[str, Any] | None:
        now = server.clock.now()
        with engine().begin() as conn:
            rid = repo.resolve_key(conn, key)
            if rid is None:
                return None
            doc = repo.referral_json(conn, rid, now)
            if doc is None:
                return None
            ctx = referral_context(conn, settings, rid, doc, now)
            audit.record(conn, now=now, actor=who, action="view", target=f"referral:{rid}", detail="workspace")
        return ctx

    async def referral_page(req: web.Request) -> web.Response:
        ctx = await asyncio.to_thread(_referral, req.match_info["id"], actor(req))
        if ctx is None:
            return web.Response(text="no such referral", status=404)
        html = env.get_template("referral.html").render(flash=req.query.get("done", ""), actions=alerts.ACTIONS,
                                                        person=req.get(identity.REQUEST_KEY, ""), **ctx)
        return web.Response(text=html, content_type="text/html")

    def _act(rid_key: str, form: dict[str, str], who: str) -> str:
        action = form.get("action", "")
        if not form.get("alert", "").isdigit():
            return "error: no alert chosen"
        alert_id = int(form["alert"])
        try:
            until = _parse_until(form.get("until", ""), zone)
        except ValueError:
            return "error: until must be a date"
        try:
            with engine().begin() as conn:
                row = conn.execute(select(alerts.ALERTS.c.referral_id).where(alerts.ALERTS.c.id == alert_id)).first()
                if row is None or str(row.referral_id) != rid_key:
                    return "error: that alert is not this referral's"
                alerts.act(conn, settings, alert_id, action, server.clock.now(), actor=who,
                           note=form.get("note", ""), until=until, owner=form.get("owner", ""),
                           reason=form.get("reason", ""))
        except alerts.ActionError as exc:
            return f"error: {exc}"
        return f"{EVENT_WORDS.get('alert_' + action, action)}"

    async def referral_action(req: web.Request) -> web.StreamResponse:
        key = req.match_info["id"]
        if not key.isdigit():
            return web.Response(text="bad referral id", status=400)
        form = {k: str(v) for k, v in (await req.post()).items()}
        done = await asyncio.to_thread(_act, key, form, actor(req))
        return _see_other(f"/referrals/{key}?done={quote(done[:160])}#clock")

    # -- weekly review and the leak list ---------------------------------------------------------------
    def _weekly(weeks_back: int) -> dict[str, Any]:
        with engine().connect() as conn:
            return weekly.review(conn, settings, server.clock.now(), zone, weeks_back=weeks_back)

    async def weekly_page(req: web.Request) -> web.Response:
        try:
            back = max(0, min(int(req.query.get("weeks_back", "0") or 0), 520))
        except ValueError:
            return web.Response(text="weeks_back must be a number", status=400)
        doc = await asyncio.to_thread(_weekly, back)
        html = env.get_template("weekly.html").render(w=doc, weeks_back=back)
        return web.Response(text=html, content_type="text/html")

    def _leaks_csv(query: Any) -> str:
        from refloop import report as rp

        now = server.clock.now()
        params = rq.default_params(now, start=query.get("from") or None, end=query.get("to") or None,
                                   filters={k: query.get(k, "") for k in rp.FILTER_FIELDS})
        with engine().connect() as conn:
            doc = rq.build_report(conn, params, windows_from_settings(settings.stall))
        cols = ("referral_id", "placer_id", "status", "stage", "age_days", "overdue_days", "referred_to",
                "specialty", "priority", "sent_at")
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(cols), extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(doc["leaks"])
        return out.getvalue()

    async def leaks_csv(req: web.Request) -> web.Response:
        try:
            body = await asyncio.to_thread(_leaks_csv, req.query)
        except ValueError as exc:
            return web.Response(text=f"bad query: {exc}", status=400)
        return web.Response(text=body, content_type="text/csv", charset="utf-8",
                            headers={"Content-Disposition": 'attachment; filename="leaks.csv"'})

    # -- JSON API -----------------------------------------------------------------------------------
    def _api_page(f: wv.Filters, after: str, limit: int) -> wv.Page:
        with engine().connect() as conn:
            return wv.page(conn, settings, server.clock.now(), f, after=after, limit=limit, with_counts=False)

    async def api_worklist(req: web.Request) -> web.Response:
        """A JSON list (one page); the next page's URL is in the ``Link: <...>; rel="next"`` header."""
        try:
            f = filters(req)
            limit = int(req.query.get("limit", str(wv.PAGE_MAX)))
            p = await asyncio.to_thread(_api_page, f, req.query.get("after", ""), limit)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        headers = {}
        if p.next_cursor:
            nxt = urlencode({**f.query(), "limit": str(limit), "after": p.next_cursor})
            headers["Link"] = f'</api/worklist?{nxt}>; rel="next"'
        return web.json_response(p.rows, headers=headers)

    def _api_counts(f: wv.Filters) -> dict[str, Any]:
        with engine().connect() as conn:
            p = wv.page(conn, settings, server.clock.now(), f, limit=1)
        return {"filters": f.query(), "total": p.total, **p.counts}

    async def api_counts(req: web.Request) -> web.Response:
        try:
            doc = await asyncio.to_thread(_api_counts, filters(req))
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(doc)

    app.add_routes([
        web.get("/worklist", worklist_page),
        web.get("/worklist.csv", worklist_csv),
        web.post("/worklist/bulk", bulk),
        web.get("/referrals/{id}", referral_page),
        web.post("/referrals/{id}/act", referral_action),
        web.get("/weekly", weekly_page),
        web.get("/leaks.csv", leaks_csv),
        web.get("/api/worklist", api_worklist),
        web.get("/api/worklist/counts", api_counts),
    ])


def referral_context(conn: Connection, settings: Settings, rid: int, doc: dict[str, Any], now: datetime
                     ) -> dict[str, Any]:
    """What the referral page shows: the clock first, then the details, the timeline with who did what."""
    ref = conn.execute(select(alerts.REFERRALS).where(alerts.REFERRALS.c.id == rid)).one()
    windows = windows_from_settings(settings.stall)
    open_alerts = list(conn.execute(select(alerts.ALERTS).where(
        alerts.ALERTS.c.referral_id == rid, alerts.ALERTS.c.open_key == 0).order_by(alerts.ALERTS.c.id)))
    clocks = []
    for a in open_alerts:
        clock = wv.clock_view(settings, windows, a.stage, a, ref, now)
        clocks.append({"alert": a, "level_name": level_name(settings.stall, int(a.level)), **clock})
    stage = STATUS_STAGE.get(doc["status"])
    current = wv.clock_view(settings, windows, stage, None, ref, now) if stage else None
    if current is not None and current["started_at"] is not None:
        current["in_stage_days"] = (now - current["started_at"]).total_seconds() / 86400
    entries = timeline(conn, rid, doc)
    hold = None
    for e in entries:  # the fold's rule: a hold lasts from hold_started to the next hold_ended
        if e["event"] == "hold_started":
            hold = e
        elif e["event"] == "hold_ended":
            hold = None
    return {"ref": doc, "stage": stage, "current": current, "clocks": clocks, "timeline": entries, "hold": hold,
            "business_days": settings.stall.business_days}


def timeline(conn: Connection, rid: int, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The fold's timeline, each entry with the journal message behind it (for ``/messages/{id}``) and, for
    coordinator actions, who did it and what (from the manual event's data)."""
    rows = repo.load_events(conn, rid)
    pool: dict[tuple[str, str, str], list[Any]] = {}
    for r in rows:
        key = (repo.iso(repo.aware(r.occurred_at)) or "", r.kind, r.control_id or "")
        pool.setdefault(key, []).append(r)
    out = []
    for t in doc["timeline"]:
        entry = dict(t)
        found = pool.get((t["at"] or "", t["event"], t["control_id"] or ""), [])
        row = found.pop(0) if found else None
        entry["message_id"] = row.message_id if row is not None else None
        entry["actor"] = entry["what"] = ""
        if row is not None and row.message_id is None:
            try:
                data = json.loads(row.data or "{}")
            except ValueError:
                data = {}
            entry["actor"] = str(data.get("actor", ""))
            action = str(data.get("action", ""))
            parts = [EVENT_WORDS.get(f"alert_{action}", action.replace("_", " ")) if action else ""]
            for label, k in (("to", "owner"), ("until", "until"), ("until", "resume_at"), ("reason", "reason"),
                             ("note", "note"), ("answer", "answer")):
                if data.get(k):
                    parts.append(f"{label}: {data[k]}")
            entry["what"] = "; ".join(p for p in parts if p)
        out.append(entry)
    return out
