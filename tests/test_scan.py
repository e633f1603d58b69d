"""The stall scan against real databases: alerts raised once, escalated in place, resolved when the
referral moves on; safe to run twice at once; `refloop scan --as-of` reproduces a past day."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, insert, select

from refloop import referral as rf
from refloop.clock import FixedClock
from refloop.config import DatabaseSettings, Settings
from refloop.config.notify import NotifySettings, WorklistSettings
from refloop.store import alerts, migrate
from refloop.store import referrals as repo
from refloop.store import scan as stall_scan
from refloop.store.engine import make_engine
from refloop.store.outbox import OUTBOX
from tests.samples import ref_msg
from tests.utils import MllpClient, make_settings, msa, running_daemon

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # a Monday


def engine_for(url: str) -> Engine:
    engine = make_engine(DatabaseSettings(url=url))
    migrate.upgrade(engine)
    return engine


def settings_for(url: str, **notify: Any) -> Settings:
    worklist = notify.pop("worklist", WorklistSettings(mode="active"))
    return replace(make_settings(url), notify=NotifySettings(**notify), worklist=worklist)


def add_event(engine: Engine, rid: int, kind: str, at: datetime, **data: Any) -> None:
    """A manual event through the real repository (journal rows need a message; manual ones do not)."""
    with engine.begin() as conn:
        conn.execute(insert(repo.EVENTS).values(
            referral_id=rid, message_id=None, origin=repo.MANUAL, seq=0, kind=kind, occurred_at=repo.utc(at),
            control_id="", subject="", pending_key="", data=json.dumps(data)))
        repo.refresh(conn, rid, at)


def new_referral(engine: Engine, placer: str = "R1", sent: datetime = T0, authority: str = "CLINIC",
                 specialty: str = "CARD") -> int:
    with engine.begin() as conn:
        rid = repo.get_or_create(conn, placer, authority, sent)
    add_event(engine, rid, rf.REFERRAL_CREATED, sent, specialty=specialty, priority="R", referred_to="Heartwell Hana")
    return rid


def open_alerts(engine: Engine) -> list[tuple[int, str, int, str]]:
    with engine.connect() as conn:
        return [(r.referral_id, r.stage, r.level, r.status) for r in conn.execute(
            select(alerts.ALERTS).where(alerts.ALERTS.c.open_key == 0).order_by(alerts.ALERTS.c.id))]


def scan(engine: Engine, settings: Settings, at: datetime) -> alerts.ScanResult:
    result = stall_scan.run_scan(engine, settings, at)
    assert result is not None
    return result


def test_raise_once_escalate_in_place_resolve(db_url: str) -> None:
    """Day 15: scheduling level 1; same instant again: nothing; day 29: level 2 in place; booked: resolved."""
    engine, settings = engine_for(db_url), settings_for(db_url)
    rid = new_referral(engine)
    assert not scan(engine, settings, T0 + timedelta(days=13)).rows("raised")
    first = scan(engine, settings, T0 + timedelta(days=15))
    assert [(r["referral"], r["stage"], r["level"]) for r in first.rows("raised")] == [(rid, "scheduling", 1)]
    again = scan(engine, settings, T0 + timedelta(days=15))
    assert again.as_json() == {"raised": [], "escalated": [], "resolved": []}
    later = scan(engine, settings, T0 + timedelta(days=29))
    assert [(r["stage"], r["level"]) for r in later.rows("escalated")] == [("scheduling", 2)]
    assert open_alerts(engine) == [(rid, "scheduling", 2, "open")]
    add_event(engine, rid, rf.APPOINTMENT_BOOKED, T0 + timedelta(days=30), appointment_id="A1",
              start=(T0 + timedelta(days=40)).isoformat())
    moved = scan(engine, settings, T0 + timedelta(days=31))
    assert [(r["stage"], r["status"]) for r in moved.rows("resolved")] == [("scheduling", "resolved")]
    assert open_alerts(engine) == []
    with engine.connect() as conn:  # the resolved row stays as history; a new stall may open a fresh one
        assert conn.execute(select(func.count()).select_from(alerts.ALERTS)).scalar() == 1
    engine.dispose()


def test_missed_runs_are_caught_up(db_url: str) -> None:
    """No scan for 50 days: the first one raises what is due now, at the level due now."""
    engine, settings = engine_for(db_url), settings_for(db_url)
    new_referral(engine)
    result = scan(engine, settings, T0 + timedelta(days=50))
    assert sorted((r["stage"], r["level"]) for r in result.rows("raised")) == [("scheduling", 3), ("visit", 1)]
    engine.dispose()


def test_hold_pauses_the_clock_and_ends_at_resume(db_url: str) -> None:
    """A 10-day hold from day 5 moves the scheduling alert from day 14 to day 24; the scan ends it."""
    engine, settings = engine_for(db_url), settings_for(db_url)
    rid = new_referral(engine)
    add_event(engine, rid, rf.HOLD_STARTED, T0 + timedelta(days=5),
              resume_at=(T0 + timedelta(days=15)).isoformat(), reason="patient travelling")
    assert not scan(engine, settings, T0 + timedelta(days=20)).rows("raised")
    with engine.connect() as conn:
        kinds = [r.kind for r in repo.load_events(conn, rid)]
    assert kinds.count(rf.HOLD_ENDED) == 1  # ended by the scan, at resume_at
    resumed = scan(engine, settings, T0 + timedelta(days=24, hours=1))
    assert [r["stage"] for r in resumed.rows("raised")] == ["scheduling"]
    engine.dispose()


def test_closed_referral_is_not_scanned_and_alerts_resolve(db_url: str) -> None:
    """A cancelled referral leaves the scan, and its open alerts are resolved."""
    engine, settings = engine_for(db_url), settings_for(db_url)
    rid = new_referral(engine)
    scan(engine, settings, T0 + timedelta(days=15))
    add_event(engine, rid, rf.REFERRAL_CANCELLED, T0 + timedelta(days=16))
    result = scan(engine, settings, T0 + timedelta(days=17))
    assert [r["referral"] for r in result.rows("resolved")] == [rid]
    assert open_alerts(engine) == []
    engine.dispose()


def test_notifications_are_enqueued_once_per_change(db_url: str) -> None:
    """Raise and escalate each enqueue one webhook row (same transaction); repeats enqueue nothing."""
    engine = engine_for(db_url)
    settings = settings_for(db_url, webhook_url="http://127.0.0.1:9/hook")
    new_referral(engine)
    for day in (15, 15, 16, 29, 29):
        scan(engine, settings, T0 + timedelta(days=day))
    with engine.connect() as conn:
        keys = sorted(r.idempotency_key for r in conn.execute(select(OUTBOX)))
    assert keys == ["alert:1:1:webhook", "alert:1:2:webhook"]
    engine.dispose()


def test_scan_result_rows_are_the_alerts_as_the_scan_wrote_them(db_url: str) -> None:
    """The scan's worklist rows are rendered when read, not when written, yet each is its alert as the scan
    left it: the row the worklist itself renders at that moment (``get_alert``), even once a coordinator has
    acted on the alert since; a resolved row is the open alert with status resolved."""
    engine, settings = engine_for(db_url), settings_for(db_url)
    rid, other = new_referral(engine, "R1"), new_referral(engine, "R2")

    def stored(now: datetime) -> list[dict[str, Any]]:
        with engine.connect() as conn:
            ids = conn.execute(select(alerts.ALERTS.c.id).order_by(alerts.ALERTS.c.id)).scalars().all()
            return [alerts.get_alert(conn, settings, a, now) or {} for a in ids]

    day15, day29, day31 = (T0 + timedelta(days=d) for d in (15, 29, 31))
    first = scan(engine, settings, day15)
    written = stored(day15)
    with engine.begin() as conn:  # acted on before the scan's rows are read
        alerts.act(conn, settings, written[0]["alert_id"], "acknowledge", day15, actor="tester")
    assert (len(first.rows("raised")), len(first.rows("escalated")), len(first.rows("resolved"))) == (2, 0, 0)
    assert first.as_json() == {"raised": written, "escalated": [], "resolved": []}
    assert first.rows("raised") == written and first.rows("escalated") == []
    assert [r["status"] for r in first.rows("raised")] == ["open"] * 2
    later = scan(engine, settings, day29)
    assert later.as_json()["escalated"] == stored(day29)  # the acknowledged alert reopened: it got worse
    add_event(engine, other, rf.REFERRAL_CANCELLED, day29 + timedelta(hours=1))
    before = stored(day31)[1]
    moved = scan(engine, settings, day31)
    assert moved.rows("resolved") == [{**before, "status": "resolved"}] and json.loads(json.dumps(moved.as_json()))
    assert moved.as_json()["raised"] == moved.as_json()["escalated"] == [] and rid != other
    engine.dispose()


def test_catch_ups_enqueue_what_the_apply_did_not_once(db_url: str) -> None:
    """Channels configured later: the scan's catch-ups enqueue the no-show reminder and the loop-closed notice
    under the apply's keys, once; a loop announced on one channel is not announced again when another is
    added; a second no-show is a new reminder."""
    engine = engine_for(db_url)
    no_show, closed = new_referral(engine, "R1"), new_referral(engine, "R2")
    for rid, appt, at in ((no_show, "A1", T0 + timedelta(days=2)), (closed, "A2", T0 + timedelta(days=1))):
        add_event(engine, rid, rf.APPOINTMENT_BOOKED, at, appointment_id=appt,
                  start=(at + timedelta(days=1)).isoformat())
    add_event(engine, no_show, rf.APPOINTMENT_NO_SHOW, T0 + timedelta(days=3), appointment_id="A1")
    add_event(engine, closed, rf.APPOINTMENT_COMPLETED, T0 + timedelta(days=2), appointment_id="A2")
    add_event(engine, closed, rf.NOTE_RECEIVED, T0 + timedelta(days=4), document_id="D2", final=True)

    def keys() -> list[str]:
        with engine.connect() as conn:
            return sorted(k for k in conn.execute(select(OUTBOX.c.idempotency_key)).scalars() if "alert" not in k)

    at = T0 + timedelta(days=5)
    assert scan(engine, settings_for(db_url), at).notifications == 0 and keys() == []
    hooks = {"webhook_url": "http://127.0.0.1:9/hook", "patient_webhook_url": "http://127.0.0.1:9/patient"}
    assert scan(engine, settings_for(db_url, **hooks), at).notifications == 2
    assert keys() == [f"loop_closed:{closed}:webhook", f"patient:no_show:{no_show}:1:patient"]
    assert scan(engine, settings_for(db_url, **hooks), at + timedelta(hours=1)).notifications == 0
    mail = settings_for(db_url, **hooks, smtp_host="127.0.0.1", smtp_to_default="desk@test.invalid")
    assert scan(engine, mail, at + timedelta(hours=2)).notifications == 0  # announced already (on the webhook)
    add_event(engine, no_show, rf.APPOINTMENT_BOOKED, T0 + timedelta(days=6), appointment_id="A3",
              start=(T0 + timedelta(days=7)).isoformat())
    add_event(engine, no_show, rf.APPOINTMENT_NO_SHOW, T0 + timedelta(days=7), appointment_id="A3")
    scan(engine, settings_for(db_url, **hooks), T0 + timedelta(days=8))  # (a second no-show also raises an alert)
    assert keys() == [f"loop_closed:{closed}:webhook", f"patient:no_show:{no_show}:1:patient",
                      f"patient:no_show:{no_show}:2:patient"]
    engine.dispose()


def test_concurrent_scans_on_postgres_make_one_set_of_alerts(pg_url: str) -> None:
    """Two daemons (two engines, two threads) scan the same instant: one set of alerts and rows."""
    setup = engine_for(pg_url)
    for n in range(20):
        new_referral(setup, placer=f"R{n}")
    settings = settings_for(pg_url, webhook_url="http://127.0.0.1:9/hook")
    engines = [make_engine(DatabaseSettings(url=pg_url)) for _ in range(2)]
    barrier = threading.Barrier(2)
    results: list[alerts.ScanResult | None] = []
    errors: list[BaseException] = []

    def run(engine: Engine) -> None:
        try:
            barrier.wait(10)
            results.append(stall_scan.run_scan(engine, settings, T0 + timedelta(days=15)))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    raised = sum(len(r.rows("raised")) for r in results if r is not None)
    assert raised == 20
    with setup.connect() as conn:
        assert conn.execute(select(func.count()).select_from(alerts.ALERTS)).scalar() == 20
        assert conn.execute(select(func.count()).select_from(OUTBOX)).scalar() == 20
    for e in [*engines, setup]:
        e.dispose()


def test_advisory_lock_makes_the_second_scan_skip(pg_url: str) -> None:
    """While one scan transaction holds the lock, another daemon's scan returns None (skipped)."""
    from sqlalchemy import text

    engine = engine_for(pg_url)
    settings = settings_for(pg_url)
    with engine.begin() as conn:
        assert conn.execute(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": stall_scan.SCAN_LOCK}).scalar()
        other = make_engine(DatabaseSettings(url=pg_url))
        assert stall_scan.run_scan(other, settings, T0) is None
        other.dispose()
    assert stall_scan.run_scan(engine, settings, T0) is not None
    engine.dispose()


def refloop_cli(db_url: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("REFLOOP_")}
    environ.update({"REFLOOP_DATABASE_URL": db_url, **(env or {})})
    return subprocess.run([sys.executable, "-m", "refloop", *args], env=environ, capture_output=True, text=True,
                          timeout=120, check=False)


def test_cli_scan_as_of_surfaces_a_referral_unbooked_for_20_days(db_url: str) -> None:
    """REF over MLLP to a daemon (its clock an hour after sending); `refloop scan --as-of sent+20d --json`
    raises it; the worklist shows it."""
    clock = FixedClock(datetime(2026, 1, 5, 15, 0, tzinfo=UTC))
    with running_daemon(make_settings(db_url), clock=clock) as d, MllpClient(d.port) as c:
        assert msa(c.send(ref_msg("R2020", at="20260105090000-0500")))[0] == "AA"
    sent = datetime(2026, 1, 5, 14, 0, tzinfo=UTC)
    env = {"REFLOOP_WORKLIST_OWNERS": "practice:CLINIC=alice"}
    out = refloop_cli(db_url, "scan", "--as-of", (sent + timedelta(days=20)).isoformat(), "--json", env=env)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert set(doc) == {"raised", "escalated", "resolved"}
    [alert] = doc["raised"]
    assert (alert["placer_id"], alert["stage"], alert["level"], alert["owner"]) == ("R2020", "scheduling", 1, "alice")
    assert alert["overdue_days"] == 6.0 and alert["mode"] == "observe"
    again = json.loads(refloop_cli(db_url, "scan", "--as-of", (sent + timedelta(days=20)).isoformat(), "--json",
                                   env=env).stdout)
    assert again == {"raised": [], "escalated": [], "resolved": []}
    listed = refloop_cli(db_url, "worklist", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [(r["placer_id"], r["stage"], r["owner"], r["status"]) for r in rows] == [
        ("R2020", "scheduling", "alice", "open")]
    assert {"alert_id", "referral", "placer_id", "stage", "level", "overdue_days", "owner", "status", "mode",
            "last_action"} <= set(rows[0])


# -- the scan's share beside busy ingest -------------------------------------------------------------------
def test_a_busy_listener_delays_each_chunk_by_a_bounded_share() -> None:
    """Under sustained traffic (ingest never idle) a chunk waits at most four times the previous chunk's
    duration (the scan keeps a fifth of the wall clock), and never more than the cap; an idle listener
    costs no wait. A simulated clock: nothing here depends on how fast the machine is."""
    from refloop.notify.scan import ingest_first

    now = [0.0]

    def clock() -> float:
        now[0] += 0.001  # every look at the clock is one millisecond of simulated time
        return now[0]

    def waited(pause: Any, chunk_s: float) -> float:
        now[0] += chunk_s  # the chunk before this pause
        before = now[0]
        pause()
        return now[0] - before

    busy = ingest_first(lambda: False, clock=clock)
    assert 0.49 <= waited(busy, 0.0) <= 0.51  # the first chunk: the cap
    for chunk_s in (0.02, 0.001, 0.3):
        assert waited(busy, chunk_s) <= min(0.5, 4 * (chunk_s + 0.002)) + 0.003
    assert 0.49 <= waited(busy, 0.3) <= 0.51  # a long chunk: the cap, not 1.2 s
    idle = ingest_first(lambda: True, clock=clock)
    assert waited(idle, 0.02) <= 0.003
