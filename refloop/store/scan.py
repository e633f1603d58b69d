"""The stall scan: the referrals whose next due instant has passed, diffed with their open alerts.

Why this shape: the stage clock is kept on the referral row when its events are applied
(:func:`refloop.store.referrals.clock_values`), including ``next_due_at``, the next instant anything about
the clock changes. So a scan is an index range (``next_due_at <= now``) plus, per referral found, the clock
and :func:`refloop.store.alerts.apply_diff` (once per chunk: each kind of alert write is one statement for
the chunk); a referral whose level did not change is never read, and an alert is never rewritten because
time passed (how overdue it is is computed on read). After handling a referral the scan moves its
``next_due_at`` on to the next level's instant, or clears it past the top level.

Rows whose ``clock_version`` is not the current windows' hash (a window change, or rows from before
migration 0012) are stale: the scan folds their events and rewrites them with the current windows, in the
same chunks, so after a window change the first scans recompute the store in the background and no due
time is ever read stale.

The listener is sacred: the work is done in chunks of :data:`CHUNK` referrals, each its own write
transaction taken through the daemon's write gate, so a journal COMMIT waiting behind a chunk is woken
when it commits (SQLite's single write lock is held for milliseconds at a time, and messages are
journaled and applied between two chunks).
Two daemons sharing PostgreSQL do not scan at once: the scan holds a session-level
``pg_try_advisory_lock`` and returns ``None`` ("skipped") when another daemon has it.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta
from typing import Any, Final, TypeVar

from sqlalchemy import Connection, Engine, bindparam, or_, select, text, update

from refloop import referral as rf
from refloop import stall
from refloop.config import Settings
from refloop.config.windows import windows_from_settings
from refloop.store import alerts, notices
from refloop.store import referrals as repo

REFERRALS, EVENTS, ALERTS = repo.REFERRALS, repo.EVENTS, alerts.ALERTS
#: Key of the PostgreSQL advisory lock that makes one daemon scan a tick ("rfl" + "scan" as an int).
SCAN_LOCK: Final = 0x72666C7363616E
#: Referrals per write transaction: a few ms of SQLite write lock for plain rows, ~20 ms when every one of
#: them raises an alert (the first scan of a store). Sizing chunks to ~5 ms was tried: more commits, and
#: ACK p50 beside a first scan of 100k went from 12 to 38 ms.
CHUNK: Final = 50
_HOLD_KINDS: Final = (rf.HOLD_STARTED, rf.HOLD_ENDED)
_MOVE_DUE: Final = update(REFERRALS).where(REFERRALS.c.id == bindparam("b_id")).values(next_due_at=bindparam("b_due"))
#: A chunk's reads, built once with expanding INs: built per chunk with the ids as literals (a bind parameter
#: object each) they and the open alerts' read cost ~8 % of a day-later scan of 1M referrals.
_CHUNK_ROWS: Final = select(REFERRALS).where(
    REFERRALS.c.id.in_(bindparam("b_ids", expanding=True)),
    or_(REFERRALS.c.next_due_at <= bindparam("b_now"), REFERRALS.c.clock_version != bindparam("b_version")))
_HELD: Final = select(EVENTS.c.referral_id).distinct().where(
    EVENTS.c.kind.in_(_HOLD_KINDS), EVENTS.c.referral_id.in_(bindparam("b_ids", expanding=True)))
T = TypeVar("T")


def run_scan(engine: Engine, settings: Settings, now: datetime, *, pause: Callable[[], None] | None = None,
             turn: Callable[[], AbstractContextManager[None]] | None = None) -> alerts.ScanResult | None:
    """One scan at *now*, in short transactions; None when another daemon is scanning (PostgreSQL).

    ``pause`` is called before each chunk: the daemon passes one that waits while its writers have frames
    to commit, so ingest goes first (SQLite's busy handler alone lets a tight loop of chunks starve it).
    ``turn`` is held around each write transaction: the daemon's write gate (``refloop.daemon.gate``), so a
    journal commit that arrives during a chunk is woken when the chunk commits rather than sleeping in
    SQLite's busy handler."""
    windows = windows_from_settings(settings.stall)
    with engine.connect() as conn:
        postgres = conn.dialect.name == "postgresql"
        if postgres and not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": SCAN_LOCK}).scalar():
            conn.rollback()
            return None
        conn.commit()
        try:
            with engine.connect() as reader, reader.begin():  # a plain read: SQLite's write lock stays free
                due = due_ids(reader, windows, now)
            writer = conn.execution_options(sqlite_begin="IMMEDIATE")
            hold = turn or contextlib.nullcontext
            result = alerts.ScanResult(settings, now)
            for start in range(0, len(due), CHUNK):
                if pause is not None:
                    pause()
                _write(writer, lambda chunk=due[start:start + CHUNK]: scan_chunk(  # type: ignore[misc]
                    writer, settings, windows, chunk, now, result), hold)
            _write(writer, lambda: _wake_snoozed(writer, now), hold)
            result.notifications += _write(writer, lambda: notices.loop_closed_catch_up(writer, settings, now), hold)
            result.notifications += _write(writer, lambda: notices.no_show_catch_up(writer, settings, now), hold)
            return result
        finally:
            if postgres:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": SCAN_LOCK})
                conn.commit()


def _write(conn: Connection, fn: Callable[[], T],
           hold: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext) -> T:
    with hold(), conn.begin():
        return fn()


def due_ids(conn: Connection, windows: stall.Windows, now: datetime) -> list[int]:
    """Referrals to look at: due (an index range on ``next_due_at``) or computed under other windows
    (two index ranges around the current version)."""
    version = windows.version
    due = select(REFERRALS.c.id).where(REFERRALS.c.next_due_at <= repo.utc(now))
    stale = select(REFERRALS.c.id).where(repo.stale(version))
    return sorted({rid for (rid,) in conn.execute(due)} | {rid for (rid,) in conn.execute(stale)})


def _plain(ref: Any, version: str, held: set[int]) -> bool:
    """Whether the row alone speaks for the clock: current version, no holds (their spells come from the
    events), no presumed attendance (the status depends on ``now``), no truncated detail a window override
    could match on."""
    return (ref.clock_version == version and ref.id not in held and not ref.presume_hours
            and len(ref.priority or "") < 64 and len(ref.referred_to or "") < 255 and len(ref.specialty or "") < 64)


def scan_chunk(conn: Connection, settings: Settings, windows: stall.Windows, ids: list[int], now: datetime,
               result: alerts.ScanResult) -> None:
    """Look at one chunk of referrals inside one transaction (re-checked there: the row may have changed)."""
    version = windows.version
    refs = {r.id: r for r in conn.execute(_CHUNK_ROWS, {"b_ids": ids, "b_now": repo.utc(now), "b_version": version})}
    if not refs:
        return
    held = {rid for (rid,) in conn.execute(_HELD, {"b_ids": list(refs)})}
    by_referral: dict[int, dict[tuple[int, str], Any]] = defaultdict(dict)
    for key, row in alerts.open_alerts(conn, sorted(refs)).items():
        by_referral[key[0]][key] = row
    moved: list[dict[str, Any]] = []
    plain: dict[int, Any] = {}
    stalls: dict[int, list[stall.Stall]] = {}
    dues: dict[tuple[int, str], datetime | None] = {}
    plain_open: dict[tuple[int, str], Any] = {}
    for rid in sorted(refs):
        ref = refs[rid]
        if _plain(ref, version, held):  # the row speaks for the clock: diffed with the rest of the chunk below
            stalls[rid], ref_dues, cursor = alerts.clock_diff(ref, repo.clock_input(ref), windows, now)
            plain[rid] = ref
            dues.update(ref_dues)
            plain_open.update(by_referral[rid])
        else:
            cursor = _fold_one(conn, settings, windows, ref, by_referral[rid], now, result)
        if cursor != repo.aware(ref.next_due_at):
            moved.append({"b_id": rid, "b_due": repo.utc(cursor)})
    if plain:  # one statement per kind of alert write for the whole chunk
        alerts.apply_diff(conn, settings, plain, plain_open, stalls, dues, now, result)
    if moved:  # one prepared statement for the chunk's due times
        conn.execute(_MOVE_DUE, moved)


def _fold_one(conn: Connection, settings: Settings, windows: stall.Windows, ref: Any,
              open_rows: dict[tuple[int, str], Any], now: datetime, result: alerts.ScanResult) -> datetime | None:
    """A referral the row cannot speak for: end a hold whose ``resume_at`` has passed, refold it at *now*
    with the current windows (rewriting a stale row), diff, and return the next instant to look again."""
    state = repo.recompute(conn, ref.id, now, ref=ref, documents=False, windows=windows)
    if state.on_hold and state.hold_resume_at is not None and state.hold_resume_at <= now:
        # referral.py: whoever owns the clock emits hold_ended at resume_at, so the pause ends exactly then
        alerts.add_manual_event(conn, ref.id, rf.HOLD_ENDED, state.hold_resume_at, {"actor": "scheduler"})
        state = repo.recompute(conn, ref.id, now, documents=False, windows=windows)
    pauses = rf.paused_intervals(repo.event_of(r) for r in repo.load_events(conn, ref.id))
    row = conn.execute(select(REFERRALS).where(REFERRALS.c.id == ref.id)).one()
    inp = stall.ClockInput.of_state(state, pauses)
    cursor = alerts.sync_referral(conn, settings, row, inp, windows, now, result, open_rows)
    later = [d for d in (cursor, state.hold_resume_at if state.on_hold else None) if d is not None and d > now]
    if ref.presume_hours:
        later += [d for a in state.live_appointments if a.status is rf.ApptStatus.BOOKED and a.start is not None
                  if (d := a.start + timedelta(hours=ref.presume_hours)) > now]
    return min(later, default=None)


def recompute_stale(engine: Engine, windows: stall.Windows, now: datetime) -> int:
    """Rewrite the clock columns of every row computed under other windows, in short chunks, without
    touching alerts (the next scan diffs them): what ``refloop report`` does first on a store no daemon has
    brought up to date (after migration 0012, or a window change while it was down). Returns the count."""
    with engine.connect() as conn:
        with engine.connect() as reader, reader.begin():
            ids = sorted(rid for (rid,) in reader.execute(select(REFERRALS.c.id).where(repo.stale(windows.version))))
        writer = conn.execution_options(sqlite_begin="IMMEDIATE")
        for start in range(0, len(ids), CHUNK):
            with writer.begin():
                for rid in ids[start:start + CHUNK]:
                    repo.recompute(writer, rid, now, documents=False, windows=windows)
    return len(ids)


def _wake_snoozed(conn: Connection, now: datetime) -> None:
    """Snoozed alerts whose date has come are open again (one indexed statement, not a per-alert pass)."""
    conn.execute(update(ALERTS).where(ALERTS.c.status == alerts.SNOOZED, ALERTS.c.snoozed_until <= repo.utc(now))
                 .values(status=alerts.OPEN, snoozed_until=None, last_action="snooze_expired",
                         last_action_at=repo.utc(now)))
