"""The stage clock kept on the referral row, on SQLite and PostgreSQL: stored columns equal the clock on
read, levels stop at the top with one notification each, business days in New York through
`refloop scan --as-of`, and a window change rewrites due times without changing what a scan decides."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, insert, select

from refloop import referral as rf
from refloop import stall
from refloop.config.notify import WorklistSettings
from refloop.config.windows import WindowSettings, windows_from_settings
from refloop.store import alerts, outbox
from refloop.store import referrals as repo
from refloop.store import scan as stall_scan
from tests.test_scan import T0, engine_for, open_alerts, refloop_cli, settings_for
from tests.utils import work

NY = ZoneInfo("America/New_York")


def add(engine: Engine, rid: int, kind: str, at: datetime, windows: stall.Windows | None,
        applied_at: datetime | None = None, **data: Any) -> None:
    """An event that happened *at*, applied at *applied_at* (default: then); a late message has
    ``applied_at`` after ``at``."""
    with engine.begin() as conn:
        conn.execute(insert(repo.EVENTS).values(
            referral_id=rid, message_id=None, origin=repo.MANUAL, seq=0, kind=kind, occurred_at=repo.utc(at),
            control_id="", subject="", pending_key="", data=json.dumps(data)))
        repo.refresh(conn, rid, applied_at or at, windows=windows)


def referral(engine: Engine, placer: str, sent: datetime, windows: stall.Windows | None, priority: str = "R") -> int:
    with engine.begin() as conn:
        rid = repo.get_or_create(conn, placer, "CLINIC", sent)
    add(engine, rid, rf.REFERRAL_CREATED, sent, windows, specialty="CARD", priority=priority,
        referred_to="Heartwell Hana")
    return rid


def stored(engine: Engine, rid: int) -> Any:
    with engine.connect() as conn:
        return conn.execute(select(repo.REFERRALS).where(repo.REFERRALS.c.id == rid)).one()


# -- stored columns == the clock on read ---------------------------------------------------------------
KINDS = st.sampled_from([
    (rf.APPOINTMENT_BOOKED, {"appointment_id": "A1"}), (rf.APPOINTMENT_NO_SHOW, {"appointment_id": "A1"}),
    (rf.APPOINTMENT_COMPLETED, {"appointment_id": "A1"}), (rf.APPOINTMENT_CANCELLED, {"appointment_id": "A1"}),
    (rf.HOLD_STARTED, {}), (rf.HOLD_ENDED, {}), (rf.REFERRAL_CANCELLED, {}),
])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(history=st.lists(st.tuples(KINDS, st.integers(min_value=0, max_value=60 * 24)), max_size=5),
       stat=st.booleans(), days=st.sampled_from((1.0, 3.0, 14.0)))
def test_stored_clock_equals_the_clock_on_read(db_url: str, history: list[Any], stat: bool, days: float) -> None:
    engine = engine_for(db_url)
    windows = windows_from_settings(WindowSettings(scheduling_days=days, visit_days=days * 3))
    with engine.connect() as conn:
        n = conn.execute(select(repo.REFERRALS.c.id).order_by(repo.REFERRALS.c.id.desc())).first()
    rid = referral(engine, f"H{(n[0] if n else 0) + 1}", T0, windows, priority="S" if stat else "R")
    now = T0  # the clock applying the events only moves forward; an event may be about an earlier time
    for (kind, data), hours in history:
        at = T0 + timedelta(hours=hours)
        now = max(now, at)
        extra = {"start": (at + timedelta(days=2)).isoformat()} if kind == rf.APPOINTMENT_BOOKED else {}
        add(engine, rid, kind, at, windows, now, **data, **extra)
    row = stored(engine, rid)
    with engine.connect() as conn:
        events = [repo.event_of(r) for r in repo.load_events(conn, rid)]
    state = rf.fold(events, now=now)
    found = stall.clocks(stall.ClockInput.of_state(state, rf.paused_intervals(events)), windows)
    leak_stage, leak_at = stall.leak(state.status.value, found, state.sent_at)
    assert (row.leak_stage, repo.aware(row.leak_at)) == (leak_stage, leak_at)
    assert row.clock_stage == ",".join(c.stage for c in found)
    assert row.clock_version == windows.version
    # the first level's instant; now (a stage stopped: look again at once); or, when an apply found the
    # stored due time already passed and raised its alert there and then, the next level's instant after
    # the last apply (referrals.clock_values keeps a cursor the apply or the scan has moved on)
    cursor = repo.aware(row.next_due_at)
    assert cursor in {stall.next_due(found), now, stall.next_due(found, now)}
    if cursor not in {stall.next_due(found), now}:  # moved on: only because an apply raised its alert
        assert any(r[0] == rid for r in open_alerts(engine))
    engine.dispose()


# -- bounded levels -------------------------------------------------------------------------------------
def test_a_year_overdue_sits_at_the_top_level_one_notice_per_level(db_url: str) -> None:
    """A STAT referral (1-day window) never booked, scanned every day for a year: levels 1, 2, 3 with one
    owner notice each, then nothing: no re-notification, no rewrite of the alert."""
    engine = engine_for(db_url)
    s = settings_for(db_url, webhook_url="http://127.0.0.1:9/hook",
                     worklist=WorklistSettings(mode="active", escalation_owners=("3=cardiology-lead",)))
    rid = referral(engine, "STAT1", T0, windows_from_settings(s.stall), priority="S")
    for day in range(1, 366):
        assert stall_scan.run_scan(engine, s, T0 + timedelta(days=day, hours=1)) is not None
        if day == 140:  # visit (45 days) reaches level 3 on day 135
            with engine.connect() as conn:
                frozen = conn.execute(select(alerts.ALERTS)).all()
    with engine.connect() as conn:
        assert conn.execute(select(alerts.ALERTS)).all() == frozen  # nothing rewritten after the top level
        keys = sorted(k for (k,) in conn.execute(select(outbox.OUTBOX.c.idempotency_key).where(
            outbox.OUTBOX.c.event.in_(("alert_raised", "alert_escalated")))))
        rows = work(conn, s, T0 + timedelta(days=365))
    assert open_alerts(engine) == [(rid, "scheduling", 3, "open"), (rid, "visit", 3, "open")]
    assert len(keys) == 6  # two stages x three levels
    assert {r["level_name"] for r in rows} == {"escalated"}
    assert max(r["overdue_days"] for r in rows) > 360  # how long it has been overdue, computed on read
    with engine.connect() as conn:
        payloads = [json.loads(o.payload) for o in conn.execute(select(outbox.OUTBOX))]
    assert {(p["level"], p.get("escalated_to")) for p in payloads} == {
        (1, None), (2, None), (3, "cardiology-lead")}  # worklist.escalation_owners names who hears of level 3
    assert stored(engine, rid).next_due_at is None  # past the top level nothing is due any more
    engine.dispose()


# -- New York business days through the CLI ----------------------------------------------------------
def test_cli_scan_as_of_either_side_of_the_local_due_time(db_url: str) -> None:
    """Sent Sunday 1 March 2026 21:00 New York time with 2 business days to book: the clock starts Monday
    00:00 local and the alert is due Wednesday 00:00 local (05:00 UTC), not 2 days after Monday 02:00 UTC."""
    engine = engine_for(db_url)
    referral(engine, "NY1", datetime(2026, 3, 1, 21, 0, tzinfo=NY), None)  # stale: the scan evaluates it
    engine.dispose()
    env = {"REFLOOP_STALL_TIMEZONE": "America/New_York", "REFLOOP_STALL_BUSINESS_DAYS": "true",
           "REFLOOP_STALL_SCHEDULING_DAYS": "2"}
    due = datetime(2026, 3, 4, 0, 0, tzinfo=NY)
    before = refloop_cli(db_url, "scan", "--as-of", (due - timedelta(seconds=1)).isoformat(), "--json", env=env)
    assert before.returncode == 0, before.stderr
    assert json.loads(before.stdout)["raised"] == []
    at = refloop_cli(db_url, "scan", "--as-of", due.astimezone(UTC).isoformat(), "--json", env=env)
    assert [(a["placer_id"], a["stage"], a["level"], a["level_name"]) for a in json.loads(at.stdout)["raised"]] == [
        ("NY1", "scheduling", 1, "due")]


# -- a window change ------------------------------------------------------------------------------------
def test_window_change_recomputes_and_a_scan_in_between_agrees(db_url: str) -> None:
    """Rows kept under 14-day windows; the windows become 7 days (a SIGHUP reload): a scan while only half
    the rows are rewritten raises exactly what a scan after the full recompute raises."""
    old = settings_for(db_url)
    new = replace(old, stall=WindowSettings(scheduling_days=7.0))
    results = []
    for label in ("in between", "after"):
        engine = engine_for(db_url)
        with engine.begin() as conn:
            conn.execute(alerts.ALERTS.delete())
            conn.execute(outbox.OUTBOX.delete())
            conn.execute(repo.EVENTS.delete())
            conn.execute(repo.REFERRALS.delete())
        ids = [referral(engine, f"W{label[0]}{i}", T0 + timedelta(days=i), windows_from_settings(old.stall))
               for i in range(12)]
        windows = windows_from_settings(new.stall)
        if label == "after":
            assert stall_scan.recompute_stale(engine, windows, T0) == len(ids)
        else:
            with engine.begin() as conn:
                for rid in ids[::2]:
                    repo.recompute(conn, rid, T0, windows=windows)
        result = stall_scan.run_scan(engine, new, T0 + timedelta(days=10))
        assert result is not None
        results.append(sorted((ids.index(r["referral"]), r["stage"], r["level"]) for r in result.rows("raised")))
        assert {stored(engine, rid).clock_version for rid in ids} == {windows.version}
        engine.dispose()
    assert results[0] == results[1]
    assert results[0] == [(i, "scheduling", 1) for i in range(4)]  # sent days 0..3 are 7+ days old at day 10


def test_an_unrelated_event_keeps_the_moved_on_due_time(db_url: str) -> None:
    """After the scan raised level 1 and moved next_due_at on to level 2, a note on the referral refolds it
    but does not set the due time back (which would make every later scan look at it again)."""
    engine = engine_for(db_url)
    s = settings_for(db_url)
    windows = windows_from_settings(s.stall)
    rid = referral(engine, "KEEP1", T0, windows)
    assert stall_scan.run_scan(engine, s, T0 + timedelta(days=15)) is not None
    level2 = T0 + timedelta(days=28)
    assert repo.aware(stored(engine, rid).next_due_at) == level2
    add(engine, rid, rf.COORDINATOR_NOTE, T0 + timedelta(days=16), windows, actor="ann")
    assert repo.aware(stored(engine, rid).next_due_at) == level2
    add(engine, rid, rf.APPOINTMENT_BOOKED, T0 + timedelta(days=17), windows, appointment_id="A1",
        start=(T0 + timedelta(days=20)).isoformat())  # scheduling stops: look again at once to resolve it
    assert repo.aware(stored(engine, rid).next_due_at) == T0 + timedelta(days=17)
    result = stall_scan.run_scan(engine, s, T0 + timedelta(days=17, hours=1))
    assert result is not None
    assert [(r["stage"], r["status"]) for r in result.rows("resolved")] == [("scheduling", "resolved")]
    assert repo.aware(stored(engine, rid).next_due_at) == T0 + timedelta(days=45)  # the visit window's end
    engine.dispose()


def test_report_rewrites_stale_rows_first_and_says_so_otherwise(db_url: str) -> None:
    """Rows from before migration 0012 (or another windows' version) carry no usable clock: `refloop report`
    rewrites them in chunks first, so its leaks are right; a report built without that names how many."""
    from refloop.store import report_queries as rq

    engine = engine_for(db_url)
    rid = referral(engine, "OLD1", T0, None)  # projected without windows: stale
    params = rq.default_params(T0 + timedelta(days=20), start="2026-01-01", end="2026-06-01")
    windows = windows_from_settings(settings_for(db_url).stall)
    with engine.connect() as conn:
        assert rq.build_report(conn, params, windows)["cohort"]["stale_rows"] == 1
    engine.dispose()
    out = refloop_cli(db_url, "report", "--from", "2026-01-01", "--to", "2026-06-01", "--now",
                      (T0 + timedelta(days=20)).isoformat(), "--format", "json")
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert "stale_rows" not in doc["cohort"]
    assert doc["totals"]["leaks_by_stage"]["never_scheduled"] == 1
    assert [leak["placer_id"] for leak in doc["leaks"]] == ["OLD1"]
    engine = engine_for(db_url)
    assert stored(engine, rid).clock_version == windows.version
    engine.dispose()
