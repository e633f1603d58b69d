"""Referral repository: events in, projection out, all on a caller's Connection.

Why the shape: ``referral_events`` is append-only and is the truth; the ``referrals`` row is recomputed
by :func:`refloop.referral.fold` over *all* of a referral's events each time one is added or moved, in
the same transaction. A late, duplicated or out-of-order message therefore only ever means "fold again",
and a parked message (explicit ID of a referral not seen yet) is attached by re-pointing its events.
Every function takes a Connection so handlers (inside the writer's savepoint), the CLI and the HTTP API
share one implementation. Nothing here logs: rows carry PHI-adjacent data (hashes, note content).

PERF: the functions below run on the writer thread for every SIU/MDM/REF. The statements of the per-message
paths (lookups, event and link inserts, the projection read/fold/update) are driver-level SQL prepared once
per dialect in :mod:`refloop.store.sqlhot` (~20 µs each instead of 50-80 µs); the rest (replays,
coordinator actions, the CLI and API) use statements built once, at import, with :func:`bindparam`
placeholders. Building a ``select().where()`` per call cost 4x the execution itself.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, delete, or_, select, update
from sqlalchemy.sql.elements import ColumnElement

from refloop import referral as rf
from refloop import report, stall, x360
from refloop.store import cms50, identity, sqlhot
from refloop.store.models import (
    Referral,
    ReferralAlias,
    ReferralDocument,
    ReferralEvent,
    ReferralLink,
)

REFERRALS = cast(Table, Referral.__table__)
EVENTS = cast(Table, ReferralEvent.__table__)
ALIASES = cast(Table, ReferralAlias.__table__)
LINKS = cast(Table, ReferralLink.__table__)
DOCUMENTS = cast(Table, ReferralDocument.__table__)

MESSAGE, MANUAL = "message", "manual"
LINKED, PARKED, REVIEW, REJECTED = "linked", "parked", "review", "rejected"
OPEN = tuple(s.value for s in rf.OPEN_STATUSES)
_MILESTONES = (
    "sent_at", "accepted_at", "scheduled_at", "appointment_at", "completed_at", "note_received_at", "closed_at",
)


def utc(moment: datetime | None) -> datetime | None:
    """Normalise for storage: SQLite keeps no offset, so everything stored is UTC."""
    return moment.astimezone(UTC) if moment is not None else None


def aware(moment: datetime | None) -> datetime | None:
    """Read back: SQLite returns naive UTC, PostgreSQL aware values."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


@dataclass(frozen=True)
class NewEvent:
    """An event a handler wants journaled; ``subject`` ties follow-ups (appt:/doc:) to it."""

    kind: str
    at: datetime
    data: dict[str, Any] = field(default_factory=dict)
    subject: str = ""


# -- prebuilt statements ----------------------------------------------------------------------------
# Parameter names that appear next to column values in UPDATE/INSERT parameter dicts start with "b_", so
# they never collide with a column name (SQLAlchemy derives the SET clause from the dict's keys).
def _expanding(name: str) -> Any:
    return bindparam(name, expanding=True)


_LINK_ROW = select(LINKS).where(LINKS.c.message_id == bindparam("message_id"))
_REFERRAL_ID = select(REFERRALS.c.id).where(REFERRALS.c.id == bindparam("rid"))
_REFERRAL_ROW = select(REFERRALS).where(REFERRALS.c.id == bindparam("rid"))
_BY_PLACER = select(REFERRALS.c.id, REFERRALS.c.patient_key, REFERRALS.c.referred_to_id).where(
    REFERRALS.c.placer_id == bindparam("placer_id"), REFERRALS.c.authority == bindparam("authority"))
_INSERT_EVENTS = EVENTS.insert()
_REFERRALS_OF_MESSAGE = select(EVENTS.c.referral_id).distinct().where(
    EVENTS.c.message_id == bindparam("message_id"), EVENTS.c.origin == MESSAGE, EVENTS.c.referral_id.is_not(None))
_ALIAS_REFERRALS_OF_MESSAGE = select(ALIASES.c.referral_id).where(ALIASES.c.message_id == bindparam("message_id"))
_DELETE_MESSAGE_EVENTS = delete(EVENTS).where(EVENTS.c.message_id == bindparam("message_id"),
                                              EVENTS.c.origin == MESSAGE)
_DELETE_MESSAGE_ALIASES = delete(ALIASES).where(ALIASES.c.message_id == bindparam("message_id"))
_MOVE_MESSAGE_EVENTS = update(EVENTS).where(
    EVENTS.c.message_id == bindparam("b_message_id"), EVENTS.c.origin == MESSAGE,
).values(referral_id=bindparam("b_rid"), pending_key="")
_DOC_SUBJECTS_OF_MESSAGE = select(EVENTS.c.subject).where(
    EVENTS.c.message_id == bindparam("message_id"), EVENTS.c.origin == MESSAGE, EVENTS.c.subject.like("doc:%"))

_UPDATE_LINK = LINKS.update().where(LINKS.c.message_id == bindparam("b_message_id"))
_DELETE_LINK = delete(LINKS).where(LINKS.c.message_id == bindparam("message_id"))

_DOCUMENT = select(DOCUMENTS.c.id, DOCUMENTS.c.final, DOCUMENTS.c.status).where(
    DOCUMENTS.c.sender == bindparam("sender"), DOCUMENTS.c.document_id == bindparam("document_id"))
_INSERT_DOCUMENT = DOCUMENTS.insert()
_UPDATE_DOCUMENT = DOCUMENTS.update().where(DOCUMENTS.c.id == bindparam("b_id"))
_POINT_DOCUMENT = update(DOCUMENTS).where(
    DOCUMENTS.c.sender == bindparam("b_sender"), DOCUMENTS.c.document_id == bindparam("b_document_id"),
).values(referral_id=bindparam("b_rid"))

_ALIASES_OF = select(ALIASES.c.id, ALIASES.c.alias_value).where(ALIASES.c.referral_id == bindparam("rid"))
_DELETE_ALIASES = delete(ALIASES).where(ALIASES.c.id.in_(_expanding("ids")))
_TAKEN_ALIASES = select(ALIASES.c.alias_value).where(ALIASES.c.alias_value.in_(_expanding("values")))
_INSERT_ALIAS = ALIASES.insert()

_ATTACH_EVENTS = update(EVENTS).where(
    EVENTS.c.message_id.in_(_expanding("b_mids")), EVENTS.c.origin == MESSAGE,
).values(referral_id=bindparam("b_rid"), pending_key="")
_ATTACH_LINKS = update(LINKS).where(
    LINKS.c.message_id.in_(_expanding("b_mids")), LINKS.c.state == PARKED,
).values(referral_id=bindparam("b_rid"), state=LINKED)

_LINKED_MESSAGES = select(LINKS.c.control_id, LINKS.c.matched_by).where(
    LINKS.c.referral_id == bindparam("rid"), LINKS.c.state == LINKED).order_by(LINKS.c.message_id)


# -- lookups ----------------------------------------------------------------------------------------
def find_referral(conn: Connection, values: Sequence[str]) -> tuple[int, str] | None:
    """The referral whose placer ID or alias equals one of *values*: ``(id, value)``, first value wins.

    One indexed query (placer IDs UNION ALL aliases), whatever the number of values, because this runs
    for every SIU/MDM that names a referral.
    """
    if not values:
        return None
    hits: dict[str, int] = {}
    for rid, value, _src in sqlhot.find(conn, values):
        hits.setdefault(value, rid)
    for value in values:
        if value in hits:
            return hits[value], value
    return None


def by_subject(conn: Connection, subject: str) -> tuple[int | None, str] | None:
    """How an earlier message about the same appointment/document was placed: ``(referral_id, pending)``."""
    if not subject:
        return None
    row = sqlhot.by_subject(conn, subject)
    return (row[0], row[1]) if row is not None else None


def open_referrals_for_patient(conn: Connection, patient_key: str) -> list[Any]:
    """Heuristic candidates: one indexed query on (patient_key, status)."""
    if not patient_key:
        return []
    return sqlhot.open_for_patient(conn, patient_key)


def link_row(conn: Connection, message_id: int) -> Any | None:
    return conn.execute(_LINK_ROW, {"message_id": message_id}).first()


def resolve_key(conn: Connection, key: str) -> int | None:
    """A referral by numeric id, placer ID (RF1-6/ORC-2) or alias: what `refloop show KEY` accepts."""
    key = key.strip()
    if key.isdigit():
        row = conn.execute(_REFERRAL_ID, {"rid": int(key)}).first()
        if row is not None:
            return int(row.id)
    hit = find_referral(conn, [key])
    return hit[0] if hit else None


# -- writes -----------------------------------------------------------------------------------------
def get_or_create(conn: Connection, placer_id: str, authority: str, now: datetime, **identity: Any) -> int:
    """The referral for a placer ID; created empty (the fold fills it) when it is new.

    ``identity`` (see :func:`set_identity`) is written with the new row, or to the existing row when a
    non-empty value differs, so a REF costs no separate UPDATE.
    """
    identity = {k: v for k, v in identity.items() if v not in ("", None)}
    row = sqlhot.by_placer(conn, placer_id, authority)
    if row is None:
        # Two daemons sharing PostgreSQL may create the same referral at once: the loser waits on the unique
        # constraint, does nothing (no row returned), and then reads the winner's committed row.
        values = {"placer_id": placer_id, "authority": authority, "status": rf.Status.SENT.value,
                  "updated_at": utc(now), **identity}
        created = sqlhot.create_referral(conn, values)
        if created is not None:
            return created
        row = conn.execute(_BY_PLACER, {"placer_id": placer_id, "authority": authority}).one()
    changed = {k: v for k, v in identity.items() if not hasattr(row, k) or getattr(row, k) != v}
    if changed:
        sqlhot.update_referral(conn, row.id, changed)
        if "patient_key" in changed:  # the referral moves from one patient's CMS50 candidates to another's
            cms50.refresh(conn, [row.patient_key, changed["patient_key"]])
    return int(row.id)


def set_identity(conn: Connection, referral_id: int, **values: Any) -> None:
    """Matching keys the fold does not know (patient hash, referred-to id): the latest non-empty wins."""
    values = {k: v for k, v in values.items() if v not in ("", None)}
    before = conn.execute(select(REFERRALS.c.patient_key).where(REFERRALS.c.id == referral_id)).scalar() \
        if "patient_key" in values else None
    if values:
        sqlhot.update_referral(conn, referral_id, values)
    if before is not None and before != values["patient_key"]:
        cms50.refresh(conn, [before, values["patient_key"]])


def forget_message(conn: Connection, message_id: int) -> set[int]:
    """Delete what a message produced (for replay), returning the referrals to recompute."""
    p = {"message_id": message_id}
    touched = {r for (r,) in conn.execute(_REFERRALS_OF_MESSAGE, p)}
    touched |= {r for (r,) in conn.execute(_ALIAS_REFERRALS_OF_MESSAGE, p)}
    conn.execute(_DELETE_MESSAGE_EVENTS, p)
    conn.execute(_DELETE_MESSAGE_ALIASES, p)
    return touched


def add_events(conn: Connection, *, referral_id: int | None, message_id: int, control_id: str,
               events: Iterable[NewEvent], pending_key: str = "") -> None:
    rows = [
        {"referral_id": referral_id, "message_id": message_id, "origin": MESSAGE, "seq": i, "kind": e.kind,
         "occurred_at": utc(e.at), "control_id": control_id[:199], "subject": e.subject[:255],
         "pending_key": pending_key[:199], "data": json.dumps(e.data, sort_keys=True, separators=(",", ":"))}
        for i, e in enumerate(events)
    ]
    if rows:
        sqlhot.insert_events(conn, rows)


def set_link(conn: Connection, message_id: int, *, referral_id: int | None, state: str, matched_by: str,
             control_id: str = "", message_type: str = "", candidates: list[dict[str, Any]] | None = None,
             fresh: bool = False) -> None:
    """Record (or replace) how a message was placed; one row per message.

    ``fresh``: the caller knows the message has no link row yet (first delivery, not a replay or a
    coordinator action), so the row is inserted without trying an UPDATE first.
    """
    values = {"referral_id": referral_id, "state": state, "matched_by": matched_by[:255],
              "candidates": json.dumps(candidates or [])}
    if not fresh and conn.execute(_UPDATE_LINK, {"b_message_id": message_id, **values}).rowcount != 0:
        return
    sqlhot.insert_link(conn, {"message_id": message_id, "control_id": control_id[:199],
                              "message_type": message_type[:16], **values})


def drop_link(conn: Connection, message_id: int) -> None:
    """A replayed message that no longer belongs anywhere loses its link row too."""
    conn.execute(_DELETE_LINK, {"message_id": message_id})


def upsert_document(conn: Connection, *, sender: str, document_id: str, referral_id: int | None, message_id: int,
                    status: str, final: bool, doc_type: str, content: bytes | None, content_type: str,
                    received_at: datetime) -> None:
    """Keep the latest content of a document; finality only moves forward, as HL7 completion status does."""
    key = {"sender": sender[:180], "document_id": document_id[:199]}
    row = conn.execute(_DOCUMENT, key).first()
    values: dict[str, Any] = {"message_id": message_id, "status": status[:16], "doc_type": doc_type[:64]}
    if referral_id is not None:
        values["referral_id"] = referral_id
    if content is not None:
        values.update(content=content, content_type=content_type)
    if row is None:
        conn.execute(_INSERT_DOCUMENT, {**key, "final": final, "received_at": utc(received_at), **values})
        return
    values["final"] = bool(row.final) or final
    if row.status == "retracted":
        values["status"] = "retracted"  # a retraction is sticky, like in the fold
    conn.execute(_UPDATE_DOCUMENT, {"b_id": row.id, **values})


def _event(row: Any) -> rf.Event:
    if type(row) is sqlhot.EventRow:  # built once per stored row (see sqlhot.events_of)
        event = row.event
        if event is None:
            event = row.event = _make_event(row)
        return event
    return _make_event(row)


def _make_event(row: Any) -> rf.Event:
    seq = (int(row.message_id), int(row.seq)) if row.origin == MESSAGE else (0, int(row.id))
    return rf.Event(row.kind, aware(row.occurred_at), seq, row.control_id, json.loads(row.data))  # type: ignore[arg-type]


def event_of(row: Any) -> rf.Event:
    """A stored event row as the fold reads it."""
    return _event(row)


def load_events(conn: Connection, referral_id: int) -> list[Any]:
    """The referral's event rows (``occurred_at`` aware on both dialects)."""
    return sqlhot.events_of(conn, referral_id)


def _wanted_aliases(rows: list[Any]) -> dict[str, tuple[str, int | None]]:
    """Aliases are derived from answered events (RF1-11), so they follow their events when moved."""
    wanted: dict[str, tuple[str, int | None]] = {}
    for r in rows:
        if r.kind == rf.REFERRAL_ANSWERED and r.origin == MESSAGE:
            for value in json.loads(r.data).get("aliases", []):
                wanted.setdefault(str(value)[:199], ("external", r.message_id))
    return wanted


def _sync_aliases(conn: Connection, referral_id: int, wanted: dict[str, tuple[str, int | None]]) -> None:
    have = {a.alias_value: a.id for a in conn.execute(_ALIASES_OF, {"rid": referral_id})}
    stale = [i for v, i in have.items() if v not in wanted]
    if stale:
        conn.execute(_DELETE_ALIASES, {"ids": stale})
    fresh = [v for v in wanted if v not in have]
    if fresh:
        taken = {v for (v,) in conn.execute(_TAKEN_ALIASES, {"values": fresh})}
        rows = [{"referral_id": referral_id, "alias_value": v, "alias_kind": wanted[v][0], "message_id": wanted[v][1]}
                for v in fresh if v not in taken]  # never steal another referral's identifier
        if rows:
            conn.execute(_INSERT_ALIAS, rows)


def _attach_parked(conn: Connection, referral_id: int, keys: list[str]) -> bool:
    """Point parked events that named one of *keys* at this referral; True if any moved."""
    if not keys:
        return False
    mids = sqlhot.parked_messages(conn, keys)
    if not mids:
        return False
    p = {"b_mids": mids, "b_rid": referral_id}
    conn.execute(_ATTACH_EVENTS, p)
    conn.execute(_ATTACH_LINKS, p)
    return True


#: Called by :func:`recompute` with the projection row as it was, the values written, the new fold and its
#: hold spells, in the same transaction: what a state change causes (notifications, alerts whose due time
#: has passed) is written there (transactional outbox).
OnChange = Callable[[Any, dict[str, Any], rf.ReferralState, list[stall.Pause]], None]


def refresh(conn: Connection, referral_id: int, now: datetime, *, duplicate_window_days: int = 30,
            appended: bool = False, on_change: OnChange | None = None,
            windows: stall.Windows | None = None) -> rf.ReferralState:
    """Attach parked events, sync aliases and recompute the projection: call after every change.

    ``appended``: since the referral's last refresh, the only change is events the caller just appended
    (a first delivery, not a replay, move or removal). Then aliases and document pointers already match
    every older event (each refresh leaves them so), and only new aliases or attached parked events can
    require work, which skips two statements per linked message.
    """
    # Lock the projection row first (PostgreSQL; SQLite has one writer): events read after the lock include
    # everything a concurrent daemon committed, so its projection update is never overwritten by a stale one.
    ref = sqlhot.referral_row(conn, referral_id)
    moved = False
    for _ in range(3):  # an attached RRI can bring aliases that unpark more messages
        rows = load_events(conn, referral_id)
        wanted = _wanted_aliases(rows)
        if wanted or not appended or moved:
            _sync_aliases(conn, referral_id, wanted)
        if not _attach_parked(conn, referral_id, [ref.placer_id, *wanted]):
            break
        moved = True
    else:
        rows = load_events(conn, referral_id)
        _sync_aliases(conn, referral_id, _wanted_aliases(rows))
    return recompute(conn, referral_id, now, rows=rows, duplicate_window_days=duplicate_window_days, ref=ref,
                     documents=moved or not appended, on_change=on_change, windows=windows)


def fold_options(presume_hours: float | None) -> rf.FoldOptions:
    return rf.FoldOptions(presume_attendance_hours=presume_hours if presume_hours else None)


def _same(stored: Any, value: Any) -> bool:
    if isinstance(value, datetime) or isinstance(stored, datetime):
        return aware(stored) == value
    return bool(stored == value)


def recompute(conn: Connection, referral_id: int, now: datetime, *, rows: list[Any] | None = None,
              duplicate_window_days: int = 30, ref: Any | None = None, documents: bool = True,
              on_change: OnChange | None = None, windows: stall.Windows | None = None) -> rf.ReferralState:
    """Fold every event of the referral and write the projection row (only if a value changed).

    ``ref``: the referral row if the caller has just read it; ``documents``: re-point the referral's
    documents at it (off when nothing moved, see :func:`refresh`); ``windows``: the stage clock's windows,
    so the clock columns are kept in this same transaction (without them the row is marked stale and the
    scan evaluates it on read until the background recompute rewrites it).
    """
    rows = load_events(conn, referral_id) if rows is None else rows
    if ref is None:
        ref = conn.execute(_REFERRAL_ROW, {"rid": referral_id}).one()
    events = [_event(r) for r in rows]
    state = rf.fold(events, now=now, options=fold_options(ref.presume_hours))
    pauses = rf.paused_intervals(events)
    values = projection_values(state, rows, pauses, windows, now, before=ref, presume_hours=ref.presume_hours)
    values["flags"] = ",".join(_duplicate_flags(conn, ref, state, duplicate_window_days))
    # updated_at is when the projection last changed: an event that changes nothing writes nothing.
    changed = not all(_same(getattr(ref, k), v) for k, v in values.items())
    if changed:
        sqlhot.update_referral(conn, referral_id, {"updated_at": utc(now), **values})
        was = report.cms50_candidate(aware(ref.sent_at), ref.status)
        if ref.patient_key and (not _same(ref.sent_at, values["sent_at"])
                                or was != report.cms50_candidate(values["sent_at"], values["status"])):
            cms50.refresh(conn, [ref.patient_key])  # its patient's first CMS50 candidate may have moved
    if documents:
        seen: set[tuple[str, str]] = set()
        params = []
        for r in rows:
            if r.subject.startswith("doc:"):
                sender, sep, doc_id = r.subject[4:].partition("|")
                if sep and (sender, doc_id) not in seen:
                    seen.add((sender, doc_id))
                    params.append({"b_sender": sender, "b_document_id": doc_id, "b_rid": referral_id})
        if params:
            conn.execute(_POINT_DOCUMENT, params)
    if changed and on_change is not None:  # after the documents point here: a loop-closed notice cites the note
        on_change(ref, values, state, pauses)
    return state


def projection_values(state: rf.ReferralState, rows: Iterable[Any], pauses: list[stall.Pause],
                      windows: stall.Windows | None, now: datetime, *, before: Any = None,
                      presume_hours: float | None = None) -> dict[str, Any]:
    """The projection row of a fold (all but the duplicate flags, which look at other referrals): the
    milestones and details, the no-show clock, the report's durations, appointment counts and bits, and
    the stage clock. :func:`recompute` writes this; the bench's generator is checked against it."""
    values: dict[str, Any] = {name: utc(getattr(state, name)) for name in _MILESTONES}
    values.update(status=state.status.value, priority=state.priority[:64], referred_to=state.referred_to[:255],
                  referring_provider=state.referring_provider[:255], specialty=state.specialty[:64],
                  **no_show_values(state), **durations(state), **appointment_values(rows))
    values.update(clock_values(state, pauses, windows, now, before=before, presume_hours=presume_hours))
    values["report_bits"] = report.report_bits(values)
    return values


def appointment_values(rows: Iterable[Any]) -> dict[str, int]:
    """Appointments ever reported for the referral (distinct ``appt:`` subjects of its event rows, whatever
    became of them) and those with a no-show: the report's no-show rate, kept on write."""
    appointments: set[str] = set()
    no_shows: set[str] = set()
    for r in rows:
        if r.subject.startswith("appt:"):
            appointments.add(r.subject)
            if r.kind == rf.APPOINTMENT_NO_SHOW:
                no_shows.add(r.subject)
    return {"appointment_count": len(appointments), "no_show_appointments": len(no_shows)}


_DURATIONS = (("sent_to_scheduled_s", "scheduled_at", "sent_at"),
              ("sent_to_appointment_s", "appointment_at", "sent_at"),
              ("appointment_to_note_s", "note_received_at", "appointment_at"),
              ("sent_to_closed_s", "closed_at", "sent_at"))
_SECOND = timedelta(seconds=1)


_MARKED = REFERRALS.c.first_marked_at
_MARK = update(REFERRALS).where(
    REFERRALS.c.id == bindparam("b_id"), or_(_MARKED.is_(None), bindparam("b_at", type_=_MARKED.type) < _MARKED)
).values(first_marked_at=bindparam("b_at"))


def mark(conn: Connection, ids: Iterable[int], at: datetime) -> None:
    """Keep ``first_marked_at`` (the earliest instant the referral was on the worklist or reminded): called
    in the transaction that raises an alert or enqueues a notification naming the referral, so the report
    reads one column instead of joining every alert and outbox row (an earlier mark is never moved later)."""
    params = [{"b_id": rid, "b_at": utc(at)} for rid in sorted(set(ids))]
    if params:
        conn.execute(_MARK, params)


def durations(state: Any) -> dict[str, int | None]:
    """The report's milestone durations in whole seconds (None unless both milestones are set)."""
    out: dict[str, int | None] = {}
    for name, later, earlier in _DURATIONS:
        b, a = getattr(state, later), getattr(state, earlier)
        out[name] = None if a is None or b is None else (b - a) // _SECOND
    return out


def clock_values(state: rf.ReferralState, pauses: list[stall.Pause], windows: stall.Windows | None,
                 now: datetime, *, before: Any = None, presume_hours: float | None = None) -> dict[str, Any]:
    """The stage clock as the projection keeps it (see ``models.Referral``), computed by :mod:`refloop.stall`.

    ``next_due_at`` is the first instant anything about the clock changes: a level is reached (the first
    level of the first stage), a presumed attendance or a hold's ``resume_at`` turns the status, or ``now``
    when a running stage stopped, so its open alert is resolved by the next look (or at once by the apply's
    alert sync). ``before`` is the stored row: when its clock is the same (same windows, same stages) and its
    ``next_due_at`` is still one of these instants (or past the top level), the scan or the apply has already
    moved it on past what it handled, and it is kept rather than set back.
    """
    if windows is None:
        return {"clock_version": ""}
    extra = [state.hold_resume_at] if state.on_hold and state.hold_resume_at is not None else []
    if presume_hours:
        extra += [a.start + timedelta(hours=presume_hours) for a in state.live_appointments
                  if a.status is rf.ApptStatus.BOOKED and a.start is not None]
    inp = stall.ClockInput.of_state(state, pauses)
    found = stall.clocks(inp, windows)
    values = clock_columns(inp, windows, extra, found)
    stages = getattr(before, "clock_stage", "") or ""
    if set(stages.split(",")) - set(values["clock_stage"].split(",")) - {""}:
        values["next_due_at"] = min(filter(None, (values["next_due_at"], utc(now))))
    elif before is not None and stages == values["clock_stage"] and before.clock_version == windows.version:
        cursor = aware(before.next_due_at)
        instants = {d for c in found for d in c.due if d is not None} | set(extra)
        if cursor in instants or (cursor is None and instants and max(instants) <= now):
            values["next_due_at"] = utc(cursor)
    return values


def clock_columns(inp: stall.ClockInput, windows: stall.Windows, extra: Iterable[datetime] = (),
                  found: list[stall.StageClock] | None = None) -> dict[str, Any]:
    """The clock columns of one referral from what the clock reads (``extra``: other instants to look
    again). A final answer (cancelled, declined, expired) leaks at once: its leak instant is ``sent_at``."""
    found = stall.clocks(inp, windows) if found is None else found
    first = min(found, key=lambda c: c.next_due(None) or _FAR, default=None)
    leak_stage, leak_at = stall.leak(inp.status, found, inp.sent_at)
    due = min((d for d in (stall.next_due(found), *extra) if d is not None), default=None)
    # the report's windows: both stages counted from sent_at as while the referral is still "sent"
    sent = {c.stage: c.due[0] for c in (found if inp.status == rf.Status.SENT.value else
                                        stall.clocks(replace(inp, status=rf.Status.SENT.value), windows, levels=1))}
    return {"clock_stage": ",".join(c.stage for c in found),
            "scheduling_due_at": utc(sent.get(stall.SCHEDULING)), "visit_due_at": utc(sent.get(stall.VISIT)),
            "stage_started_at": utc(first.started_at) if first else None, "next_due_at": utc(due),
            "leak_stage": leak_stage, "leak_at": utc(leak_at), "clock_version": windows.version}


_FAR = datetime.max.replace(tzinfo=UTC)


def stale(version: str) -> ColumnElement[bool]:
    """Rows whose clock columns were computed under other windows than *version*: two ranges of
    ``ix_referrals_clock_version`` around it (``!=`` would read the whole index)."""
    return or_(REFERRALS.c.clock_version < version, REFERRALS.c.clock_version > version)


def clock_input(row: Any, pauses: Iterable[stall.Pause] = ()) -> stall.ClockInput:
    """What the clock reads, from a projection row (exact for rows without holds or truncated details)."""
    return stall.ClockInput(row.status, aware(row.sent_at), aware(row.completed_at), aware(row.no_show_at),
                            int(row.no_show_count or 0), row.priority or "", row.referred_to or "",
                            row.specialty or "", tuple(pauses))


def no_show_values(state: rf.ReferralState) -> dict[str, Any]:
    """The rebooking clock as the projection stores it, so the stall scan need not re-fold a no-show:
    ``no_show_at`` is exactly :func:`refloop.stall.latest_no_show` (None without a no-show) and
    ``no_show_count`` the fold's. Neither depends on ``now`` (presumed attendance only turns *booked*
    appointments into attended ones), so the columns stay equal to the fold of the events at any instant."""
    return {"no_show_at": utc(stall.latest_no_show(state)), "no_show_count": state.no_show_count}


def _duplicate_flags(conn: Connection, ref: Any, state: rf.ReferralState, window_days: int) -> list[str]:
    """``possible_duplicate`` on the later of two open referrals for one patient and specialty sent within
    ``window_days`` of each other (flag, not merge; "later" by sent time, then id)."""
    if not ref.patient_key or not state.specialty or state.sent_at is None or state.status not in rf.OPEN_STATUSES:
        return []
    earlier = sqlhot.earlier_open_same_specialty(conn, ref.patient_key, ref.id, state.specialty,
                                                 state.sent_at.astimezone(UTC), timedelta(days=window_days))
    return ["possible_duplicate"] if earlier else []


# -- coordinator actions ----------------------------------------------------------------------------
def _referrals_of(conn: Connection, message_id: int) -> set[int]:
    return {r for (r,) in conn.execute(_REFERRALS_OF_MESSAGE, {"message_id": message_id})}


def _manual_event(conn: Connection, referral_id: int, message_id: int, kind: str, now: datetime,
                  actor: str) -> None:
    conn.execute(_INSERT_EVENTS, {
        "referral_id": referral_id, "message_id": message_id, "origin": MANUAL, "seq": 0, "kind": kind,
        "occurred_at": utc(now), "control_id": "", "subject": "", "pending_key": "",
        "data": json.dumps({"message_id": message_id, "actor": actor[:64]}, sort_keys=True)})


def manual_link(conn: Connection, message_id: int, referral_id: int, now: datetime, actor: str = "") -> None:
    """A coordinator ties a message to a referral: its events move, and a link_confirmed event records why."""
    before = _referrals_of(conn, message_id) - {referral_id}
    identity.forget_learned(conn, message_id)  # what the old referral learned from it was not its patient
    conn.execute(_MOVE_MESSAGE_EVENTS, {"b_message_id": message_id, "b_rid": referral_id})
    set_link(conn, message_id, referral_id=referral_id, state=LINKED, matched_by="manual")
    _manual_event(conn, referral_id, message_id, rf.LINK_CONFIRMED, now, actor)
    for old in before:
        _manual_event(conn, old, message_id, rf.LINK_REJECTED, now, actor)
        refresh(conn, old, now)
    refresh(conn, referral_id, now)


def manual_unlink(conn: Connection, message_id: int, now: datetime, actor: str = "") -> list[int]:
    """A coordinator says a message is not about its referral: its events stop being folded there."""
    before = sorted(_referrals_of(conn, message_id))
    for (subject,) in conn.execute(_DOC_SUBJECTS_OF_MESSAGE, {"message_id": message_id}):
        sender, _, doc_id = subject[4:].partition("|")
        conn.execute(_POINT_DOCUMENT, {"b_sender": sender, "b_document_id": doc_id, "b_rid": None})
    conn.execute(_MOVE_MESSAGE_EVENTS, {"b_message_id": message_id, "b_rid": None})
    identity.forget_learned(conn, message_id)
    set_link(conn, message_id, referral_id=None, state=REJECTED, matched_by="manual_unlink")
    for old in before:
        _manual_event(conn, old, message_id, rf.LINK_REJECTED, now, actor)
        refresh(conn, old, now)
    return before


# -- read side (CLI and HTTP share these, so the JSON has one shape) --------------------------------
def referral_json(conn: Connection, referral_id: int, now: datetime) -> dict[str, Any] | None:
    """One referral as other tools read it. Folded afresh so presumed attendance reflects *now*."""
    ref = conn.execute(_REFERRAL_ROW, {"rid": referral_id}).first()
    if ref is None:
        return None
    rows = load_events(conn, referral_id)
    state = rf.fold([_event(r) for r in rows], now=now, options=fold_options(ref.presume_hours))
    links = conn.execute(_LINKED_MESSAGES, {"rid": referral_id})
    out: dict[str, Any] = {
        "id": ref.id,
        "placer_id": ref.placer_id,
        "status": state.status.value,
        "x360_state": x360.state_name(state),
        "priority": state.priority,
        "referred_to": state.referred_to,
        "referring_provider": state.referring_provider,
    }
    out.update({name: iso(getattr(state, name)) for name in _MILESTONES})
    out["appointments"] = [
        {"appointment_id": a.appointment_id, "status": a.status.value, "start": iso(a.start)}
        for a in state.appointments
    ]
    out["documents"] = [
        {"id": d.document_id, "type": d.doc_type,
         "status": "retracted" if d.retracted else "final" if d.final else "preliminary", "final": d.final}
        for d in state.documents
    ]
    out["timeline"] = [
        {"at": iso(t.at), "event": t.event, "control_id": t.control_id, "detail": t.detail} for t in state.timeline
    ]
    out["links"] = [{"control_id": c, "matched_by": m} for c, m in links]
    out["flags"] = [f for f in (ref.flags or "").split(",") if f]
    return out


def list_referrals_by_id(conn: Connection, referral_id: int) -> list[dict[str, Any]]:
    """One worklist row (or none), in :func:`list_referrals`' shape."""
    return list_referrals(conn, referral_id=referral_id, limit=1)


def list_referrals(conn: Connection, *, status: str | None = None, placer_id: str | None = None,
                   limit: int = 500, referral_id: int | None = None) -> list[dict[str, Any]]:
    """Worklist rows from the projection (no fold, so it stays one indexed query)."""
    stmt = select(REFERRALS).order_by(REFERRALS.c.id).limit(limit)
    if referral_id is not None:
        stmt = stmt.where(REFERRALS.c.id == referral_id)
    if status:
        stmt = stmt.where(REFERRALS.c.status == status)
    if placer_id:
        stmt = stmt.where(REFERRALS.c.placer_id == placer_id)
    out = []
    for r in conn.execute(stmt):
        row = {"id": r.id, "placer_id": r.placer_id, "status": r.status, "priority": r.priority,
               "referred_to": r.referred_to, "referring_provider": r.referring_provider}
        row.update({name: iso(aware(getattr(r, name))) for name in _MILESTONES})
        row["flags"] = [f for f in (r.flags or "").split(",") if f]
        out.append(row)
    return out


def list_unmatched(conn: Connection) -> list[dict[str, Any]]:
    """The review queue (ambiguous matches, with candidates) followed by parked messages."""
    rows = list(conn.execute(select(LINKS).where(LINKS.c.state.in_((REVIEW, PARKED))).order_by(
        LINKS.c.state.desc(), LINKS.c.message_id)))
    ids = {c["id"] for r in rows for c in json.loads(r.candidates)}
    placers: dict[int, str] = {}
    if ids:
        placers = {r.id: r.placer_id for r in conn.execute(
            select(REFERRALS.c.id, REFERRALS.c.placer_id).where(REFERRALS.c.id.in_(ids)))}
    return [
        {"message_id": r.message_id, "control_id": r.control_id, "type": r.message_type, "state": r.state,
         "candidates": [{"id": c["id"], "placer_id": placers.get(c["id"], ""), "matched": c.get("matched", []),
                         "authority": c.get("authority", "")} for c in json.loads(r.candidates)]}
        for r in rows
    ]
