"""The worklist and coordinator actions: owners from config, most overdue first, acknowledge / snooze /
assign / note / close (each a timeline event and an audit row), answers from patients and practices
through the API and the signed callback, and the CLI front end."""

from __future__ import annotations

import json
import urllib.request
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from refloop import referral as rf
from refloop.clock import FixedClock
from refloop.config.notify import WorklistSettings
from refloop.notify.webhook import sign
from refloop.store import alerts
from refloop.store import referrals as repo
from refloop.store.models import AuditEntry
from tests.test_scan import T0, engine_for, new_referral, open_alerts, refloop_cli, scan, settings_for
from tests.utils import make_settings, running_daemon, work

OWNERS = WorklistSettings(mode="active", owners=("practice:CLINIC=alice", "specialty:NEURO=bob",
                                                 "referred_to:Heartwell Hana=carol"))


def timeline(engine: Any, rid: int) -> list[str]:
    with engine.connect() as conn:
        return [t["event"] for t in repo.referral_json(conn, rid, T0 + timedelta(days=60))["timeline"]]


def test_owners_from_config_and_most_overdue_first(db_url: str) -> None:
    """referred_to beats specialty beats practice; unmatched referrals go to the default owner; how
    overdue each is is computed when the worklist is read."""
    engine = engine_for(db_url)
    settings = settings_for(db_url, worklist=replace(OWNERS, owners=OWNERS.owners[:2]))
    a = new_referral(engine, "RA", sent=T0, specialty="CARD")
    b = new_referral(engine, "RB", sent=T0 - timedelta(days=5), specialty="NEURO")
    c = new_referral(engine, "RC", sent=T0 - timedelta(days=2), authority="OTHER")
    scan(engine, settings, T0 + timedelta(days=15))
    with engine.connect() as conn:
        rows = work(conn, settings, T0 + timedelta(days=15))
        assert [(r["referral"], r["owner"]) for r in rows] == [(b, "bob"), (c, "coordinator"), (a, "alice")]
        assert [r["overdue_days"] for r in rows] == [6.0, 3.0, 1.0]
        assert [r["referral"] for r in work(conn, settings, T0 + timedelta(days=15), owner="alice")] == [a]
    with_rt = settings_for(db_url, worklist=OWNERS)
    d = new_referral(engine, "RD", sent=T0)
    scan(engine, with_rt, T0 + timedelta(days=15))
    with engine.connect() as conn:
        assert [r["owner"] for r in work(conn, with_rt, T0) if r["referral"] == d] == ["carol"]
    engine.dispose()


def test_actions_are_timeline_events_and_audited(db_url: str) -> None:
    engine = engine_for(db_url)
    settings = settings_for(db_url)
    rid = new_referral(engine)
    now = T0 + timedelta(days=15)
    [raised] = scan(engine, settings, now).rows("raised")
    aid = raised["alert_id"]
    with engine.begin() as conn:
        assert alerts.act(conn, settings, aid, "acknowledge", now, actor="dana")["status"] == "acknowledged"
        assert alerts.act(conn, settings, aid, "assign", now, actor="dana", owner="erin")["owner"] == "erin"
        noted = alerts.act(conn, settings, aid, "note", now, actor="dana", note="left voicemail")
        assert noted["last_action"] == "note"
        snoozed = alerts.act(conn, settings, aid, "snooze", now, actor="dana", until=now + timedelta(days=3))
        assert (snoozed["status"], snoozed["snoozed_until"]) == ("snoozed", (now + timedelta(days=3)).isoformat())
        with pytest.raises(alerts.ActionError) as bad:
            alerts.act(conn, settings, aid, "snooze", now, actor="dana", until=now - timedelta(days=1))
        assert bad.value.status == 400
        with pytest.raises(alerts.ActionError):
            alerts.act(conn, settings, 999, "acknowledge", now, actor="dana")
    with engine.connect() as conn:  # snoozed alerts leave the default worklist
        assert work(conn, settings, now) == []
    assert timeline(engine, rid).count(rf.COORDINATOR_NOTE) == 4
    with engine.connect() as conn:
        audit_rows = [(a.actor, a.action, a.target) for a in conn.execute(select(AuditEntry.__table__))]
    assert audit_rows == [("dana", f"alert_{x}", f"alert:{aid}") for x in ("acknowledge", "assign", "note", "snooze")]
    engine.dispose()


def test_snooze_holds_through_escalation_until_its_date(db_url: str) -> None:
    """A snoozed alert escalates quietly (no notification) and reopens when snoozed_until passes."""
    engine = engine_for(db_url)
    settings = settings_for(db_url, webhook_url="http://127.0.0.1:9/hook")
    new_referral(engine)
    now = T0 + timedelta(days=15)
    [raised] = scan(engine, settings, now).rows("raised")
    with engine.begin() as conn:
        alerts.act(conn, settings, raised["alert_id"], "snooze", now, actor="dana", until=T0 + timedelta(days=35))
    scan(engine, settings, T0 + timedelta(days=29))
    assert open_alerts(engine)[0][2:] == (2, "snoozed")
    scan(engine, settings, T0 + timedelta(days=36))
    assert open_alerts(engine)[0][2:] == (2, "open")
    with engine.connect() as conn:
        from refloop.store.outbox import listing

        assert [r["event"] for r in listing(conn)] == ["alert_raised"]  # the escalation stayed quiet
    engine.dispose()


def test_close_by_hand_is_a_manual_closed_event(db_url: str) -> None:
    engine = engine_for(db_url)
    settings = settings_for(db_url)
    rid = new_referral(engine)
    now = T0 + timedelta(days=15)
    [raised] = scan(engine, settings, now).rows("raised")
    with engine.begin() as conn:
        with pytest.raises(alerts.ActionError):
            alerts.act(conn, settings, raised["alert_id"], "close", now, actor="dana")
        closed = alerts.act(conn, settings, raised["alert_id"], "close", now, actor="dana", reason="seen elsewhere")
    assert (closed["status"], closed["last_action"]) == ("resolved", "close")
    with engine.connect() as conn:
        assert repo.list_referrals(conn, placer_id="R1")[0]["status"] == "closed"
        events = [(e.kind, json.loads(e.data)) for e in repo.load_events(conn, rid)]
    assert (rf.MANUAL_CLOSED, {"actor": "dana", "alert_id": raised["alert_id"], "reason": "seen elsewhere"}) in events
    assert scan(engine, settings, now + timedelta(days=1)).as_json() == {"raised": [], "escalated": [], "resolved": []}
    engine.dispose()


def post(port: int, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_worklist_actions_and_answers(db_url: str) -> None:
    """GET /api/worklist, POST /api/alerts/{id}/{action}, answers that hold or close, the signed callback."""
    engine = engine_for(db_url)
    settings = settings_for(db_url, webhook_secret="cb-secret")
    settings = replace(settings, worklist=OWNERS)
    held, closed = new_referral(engine, "RH"), new_referral(engine, "RX")
    now = T0 + timedelta(days=15)
    scan(engine, settings, now)
    with running_daemon(replace(settings, database=make_settings(db_url).database), clock=FixedClock(now)) as d:
        status, work = d.get("/api/worklist?owner=carol")
        assert status == 200 and {w["placer_id"] for w in work} == {"RH", "RX"}
        assert all(w["mode"] == "active" for w in work)
        aid = work[0]["alert_id"]
        assert post(d.http_port, f"/api/alerts/{aid}/acknowledge", {"actor": "dana"})[1]["status"] == "acknowledged"
        assert post(d.http_port, f"/api/alerts/{aid}/snooze", {"until": "2026-01-01"})[0] == 400
        assert post(d.http_port, f"/api/alerts/{aid}/explode", {})[0] == 400
        status, doc = post(d.http_port, f"/api/referrals/{held}/events", {"answer": "will_book", "actor": "patient"})
        assert (status, doc["effect"], doc["on_hold"]) == (200, "hold", True)
        body = json.dumps({"placer_id": "RX", "answer": "booked_elsewhere", "actor": "practice"}).encode()
        status, _ = post(d.http_port, "/api/callbacks/answer", json.loads(body), {"X-Refloop-Signature": "sha256=00"})
        assert status == 401
        req = urllib.request.Request(f"http://127.0.0.1:{d.http_port}/api/callbacks/answer", data=body, method="POST",
                                     headers={"X-Refloop-Signature": sign("cb-secret", body)})
        with urllib.request.urlopen(req, timeout=10) as resp:
            doc = json.loads(resp.read())
        assert (doc["referral"], doc["status"]) == (closed, "closed")
        status, work = d.get("/api/worklist")
        assert [w["placer_id"] for w in work] == ["RH"]
        status, rows = d.get("/api/outbox")
        assert status == 200 and rows == []
    assert rf.HOLD_STARTED in timeline(engine, held)
    engine.dispose()


def test_cli_alert_and_outbox(db_url: str) -> None:
    engine = engine_for(db_url)
    new_referral(engine)
    env = {"REFLOOP_NOTIFY_WEBHOOK_URL": "http://127.0.0.1:9/hook", "REFLOOP_WORKLIST_MODE": "active"}
    out = refloop_cli(db_url, "scan", "--as-of", (T0 + timedelta(days=15)).isoformat(), env=env)
    assert out.returncode == 0 and "raised: 1" in out.stdout, out.stderr
    out = refloop_cli(db_url, "alert", "assign", "1", "--owner", "frank", "--actor", "dana", env=env)
    assert out.returncode == 0 and json.loads(out.stdout)["owner"] == "frank"
    assert refloop_cli(db_url, "alert", "snooze", "1", env=env).returncode == 1
    rows = json.loads(refloop_cli(db_url, "outbox", "--json", env=env).stdout)
    assert [(r["event"], r["status"]) for r in rows] == [("alert_raised", "pending")]
    assert "payload" not in rows[0]
    assert refloop_cli(db_url, "outbox", "retry", str(rows[0]["id"]), env=env).returncode == 1  # not dead
    engine.dispose()


def test_gauges_after_a_scan(db_url: str) -> None:
    """refloop_alerts_open{stage,level}, refloop_referrals{status} and the outbox gauges follow the database."""
    from prometheus_client import CollectorRegistry

    from refloop.daemon.metrics import Metrics
    from refloop.notify.scan import update_gauges

    engine = engine_for(db_url)
    settings = settings_for(db_url, webhook_url="http://127.0.0.1:9/hook")
    new_referral(engine, "R1")
    new_referral(engine, "R2", sent=T0 - timedelta(days=40))
    scan(engine, settings, T0 + timedelta(days=15))
    metrics = Metrics(CollectorRegistry())
    update_gauges(engine, metrics)
    value = metrics.registry.get_sample_value
    assert value("refloop_alerts_open", {"stage": "scheduling", "level": "1"}) == 1.0
    assert value("refloop_alerts_open", {"stage": "scheduling", "level": "3+"}) == 1.0
    assert value("refloop_alerts_open", {"stage": "visit", "level": "1"}) == 1.0
    assert value("refloop_referrals", {"status": "sent"}) == 2.0
    assert value("refloop_outbox_backlog", {}) == 3.0
    assert value("refloop_outbox_dead_letters", {}) == 0.0
    engine.dispose()
