"""Stall alerts: the scan that persists them, the worklist that shows them, and coordinator actions.

Why the scan has this shape: it recomputes everything from the events and ``now`` (fold, then
:func:`refloop.stall.evaluate`, then :func:`refloop.stall.diff_alerts` against the stored open alerts),
so a missed run is caught up by the next one and running it twice at the same instant changes nothing.
Every notification it causes is enqueued in the same transaction (:mod:`refloop.store.outbox`).

Two daemons sharing PostgreSQL must not scan the same tick at once: the scan transaction takes
``pg_try_advisory_xact_lock`` first and returns ``None`` ("skipped") if another daemon holds it; the lock
ends with the transaction. SQLite has a single daemon, and ``BEGIN IMMEDIATE`` serialises a CLI scan with
it. The unique index on ``alerts (referral_id, stage, open_key)`` is the last line of defence either way.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sqlalchemy import Connection, Engine, Table, func, insert, select, text, update

from refloop import referral as rf
from refloop import stall
from refloop.config import Settings
from refloop.config.windows import windows_from_settings
from refloop.notify import policy
from refloop.store import audit, outbox, sqlhot
from refloop.store import referrals as repo
from refloop.store.models import Alert

ALERTS: Table = Alert.__table__  # type: ignore[assignment]
REFERRALS, DOCUMENTS = repo.REFERRALS, repo.DOCUMENTS
EVENTS: Table = repo.EVENTS

OPEN: Final = "open"
ACKNOWLEDGED: Final = "acknowledged"
SNOOZED: Final = "snoozed"
RESOLVED: Final = "resolved"
UNRESOLVED: Final = (OPEN, ACKNOWLEDGED, SNOOZED)

#: Key of the PostgreSQL advisory lock that makes one daemon scan a tick ("rfl" + "scan" as an int).
SCAN_LOCK: Final = 0x72666C7363616E
#: Loop-closed notices are only sent for loops closed this recently, so enabling notifications on an old
#: database does not mail every referrer about years of history.
LOOP_CLOSED_LOOKBACK: Final = timedelta(days=14)
ACTIONS: Final = ("acknowledge", "snooze", "assign", "note", "hold", "close")
_CHUNK: Final = 500


@dataclass
class ScanResult:
    """What one scan changed; the lists hold worklist rows (see :func:`worklist_row`)."""

    raised: list[dict[str, Any]] = field(default_factory=list)
    escalated: list[dict[str, Any]] = field(default_factory=list)
    resolved: list[dict[str, Any]] = field(default_factory=list)
    notifications: int = 0

    def as_json(self) -> dict[str, Any]:
        return {"raised": self.raised, "escalated": self.escalated, "resolved": self.resolved}


class ActionError(Exception):
    """A coordinator action that cannot be applied; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def level_label(level: int) -> str:
    """Bounded metric label: 1, 2, or 3+."""
    return str(level) if level < 3 else "3+"


# -- scan -------------------------------------------------------------------------------------------
def run_scan(engine: Engine, settings: Settings, now: datetime) -> ScanResult | None:
    """One scan at *now* in one transaction; None when another daemon is scanning (PostgreSQL)."""
    with engine.connect() as conn:
        conn = conn.execution_options(sqlite_begin="IMMEDIATE")
        with conn.begin():
            if conn.dialect.name == "postgresql" and not conn.execute(
                    text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": SCAN_LOCK}).scalar():
                return None
            return scan(conn, settings, now)


def _events_by_referral(conn: Connection, ids: list[int]) -> dict[int, list[Any]]:
    """Every event of many referrals, as the rows ``repo.load_events`` returns, in chunked IN queries."""
    out: dict[int, list[Any]] = defaultdict(list)
    sqlite = conn.dialect.name == "sqlite"
    ph = "?" if sqlite else "%s"
    at = sqlhot.EVENT_COLUMNS.index("occurred_at")
    rid_at = sqlhot.EVENT_COLUMNS.index("referral_id")
    cols = ", ".join(sqlhot.EVENT_COLUMNS)
    for start in range(0, len(ids), _CHUNK):
        chunk = ids[start:start + _CHUNK]
        for raw in _raw(conn, f"SELECT {cols} FROM referral_events WHERE referral_id IN "
                              f"({', '.join([ph] * len(chunk))})", chunk):
            values = list(raw)
            values[at] = _time(values[at])
            out[values[rid_at]].append(sqlhot.EventRow(values))
    return out


def _raw(conn: Connection, sql: str, params: Any = ()) -> list[Any]:
    """Plain DB-API tuples: the scan reads hundreds of thousands of rows, and Row objects cost 3x more."""
    cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cur.execute(sql, params)
        return list(cur.fetchall())
    finally:
        cur.close()


def _end_expired_holds(conn: Connection, rid: int, state: rf.ReferralState, now: datetime) -> bool:
    """A hold with a ``resume_at`` in the past ends *at* resume_at (referral.py: whoever owns the clock
    emits it), so the stall clock restarts exactly then even if the scan runs late."""
    if not state.on_hold or state.hold_resume_at is None or state.hold_resume_at > now:
        return False
    conn.execute(insert(EVENTS).values(
        referral_id=rid, message_id=None, origin=repo.MANUAL, seq=0, kind=rf.HOLD_ENDED,
        occurred_at=repo.utc(state.hold_resume_at), control_id="", subject="", pending_key="",
        data=json.dumps({"actor": "scheduler"})))
    repo.refresh(conn, rid, now)
    return True


def scan(conn: Connection, settings: Settings, now: datetime) -> ScanResult:
    """Fold every open referral (and every referral with an open alert), diff, persist, enqueue.

    PERF (a million referrals): the result is that definition's, but most referrals are never loaded.
    The projection carries everything :func:`stall.evaluate` reads of a referral without holds or presumed
    attendance (the milestones, the details, and the rebooking clock ``no_show_at``/``no_show_count``, all
    of which ``recompute`` keeps equal to the fold of its events), so :func:`_plan` evaluates those
    "plain" referrals from columns, and only folds the rest (holds, presumed attendance, truncated
    details, alerts on referrals that left the scan). With calendar-day windows the comparison with the
    open alerts runs in SQL (:func:`_changed_sql`), so a scan that changes nothing reads ~no rows into
    Python. Stalls are per referral, so the diff of that subset is the diff of the whole.
    """
    windows = windows_from_settings(settings.stall)
    result = ScanResult()
    plan = _plan(conn, settings, windows, now)
    stalls: dict[int, list[stall.Stall]] = dict(plan.stalls)
    fold_ids = sorted(plan.fold)
    # the open alerts of exactly the referrals diffed below (diff_alerts resolves what it is not given stalls for)
    ids = sorted(plan.fold | set(plan.stalls))
    open_rows = {(r.referral_id, r.stage): r for start in range(0, len(ids), _CHUNK) for r in conn.execute(
        select(ALERTS).where(ALERTS.c.referral_id.in_(ids[start:start + _CHUNK]), ALERTS.c.open_key + 0 == 0))}
    ids = sorted(set(ids) | set(plan.reminders))
    refs = {r.id: r for start in range(0, len(ids), _CHUNK) for r in conn.execute(
        select(REFERRALS).where(REFERRALS.c.id.in_(ids[start:start + _CHUNK])))}
    for start in range(0, len(fold_ids), _BATCH):
        batch = fold_ids[start:start + _BATCH]
        events = _events_by_referral(conn, batch)
        for rid in batch:
            folded = [repo._event(e) for e in events.get(rid, [])]
            state = rf.fold(folded, now=now, options=repo.fold_options(refs[rid].presume_hours))
            if _end_expired_holds(conn, rid, state, now):
                folded = [repo._event(e) for e in repo.load_events(conn, rid)]
                state = rf.fold(folded, now=now, options=repo.fold_options(refs[rid].presume_hours))
            found = stall.evaluate(state, now, windows, rf.paused_intervals(folded)) \
                if state.status in rf.OPEN_STATUSES else []
            stalls[rid] = found
            if state.status is rf.Status.NO_SHOW:
                result.notifications += _no_show_reminder(conn, settings, refs[rid], state.no_show_count, now)
    for rid, count in sorted(plan.reminders.items()):  # plain no-shows whose reminder is not enqueued yet
        result.notifications += _no_show_reminder(conn, settings, refs[rid], count, now)
    diff = stall.diff_alerts({k: int(r.level) for k, r in open_rows.items()}, stalls)
    for rid, fresh in diff.raised:
        result.raised.append(_raise(conn, settings, refs[rid], fresh, now, result))
    for rid, fresh in diff.escalated:
        result.escalated.append(_escalate(conn, settings, refs[rid], open_rows[(rid, fresh.stage)], fresh, now,
                                          result))
    for rid, stage in diff.resolved:
        row = open_rows[(rid, stage)]
        conn.execute(update(ALERTS).where(ALERTS.c.id == row.id).values(
            status=RESOLVED, resolved_at=repo.utc(now), open_key=row.id, last_action="auto_resolved",
            last_action_at=repo.utc(now)))
        result.resolved.append(_row_json(settings, {**row._mapping, "status": RESOLVED}, refs[rid], now))
    _refresh_unchanged(conn, open_rows, stalls, diff, now)
    result.notifications += _loop_closed(conn, settings, now)
    return result


_BATCH: Final = 5000
_HOLD_KINDS: Final = (rf.HOLD_STARTED, rf.HOLD_ENDED)
_SENT, _SCHEDULED, _COMPLETED, _NO_SHOW = (rf.Status.SENT.value, rf.Status.SCHEDULED.value,
                                           rf.Status.COMPLETED.value, rf.Status.NO_SHOW.value)
#: The stages :func:`stall._clocks` runs per status, in :data:`stall.STAGES` order, and each one's start column.
_PLAIN_STAGES: Final = {_SENT: (stall.SCHEDULING, stall.VISIT), _SCHEDULED: (stall.VISIT,),
                        _COMPLETED: (stall.NOTE,), _NO_SHOW: (stall.REBOOKING, stall.VISIT)}
_START: Final = {stall.SCHEDULING: "sent_at", stall.VISIT: "sent_at", stall.REBOOKING: "no_show_at",
                 stall.NOTE: "completed_at"}
#: The projection columns the plain evaluation reads, in this order.
_COLUMNS: Final = "id, status, sent_at, completed_at, no_show_at, no_show_count, priority, referred_to, specialty"
#: Bound on |SQL elapsed days - Python elapsed days|: SQLite's julianday() keeps milliseconds (up to 1 ms
#: lost on each side) and a double near 2.46e6 has ~4e-10 day steps; PostgreSQL is exact to the µs. With
#: margin (8.6 ms), so the SQL pre-filter can decide "unchanged" only where Python would decide the same.
_SQL_SLACK: Final = 1e-7
#: ``_plan``'s "unchanged" rule for overdue_days (Python), and the stricter one SQL applies.
_OVERDUE_TOLERANCE: Final = 1e-6
_SQL_OVERDUE_TOLERANCE: Final = _OVERDUE_TOLERANCE - 2 * _SQL_SLACK


@dataclass
class _Plan:
    """What the scan must look at: referrals to fold, stalls already evaluated from the projection (only
    those that differ from their open alerts), and plain no-shows whose patient reminder is still due
    (referral id → no-show count)."""

    fold: set[int] = field(default_factory=set)
    stalls: dict[int, list[stall.Stall]] = field(default_factory=dict)
    reminders: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Details:
    """What :meth:`stall.Windows.window_days` reads of a state."""

    referred_to: str
    specialty: str
    priority: str


def _min_window(windows: stall.Windows, stages: tuple[str, ...]) -> float:
    days = [windows.stage_days[s] for s in stages]
    days += [d for (_, s), d in windows.priority_days.items() if s in stages]
    days += [d for (_, s), d in windows.target_days.items() if s in stages]
    return min(days)


def _time(value: Any) -> datetime | None:
    """A driver-level DateTime value as an aware UTC datetime (SQLite returns text, PostgreSQL datetimes)."""
    if value is None or isinstance(value, datetime):
        return repo.aware(value)
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def _truncated(priority: str | None, referred_to: str | None, specialty: str | None) -> bool:
    """Projection columns are truncated copies of the fold's values: a full-length one may have lost
    characters a window override matches on, so such a referral takes the fold path."""
    return len(priority or "") >= 64 or len(referred_to or "") >= 255 or len(specialty or "") >= 64


def _open_sql() -> str:
    return ", ".join(f"'{s}'" for s in repo.OPEN)


def _plan(conn: Connection, settings: Settings, windows: stall.Windows, now: datetime) -> _Plan:
    plan = _Plan()
    sqlite = conn.dialect.name == "sqlite"
    ph = "?" if sqlite else "%s"
    # open referrals the projection cannot speak for: holds (the pauses come from the timeline) and
    # presumed attendance (the status depends on now; found below)
    plan.fold |= {rid for (rid,) in _raw(
        conn, f"SELECT id FROM referrals WHERE id IN (SELECT referral_id FROM referral_events WHERE kind IN "
              f"({ph}, {ph})) AND status IN ({_open_sql()})", _HOLD_KINDS)}
    margin = timedelta(seconds=1)

    def bound(stages: tuple[str, ...]) -> Any:
        t = now - timedelta(days=_min_window(windows, stages)) + margin
        return sqlhot.sqlite_time(t) if sqlite else t

    # the plain referrals whose clock could have run past a window (no-shows: all of them, a second
    # no-show is level 2 at once)
    bounds = {"b_sent": bound((stall.SCHEDULING, stall.VISIT)), "b_scheduled": bound((stall.VISIT,)),
              "b_completed": bound((stall.NOTE,))}
    if windows.business_days:
        # business time is not SQL arithmetic: read every candidate and evaluate it in Python (still no fold)
        plan.fold |= {rid for (rid,) in _raw(
            conn, f"SELECT id FROM referrals{' NOT INDEXED' if sqlite else ''} "
                  f"WHERE presume_hours <> 0 AND status IN ({_open_sql()})")}
        rows = _raw(conn, f"SELECT {_COLUMNS} FROM referrals r WHERE ({_candidate_sql(sqlite)}) "
                          "AND coalesce(presume_hours, 0) = 0", bounds)
        alerts_by = _open_alerts(conn, None)
        plan.fold |= set(alerts_by) - {r[0] for r in rows}  # alerts on referrals that left the plain scan
    else:
        changed, presumed, covered = _changed(conn, windows, now, bounds, set(plan.fold))
        plan.fold |= presumed
        chunks = [changed[start:start + _CHUNK] for start in range(0, len(changed), _CHUNK)]
        rows = [r for chunk in chunks for r in _raw(
            conn, f"SELECT {_COLUMNS} FROM referrals WHERE id IN ({', '.join([ph] * len(chunk))})", chunk)]
        alerts_by = _open_alerts(conn, changed)
        covered += sum(len(have) for have in alerts_by.values())
        plan.fold |= _orphans(conn, plan.fold, covered, bounds)
    window_cache: dict[tuple[str, str, str, str], float] = {}
    for row in rows:
        rid, status, sent_at, completed_at, no_show_at, no_show_count, priority, referred_to, specialty = row
        if rid in plan.fold:
            continue
        if _truncated(priority, referred_to, specialty):
            plan.fold.add(rid)
            continue
        found = _column_stalls(windows, now, window_cache, status, _time(sent_at), _time(completed_at),
                               _time(no_show_at), int(no_show_count), priority, referred_to, specialty)
        have = alerts_by.get(rid, {})
        same = len(have) == len(found) and all(
            (a := have.get(s.stage)) is not None and s.level <= a[1] and a[2] != SNOOZED
            and abs(a[3] - s.overdue_days) <= _OVERDUE_TOLERANCE
            for s in found)
        if not same:
            plan.stalls[rid] = found
    if policy.patient_channels(settings.notify):
        plan.reminders = {rid: count for rid, count in _due_reminders(conn, settings) if rid not in plan.fold}
    return plan


def _column_stalls(windows: stall.Windows, now: datetime, cache: dict[tuple[str, str, str, str], float],
                   status: str, sent_at: datetime | None, completed_at: datetime | None,
                   no_show_at: datetime | None, no_show_count: int, priority: str, referred_to: str,
                   specialty: str) -> list[stall.Stall]:
    """:func:`stall.evaluate` of a plain referral (no holds, no presumed attendance) from its projection."""
    if sent_at is None:
        return []  # no clock without a start (stall._clocks)
    starts = {"sent_at": sent_at, "completed_at": completed_at, "no_show_at": no_show_at}
    found: list[stall.Stall] = []
    for stage in _PLAIN_STAGES.get(status, ()):
        start = starts[_START[stage]]
        if start is None:
            continue
        if windows.business_days:
            elapsed = stall.elapsed_days(start, now, business_days=True, holidays=windows.holidays)
        else:
            elapsed = max((now - start) / _DAY, 0.0) if now > start else 0.0
        key = (stage, referred_to, specialty, priority)
        window = cache.get(key)
        if window is None:
            window = cache[key] = windows.window_days(
                stage, _Details(referred_to, specialty, priority))  # type: ignore[arg-type]
        level = math.floor(elapsed / window + stall._LEVEL_EPSILON)
        if stage == stall.REBOOKING and no_show_count >= 2:
            level = max(level, 2)
        if level >= 1:
            found.append(stall.Stall(stage, level, max(elapsed - window, 0.0), window, start))
    return found


_DAY: Final = timedelta(days=1)


def _candidate_sql(sqlite: bool) -> str:
    """Open referrals whose clock could have run past a window (bounds from :func:`_plan`)."""
    p = (lambda n: f":{n}") if sqlite else (lambda n: f"%({n})s")
    return (f"(r.status = '{_SENT}' AND r.sent_at <= {p('b_sent')}) "
            f"OR (r.status = '{_SCHEDULED}' AND r.sent_at <= {p('b_scheduled')}) "
            f"OR (r.status = '{_COMPLETED}' AND r.completed_at <= {p('b_completed')}) "
            f"OR r.status = '{_NO_SHOW}'")


def _open_alerts(conn: Connection, ids: list[int] | None) -> dict[int, dict[str, tuple[int, int, str, float]]]:
    """Open alerts ``{referral_id: {stage: (id, level, status, overdue_days)}}``, of *ids* or all."""
    out: dict[int, dict[str, tuple[int, int, str, float]]] = defaultdict(dict)
    if ids is None:
        rows = _raw(conn, "SELECT id, referral_id, stage, level, status, overdue_days FROM alerts WHERE open_key = 0")
    else:
        sqlite = conn.dialect.name == "sqlite"
        ph = "?" if sqlite else "%s"
        rows = [r for start in range(0, len(ids), _CHUNK) for r in _raw(  # by referral (uq_alerts_open), see _Sql
            conn, "SELECT id, referral_id, stage, level, status, overdue_days FROM alerts "
                  f"WHERE referral_id IN ({', '.join([ph] * len(ids[start:start + _CHUNK]))}) "
                  f"AND {'+' if sqlite else ''}open_key = 0", ids[start:start + _CHUNK])]
    for aid, rid, stage, level, status, overdue in rows:
        out[rid][stage] = (aid, int(level), status, float(overdue))
    return out


def _orphans(conn: Connection, fold: set[int], covered: int, bounds: dict[str, Any]) -> set[int]:
    """Referrals with open alerts that are neither plain candidates nor folded anyway (they closed, or their
    clock stopped qualifying). Usually none, which is proven by counting: ``covered`` open alerts are on
    plain candidates (see :func:`_changed`), the rest must be on folded referrals. A mismatch costs a join."""
    sqlite = conn.dialect.name == "sqlite"
    ph = "?" if sqlite else "%s"
    (total,), = _raw(conn, "SELECT count(*) FROM alerts WHERE open_key = 0")
    ids = sorted(fold)
    on_fold = sum(n for start in range(0, len(ids), _CHUNK) for (n,) in _raw(
        conn, f"SELECT count(*) FROM alerts WHERE referral_id IN ({', '.join([ph] * len(ids[start:start + _CHUNK]))})"
              f" AND {'+' if sqlite else ''}open_key = 0", ids[start:start + _CHUNK]))
    if total == covered + on_fold:
        return set()
    return {rid for (rid,) in _raw(
        conn, "SELECT DISTINCT a.referral_id FROM alerts a JOIN referrals r ON r.id = a.referral_id "
              f"WHERE a.open_key = 0 AND (({_candidate_sql(sqlite)}) AND coalesce(r.presume_hours, 0) = 0) "
              "IS NOT TRUE", bounds)} - fold


def _due_reminders(conn: Connection, settings: Settings) -> list[tuple[int, int]]:
    """Plain no-shows whose reminder (keyed by the count, see :func:`_no_show_reminder`) is missing on a
    patient channel: one indexed outbox lookup per no-show instead of an INSERT attempt per scan."""
    key = "'patient:no_show:' || CAST(r.id AS TEXT) || ':' || CAST(r.no_show_count AS TEXT) || ':'"
    q = _Sql(conn.dialect.name == "sqlite")
    missing = " OR ".join(f"NOT EXISTS (SELECT 1 FROM outbox o WHERE o.idempotency_key = {key} || {q.bind(channel)})"
                          for channel, _ in policy.patient_channels(settings.notify))
    return [(int(rid), int(n)) for rid, n in _raw(
        conn, f"SELECT r.id, r.no_show_count FROM referrals r WHERE r.status = '{_NO_SHOW}' "
              f"AND coalesce(r.presume_hours, 0) = 0 AND ({missing})", q.params)]


class _Sql:
    """Builds the pre-filter's SQL for one dialect, binding every value (windows, override keys, times)."""

    def __init__(self, sqlite: bool) -> None:
        self.sqlite = sqlite
        self.params: dict[str, Any] = {}

    def bind(self, value: Any, name: str | None = None) -> str:
        name = name or f"v{len(self.params)}"
        self.params[name] = value
        return f":{name}" if self.sqlite else f"%({name})s"

    def days(self, value: float) -> str:
        mark = self.bind(float(value))
        return mark if self.sqlite else f"CAST({mark} AS DOUBLE PRECISION)"

    def max0(self, expr: str) -> str:
        """``max(expr, 0)``, NULL when *expr* is (PostgreSQL's GREATEST skips NULLs; SQLite's max doesn't)."""
        return f"max({expr}, 0.0)" if self.sqlite else f"CASE WHEN {expr} < 0 THEN 0.0 ELSE {expr} END"

    def greatest(self, a: str, b: str) -> str:
        """The larger of two values, NULL when *a* is (see :meth:`max0`)."""
        return f"max({a}, {b})" if self.sqlite else f"CASE WHEN {a} < {b} THEN {b} ELSE {a} END"

    def floor(self, expr: str) -> str:  # of a value >= 0 (SQLite: no math functions needed)
        return f"CAST({expr} AS INTEGER)" if self.sqlite else f"floor({expr})"

    def day_number(self, expr: str) -> str:
        """A point in time as a number of days (differences are elapsed days; see _SQL_SLACK)."""
        if self.sqlite:
            return f"julianday({expr})"
        return f"(CAST(EXTRACT(EPOCH FROM {expr}) AS DOUBLE PRECISION) / 86400.0)"

    def key(self, column: str) -> str:
        """``stall._key`` for printable-ASCII values without double spaces (others are ``unsafe``)."""
        return f"lower(trim(r.{column}))" if self.sqlite else f"lower(trim(r.{column}) COLLATE \"C\")"

    def code(self) -> str:
        """The priority code ``stall.priority_class`` looks up, for printable-ASCII values."""
        if self.sqlite:
            return "lower(trim(substr(r.priority, 1, instr(r.priority || '^', '^') - 1)))"
        return "lower(trim(split_part(r.priority, '^', 1)) COLLATE \"C\")"

    def not_ascii(self, column: str) -> str:
        return f"r.{column} GLOB '*[^ -~]*'" if self.sqlite else f"r.{column} ~ '[^ -~]'"

    def double_space(self, column: str) -> str:
        return f"instr(r.{column}, '  ') > 0" if self.sqlite else f"position('  ' in r.{column}) > 0"

    def window(self, windows: stall.Windows, stage: str) -> str:
        """:meth:`stall.Windows.window_days` as a CASE: referred_to > specialty > priority > stage default."""
        default = windows.stage_days[stage]
        prio = {cls: d for (cls, s), d in windows.priority_days.items() if s == stage}
        expr = self.days(default)
        if prio:
            whens = " ".join(f"WHEN {self.bind(code)} THEN {self.days(prio.get(cls, default))}"
                             for code, cls in stall.PRIORITY_CODES.items())
            expr = f"CASE {self.code()} {whens} ELSE {self.days(prio.get(stall.ROUTINE, default))} END"
        targets = {name: d for (name, s), d in windows.target_days.items() if s == stage}
        for column in ("specialty", "referred_to"):  # built inside out: referred_to is looked at first
            if targets:
                whens = " ".join(f"WHEN {self.bind(name)} THEN {self.days(d)}" for name, d in targets.items())
                expr = f"CASE {self.key(column)} {whens} ELSE {expr} END"
        return expr

    def unsafe(self, windows: stall.Windows, stage: str) -> str:
        """When the window SQL of *stage* might not resolve exactly like Python: a value a window override is
        looked up by is truncated (see :func:`_truncated`) or not printable ASCII (``casefold``/``strip``
        differ from ``lower``/``trim`` there). Only the fields an override for that stage exists on count."""
        terms = []
        if any(s == stage for _, s in windows.priority_days):
            terms += ["length(r.priority) >= 64", self.not_ascii("priority")]
        if any(s == stage for _, s in windows.target_days):
            terms += ["length(r.referred_to) >= 255", "length(r.specialty) >= 64"]
            for column in ("referred_to", "specialty"):
                terms += [self.not_ascii(column), self.double_space(column)]
        return " OR ".join(terms)


def _changed(conn: Connection, windows: stall.Windows, now: datetime, bounds: dict[str, Any],
             held: set[int]) -> tuple[list[int], set[int], int]:
    """One pass of SQL over the open referrals (calendar-day windows): the plain candidates whose stalls may
    differ from their open alerts, the open referrals with presumed attendance (to fold), and how many open
    alerts the other plain candidates have (for :func:`_orphans`).

    Per candidate, SQL computes what :func:`_column_stalls` would for its (at most two) stages: elapsed
    days, the window, overdue_days and the level as ``lo``/``hi``, the floors of ``elapsed / window +
    epsilon`` -/+ ``_SQL_SLACK / smallest window`` (the level is certain when they agree). It leaves a
    referral out only where Python would find it unchanged (``same`` in :func:`_plan`): every level is
    certain, and the open alerts are exactly one per stalled stage, each at that level or higher, not
    snoozed, with overdue_days within the stricter ``_SQL_OVERDUE_TOLERANCE``. Anything the SQL does not
    mirror exactly (see :meth:`_Sql.unsafe`) is returned.

    PERF: SQLite evaluates every expression each time it appears, so each value is computed once, in
    nested subqueries kept from being inlined (``fence``). About 0.95 s per million referrals (bench/store.py,
    ~415k candidates, 545k open alerts): ~0.2 s reading the rows, ~0.3 s arithmetic, ~0.45 s probing each
    candidate's open alerts (uq_alerts_open, then the alert row).
    """
    sqlite = conn.dialect.name == "sqlite"
    q = _Sql(sqlite)
    p = q.bind
    if sqlite:  # now as SQLite's own julianday() reads it, computed once (not per row)
        (today_value,), = _raw(conn, "SELECT julianday(?)", (sqlhot.sqlite_time(now),))
        today = p(float(today_value), "today")
    else:
        today = q.day_number(f"CAST({p(now, 'now')} AS TIMESTAMPTZ)")
    fence = "LIMIT -1" if sqlite else "OFFSET 0"  # a subquery evaluated once per row, not inlined per use
    # SQLite: read the table in rowid order (~0.1 s per million rows) rather than fetch ~40 % of it in index
    # order (random access, 10x slower); probe alerts by referral (uq_alerts_open), never by open_key alone
    scan_all, plus = (" NOT INDEXED", "+") if sqlite else ("", "")
    # held referrals are folded (the caller has them): left out by id, or by subquery when there are many
    if not held:
        not_held = "1 = 1"
    elif len(held) <= _CHUNK:
        not_held = f"r.id NOT IN ({', '.join(p(rid) for rid in sorted(held))})"
    else:
        not_held = (f"r.id NOT IN (SELECT referral_id FROM referral_events WHERE kind IN "
                    f"({', '.join(p(k) for k in _HOLD_KINDS)}) AND referral_id IS NOT NULL)")
    # k: the stage of slot 1 (1 scheduling, 2 rebooking, 5 rebooking after a second no-show, which is level
    # 2 at once, 3 visit, 4 note); 0 unsafe, 9 presumed attendance.
    # Slot 2 is visit, for sent and no_show referrals (stall._clocks); no clock at all without sent_at.
    codes = {_COMPLETED: 4, _SENT: 1, _SCHEDULED: 3, _NO_SHOW: 2}  # most frequent first
    stage_of = {1: stall.SCHEDULING, 2: stall.REBOOKING, 3: stall.VISIT, 4: stall.NOTE, 5: stall.REBOOKING}
    two = (_SENT, _NO_SHOW)
    whens = []
    for status, code in codes.items():
        unsafe = [u for u in (q.unsafe(windows, stage_of[code]),
                              q.unsafe(windows, stall.VISIT) if status in two else "") if u]
        if status in (_COMPLETED, _NO_SHOW):  # (sent and scheduled candidates have a sent_at)
            unsafe.append("r.sent_at IS NULL")  # no clock at all: rare, let Python say so
        code_sql = "CASE WHEN r.no_show_count >= 2 THEN 5 ELSE 2 END" if status == _NO_SHOW else str(code)
        whens.append(f"WHEN '{status}' THEN " + (f"CASE WHEN {' OR '.join(unsafe)} THEN 0 ELSE {code_sql} END"
                                                  if unsafe else code_sql))
    presumed = "r.presume_hours <> 0"
    kind = f"CASE WHEN {presumed} THEN 9 ELSE CASE r.status {' '.join(whens)} END END"
    # which rows: the candidates (_candidate_sql) and every open referral with presumed attendance; closed
    # first, as it is the commonest status and the rest of the CASE is skipped for it
    candidate = (f"CASE r.status WHEN '{rf.Status.CLOSED.value}' THEN 1 = 0 "
                 f"WHEN '{_COMPLETED}' THEN r.completed_at <= {p(bounds['b_completed'])} OR {presumed} "
                 f"WHEN '{_SENT}' THEN r.sent_at <= {p(bounds['b_sent'])} OR {presumed} "
                 f"WHEN '{_SCHEDULED}' THEN r.sent_at <= {p(bounds['b_scheduled'])} OR {presumed} "
                 f"WHEN '{_NO_SHOW}' THEN 1 = 1 ELSE 1 = 0 END")
    e_sent = f"{today} - {q.day_number('r.sent_at')}"
    e1 = (f"CASE r.status WHEN '{_COMPLETED}' THEN {today} - {q.day_number('r.completed_at')} "
          f"WHEN '{_NO_SHOW}' THEN {today} - {q.day_number('r.no_show_at')} ELSE {e_sent} END")
    e1 = q.max0(e1)  # elapsed days: 0 before the start (stall.elapsed_days); NULL without a clock
    w1 = f"CASE r.status {' '.join(f'WHEN {p(s)} THEN {q.window(windows, stage_of[c])}' for s, c in codes.items())} END"
    e2 = f"CASE r.status WHEN '{two[0]}' THEN {q.max0(e_sent)} WHEN '{two[1]}' THEN {q.max0(e_sent)} END"
    inner = (
        f"SELECT r.id AS id, {kind} AS k, {e1} AS e1, {w1} AS w1, {e2} AS e2, "
        f"{q.window(windows, stall.VISIT)} AS w2 FROM referrals r{scan_all} "
        f"WHERE {candidate} AND {not_held} {fence}")
    # lo/hi: the level's floor at elapsed -/+ slack, -1 when the slot has no clock (CAST truncates toward 0,
    # which is floor for the levels >= 0 that matter); a second no-show makes rebooking level 2 at once
    near = _SQL_SLACK / _min_window(windows, stall.STAGES)
    below, above = q.days(stall._LEVEL_EPSILON - near), q.days(stall._LEVEL_EPSILON + near)
    stage1 = f"CASE c.k {' '.join(f'WHEN {c} THEN {p(st)}' for c, st in stage_of.items())} END"
    cols = ["CASE WHEN c.k = 9 THEN -1 WHEN c.k = 0 THEN -2 ELSE 0 END AS flag", f"{stage1} AS st1"]
    for n in ("1", "2"):
        e, w = f"c.e{n}", f"c.w{n}"
        lo, hi = (q.floor(f"{e} / {w} + {bound}") for bound in (below, above))
        if n == "1":
            lo, hi = (f"CASE WHEN c.k = 5 THEN {q.greatest(x, '2')} ELSE {x} END" for x in (lo, hi))
        cols += [f"coalesce({lo}, -1) AS lo{n}", f"coalesce({hi}, -1) AS hi{n}", f"{q.max0(f'{e} - {w}')} AS ov{n}"]
    levels = f"SELECT c.id AS id, {', '.join(cols)} FROM ({inner}) c {fence}"
    tol = q.days(_SQL_OVERDUE_TOLERANCE)
    # A stage is stalled for sure when lo >= 1 and certainly not when hi < 1; otherwise Python decides. An
    # open alert at level >= hi is at least at the level Python computes (which lies in [lo, hi]). Each open
    # alert scores 1 if it is one of the stalled stages and unchanged, else 1000: the sum equals the number
    # of stalled stages exactly when the alerts are those stages (there is one open alert per stage).
    alerts = (f"SELECT sum(CASE WHEN a.status <> '{SNOOZED}' AND ("
              f"(m.lo1 >= 1 AND a.stage = m.st1 AND a.level >= m.hi1 "
              f"AND a.overdue_days - m.ov1 BETWEEN -{tol} AND {tol}) "
              f"OR (m.lo2 >= 1 AND a.stage = '{stall.VISIT}' AND a.level >= m.hi2 "
              f"AND a.overdue_days - m.ov2 BETWEEN -{tol} AND {tol})) THEN 1 ELSE 1000 END) "
              f"FROM alerts a WHERE a.referral_id = m.id AND {plus}a.open_key = 0")
    stalled = "(CASE WHEN m.lo1 >= 1 THEN 1 ELSE 0 END + CASE WHEN m.lo2 >= 1 THEN 1 ELSE 0 END)"
    outer = (f"SELECT m.id AS id, CASE WHEN m.flag < 0 THEN m.flag WHEN (m.lo1 < 1 AND m.hi1 >= 1) "
             f"OR (m.lo2 < 1 AND m.hi2 >= 1) OR coalesce(({alerts}), 0) <> {stalled} THEN -2 ELSE {stalled} END AS s "
             f"FROM ({levels}) m {fence}")
    ids = ("group_concat(CASE o.s WHEN -2 THEN o.id WHEN -1 THEN -o.id END)" if sqlite
           else "string_agg(CASE o.s WHEN -2 THEN CAST(o.id AS TEXT) WHEN -1 THEN CAST(-o.id AS TEXT) END, ',')")
    (covered, found), = _raw(
        conn, f"SELECT coalesce(sum(CASE WHEN o.s >= 0 THEN o.s END), 0), {ids} FROM ({outer}) o", q.params)
    marked = [int(i) for i in found.split(",")] if found else []
    return sorted(i for i in marked if i > 0), {-i for i in marked if i < 0}, int(covered)


def _refresh_unchanged(conn: Connection, open_rows: dict[tuple[int, str], Any],
                       stalls: dict[int, list[stall.Stall]], diff: stall.AlertDiff, now: datetime) -> None:
    """Keep ``overdue_days`` current for the worklist and wake snoozed alerts whose time has come."""
    touched = {(rid, s.stage) for rid, s in diff.escalated} | set(diff.resolved)
    for rid, found in stalls.items():
        for s in found:
            row = open_rows.get((rid, s.stage))
            if row is None or (rid, s.stage) in touched:
                continue
            values: dict[str, Any] = {}
            if abs(float(row.overdue_days) - s.overdue_days) > 1e-6:
                values["overdue_days"] = s.overdue_days
            if row.status == SNOOZED and _expired(row.snoozed_until, now):
                values.update(status=OPEN, snoozed_until=None, last_action="snooze_expired",
                              last_action_at=repo.utc(now))
            if values:
                conn.execute(update(ALERTS).where(ALERTS.c.id == row.id).values(**values))


def _expired(until: datetime | None, now: datetime) -> bool:
    return until is None or repo.aware(until) <= now  # type: ignore[operator]


def _raise(conn: Connection, settings: Settings, ref: Any, found: stall.Stall, now: datetime,
           result: ScanResult) -> dict[str, Any]:
    parties = policy.Parties.of(ref)
    owner = policy.owner_for(settings.worklist, parties)
    values = {"referral_id": ref.id, "stage": found.stage, "level": found.level, "status": OPEN, "owner": owner[:128],
              "overdue_days": found.overdue_days, "raised_at": repo.utc(now), "last_action": "raised",
              "last_action_at": repo.utc(now), "open_key": 0}
    alert_id = int(conn.execute(insert(ALERTS).values(values).returning(ALERTS.c.id)).scalar_one())
    row = {**values, "id": alert_id}
    result.notifications += _notify_owner(conn, settings, ref, row, "alert_raised", f"alert:{alert_id}:1", now)
    if found.stage == stall.SCHEDULING:
        result.notifications += _notify_patient(conn, settings, ref, "booking_reminder", f"patient:booking:{alert_id}",
                                                now, alert_id=alert_id)
    return _row_json(settings, row, ref, now)


def _escalate(conn: Connection, settings: Settings, ref: Any, old: Any, found: stall.Stall, now: datetime,
              result: ScanResult) -> dict[str, Any]:
    """Raise the level in place. A snoozed alert stays snoozed (and quiet) until its date; an acknowledged
    one is reopened, because it got worse since someone looked at it."""
    snoozed = old.status == SNOOZED and not _expired(old.snoozed_until, now)
    status = SNOOZED if snoozed else OPEN
    values = {"level": found.level, "overdue_days": found.overdue_days, "escalated_at": repo.utc(now),
              "status": status, "last_action": "escalated", "last_action_at": repo.utc(now)}
    if not snoozed:
        values["snoozed_until"] = None
    conn.execute(update(ALERTS).where(ALERTS.c.id == old.id).values(**values))
    row = {**old._mapping, **values}
    if not snoozed:
        result.notifications += _notify_owner(conn, settings, ref, row, "alert_escalated",
                                              f"alert:{old.id}:{found.level}", now)
    return _row_json(settings, row, ref, now)


# -- notifications ------------------------------------------------------------------------------------
def _base_payload(settings: Settings, ref: Any, event: str, now: datetime) -> dict[str, Any]:
    """IDs and statuses only; provider names and specialty only with ``webhook_phi``."""
    payload: dict[str, Any] = {"event": event, "referral_id": ref.id, "placer_id": ref.placer_id,
                               "status": ref.status, "at": now.isoformat()}
    if settings.notify.webhook_phi:
        payload.update(referred_to=ref.referred_to, referring_provider=ref.referring_provider,
                       specialty=ref.specialty)
    return payload


def _fan_out(conn: Connection, settings: Settings, ref: Any, channels: list[tuple[str, str]], event: str,
             key: str, payload: dict[str, Any], now: datetime, alert_id: int | None = None) -> int:
    suppressed = policy.mode_for(settings.worklist, policy.Parties.of(ref)) != policy.ACTIVE
    n = 0
    for channel, target in channels:
        n += outbox.enqueue(conn, key=f"{key}:{channel}", channel=channel, target=target, event=event, now=now,
                            payload=payload, referral_id=ref.id, alert_id=alert_id, suppressed=suppressed)
    return n


def _notify_owner(conn: Connection, settings: Settings, ref: Any, row: dict[str, Any], event: str, key: str,
                  now: datetime) -> int:
    payload = {**_base_payload(settings, ref, event, now), "alert_id": row["id"], "stage": row["stage"],
               "level": row["level"], "overdue_days": round(float(row["overdue_days"]), 2), "owner": row["owner"]}
    channels = policy.owner_channels(settings.notify, settings.worklist, row["owner"])
    return _fan_out(conn, settings, ref, channels, event, key, payload, now, alert_id=row["id"])


def _notify_patient(conn: Connection, settings: Settings, ref: Any, event: str, key: str, now: datetime,
                    alert_id: int | None = None) -> int:
    """The patient-engagement system resolves the patient from the placer ID; refloop holds no contact data."""
    payload = {"event": event, "referral_id": ref.id, "placer_id": ref.placer_id, "at": now.isoformat()}
    return _fan_out(conn, settings, ref, policy.patient_channels(settings.notify), event, key, payload, now,
                    alert_id=alert_id)


def _no_show_reminder(conn: Connection, settings: Settings, ref: Any, no_show_count: int, now: datetime) -> int:
    """One re-engagement reminder per no-show (keyed by the count, so a resent no-show is not re-sent;
    :func:`_due_reminders` builds the same key in SQL)."""
    return _notify_patient(conn, settings, ref, "no_show_reminder", f"patient:no_show:{ref.id}:{no_show_count}", now)


def _loop_closed(conn: Connection, settings: Settings, now: datetime) -> int:
    """Catch-up for :func:`on_projection_change`: referrals closed by a consult note (not by hand) since the
    lookback and not yet announced (e.g. a status reached through a replay or an older version)."""
    if not policy.referrer_channels(settings.notify):
        return 0  # nothing to enqueue (and nothing marks them announced): skip the per-referral lookups
    announced = select(outbox.OUTBOX.c.referral_id).where(outbox.OUTBOX.c.event == "loop_closed",
                                                          outbox.OUTBOX.c.referral_id.is_not(None))
    rows = list(conn.execute(select(REFERRALS).where(
        REFERRALS.c.status == rf.Status.CLOSED.value, REFERRALS.c.note_received_at.is_not(None),
        REFERRALS.c.closed_at <= repo.utc(now), REFERRALS.c.closed_at >= repo.utc(now - LOOP_CLOSED_LOOKBACK),
        REFERRALS.c.id.not_in(announced))))
    return sum(_announce_loop_closed(conn, settings, ref, now) for ref in rows)


def _announce_loop_closed(conn: Connection, settings: Settings, ref: Any, now: datetime) -> int:
    """Tell the referrer (webhook, e-mail, and the note forwarded over MLLP); keyed per referral, once."""
    payload = _base_payload(settings, ref, "loop_closed", now)
    payload["closed_at"] = repo.iso(repo.aware(ref.closed_at))
    doc = conn.execute(select(DOCUMENTS.c.id, DOCUMENTS.c.document_id).where(
        DOCUMENTS.c.referral_id == ref.id, DOCUMENTS.c.final.is_(True), DOCUMENTS.c.status != "retracted")
        .order_by(DOCUMENTS.c.id.desc()).limit(1)).first()
    if doc is not None:
        payload.update(document_row=doc.id, document_id=doc.document_id)
    return _fan_out(conn, settings, ref, policy.referrer_channels(settings.notify), "loop_closed",
                    f"loop_closed:{ref.id}", payload, now)


class _Projected:
    """The referral row as just written: the old row's columns with the recomputed values over them."""

    def __init__(self, before: Any, values: dict[str, Any]) -> None:
        names = before._mapping.keys() if hasattr(before, "_mapping") else REFERRALS.columns.keys()
        self.__dict__.update({n: getattr(before, n) for n in names})
        self.__dict__.update(values)


def on_projection_change(conn: Connection, settings: Settings, now: datetime, before: Any, values: dict[str, Any],
                         state: rf.ReferralState) -> None:
    """Notifications that a message's state change causes, enqueued in the message's own transaction:
    the loop closed by a consult note (referrer), and a new no-show (patient re-engagement reminder).
    Stall alerts are the scan's (their cause is time passing, not a message). Same idempotency keys as the
    scan's catch-up, so whichever runs first enqueues and the other finds the key taken."""
    closed_now = state.status is rf.Status.CLOSED and before.status != rf.Status.CLOSED.value
    if closed_now and state.note_received_at is not None and policy.referrer_channels(settings.notify):
        _announce_loop_closed(conn, settings, _Projected(before, values), now)
    if state.status is rf.Status.NO_SHOW and state.no_show_count > int(before.no_show_count or 0):
        _no_show_reminder(conn, settings, _Projected(before, values), state.no_show_count, now)


def dead_letter_notice(conn: Connection, settings: Settings, dead: dict[str, Any], now: datetime) -> int:
    """Tell the owner a notification was dead-lettered, on the other channels (the failed one may be down)."""
    if dead["event"] == "dead_letter":
        return 0
    owner = settings.worklist.default_owner
    if dead["alert_id"] is not None:
        found = conn.execute(select(ALERTS.c.owner).where(ALERTS.c.id == dead["alert_id"])).scalar()
        owner = found or owner
    channels = [c for c in policy.owner_channels(settings.notify, settings.worklist, owner, digest_email=True)
                if c[0] != dead["channel"]]
    payload = {"event": "dead_letter", "outbox_id": dead["id"], "failed_event": dead["event"],
               "channel": dead["channel"], "referral_id": dead["referral_id"], "alert_id": dead["alert_id"],
               "at": now.isoformat()}
    n = 0
    for channel, target in channels:
        n += outbox.enqueue(conn, key=f"dead:{dead['id']}:{channel}", channel=channel, target=target,
                            event="dead_letter", now=now, payload=payload, referral_id=dead["referral_id"])
    return n


def digest(conn: Connection, settings: Settings, now: datetime) -> int:
    """One e-mail per owner per day listing new (last 24 h) and still-open alerts; idempotent per day."""
    ws = settings.worklist
    if ws.digest == "immediate" or now.hour < ws.digest_hour_utc:
        return 0
    rows = conn.execute(select(ALERTS, REFERRALS.c.placer_id, REFERRALS.c.authority, REFERRALS.c.referred_to,
                               REFERRALS.c.referred_to_id, REFERRALS.c.specialty)
                        .join(REFERRALS, REFERRALS.c.id == ALERTS.c.referral_id)
                        .where(ALERTS.c.status.in_((OPEN, ACKNOWLEDGED))).order_by(ALERTS.c.id))
    by_owner: dict[str, list[Any]] = defaultdict(list)
    for r in rows:
        by_owner[r.owner].append(r)
    n = 0
    for owner, alerts in sorted(by_owner.items()):
        email = policy.owner_email(settings.notify, owner)
        if not settings.notify.smtp_host or not email:
            continue
        active = [a for a in alerts if policy.mode_for(ws, policy.Parties(
            a.authority, a.referred_to, a.referred_to_id, a.specialty)) == policy.ACTIVE]
        listed = active or alerts
        since = now - timedelta(days=1)
        payload = {"event": "digest", "owner": owner, "date": now.date().isoformat(), "alerts": [
            {"alert_id": a.id, "placer_id": a.placer_id, "stage": a.stage, "level": a.level,
             "overdue_days": round(float(a.overdue_days), 2), "new": repo.aware(a.raised_at) >= since}  # type: ignore[operator]
            for a in listed]}
        n += outbox.enqueue(conn, key=f"digest:{owner}:{now.date().isoformat()}", channel=policy.EMAIL,
                            target=email, event="digest", now=now, payload=payload, suppressed=not active)
    return n


# -- worklist -----------------------------------------------------------------------------------------
def _row_json(settings: Settings, row: Any, ref: Any, now: datetime) -> dict[str, Any]:
    get = row.get if isinstance(row, dict) else row._mapping.get
    return {
        "alert_id": get("id"), "referral": ref.id, "placer_id": ref.placer_id, "stage": get("stage"),
        "level": get("level"), "overdue_days": round(float(get("overdue_days") or 0.0), 2), "owner": get("owner"),
        "status": get("status"), "mode": policy.mode_for(settings.worklist, policy.Parties.of(ref)),
        "last_action": get("last_action"), "snoozed_until": repo.iso(repo.aware(get("snoozed_until"))),
        "raised_at": repo.iso(repo.aware(get("raised_at"))),
    }


def worklist(conn: Connection, settings: Settings, now: datetime, *, owner: str | None = None,
             include_snoozed: bool = False) -> list[dict[str, Any]]:
    """Unresolved alerts, most overdue first, each with its relationship's mode and worst delivery state;
    then dead-lettered notifications, which need a human as much as a stalled referral does."""
    statuses = UNRESOLVED if include_snoozed else (OPEN, ACKNOWLEDGED)
    stmt = (select(ALERTS, REFERRALS.c.placer_id, REFERRALS.c.authority, REFERRALS.c.referred_to,
                   REFERRALS.c.referred_to_id, REFERRALS.c.specialty, REFERRALS.c.status.label("referral_status"))
            .join(REFERRALS, REFERRALS.c.id == ALERTS.c.referral_id).where(ALERTS.c.status.in_(statuses))
            .order_by(ALERTS.c.overdue_days.desc(), ALERTS.c.level.desc(), ALERTS.c.id))
    if owner:
        stmt = stmt.where(ALERTS.c.owner == owner)
    rows = list(conn.execute(stmt))
    worst = _delivery_states(conn, [r.id for r in rows])
    out = []
    for r in rows:
        ref = _RefView(r.referral_id, r.placer_id, r.authority, r.referred_to, r.referred_to_id, r.specialty)
        item = _row_json(settings, r, ref, now)
        item["delivery"] = worst.get(r.id, "")
        out.append(item)
    if owner in (None, "", settings.worklist.default_owner):
        for d in conn.execute(select(outbox.OUTBOX, REFERRALS.c.placer_id).outerjoin(
                REFERRALS, REFERRALS.c.id == outbox.OUTBOX.c.referral_id).where(
                outbox.OUTBOX.c.status == outbox.DEAD, outbox.OUTBOX.c.alert_id.is_(None))
                .order_by(outbox.OUTBOX.c.id)):
            out.append({"alert_id": None, "referral": d.referral_id, "placer_id": d.placer_id or "",
                        "stage": "delivery", "level": None, "overdue_days": 0.0,
                        "owner": settings.worklist.default_owner, "status": "dead", "mode": policy.ACTIVE,
                        "last_action": d.last_error, "outbox_id": d.id, "event": d.event, "delivery": "dead"})
    return out


_DELIVERY_RANK: Final = {"dead": 4, "failed": 3, "pending": 2, "suppressed": 1, "delivered": 0}


def _delivery_states(conn: Connection, alert_ids: list[int]) -> dict[int, str]:
    out: dict[int, str] = {}
    if not alert_ids:
        return out
    for start in range(0, len(alert_ids), _CHUNK):  # chunked: SQLite caps bound parameters per statement
        for alert_id, status in conn.execute(select(outbox.OUTBOX.c.alert_id, outbox.OUTBOX.c.status).where(
                outbox.OUTBOX.c.alert_id.in_(alert_ids[start:start + _CHUNK]))):
            if _DELIVERY_RANK.get(status, 0) >= _DELIVERY_RANK.get(out.get(alert_id, "delivered"), 0):
                out[alert_id] = status
    return out


@dataclass(frozen=True)
class _RefView:
    id: int
    placer_id: str
    authority: str
    referred_to: str
    referred_to_id: str
    specialty: str


# -- coordinator actions ------------------------------------------------------------------------------
def _timeline(conn: Connection, rid: int, kind: str, now: datetime, data: dict[str, Any]) -> None:
    """A manual referral event, so every coordinator action shows on the referral's timeline."""
    conn.execute(insert(EVENTS).values(
        referral_id=rid, message_id=None, origin=repo.MANUAL, seq=0, kind=kind, occurred_at=repo.utc(now),
        control_id="", subject="", pending_key="", data=json.dumps(data, sort_keys=True)))


def act(conn: Connection, settings: Settings, alert_id: int, action: str, now: datetime, *, actor: str,
        note: str = "", until: datetime | None = None, owner: str = "", reason: str = "") -> dict[str, Any]:
    """Apply one coordinator action; each is also a timeline event and an audit row (IDs only)."""
    if action not in ACTIONS:
        raise ActionError(400, f"unknown action (known: {', '.join(ACTIONS)})")
    row = conn.execute(select(ALERTS).where(ALERTS.c.id == alert_id).with_for_update()).first()
    if row is None:
        raise ActionError(404, "no such alert")
    actor = (actor or "unknown")[:64]
    values: dict[str, Any] = {"last_action": action, "last_action_at": repo.utc(now)}
    data: dict[str, Any] = {"actor": actor, "alert_id": alert_id, "action": action}
    if action == "acknowledge":
        values["status"] = ACKNOWLEDGED if row.status != RESOLVED else RESOLVED
    elif action == "snooze":
        if until is None or until <= now:
            raise ActionError(400, "snooze needs an 'until' date in the future")
        values.update(status=SNOOZED, snoozed_until=repo.utc(until))
        data["until"] = until.isoformat()
    elif action == "assign":
        if not owner.strip():
            raise ActionError(400, "assign needs an 'owner'")
        values["owner"] = owner.strip()[:128]
        data["owner"] = values["owner"]
    elif action == "note" and not note.strip():
        raise ActionError(400, "note needs a 'note'")
    if note:
        data["note"] = note  # free text: kept in event data, which fold keeps off the timeline detail
    if action == "hold":
        # pauses the referral's stall clock (referral.paused_intervals) until *until*, or until someone ends it
        if not reason.strip():
            raise ActionError(400, "hold needs a 'reason'")
        if until is not None and until <= now:
            raise ActionError(400, "hold 'until' must be in the future")
        hold = {"actor": actor, "reason": reason.strip()[:255], "alert_id": alert_id}
        if until is not None:
            hold["resume_at"] = until.isoformat()
        _timeline(conn, row.referral_id, rf.HOLD_STARTED, now, hold)
        repo.refresh(conn, row.referral_id, now)
        conn.execute(update(ALERTS).where(ALERTS.c.id == alert_id).values(
            **values, status=ACKNOWLEDGED if row.status != RESOLVED else RESOLVED))
    elif action == "close":
        if not reason.strip():
            raise ActionError(400, "close needs a 'reason'")
        _timeline(conn, row.referral_id, rf.MANUAL_CLOSED, now, {"actor": actor, "reason": reason.strip()[:255],
                                                                 "alert_id": alert_id})
        repo.refresh(conn, row.referral_id, now)
        conn.execute(update(ALERTS).where(ALERTS.c.referral_id == row.referral_id, ALERTS.c.open_key == 0).values(
            status=RESOLVED, resolved_at=repo.utc(now), open_key=ALERTS.c.id, last_action="close",
            last_action_at=repo.utc(now)))
    else:
        _timeline(conn, row.referral_id, rf.COORDINATOR_NOTE, now, data)
        conn.execute(update(ALERTS).where(ALERTS.c.id == alert_id).values(**values))
    audit.record(conn, now=now, actor=actor, action=f"alert_{action}", target=f"alert:{alert_id}",
                 detail=f"referral:{row.referral_id}")
    return get_alert(conn, settings, alert_id, now) or {}


def get_alert(conn: Connection, settings: Settings, alert_id: int, now: datetime) -> dict[str, Any] | None:
    row = conn.execute(select(ALERTS).where(ALERTS.c.id == alert_id)).first()
    if row is None:
        return None
    ref = conn.execute(select(REFERRALS).where(REFERRALS.c.id == row.referral_id)).one()
    return _row_json(settings, row, ref, now)


ANSWERS: Final = {
    "booked_elsewhere": "close",  # the patient was seen elsewhere: the loop is closed, stop chasing
    "declined": "close",  # the patient does not want the referral
    "will_book": "hold",  # give the patient time before alerting again
}


def answer(conn: Connection, settings: Settings, rid: int, answer_code: str, now: datetime, *, actor: str,
           note: str = "", hold_days: float = 7.0) -> dict[str, Any]:
    """A patient's or practice's answer as timeline events: close, hold for *hold_days*, or just a note."""
    code = answer_code.strip().lower()[:32]
    if not code:
        raise ActionError(400, "answer is required")
    actor = (actor or "unknown")[:64]
    effect = ANSWERS.get(code, "note")
    data: dict[str, Any] = {"actor": actor, "answer": code}
    if note:
        data["note"] = note
    if effect == "close":
        _timeline(conn, rid, rf.MANUAL_CLOSED, now, {**data, "reason": code})
    elif effect == "hold":
        resume = now + timedelta(days=hold_days)
        _timeline(conn, rid, rf.HOLD_STARTED, now, {**data, "reason": code, "resume_at": resume.isoformat()})
    else:
        _timeline(conn, rid, rf.COORDINATOR_NOTE, now, data)
    state = repo.refresh(conn, rid, now)
    if effect == "close":
        conn.execute(update(ALERTS).where(ALERTS.c.referral_id == rid, ALERTS.c.open_key == 0).values(
            status=RESOLVED, resolved_at=repo.utc(now), open_key=ALERTS.c.id, last_action=f"answer_{code}",
            last_action_at=repo.utc(now)))
    audit.record(conn, now=now, actor=actor, action="referral_answer", target=f"referral:{rid}", detail=code)
    return {"referral": rid, "answer": code, "effect": effect, "status": state.status.value,
            "on_hold": state.on_hold}


def gauges(conn: Connection) -> dict[str, Any]:
    """Counts for the Prometheus gauges, refreshed at the end of each scan."""
    summed: dict[tuple[str, str], int] = defaultdict(int)
    for stage, level, n in conn.execute(select(ALERTS.c.stage, ALERTS.c.level, func.count())
                                        .where(ALERTS.c.open_key == 0).group_by(ALERTS.c.stage, ALERTS.c.level)):
        summed[(stage, level_label(int(level)))] += int(n)  # levels 3, 4, ... share the "3+" label
    alerts = [(stage, label, n) for (stage, label), n in sorted(summed.items())]
    statuses: dict[str, int] = dict(conn.execute(
        select(REFERRALS.c.status, func.count()).group_by(REFERRALS.c.status)).all())
    return {"alerts": alerts, "referrals": {s.value: int(statuses.get(s.value, 0)) for s in rf.Status},
            "outbox": outbox.counts(conn)}
