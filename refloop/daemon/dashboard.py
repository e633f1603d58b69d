"""The coordinator dashboard: server-rendered HTML on the daemon's HTTP listener, plus ``GET /api/report``.

Why server-rendered: the dashboard must work from a locked-down clinical workstation, so there is no
CDN, no external font and no script needed to use it. Charts are inline SVG with a real ``<table>``
behind each one (screen readers and copy-paste get the numbers), and every action is a plain HTML form
that posts to a ``/dashboard/...`` route and redirects back (post/redirect/get), so keyboard and
no-script use work. Forms call the same store functions as the JSON API, so both behave the same.
Every page that shows referral detail is audited (``action="view"``); the report page lists IDs and
provider names only, never patient data.

``GET /login`` shows a form; ``POST /login`` checks the token from the form body (never the URL, which
ends up in proxy logs and browser history) and sets the ``refloop_token`` cookie (HttpOnly,
SameSite=Strict, ``Secure`` per ``http.cookie_secure``) that the auth middleware in ``http.py`` accepts.
The coordinator's worklist, referral and weekly pages live in :mod:`refloop.daemon.workspace`.
"""

from __future__ import annotations

import asyncio
import hmac
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from jinja2 import Environment, FileSystemLoader, select_autoescape

from refloop.config.windows import windows_from_settings
from refloop.daemon import identity
from refloop.store import referrals as repo
from refloop.store import report_queries as rq

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from refloop.daemon.app import AppContext

COOKIE = "refloop_token"
#: The dashboard shows the most overdue few; the full list, filters and paging are on /worklist.
DASHBOARD_ROWS = 20
_HERE = Path(__file__).parent


def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(_HERE / "templates"), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters["pct"] = lambda r: "–" if r is None or r.get("rate") is None else f"{r['rate'] * 100:.1f}%"
    env.filters["num"] = lambda v: "–" if v is None else v
    return env


# -- charts: inline SVG (the numbers are always in a table next to them) --------------------------
def funnel(totals: dict[str, Any]) -> list[dict[str, Any]]:
    steps = [("Sent", totals["sent"]), ("Scheduled", totals["scheduled"]), ("Completed", totals["completed"]),
             ("Note received", totals["note_received"]), ("Closed", totals["closed"])]
    top = max(totals["sent"], 1)
    return [{"label": k, "value": v, "width": round(100 * v / top, 1)} for k, v in steps]


def trend(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Monthly loop-closure rate as an SVG polyline (viewBox 0..100 x 0..40)."""
    pts = [(g["key"], g["rates"]["loop_closure"]["rate"], g["totals"]["sent"]) for g in groups]
    n = len(pts)
    coords = []
    for i, (_, rate, _) in enumerate(pts):
        if rate is not None:
            x = 5 + (90 * i / max(n - 1, 1))
            coords.append(f"{x:.1f},{38 - 34 * rate:.1f}")
    return {"points": " ".join(coords), "rows": pts}


def histogram(width: int, counts: list[int]) -> list[dict[str, Any]]:
    """Days to close in equal-width bins (:func:`refloop.store.report_queries.close_bins`; bar heights as
    % of the tallest)."""
    top = max(counts, default=0) or 1
    return [{"label": f"{i * width}–{(i + 1) * width}", "count": c, "height": round(100 * c / top, 1)}
            for i, c in enumerate(counts)]


def add_routes(app: web.Application, server: AppContext) -> None:
    """Register the dashboard, its form actions, ``/login`` and ``GET /api/report``."""
    env = _env()

    def engine() -> Engine:
        assert server.engine is not None
        return server.engine

    def windows() -> Any:
        return windows_from_settings(server.settings.stall)

    def params(query: Any) -> rq.ReportParams:
        from refloop import report as rp

        now = datetime.fromisoformat(query["now"]) if query.get("now") else server.clock.now()
        now = (now if now.tzinfo else now.replace(tzinfo=UTC)).astimezone(UTC)
        filters = {k: query.get(k, "") for k in rp.FILTER_FIELDS}
        year = int(query["year"]) if query.get("year") else None
        return rq.default_params(now, start=query.get("from") or None, end=query.get("to") or None,
                                 by=query.get("by") or None, filters=filters, year=year)

    def _report(p: rq.ReportParams) -> dict[str, Any]:
        with engine().connect() as conn:
            return rq.build_report(conn, p, windows())

    async def api_report(req: web.Request) -> web.Response:
        try:
            p = params(req.query)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(await asyncio.to_thread(_report, p))

    def _dashboard(p: rq.ReportParams) -> dict[str, Any]:

        from refloop import report as rp
        from refloop.store import worklist_view

        with engine().connect() as conn:
            doc = rq.build_report(conn, p, windows())  # once per page; the charts read two small aggregates
            monthly = [{"key": key, "rates": {"loop_closure": rp.ratio(closed, sent)}, "totals": {"sent": sent}}
                       for key, sent, closed in rq.monthly(conn, p)]
            closing = rq.close_bins(conn, p)
            first = worklist_view.page(conn, server.settings, server.clock.now(), worklist_view.Filters(),
                                       limit=DASHBOARD_ROWS, with_counts=False)  # the worklist's own query
            work = first.rows + worklist_view.dead_letters(conn, server.settings)
            work_note = ""
            unmatched = repo.list_unmatched(conn)
        return {"r": doc, "funnel": funnel(doc["totals"]), "trend": trend(monthly), "hist": histogram(*closing),
                "work": work, "work_note": work_note, "unmatched": unmatched[:200],
                "actions": ("acknowledge", "snooze", "assign", "note", "close")}

    async def index(req: web.Request) -> web.Response:
        try:
            p = params(req.query)
        except ValueError as exc:
            return web.Response(text=f"bad query: {exc}", status=400)
        ctx = await asyncio.to_thread(_dashboard, p)
        html = env.get_template("dashboard.html").render(query=dict(req.query), flash=req.query.get("done", ""),
                                                         **ctx)
        return web.Response(text=html, content_type="text/html")

    def _act(alert_id: int, action: str, form: dict[str, str], actor: str) -> str:
        from refloop.store import alerts

        until = None
        if form.get("until"):
            until = datetime.fromisoformat(form["until"])
            until = until if until.tzinfo else until.replace(tzinfo=UTC)
        try:
            with engine().begin() as conn:
                alerts.act(conn, server.settings, alert_id, action, server.clock.now(), actor=actor,
                           note=form.get("note", ""), until=until, owner=form.get("owner", ""),
                           reason=form.get("reason", ""))
        except alerts.ActionError as exc:
            return f"error: {exc}"
        return f"{action} alert {alert_id}"

    async def alert_action(req: web.Request) -> web.StreamResponse:
        form = {k: str(v) for k, v in (await req.post()).items()}
        if not req.match_info["id"].isdigit():
            return web.Response(text="bad alert id", status=400)
        try:
            done = await asyncio.to_thread(_act, int(req.match_info["id"]), req.match_info["action"], form,
                                           _actor(req))
        except ValueError:
            done = "error: until must be an ISO date"
        return _see_other(f"/?done={_q(done)}#worklist")

    def _link(message_id: int, key: str, actor: str) -> str:
        with engine().begin() as conn:
            if repo.link_row(conn, message_id) is None:
                return "error: no such message"
            rid = repo.resolve_key(conn, key)
            if rid is None:
                return "error: no such referral"
            repo.manual_link(conn, message_id, rid, server.clock.now(), actor=actor)
        return f"linked message {message_id} to referral {rid}"

    def _unlink(message_id: int, actor: str) -> str:
        with engine().begin() as conn:
            repo.manual_unlink(conn, message_id, server.clock.now(), actor=actor)
        return f"unlinked message {message_id}"

    async def link(req: web.Request) -> web.StreamResponse:
        form = await req.post()
        mid = req.match_info["message_id"]
        if not mid.isdigit():
            return web.Response(text="bad message id", status=400)
        done = await asyncio.to_thread(_link, int(mid), str(form.get("referral", "")), _actor(req))
        return _see_other(f"/?done={_q(done)}#review")

    async def unlink(req: web.Request) -> web.StreamResponse:
        mid = req.match_info["message_id"]
        if not mid.isdigit():
            return web.Response(text="bad message id", status=400)
        done = await asyncio.to_thread(_unlink, int(mid), _actor(req))
        return _see_other(f"/?done={_q(done)}#review")

    resolver = identity.Resolver(server.settings.http)

    async def login_form(req: web.Request) -> web.Response:
        if "token" in req.query:  # an old bookmark: never accept a secret from a URL
            return web.Response(text="the token goes in the login form, not the URL", status=400)
        html = env.get_template("login.html").render(error="", needed=bool(server.settings.http.token))
        return web.Response(text=html, content_type="text/html")

    async def login(req: web.Request) -> web.StreamResponse:
        token = server.settings.http.token
        given = str((await req.post()).get("token", ""))
        if token and not hmac.compare_digest(given.encode(), token.encode()):
            html = env.get_template("login.html").render(error="That token is not right.", needed=True)
            return web.Response(text=html, content_type="text/html", status=401)
        resp = _see_other("/worklist")
        if token:
            secure = resolver.secure_cookie(resolver.identify(req))
            resp.set_cookie(COOKIE, token, httponly=True, samesite="Strict", path="/", secure=secure)
        return resp

    async def static(req: web.Request) -> web.StreamResponse:
        name = req.match_info["name"]
        path = _HERE / "static" / name
        if name not in {"dashboard.css", "dashboard.js"} or not path.is_file():
            return web.Response(status=404)
        ctype = "text/css" if name.endswith(".css") else "text/javascript"
        return web.Response(body=path.read_bytes(), content_type=ctype)

    app.add_routes([
        web.get("/", index),
        web.get("/api/report", api_report),
        web.post("/dashboard/alerts/{id}/{action}", alert_action),
        web.post("/dashboard/unmatched/{message_id}/link", link),
        web.post("/dashboard/unmatched/{message_id}/unlink", unlink),
        web.get("/login", login_form),
        web.post("/login", login),
        web.get("/static/{name}", static),
    ])


def _see_other(location: str) -> web.Response:
    """A 303 as a plain response: the auth middleware turns *raised* HTTP exceptions into JSON errors."""
    return web.Response(status=303, headers={"Location": location})


def _actor(req: web.Request) -> str:
    """Who acted, for the audit trail: the person from ``http.user_header`` (a trusted proxy's), else the
    remote address (refloop has no user accounts of its own)."""
    return identity.actor(req, f"dashboard@{req.remote or 'unknown'}")


def _q(text: str) -> str:
    from urllib.parse import quote

    return quote(text[:120])
