"""Stall alerts: how they are written (raised, escalated, resolved, with their notifications), the row each
shows on the worklist (:func:`render`), and coordinator actions. The scan that finds due referrals is
:mod:`refloop.store.scan`, the worklist's query :mod:`refloop.store.worklist_view`, the digest
:mod:`refloop.store.digest`.

Alerts are diffed, never recomputed wholesale: :func:`apply_diff` compares the open alerts of some referrals
with their stage clocks (:mod:`refloop.stall`) and writes only what changed, in the caller's transaction,
with every notification it causes enqueued there too (:mod:`refloop.store.outbox`). How overdue an alert
is *now* is computed on read from the instant its window ended (``alerts.due_at``), so nothing is
rewritten just because time passed. Levels are bounded (``stall.max_level``) and named
(``stall.level_names``, :func:`refloop.config.windows.level_name`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, NamedTuple

from sqlalchemy import Connection, Table, bindparam, insert, select, update

from refloop import referral as rf
from refloop import stall
from refloop.config import Settings
from refloop.config.windows import level_name, windows_from_settings
from refloop.notify import policy
from refloop.store import audit, notices
from refloop.store import referrals as repo
from refloop.store.models import Alert
from refloop.store.queries import unindexed

ALERTS: Table = Alert.__table__  # type: ignore[assignment]
REFERRALS = repo.REFERRALS
EVENTS: Table = repo.EVENTS

OPEN: Final = "open"
ACKNOWLEDGED: Final = "acknowledged"
SNOOZED: Final = "snoozed"
RESOLVED: Final = "resolved"
UNRESOLVED: Final = (OPEN, ACKNOWLEDGED, SNOOZED)

ACTIONS: Final = ("acknowledge", "snooze", "assign", "note", "hold", "close")
_CHUNK: Final = 500


class Shown(NamedTuple):
    """What a worklist row shows of one alert and its referral, as the row was when read or written;
    :func:`render` turns it into the row."""

    alert_id: int | None
    referral: int
    placer_id: str
    stage: str
    level: int
    due_at: datetime | None
    overdue_days: float
    owner: str
    status: str
    last_action: str
    snoozed_until: datetime | None
    raised_at: datetime | None
    parties: policy.Parties

    @classmethod
    def of(cls, row: Any, ref: Any) -> Shown:
        """From an alert (a row or a dict of its columns) and its referral (anything with the referral's
        identifying attributes)."""
        get: Callable[[str], Any] = row.get if isinstance(row, dict) else row._mapping.get
        return cls(get("id"), ref.id, ref.placer_id, get("stage"), get("level"), get("due_at"), get("overdue_days"),
                   get("owner"), get("status"), get("last_action"), get("snoozed_until"), get("raised_at"),
                   policy.Parties.of(ref))


def render(settings: Settings, shown: Shown, now: datetime) -> dict[str, Any]:
    """The worklist row of one alert at *now* (how overdue it is is computed here, on read)."""
    return {
        "alert_id": shown.alert_id, "referral": shown.referral, "placer_id": shown.placer_id, "stage": shown.stage,
        "level": shown.level, "level_name": level_name(settings.stall, int(shown.level or 1)),
        "overdue_days": round(overdue_days(settings, shown.due_at, shown.overdue_days or 0.0, now), 2),
        "owner": shown.owner,
        "status": shown.status, "mode": policy.mode_for(settings.worklist, shown.parties),
        "last_action": shown.last_action, "snoozed_until": repo.iso(repo.aware(shown.snoozed_until)),
        "raised_at": repo.iso(repo.aware(shown.raised_at)),
    }


@dataclass
class ScanResult:
    """What one scan (or one apply) changed, as :class:`Shown` snapshots of each alert when it was written.

    Why snapshots: the daemon's scan job only counts the changes, and rendering every row (the level's name,
    how overdue, the relationship's mode) was ~6 % of a day-later scan of 1M referrals, so rows are rendered
    (at the scan's own instant, see :func:`render`) only when ``refloop scan`` or the HTTP scan reads them."""

    settings: Settings
    now: datetime
    shown: dict[str, list[Shown]] = field(default_factory=lambda: {k: [] for k in ("raised", "escalated", "resolved")})
    notifications: int = 0

    def rows(self, kind: str) -> list[dict[str, Any]]:
        """The worklist rows of one kind of change: ``raised``, ``escalated`` or ``resolved``."""
        return [render(self.settings, s, self.now) for s in self.shown[kind]]

    def counts(self) -> dict[str, int]:
        """How many alerts were raised, escalated and resolved."""
        return {kind: len(shown) for kind, shown in self.shown.items()}

    def as_json(self) -> dict[str, Any]:
        return {kind: self.rows(kind) for kind in self.shown}


class ActionError(Exception):
    """A coordinator action that cannot be applied; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def level_label(level: int) -> str:
    """Bounded metric label: 1, 2, or 3+ (levels are bounded by ``stall.max_level`` anyway)."""
    return str(level) if level < 3 else "3+"


def overdue_days(settings: Settings, due_at: datetime | None, stored: float, now: datetime) -> float:
    """How overdue an alert is at *now*, in (business) days since its window ended; the value stored when
    it was raised for alerts from before the clock kept ``due_at``."""
    if due_at is None:
        return float(stored or 0.0)
    windows = windows_from_settings(settings.stall)
    return stall.elapsed(stall.Calendar(windows), repo.aware(due_at), now) / timedelta(days=1)  # type: ignore[arg-type]


# -- alert writes (shared by the scan and the apply) ------------------------------------------------------
#: The chunk's alert writes as prepared statements run once per chunk with many rows (executemany): the
#: scan one day later escalates hundreds of alerts, and building one UPDATE per alert cost more than the SQL.
#: An escalation that leaves the status as it was (an open alert stays open: nearly all of them) does not
#: name ``status``: SQLite rewrites the index entries of every column a SET names, changed or not, and
#: ``ix_alerts_status`` was then one more page written per escalation (~1,700 of the 28,000 a day-later
#: scan of 1M referrals wrote).
_ESCALATE_LEVEL: Final = update(ALERTS).where(ALERTS.c.id == bindparam("b_id")).values(
    level=bindparam("b_level"), overdue_days=bindparam("b_overdue"), escalated_at=bindparam("b_at"),
    snoozed_until=bindparam("b_until"), last_action="escalated", last_action_at=bindparam("b_at"))
_ESCALATE: Final = _ESCALATE_LEVEL.values(status=bindparam("b_status"))
_RESOLVE: Final = update(ALERTS).where(ALERTS.c.id == bindparam("b_id")).values(
    status=RESOLVED, resolved_at=bindparam("b_at"), open_key=bindparam("b_id"), last_action="auto_resolved",
    last_action_at=bindparam("b_at"))
_INSERT: Final = insert(ALERTS).returning(ALERTS.c.id, sort_by_parameter_order=True)


def _raise_all(conn: Connection, settings: Settings, refs: Mapping[int, Any], raised: Any,
               dues: Mapping[tuple[int, str], datetime | None], now: datetime, result: ScanResult) -> None:
    """Insert the new alerts in one statement, then enqueue each one's notifications."""
    rows = []
    for rid, found in raised:
        owner = policy.owner_for(settings.worklist, policy.Parties.of(refs[rid]))
        rows.append({"referral_id": rid, "stage": found.stage, "level": found.level, "status": OPEN,
                     "owner": owner[:128], "overdue_days": found.overdue_days,
                     "due_at": repo.utc(dues.get((rid, found.stage))), "raised_at": repo.utc(now),
                     "last_action": "raised", "last_action_at": repo.utc(now), "open_key": 0})
    if not rows:
        return
    ids = conn.execute(_INSERT, rows).scalars().all()
    repo.mark(conn, (rid for rid, _ in raised), now)
    for (rid, found), values, alert_id in zip(raised, rows, ids, strict=True):
        ref, row = refs[rid], {**values, "id": int(alert_id)}
        result.notifications += notices.notify_owner(conn, settings, ref, row, "alert_raised",
                                                     f"alert:{alert_id}:1", now)
        if found.stage == stall.SCHEDULING:
            result.notifications += notices.notify_patient(conn, settings, ref, "booking_reminder",
                                                           f"patient:booking:{alert_id}", now, alert_id=alert_id)
        result.shown["raised"].append(Shown.of(row, ref))


def _escalate_all(conn: Connection, settings: Settings, refs: Mapping[int, Any],
                  open_rows: Mapping[tuple[int, str], Any], escalated: Any, now: datetime, result: ScanResult) -> None:
    """Raise levels in place. A snoozed alert stays snoozed (and quiet) until its date; an acknowledged
    one is reopened, because it got worse since someone looked at it."""
    same: list[dict[str, Any]] = []  # the status stays as it is
    moved: list[dict[str, Any]] = []  # reopened
    rows = []
    for rid, found in escalated:
        old = open_rows[(rid, found.stage)]
        until = repo.aware(old.snoozed_until)
        snoozed = old.status == SNOOZED and until is not None and until > now
        values = {"level": found.level, "overdue_days": found.overdue_days, "escalated_at": repo.utc(now),
                  "status": SNOOZED if snoozed else OPEN, "snoozed_until": old.snoozed_until if snoozed else None,
                  "last_action": "escalated", "last_action_at": repo.utc(now)}
        (same if values["status"] == old.status else moved).append({
            "b_id": old.id, "b_level": found.level, "b_overdue": found.overdue_days, "b_at": repo.utc(now),
            "b_status": values["status"], "b_until": values["snoozed_until"]})
        rows.append((rid, found, old, snoozed, {**old._mapping, **values}))
    if same:
        conn.execute(_ESCALATE_LEVEL, same)
    if moved:
        conn.execute(_ESCALATE, moved)
    for rid, found, old, snoozed, row in rows:
        if not snoozed:
            result.notifications += notices.notify_owner(conn, settings, refs[rid], row, "alert_escalated",
                                                         f"alert:{old.id}:{found.level}", now)
        result.shown["escalated"].append(Shown.of(row, refs[rid]))


def apply_diff(conn: Connection, settings: Settings, refs: Mapping[int, Any], open_rows: Mapping[tuple[int, str], Any],
               stalls: Mapping[int, list[stall.Stall]], dues: Mapping[tuple[int, str], datetime | None],
               now: datetime, result: ScanResult) -> None:
    """Persist :func:`refloop.stall.diff_alerts` of *stalls* against *open_rows* (both for the same referrals):
    raise, escalate and resolve, each with its notifications, in the caller's transaction; each kind of
    write is one statement for all the referrals given (the scan passes a whole chunk)."""
    diff = stall.diff_alerts({k: int(r.level) for k, r in open_rows.items()}, stalls)
    _raise_all(conn, settings, refs, diff.raised, dues, now, result)
    _escalate_all(conn, settings, refs, open_rows, diff.escalated, now, result)
    if diff.resolved:
        conn.execute(_RESOLVE, [{"b_id": open_rows[key].id, "b_at": repo.utc(now)} for key in diff.resolved])
    for rid, stage in diff.resolved:
        row = open_rows[(rid, stage)]
        result.shown["resolved"].append(Shown.of(row, refs[rid])._replace(status=RESOLVED))


#: ``+open_key``, the same value: keeps SQLite's planner on ``uq_alerts_open`` (referral_id first) for "the open
#: alerts of these referrals"; on ``ix_alerts_open_key`` it read every open alert of the store (9 ms a chunk
#: at 100k referrals) whenever the statistics did not tell it better.
_OPEN_KEY: Final = unindexed(ALERTS.c.open_key)
#: Built once (an expanding IN): building the statement with the ids as literals cost more than running it.
_OPEN_OF: Final = select(ALERTS).where(ALERTS.c.referral_id.in_(bindparam("b_ids", expanding=True)), _OPEN_KEY == 0)


def open_alerts(conn: Connection, ids: list[int]) -> dict[tuple[int, str], Any]:
    """The unresolved alerts of *ids* by ``(referral_id, stage)`` (one per pair: ``uq_alerts_open``)."""
    return {(r.referral_id, r.stage): r for start in range(0, len(ids), _CHUNK)
            for r in conn.execute(_OPEN_OF, {"b_ids": ids[start:start + _CHUNK]})}


def clock_diff(ref: Any, inp: stall.ClockInput, windows: stall.Windows, now: datetime
               ) -> tuple[list[stall.Stall], dict[tuple[int, str], datetime | None], datetime | None]:
    """One referral's stalls at *now*, the instant each stage's window ends, and its next due instant after
    *now*: what :func:`apply_diff` needs, computed without touching the database (the scan gathers a chunk's)."""
    found = stall.clocks(inp, windows)
    stalls = stall.stalls_at(inp, found, now, windows) if ref.status in repo.OPEN else []
    return stalls, {(ref.id, c.stage): c.due[0] for c in found}, stall.next_due(found, now)


def sync_referral(conn: Connection, settings: Settings, ref: Any, inp: stall.ClockInput, windows: stall.Windows,
                  now: datetime, result: ScanResult, open_rows: Mapping[tuple[int, str], Any] | None = None
                  ) -> datetime | None:
    """Bring one referral's alerts in line with its clock at *now* and return its next due instant after
    *now*: what an applied message does when its referral's due time has already passed, so the worklist
    never waits for the next scan (the scan does the same for a chunk at once)."""
    stalls, dues, cursor = clock_diff(ref, inp, windows, now)
    have = open_alerts(conn, [ref.id]) if open_rows is None else open_rows
    apply_diff(conn, settings, {ref.id: ref}, have, {ref.id: stalls}, dues, now, result)
    return cursor


# -- coordinator actions ------------------------------------------------------------------------------
def add_manual_event(conn: Connection, rid: int, kind: str, at: datetime, data: dict[str, Any]) -> None:
    """A manual referral event, so every coordinator (or scheduler) action shows on the referral's timeline."""
    conn.execute(insert(EVENTS).values(
        referral_id=rid, message_id=None, origin=repo.MANUAL, seq=0, kind=kind, occurred_at=repo.utc(at),
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
    if action in ("hold", "close"):
        # a hold pauses the referral's stall clock (referral.paused_intervals) until *until*, or until ended
        if not reason.strip():
            raise ActionError(400, f"{action} needs a 'reason'")
        if action == "hold" and until is not None and until <= now:
            raise ActionError(400, "hold 'until' must be in the future")
        why = {"actor": actor, "reason": reason.strip()[:255], "alert_id": alert_id}
        if action == "hold" and until is not None:
            why["resume_at"] = until.isoformat()
        add_manual_event(conn, row.referral_id, rf.HOLD_STARTED if action == "hold" else rf.MANUAL_CLOSED, now, why)
        repo.refresh(conn, row.referral_id, now, windows=windows_from_settings(settings.stall))
        if action == "hold":
            conn.execute(update(ALERTS).where(ALERTS.c.id == alert_id).values(
                **values, status=ACKNOWLEDGED if row.status != RESOLVED else RESOLVED))
        else:  # closing the referral resolves every open alert of it
            conn.execute(update(ALERTS).where(ALERTS.c.referral_id == row.referral_id, ALERTS.c.open_key == 0)
                         .values(**values, status=RESOLVED, resolved_at=repo.utc(now), open_key=ALERTS.c.id))
    else:
        add_manual_event(conn, row.referral_id, rf.COORDINATOR_NOTE, now, data)
        conn.execute(update(ALERTS).where(ALERTS.c.id == alert_id).values(**values))
    audit.record(conn, now=now, actor=actor, action=f"alert_{action}", target=f"alert:{alert_id}",
                 detail=f"referral:{row.referral_id}")
    return get_alert(conn, settings, alert_id, now) or {}


def get_alert(conn: Connection, settings: Settings, alert_id: int, now: datetime) -> dict[str, Any] | None:
    row = conn.execute(select(ALERTS).where(ALERTS.c.id == alert_id)).first()
    if row is None:
        return None
    ref = conn.execute(select(REFERRALS).where(REFERRALS.c.id == row.referral_id)).one()
    return render(settings, Shown.of(row, ref), now)
