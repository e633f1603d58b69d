"""The coordinator's workspace without a browser: the worklist view's filters, sort and keyset pages against
a plain Python reading of every open alert, the weekly figures against the cohort report, the CSV exports
against the API, and per-user identity (POST login, Secure cookie, the user header only from a trusted proxy).

One simulated store (a year of 160 referrals sent over MLLP to a real daemon, then one stall scan) is built
per module and copied for each test that writes, so each test starts from the same state.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from refloop import simulate as sim
from refloop.clock import FixedClock
from refloop.config import DatabaseSettings, Settings
from refloop.config.notify import WorklistSettings
from refloop.config.windows import windows_from_settings
from refloop.notify import policy
from refloop.store import alerts, weekly
from refloop.store import referrals as repo
from refloop.store import report_queries as rq
from refloop.store import scan as stall_scan
from refloop.store import worklist_view as wv
from refloop.store.engine import make_engine
from refloop.store.models import AuditEntry
from tests.utils import make_settings, running_daemon

NOW = datetime(2026, 10, 1, tzinfo=UTC)
OWNERS = WorklistSettings(mode="active", owners=("specialty:CARD=alice", "specialty:DERM=bob", "specialty:ORTH=carol"),
                          relationship_modes=("PRACTICE1>*=observe", "PRACTICE2>DERM=observe"))


def settings_for(url: str, **http: Any) -> Settings:
    s = make_settings(url)
    return dataclasses.replace(s, worklist=OWNERS, http=dataclasses.replace(s.http, **http))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("store") / "refloop.db"
    url = f"sqlite:///{path}"
    run = sim.Simulation(160, seed=11, now=NOW).build()
    with running_daemon(settings_for(url)) as d:
        sim.send(run, "127.0.0.1", d.port)
        assert d.server.engine is not None
        stall_scan.run_scan(d.server.engine, d.server.settings, NOW)
    return path


@pytest.fixture
def store(built: Path, tmp_path: Path) -> str:
    path = tmp_path / "refloop.db"
    shutil.copy(built, path)
    return f"sqlite:///{path}"


@pytest.fixture
def conn_of(store: str) -> Iterator[Any]:
    engine = make_engine(DatabaseSettings(url=store))
    try:
        yield engine
    finally:
        engine.dispose()


def everything(conn: Any, settings: Settings) -> list[dict[str, Any]]:
    """Every unresolved alert read plainly (no view code), earliest due instant first, as the oracle."""
    rows = conn.execute(select(alerts.ALERTS, alerts.REFERRALS.c.authority, alerts.REFERRALS.c.priority,
                               alerts.REFERRALS.c.specialty, alerts.REFERRALS.c.referred_to,
                               alerts.REFERRALS.c.referred_to_id)
                        .join(alerts.REFERRALS, alerts.REFERRALS.c.id == alerts.ALERTS.c.referral_id)
                        .where(alerts.ALERTS.c.open_key == 0)).all()
    from refloop import stall

    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    out = [{"alert_id": r.id, "stage": r.stage, "level": r.level, "owner": r.owner, "status": r.status,
            "due": repo.aware(r.due_at) or epoch, "specialty": r.specialty, "practice": r.authority,
            "priority": stall.priority_class(r.priority or ""),
            "mode": policy.mode_for(settings.worklist, policy.Parties.of(r))} for r in rows]
    return sorted(out, key=lambda x: (x["due"], x["alert_id"]))  # earliest due (longest overdue) first


def test_keyset_pages_filters_and_counts_match_a_plain_reading(conn_of: Any, store: str) -> None:
    settings = settings_for(store)
    with conn_of.connect() as conn:
        truth = [x for x in everything(conn, settings) if x["status"] in ("open", "acknowledged")]
        assert len(truth) > 40, "the simulated year should leave plenty of stalled referrals"
        owners = {x["owner"] for x in truth}
        assert {"alice", "bob", "coordinator"} <= owners
        assert {x["mode"] for x in truth} == {"observe", "active"}
        # every page of 7, cursor to cursor, is the whole list in order, nothing twice
        f = wv.Filters.from_query({"owner": ""})
        seen: list[int] = []
        after = ""
        for _ in range(100):
            p = wv.page(conn, settings, NOW, f, after=after, limit=7)
            assert len(p.rows) <= 7
            seen += [r["alert_id"] for r in p.rows]
            after = p.next_cursor
            if not after:
                break
        assert seen == [x["alert_id"] for x in truth]
        assert [r["alert_id"] for r in wv.iterate(conn, settings, NOW, f, batch=5)] == seen
        # each filter narrows to exactly what the plain reading says
        cases = [({"owner": "alice"}, lambda x: x["owner"] == "alice"),
                 ({"owner": "", "stage": "visit"}, lambda x: x["stage"] == "visit"),
                 ({"owner": "", "level": "2"}, lambda x: x["level"] == 2),
                 ({"owner": "", "priority": "routine"}, lambda x: x["priority"] == "routine"),
                 ({"owner": "", "specialty": "derm"}, lambda x: x["specialty"] == "DERM"),
                 ({"owner": "", "practice": "PRACTICE2"}, lambda x: x["practice"] == "PRACTICE2"),
                 ({"owner": "", "mode": "observe"}, lambda x: x["mode"] == "observe"),
                 ({"owner": "bob", "mode": "active"}, lambda x: x["owner"] == "bob" and x["mode"] == "active")]
        for query, keep in cases:
            view = wv.Filters.from_query(query)
            got = [r["alert_id"] for r in wv.iterate(conn, settings, NOW, view, batch=4)]
            want = [x["alert_id"] for x in truth if keep(x)]
            assert got == want, query
            assert wv.page(conn, settings, NOW, view).total == len(want), query
        # counts per stage and level ignore the stage/level filters (each count is a click away)
        p = wv.page(conn, settings, NOW, wv.Filters.from_query({"owner": "", "stage": "visit"}))
        assert sum(p.counts["stage"].values()) == len(truth)
        assert p.counts["stage"].get("visit", 0) == p.total
        assert sum(p.counts["level"].values()) == len(truth)
        # other sorts page without loss as well
        for sort in ("level", "priority", "raised"):
            view = wv.Filters.from_query({"owner": "", "sort": sort})
            ids = [r["alert_id"] for r in wv.iterate(conn, settings, NOW, view, batch=6)]
            assert sorted(ids) == sorted(seen), sort
            if sort == "priority":
                ranks = [{"stat": 0, "urgent": 1, "routine": 2}[r["priority"]]
                         for r in wv.iterate(conn, settings, NOW, view)]
                assert ranks == sorted(ranks)
        with pytest.raises(ValueError):
            wv.Filters.from_query({"stage": "lunch"})
        with pytest.raises(ValueError):
            wv.page(conn, settings, NOW, f, after="not-a-cursor")


def test_owner_defaults_to_the_person_and_survives_as_everyone() -> None:
    assert wv.Filters.from_query({}, default_owner="alice").owner == "alice"
    assert wv.Filters.from_query({"owner": ""}, default_owner="alice").owner == ""
    assert wv.Filters.from_query({"owner": ""}).query() == {"owner": ""}
    f = wv.Filters.from_query({"owner": "bob", "stage": "note", "sort": "level"})
    assert wv.Filters.from_query(f.query()) == f


def test_weekly_figures_add_up_to_the_report(conn_of: Any, store: str) -> None:
    """Milestones counted week by week over the whole simulated year sum to the cohort report's totals for
    the same dates; each week's new leaks are the report's leak list at its end less the one at its start."""
    settings = settings_for(store)
    windows = windows_from_settings(settings.stall)
    zone = weekly.ZoneInfo("UTC")
    with conn_of.begin() as conn:
        # the one scan ran at NOW, after every completion: give some completed referrals an earlier (resolved)
        # alert, and one a later one, so "recovered" has cases on both sides of its rule
        done = conn.execute(select(alerts.REFERRALS.c.id, alerts.REFERRALS.c.completed_at).where(
            alerts.REFERRALS.c.completed_at.is_not(None)).order_by(alerts.REFERRALS.c.id).limit(13)).all()
        for i, (rid, completed) in enumerate(done):
            at = completed + timedelta(days=-4 if i % 4 else 2)
            aid = conn.execute(alerts.ALERTS.insert().values(
                referral_id=rid, stage="visit", level=1, status="resolved", owner="alice", overdue_days=1.0,
                raised_at=at, resolved_at=completed, last_action="auto_resolved", open_key=0)).inserted_primary_key[0]
            conn.execute(alerts.ALERTS.update().where(alerts.ALERTS.c.id == aid).values(open_key=aid))
            repo.mark(conn, [rid], at)  # what raising the alert keeps on the referral row
    with conn_of.connect() as conn:
        first = weekly.week_start(NOW - timedelta(days=400), zone)
        stop = weekly.week_start(NOW, zone) + timedelta(days=7)
        report = rq.build_report(conn, rq.ReportParams(start=first, end=stop, now=stop), windows)
        sums = dict.fromkeys(weekly.FIGURES, 0)
        start = first
        while start < stop:
            week = _milestones_only(conn, start, start + timedelta(days=7))
            for k in ("sent", "scheduled", "completed", "closed", "recovered"):
                sums[k] += week[k]
            start += timedelta(days=7)
        t = report["totals"]
        assert sums["sent"] == t["sent"] > 100
        assert sums["scheduled"] == report["rates"]["scheduled"]["num"]
        assert sums["completed"] == report["rates"]["completed"]["num"]
        assert sums["closed"] == t["closed"]
        assert sums["recovered"] == report["rates"]["recovered"]["num"] == 9
        # one recent week in full: by owner and by specialty add up to the totals; new leaks as the report says
        # the most recent week (at least ~3 weeks back, so leaks have had time to show) in which referrals were sent
        back = 20
        while True:
            a = weekly.week_start(NOW - timedelta(days=back), zone)
            b = a + timedelta(days=7)
            week = weekly.figures(conn, settings, a, b)
            if (week["totals"]["sent"] > 0 and week["totals"]["new_leaks"] > 0) or back > 200:
                break
            back += 7
        assert {k: week["totals"][k] for k in ("sent", "scheduled", "completed", "closed", "recovered")} == \
            _milestones_only(conn, a, b)
        for k in weekly.FIGURES:
            assert sum(v[k] for v in week["by_owner"].values()) == week["totals"][k]
            assert sum(v[k] for v in week["by_specialty"].values()) == week["totals"][k]
        cohort = rq.ReportParams(start=first, end=b, now=b, leak_limit=100_000)
        at_end = {x["referral_id"] for x in rq.build_report(conn, cohort, windows)["leaks"]}
        at_start = {x["referral_id"] for x in rq.build_report(
            conn, dataclasses.replace(cohort, end=a, now=a), windows)["leaks"]}  # what was sent by then
        assert {x["referral_id"] for x in week["new_leaks"]} == at_end - at_start
        assert week["totals"]["new_leaks"] == len(at_end - at_start) > 0
        assert week["totals"]["sent"] > 0


def _milestones_only(conn: Any, start: datetime, end: datetime) -> dict[str, int]:
    """One week's milestone figures through weekly.figures' own query, checked against a plain Python count."""
    rows = weekly._activity(conn, start, end)

    def inside(v: Any) -> bool:
        m = v if isinstance(v, datetime) or v is None else datetime.fromisoformat(v)
        m = m.replace(tzinfo=UTC) if m is not None and m.tzinfo is None else m
        return m is not None and start <= m < end

    return {"sent": sum(inside(r.sent_at) for r in rows), "scheduled": sum(inside(r.scheduled_at) for r in rows),
            "completed": sum(inside(r.completed_at) for r in rows),
            "closed": sum(r.status == "closed" and inside(r.closed_at) for r in rows),
            "recovered": sum(bool(r.marked) and inside(r.completed_at) for r in rows)}


def _get(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=20) as resp:
            return resp.status, resp.read().decode(), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), err.headers


def test_csv_exports_parse_and_match_the_api(store: str) -> None:
    import json

    with running_daemon(settings_for(store), clock=FixedClock(NOW)) as d:
        query = "owner=&stage=visit&sort=level"
        status, body, _ = _get(d.http_port, f"/worklist.csv?{query}")
        assert status == 200
        rows = list(csv.DictReader(io.StringIO(body)))
        api: list[dict[str, Any]] = []
        path = f"/api/worklist?{query}&limit=9"
        for _ in range(50):  # follow the Link: rel="next" pages
            status, text, headers = _get(d.http_port, path)
            assert status == 200
            api += json.loads(text)
            link = headers.get("Link", "")
            if not link:
                break
            path = link.split(">", 1)[0].lstrip("<")
        assert rows and [int(r["alert_id"]) for r in rows] == [a["alert_id"] for a in api]
        assert all(r["stage"] == "visit" for r in rows)
        assert [(r["owner"], r["level_name"], r["due_at"]) for r in rows] == [
            (a["owner"], a["level_name"], a["due_at"] or "") for a in api]
        status, counts, _ = _get(d.http_port, f"/api/worklist/counts?{query}")
        assert json.loads(counts)["total"] == len(rows)
        status, body, _ = _get(d.http_port, "/leaks.csv?from=2025-09-01&to=2026-10-02")
        leaks = list(csv.DictReader(io.StringIO(body)))
        status, report = d.get("/api/report?from=2025-09-01&to=2026-10-02")
        assert [int(x["referral_id"]) for x in leaks] == [x["referral_id"] for x in report["leaks"]]
        assert len(leaks) == report["totals"]["leaks"] > 0
        assert _get(d.http_port, "/api/worklist?stage=lunch")[0] == 400


def _post(port: int, path: str, form: dict[str, Any], headers: dict[str, str] | None = None
          ) -> tuple[int, str, Any]:
    data = urllib.parse.urlencode(form, doseq=True).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST",
                                 headers={"Content-Type": "application/x-www-form-urlencoded", **(headers or {})})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kw: Any) -> None:
            return None

    opener = urllib.request.build_opener(NoRedirect)
    try:
        with opener.open(req, timeout=20) as resp:
            return resp.status, resp.read().decode(), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode(), err.headers


def test_login_is_a_post_and_the_cookie_is_secure_behind_https(store: str) -> None:
    with running_daemon(settings_for(store, token="s3cret")) as d:
        port = d.http_port
        status, _, headers = _get(port, "/worklist", {"Accept": "text/html"})
        assert status == 200 and "Sign in" in _  # followed the 303 to the login form
        assert _get(port, "/api/worklist")[0] == 401
        assert _get(port, "/login?token=s3cret")[0] == 400  # a secret in a URL is refused, never used
        assert _post(port, "/login", {"token": "nope"})[0] == 401
        status, _, headers = _post(port, "/login", {"token": "s3cret"})
        assert status == 303 and "s3cret" not in headers["Location"]
        cookie = headers["Set-Cookie"]
        assert "refloop_token=s3cret" in cookie and "HttpOnly" in cookie and "Secure" not in cookie
        # behind a trusted proxy that terminated TLS, "auto" sets Secure
        status, _, headers = _post(port, "/login", {"token": "s3cret"}, {"X-Forwarded-Proto": "https"})
        assert status == 303 and "Secure" in headers["Set-Cookie"]
        # a form posted from another site is refused (CSRF), one from this site is not
        evil = {"Cookie": "refloop_token=s3cret", "Origin": "http://evil.example"}
        assert _post(port, "/worklist/bulk", {"action": "acknowledge", "alert": "1"}, evil)[0] == 403
        same = {"Cookie": "refloop_token=s3cret", "Origin": f"http://127.0.0.1:{port}"}
        assert _post(port, "/worklist/bulk", {"action": "acknowledge"}, same)[0] == 303
        status, body, _ = _get(port, "/worklist?owner=", {"Cookie": "refloop_token=s3cret"})
        assert status == 200 and "Worklist" in body
    with running_daemon(settings_for(store, token="s3cret", trusted_proxies=("10.9.9.9/32",))) as d:
        status, _, headers = _post(d.http_port, "/login", {"token": "s3cret"}, {"X-Forwarded-Proto": "https"})
        assert "Secure" not in headers["Set-Cookie"], "an untrusted peer cannot claim https"
    with running_daemon(settings_for(store, token="s3cret", cookie_secure="on")) as d:
        assert "Secure" in _post(d.http_port, "/login", {"token": "s3cret"})[2]["Set-Cookie"]


def test_user_header_names_the_person_only_from_a_trusted_proxy(store: str) -> None:
    engine = make_engine(DatabaseSettings(url=store))
    with engine.connect() as conn:
        [first] = wv.page(conn, settings_for(store), NOW, wv.Filters.from_query({"owner": ""}), limit=1).rows
    aid, rid = first["alert_id"], first["referral"]
    who = {"X-Forwarded-User": "dana.r"}
    with running_daemon(settings_for(store, user_header="X-Forwarded-User"), clock=FixedClock(NOW)) as d:
        status, body, _ = _get(d.http_port, "/worklist", who)
        assert status == 200 and "Worklist of dana.r" in body  # the owner filter defaults to the person
        status, _, headers = _post(d.http_port, f"/referrals/{rid}/act",
                                   {"alert": aid, "action": "note", "note": "called the clinic"}, who)
        assert status == 303 and headers["Location"].startswith(f"/referrals/{rid}?done=")
        status, body, _ = _get(d.http_port, f"/referrals/{rid}", who)
        assert status == 200 and "dana.r" in body and "called the clinic" in body
    with running_daemon(settings_for(store, user_header="X-Forwarded-User", trusted_proxies=("10.9.9.9/32",)),
                        clock=FixedClock(NOW)) as d:
        status, body, _ = _get(d.http_port, "/worklist", who)
        assert "Worklist of dana.r" not in body
        _post(d.http_port, f"/referrals/{rid}/act", {"alert": aid, "action": "acknowledge"}, who)
    with engine.connect() as conn:
        acts = [(a.actor, a.action) for a in conn.execute(
            select(AuditEntry.actor, AuditEntry.action).where(AuditEntry.action.like("alert_%")))]
    engine.dispose()
    assert acts == [("dana.r", "alert_note"), ("dashboard@127.0.0.1", "alert_acknowledge")]


def test_cli_worklist_and_weekly_match_the_pages(store: str) -> None:
    """`refloop worklist` takes the page's filters and gives the API's rows; `refloop report --weekly` gives the
    weekly page's figures; a bad filter is a one-line usage error (exit 2)."""
    import json

    from tests.test_scan import refloop_cli

    env = {"REFLOOP_WORKLIST_OWNERS": ",".join(OWNERS.owners), "REFLOOP_WORKLIST_MODE": "active",
           "REFLOOP_WORKLIST_RELATIONSHIP_MODES": ",".join(OWNERS.relationship_modes)}
    out = refloop_cli(store, "worklist", "--stage", "visit", "--mode", "active", "--sort", "priority", "--json",
                      "--as-of", NOW.isoformat(), env=env)
    assert out.returncode == 0, out.stderr
    cli = json.loads(out.stdout)
    with running_daemon(settings_for(store), clock=FixedClock(NOW)) as d:
        status, api = d.get("/api/worklist?owner=&stage=visit&mode=active&sort=priority")
    assert status == 200 and cli == api and cli
    out = refloop_cli(store, "worklist", "--stage", "visit", "--mode", "active", "--sort", "priority", "--json",
                      "--limit", "5", "--as-of", NOW.isoformat(), env=env)
    cursor = out.stderr.strip().rsplit(" ", 1)[-1]
    assert cursor.startswith("--after=")
    rest = refloop_cli(store, "worklist", "--stage", "visit", "--mode", "active", "--sort", "priority", "--json",
                       "--limit", "500", "--as-of", NOW.isoformat(), cursor, env=env)
    assert json.loads(out.stdout) + json.loads(rest.stdout) == cli
    out = refloop_cli(store, "worklist", "--level", "seven", env=env)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    out = refloop_cli(store, "report", "--weekly", "--weeks-back", "3", "--now", NOW.isoformat(), "--format", "json",
                      env=env)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    engine = make_engine(DatabaseSettings(url=store))
    with engine.connect() as conn:
        want = weekly.review(conn, settings_for(store), NOW, weekly.ZoneInfo("UTC"), weeks_back=3)
    engine.dispose()
    assert doc["this_week"]["totals"] == want["this_week"]["totals"]
    assert doc["last_week"]["by_owner"] == want["last_week"]["by_owner"]
    out = refloop_cli(store, "report", "--weekly", "--now", NOW.isoformat(), "--format", "csv", env=env)
    rows = list(csv.DictReader(io.StringIO(out.stdout)))
    assert rows[0]["group"] == "total" and {"sent", "last_sent", "new_leaks"} <= set(rows[0])


def test_through_a_reverse_proxy_the_audit_log_names_the_person(store: str) -> None:
    """The docs' recipe, played by a real HTTP reverse proxy on loopback: it authenticates the person (HTTP
    Basic here), drops any X-Forwarded-User the client sent, sets its own and X-Forwarded-Proto: https, and
    adds the bearer token; refloop then names the person in the audit log and sets a Secure cookie."""
    import asyncio
    import base64
    import threading

    from aiohttp import ClientSession, web

    engine = make_engine(DatabaseSettings(url=store))
    with engine.connect() as conn:
        [first] = wv.page(conn, settings_for(store), NOW, wv.Filters.from_query({"owner": ""}), limit=1).rows
    users = {"erin": "pw1"}
    settings = settings_for(store, token="s3cret", user_header="X-Forwarded-User")
    with running_daemon(settings, clock=FixedClock(NOW)) as d:
        upstream = f"http://127.0.0.1:{d.http_port}"

        async def proxy(req: web.Request) -> web.StreamResponse:
            user, _, password = base64.b64decode(req.headers.get("Authorization", "Basic Og==")[6:]).decode() \
                .partition(":")
            if users.get(user) != password:
                return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="refloop"'})
            headers = {k: v for k, v in req.headers.items()
                       if k.lower() not in ("host", "authorization", "x-forwarded-user", "x-forwarded-proto")}
            headers.update({"X-Forwarded-User": user, "X-Forwarded-Proto": "https",
                            "Authorization": "Bearer s3cret"})
            async with ClientSession() as s, s.request(req.method, upstream + req.path_qs, headers=headers,
                                                       data=await req.read(), allow_redirects=False) as up:
                body = await up.read()
                out = {k: v for k, v in up.headers.items() if k.lower() in ("content-type", "location", "set-cookie")}
                return web.Response(status=up.status, body=body, headers=out)

        loop = asyncio.new_event_loop()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", proxy)
        runner = web.AppRunner(app)
        loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        loop.run_until_complete(site.start())
        port = runner.addresses[0][1]
        thread = threading.Thread(target=loop.run_forever, daemon=True)
        thread.start()
        try:
            auth = {"Authorization": "Basic " + base64.b64encode(b"erin:pw1").decode()}
            assert _get(port, "/worklist")[0] == 401
            spoof = {**auth, "X-Forwarded-User": "mallory"}
            status, body, _ = _get(port, "/worklist", spoof)
            assert status == 200 and "Worklist of erin" in body
            status, _, headers = _post(port, f"/referrals/{first['referral']}/act",
                                       {"alert": first["alert_id"], "action": "acknowledge"}, spoof)
            assert status == 303
            status, _, headers = _post(port, "/login", {"token": "s3cret"}, auth)
            assert status == 303 and "Secure" in headers["Set-Cookie"]
            # the JSON API too: the person from the proxy beats an "actor" in the body
            req = urllib.request.Request(f"http://127.0.0.1:{port}/api/alerts/{first['alert_id']}/note",
                                         data=b'{"note": "left a message", "actor": "someone"}', method="POST",
                                         headers={**auth, "Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=20) as resp:
                assert resp.status == 200
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.run_until_complete(runner.cleanup())
            loop.close()
    with engine.connect() as conn:
        acts = [(a.actor, a.action) for a in conn.execute(
            select(AuditEntry.actor, AuditEntry.action).where(AuditEntry.action.like("alert_%")))]
        reads = {a for (a,) in conn.execute(select(AuditEntry.actor).where(AuditEntry.action == "view"))}
    engine.dispose()
    assert acts == [("erin", "alert_acknowledge"), ("erin", "alert_note")] and "mallory" not in reads


def test_view_on_both_databases(db_url: str) -> None:
    """The SQL forms of the priority class and the rollout mode, and the keyset cursor, on SQLite and
    PostgreSQL: every filter and sort pages to exactly what a plain reading gives."""
    from bench.worklist_paging import build

    build(db_url, 300)
    settings = dataclasses.replace(settings_for(db_url), worklist=WorklistSettings(
        mode="active", relationship_modes=("PRACTICE1>*=observe", "PRACTICE2>DERM=observe", "*>CARD=observe")))
    engine = make_engine(DatabaseSettings(url=db_url))
    try:
        with engine.connect() as conn:
            truth = [x for x in everything(conn, settings) if x["status"] in ("open", "acknowledged")]
            assert {x["priority"] for x in truth} == {"stat", "urgent", "routine"}
            cases = [({}, lambda x: True), ({"priority": "stat"}, lambda x: x["priority"] == "stat"),
                     ({"mode": "observe"}, lambda x: x["mode"] == "observe"),
                     ({"level": "3+"}, lambda x: x["level"] >= 3),
                     ({"owner": "owner3"}, lambda x: x["owner"] == "owner3")]
            for query, keep in cases:
                view = wv.Filters.from_query({"owner": "", **query})
                got = [r["alert_id"] for r in wv.iterate(conn, settings, NOW, view, batch=13)]
                assert got == [x["alert_id"] for x in truth if keep(x)], query
            rank = {"stat": 0, "urgent": 1, "routine": 2}
            view = wv.Filters.from_query({"owner": "", "sort": "priority"})
            by_priority = list(wv.iterate(conn, settings, NOW, view, batch=11))
            assert len(by_priority) == len(truth)
            assert [(rank[r["priority"]], r["due_at"]) for r in by_priority] == sorted(
                (rank[r["priority"]], r["due_at"]) for r in by_priority)
            # the weekly SQL on this backend: sent counts per week add up to the report's, as on SQLite
            a, b = weekly.week_start(NOW - timedelta(days=300), weekly.ZoneInfo("UTC")), NOW
            sent, start = 0, a
            while start < b:
                sent += weekly.figures(conn, settings, start, min(start + timedelta(days=7), b))["totals"]["sent"]
                start += timedelta(days=7)
            windows = windows_from_settings(settings.stall)
            report = rq.build_report(conn, rq.ReportParams(start=a, end=b, now=b), windows)
            assert sent == report["totals"]["sent"] == 300
    finally:
        engine.dispose()
