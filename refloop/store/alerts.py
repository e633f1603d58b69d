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
ACTIONS: Final = ("acknowledge", "snooze", "assign", "note", "close")
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
    :func:`_plan` reads the open alerts and the projection columns of the open referrals whose clock could
    have run past a window (SQL, indexed), and evaluates the plain ones (sent/scheduled/completed, no
    holds, no presumed attendance) straight from the projection, which ``recompute`` keeps equal to the
    fold of their events; a referral whose stalls match its open alerts exactly is skipped. Only the rest
    (no-shows, holds, presumed attendance, alerts on referrals that moved on, changed stalls) are folded
    from their events, loaded in batches. Stalls are per referral, so the diff of that subset is the diff
    of the whole.
    """
    windows = windows_from_settings(settings.stall)
    result = ScanResult()
    plan = _plan(conn, settings, windows, now)
    stalls: dict[int, list[stall.Stall]] = dict(plan.stalls)
    fold_ids = sorted(plan.fold)
    alert_ids = sorted({aid for rid in (*fold_ids, *plan.stalls) for aid in plan.alerts_of.get(rid, ())})
    open_rows = {(r.referral_id, r.stage): r for start in range(0, len(alert_ids), _CHUNK) for r in conn.execute(
        select(ALERTS).where(ALERTS.c.id.in_(alert_ids[start:start + _CHUNK]), ALERTS.c.open_key == 0))}
    ids = sorted(plan.fold | set(plan.stalls))
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
                result.notifications += _no_show_reminder(conn, settings, refs[rid], state, now)
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
_PLAIN_STAGES: Final = {rf.Status.SENT.value: (stall.SCHEDULING, stall.VISIT),
                        rf.Status.SCHEDULED.value: (stall.VISIT,), rf.Status.COMPLETED.value: (stall.NOTE,)}


@dataclass
class _Plan:
    """What the scan must look at: referrals to fold, stalls already evaluated from the projection (only
    those that differ from their open alerts), and the open alert ids of each referral."""

    fold: set[int] = field(default_factory=set)
    stalls: dict[int, list[stall.Stall]] = field(default_factory=dict)
    alerts_of: dict[int, list[int]] = field(default_factory=dict)


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


def _plan(conn: Connection, settings: Settings, windows: stall.Windows, now: datetime) -> _Plan:
    plan = _Plan()
    sqlite = conn.dialect.name == "sqlite"
    ph = "?" if sqlite else "%s"
    # open alerts: (id, stage, level, status, overdue_days) per referral
    alerts_by: dict[int, dict[str, tuple[int, int, str, float]]] = defaultdict(dict)
    for aid, rid, stage, level, status, overdue in _raw(
            conn, "SELECT id, referral_id, stage, level, status, overdue_days FROM alerts WHERE open_key = 0"):
        alerts_by[rid][stage] = (aid, int(level), status, float(overdue))
        plan.alerts_of.setdefault(rid, []).append(aid)
    open_sql = ", ".join(f"'{s}'" for s in repo.OPEN)
    held = {rid for (rid,) in _raw(
        conn, f"SELECT id FROM referrals WHERE id IN (SELECT referral_id FROM referral_events WHERE kind IN "
              f"({ph}, {ph})) AND status IN ({open_sql})", _HOLD_KINDS)}
    plan.fold |= held
    # open referrals the projection cannot speak for: every no-show (the rebooking clock and the reminder
    # come from the timeline) and presumed attendance (the status depends on now)
    plan.fold |= {rid for (rid,) in _raw(
        conn, f"SELECT id FROM referrals WHERE status = {ph} OR (status IN ({open_sql}) AND presume_hours <> 0)",
        (rf.Status.NO_SHOW.value,))}
    margin = timedelta(seconds=1)

    def bound(stages: tuple[str, ...]) -> Any:
        t = now - timedelta(days=_min_window(windows, stages)) + margin
        return sqlhot.sqlite_time(t) if sqlite else t

    rows = _raw(
        conn, "SELECT id, status, sent_at, completed_at, priority, referred_to, specialty FROM referrals "
        f"WHERE (status = {ph} AND sent_at <= {ph}) OR (status = {ph} AND sent_at <= {ph}) "
        f"OR (status = {ph} AND completed_at <= {ph})",
        (rf.Status.SENT.value, bound((stall.SCHEDULING, stall.VISIT)),
         rf.Status.SCHEDULED.value, bound((stall.VISIT,)),
         rf.Status.COMPLETED.value, bound((stall.NOTE,))))
    window_cache: dict[tuple[str, str, str, str], float] = {}
    calendar = not windows.business_days
    day = timedelta(days=1)
    eps = stall._LEVEL_EPSILON
    seen: set[int] = set()
    for rid, status, sent_at, completed_at, priority, referred_to, specialty in rows:
        if rid in plan.fold:
            continue
        # projection columns are truncated copies of the fold's values: a full-length one may have lost
        # characters a window override matches on, so such a referral takes the fold path
        if len(priority or "") >= 64 or len(referred_to or "") >= 255 or len(specialty or "") >= 64:
            plan.fold.add(rid)
            continue
        seen.add(rid)
        start = _time(completed_at if status == rf.Status.COMPLETED.value else sent_at)
        assert start is not None
        if calendar:
            elapsed = max((now - start) / day, 0.0) if now > start else 0.0
        else:
            elapsed = stall.elapsed_days(start, now, business_days=True, holidays=windows.holidays)
        found: list[tuple[str, int, float, float]] = []
        for stage in _PLAIN_STAGES[status]:
            key = (stage, referred_to, specialty, priority)
            window = window_cache.get(key)
            if window is None:
                window = window_cache[key] = windows.window_days(
                    stage, _Details(referred_to, specialty, priority))  # type: ignore[arg-type]
            level = math.floor(elapsed / window + eps)
            if level >= 1:
                found.append((stage, level, max(elapsed - window, 0.0), window))
        have = alerts_by.get(rid, {})
        same = len(have) == len(found) and all(
            (a := have.get(stage)) is not None and level <= a[1] and a[2] != SNOOZED and abs(a[3] - overdue) <= 1e-6
            for stage, level, overdue, _ in found)
        if not same:
            plan.stalls[rid] = [stall.Stall(stage, level, overdue, window, start)
                                for stage, level, overdue, window in found]
    # every other referral with an open alert (its referral moved on, or its clock no longer qualifies)
    plan.fold |= set(alerts_by) - seen
    return plan


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


def _no_show_reminder(conn: Connection, settings: Settings, ref: Any, state: rf.ReferralState,
                      now: datetime) -> int:
    """One re-engagement reminder per no-show (keyed by the count, so a resent no-show is not re-sent)."""
    return _notify_patient(conn, settings, ref, "no_show_reminder", f"patient:no_show:{ref.id}:{state.no_show_count}",
                           now)


def _loop_closed(conn: Connection, settings: Settings, now: datetime) -> int:
    """Referrals closed by a consult note (not by hand) since the lookback and not yet announced."""
    if not policy.referrer_channels(settings.notify):
        return 0  # nothing to enqueue (and nothing marks them announced): skip the per-referral lookups
    announced = select(outbox.OUTBOX.c.referral_id).where(outbox.OUTBOX.c.event == "loop_closed",
                                                          outbox.OUTBOX.c.referral_id.is_not(None))
    rows = list(conn.execute(select(REFERRALS).where(
        REFERRALS.c.status == rf.Status.CLOSED.value, REFERRALS.c.note_received_at.is_not(None),
        REFERRALS.c.closed_at <= repo.utc(now), REFERRALS.c.closed_at >= repo.utc(now - LOOP_CLOSED_LOOKBACK),
        REFERRALS.c.id.not_in(announced))))
    n = 0
    for ref in rows:
        payload = _base_payload(settings, ref, "loop_closed", now)
        payload["closed_at"] = repo.iso(repo.aware(ref.closed_at))
        doc = conn.execute(select(DOCUMENTS.c.id, DOCUMENTS.c.document_id).where(
            DOCUMENTS.c.referral_id == ref.id, DOCUMENTS.c.final.is_(True), DOCUMENTS.c.status != "retracted")
            .order_by(DOCUMENTS.c.id.desc()).limit(1)).first()
        if doc is not None:
            payload.update(document_row=doc.id, document_id=doc.document_id)
        n += _fan_out(conn, settings, ref, policy.referrer_channels(settings.notify), "loop_closed",
                      f"loop_closed:{ref.id}", payload, now)
    return n


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
    if action == "close":
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
