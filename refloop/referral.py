"""The referral loop's domain core: a referral's state is the fold of its events.

Messages about one referral come from up to three systems (the referrer's EHR, the specialist's
scheduling system and their document system), over separate links, with retries, resends and clocks that
disagree. So refloop stores facts append-only and recomputes the state from all of them: any status can be
explained by the events behind it, and a late or out-of-order message is handled by simply folding again.
This module has no I/O, no clock and no HL7. Handlers turn messages into :class:`Event` objects, the store
journals them, and :func:`fold` turns them back into a :class:`ReferralState`.

How refloop decides a status
----------------------------

**Ordering.** Events are first deduplicated on ``(seq, kind)``: replaying a journal row twice changes
nothing. If two events share that key but differ, the smaller one in a fixed canonical order is kept, so the
choice never depends on arrival order. The rest are sorted by ``(at, seq, kind)``. ``at`` is the occurrence
time the caller chose (the message's own event time, or MSH-7 if it has none), and ``seq`` breaks ties, so
events from one message apply in message order. Events are replayed in that order into records for the
referral, each appointment and each document, and the status is derived from those records at the end.
This is a total order on the event set, so every permutation of the same events yields the same state.

**Resends are harmless.** A resent message gets a new ``seq``, so it is not deduplicated, but every rule is
idempotent for it: booking the same appointment twice is still one appointment, repeated no-shows in a row
count once, a resent note is the same document, and ``sent_at`` is the earliest ``referral_created``.

**Sticky facts.** Source clocks disagree, so some facts ignore timestamps. A deleted appointment and a
retracted document stay that way whatever comes after. A document that was once final stays final, because
HL7 moves completion status only forward. Use a retraction to undo it.

**Status, first match wins:**

1. ``closed``: a non-retracted final document is linked. This wins over everything, including a referrer
   cancel, a decline or a manual reopen, because the report exists and the loop *is* closed. To undo it,
   retract the note, or reject the link so that the note's events stop being folded into this referral.
2. The latest *disposition*. This is ``cancelled`` (the referrer cancelled), ``declined`` or ``expired``
   (the specialist's answer), or ``closed`` (a manual close). An ``accepted`` answer clears an earlier
   decline or expiry, because the specialist changed their answer, but it does not clear a cancel or a
   manual close. A manual reopen clears every disposition before it.
3. ``completed``: a live appointment was attended, either by an explicit completion or presumed (see
   below). Booking a follow-up afterwards does not undo this.
4. ``scheduled``: a live appointment is booked.
5. ``no_show``: the most recent appointment outcome was a no-show, and nothing has been rebooked.
6. ``sent``: everything else. Nothing is booked yet, the last appointment was cancelled, or the referral
   was only answered. This also applies when ``referral_created`` is missing; then ``sent_at`` is None.

**Appointments** are keyed by ``appointment_id``. An event for an id not seen before creates the
appointment, with ``booked_at`` set to that event's time. ``booked`` and ``rescheduled`` both make the
appointment booked, with the start the event gives, so rescheduling a cancelled or no-show appointment is
a rebooking. ``modified`` only updates the start. ``cancelled``, ``no_show`` and ``completed`` set the
status, and for one appointment the latest event wins. ``deleted`` means the appointment was entered in
error. It stays in ``appointments`` with status ``deleted`` so that staff can see it, but every derived
field ignores it, and so do later events for the same id. ``no_show_count`` counts how many times a live
appointment became a no-show: two no-show messages in a row count once, but no-show, reschedule, no-show
counts twice.

**Presumed attendance** is a sender-profile option, because some feeds never report completion. It needs
``FoldOptions.presume_attendance_hours = N`` and a ``now``. A live appointment that is still booked when
``now >= start + N h`` is treated as completed. ``Appointment.presumed`` is set and the timeline gets an
entry at ``start + N h``. If a no-show or cancel arrives later, whenever it does, the next fold drops the
presumption. Without ``now`` nothing is presumed, because this module never reads a clock.

**Documents** are keyed by ``document_id``. ``note_received`` and ``note_replaced`` set the type and the
finality (which only ever goes from preliminary to final). ``note_retracted`` retracts a document for good.
A preliminary note is attached but never changes the status. If the last final note is retracted, the
referral reopens and its status is recomputed from the remaining events.

**Dates:**

* ``sent_at`` is the earliest ``referral_created``.
* ``accepted_at`` is the first accept since the last decline or expiry, and None otherwise.
* ``scheduled_at`` is the earliest ``booked_at`` among live appointments. Cancelled and no-show
  appointments count (the referral *was* scheduled then); deleted ones do not.
* ``appointment_at`` is the earliest start of an attended appointment (the consult visit). If there is
  none, it is the earliest start of a booked one (the upcoming visit).
* ``completed_at`` is the earliest start of an attended appointment (its completion time if the start is
  unknown). Failing that, a final note counts as proof of the visit, and ``completed_at`` is
  ``note_received_at``.
* ``note_received_at`` is the earliest time at which a live document became final.
* ``closed_at`` is set only while the status is ``closed``. It is the earlier of ``note_received_at`` and
  an effective manual close.

**Holds** (``hold_started`` / ``hold_ended``) switch ``on_hold`` and never change the status.
``resume_at`` is informational: whatever owns the clock emits ``hold_ended`` with ``at = resume_at``, so
the pause is exact even if that runs late. :func:`paused_intervals` gives the spells for the stall clock.

**Details** (priority, referred-to, referring provider, specialty): the latest ``referral_created`` or
``referral_updated`` value wins. An empty or missing value never erases a known one, because an empty HL7
field means "not sent".

**Reported states** (``referral_status_reported``, and ``data["x360"]`` on any event): the latest 360X
state a message named is kept as ``reported_x360``; a reported state alone never changes the status.

**PHI:** timeline details contain only identifiers, codes and times, never free text (coordinator notes,
hold or close reasons). ``Event.data`` and ``ReferralState.hold_reason`` are left out of ``repr``.

This module is longer than refloop's usual 300 lines on purpose. The docstring above is the full rule
set, and the rest is one short handler per event kind. Splitting it would scatter the rules, which
have to be read together.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final


class Status(StrEnum):
    """Referral status; see the module docstring for how one is chosen."""

    SENT = "sent"
    SCHEDULED = "scheduled"
    COMPLETED = "completed"
    NO_SHOW = "no_show"
    CLOSED = "closed"
    CANCELLED = "cancelled"
    DECLINED = "declined"
    EXPIRED = "expired"


#: Statuses that still need something to happen, so the stall clock runs for them.
OPEN_STATUSES: Final[frozenset[Status]] = frozenset(
    {Status.SENT, Status.SCHEDULED, Status.COMPLETED, Status.NO_SHOW}
)
#: Statuses that end the loop, at least until new events (a reopen or a retraction) change them.
TERMINAL_STATUSES: Final[frozenset[Status]] = frozenset(Status) - OPEN_STATUSES


class ApptStatus(StrEnum):
    """One appointment's status. A presumed attendance is ``completed`` with ``Appointment.presumed``."""

    BOOKED = "booked"
    CANCELLED = "cancelled"
    NO_SHOW = "no_show"
    COMPLETED = "completed"
    DELETED = "deleted"


REFERRAL_CREATED: Final = "referral_created"
REFERRAL_UPDATED: Final = "referral_updated"
REFERRAL_CANCELLED: Final = "referral_cancelled"
REFERRAL_ANSWERED: Final = "referral_answered"
APPOINTMENT_BOOKED: Final = "appointment_booked"
APPOINTMENT_RESCHEDULED: Final = "appointment_rescheduled"
APPOINTMENT_MODIFIED: Final = "appointment_modified"
APPOINTMENT_CANCELLED: Final = "appointment_cancelled"
APPOINTMENT_DELETED: Final = "appointment_deleted"
APPOINTMENT_NO_SHOW: Final = "appointment_no_show"
APPOINTMENT_COMPLETED: Final = "appointment_completed"
NOTE_RECEIVED: Final = "note_received"
NOTE_REPLACED: Final = "note_replaced"
NOTE_RETRACTED: Final = "note_retracted"
MANUAL_CLOSED: Final = "manual_closed"
MANUAL_REOPENED: Final = "manual_reopened"
HOLD_STARTED: Final = "hold_started"
HOLD_ENDED: Final = "hold_ended"
COORDINATOR_NOTE: Final = "coordinator_note"
LINK_CONFIRMED: Final = "link_confirmed"
LINK_REJECTED: Final = "link_rejected"
#: A status the other side reported that changes nothing here (a 360X interim communication, an order
#: put on hold). ``data["x360"]`` names the 360X state; it is recorded for the timeline and the state name.
REFERRAL_STATUS_REPORTED: Final = "referral_status_reported"

#: Timeline-only pseudo event for a presumed attendance. It is derived from ``now``, never stored.
PRESUMED_ATTENDANCE: Final = "appointment_presumed_completed"

#: ``data["answer"]`` values of ``referral_answered`` (RF1-1 A / R / E); anything else is recorded only.
ANSWER_ACCEPTED: Final = "accepted"
ANSWER_DECLINED: Final = "declined"
ANSWER_EXPIRED: Final = "expired"

_DETAIL_FIELDS: Final = ("priority", "referred_to", "referring_provider", "specialty")


@dataclass(frozen=True)
class Event:
    """One fact about a referral, as journaled. ``data`` must stay JSON-serialisable and is treated as
    read-only. It is left out of ``repr`` and ``hash`` because it can hold free text."""

    kind: str
    at: datetime
    seq: tuple[int, int]
    control_id: str = ""
    data: Mapping[str, Any] = field(default_factory=dict, repr=False, hash=False)

    def __post_init__(self) -> None:
        """Reject unknown kinds and naive times here, where the bug is, rather than deep inside a fold."""
        if self.kind not in EVENT_KINDS:
            raise ValueError(f"unknown referral event kind {self.kind!r}")
        if self.at.utcoffset() is None:
            raise ValueError(f"{self.kind} event at {self.at.isoformat()} has no time zone")


EVENT_KINDS: Final[frozenset[str]] = frozenset(
    {
        REFERRAL_CREATED, REFERRAL_UPDATED, REFERRAL_CANCELLED, REFERRAL_ANSWERED,
        APPOINTMENT_BOOKED, APPOINTMENT_RESCHEDULED, APPOINTMENT_MODIFIED, APPOINTMENT_CANCELLED,
        APPOINTMENT_DELETED, APPOINTMENT_NO_SHOW, APPOINTMENT_COMPLETED,
        NOTE_RECEIVED, NOTE_REPLACED, NOTE_RETRACTED,
        MANUAL_CLOSED, MANUAL_REOPENED, HOLD_STARTED, HOLD_ENDED, COORDINATOR_NOTE,
        LINK_CONFIRMED, LINK_REJECTED, REFERRAL_STATUS_REPORTED,
    }
)  # fmt: skip


@dataclass(frozen=True)
class Appointment:
    """An appointment as last reported. ``booked_at`` is when refloop first heard of it."""

    appointment_id: str
    status: ApptStatus
    start: datetime | None
    booked_at: datetime
    presumed: bool = False


@dataclass(frozen=True)
class Document:
    """A consult note. ``final_at`` is when it first became final, which is what "note received" means."""

    document_id: str
    final: bool
    retracted: bool
    received_at: datetime
    doc_type: str = ""
    final_at: datetime | None = None


@dataclass(frozen=True)
class TimelineEntry:
    """One line of a referral's history, safe to show or log (no PHI in ``detail``)."""

    at: datetime
    event: str
    control_id: str
    detail: str


@dataclass(frozen=True)
class ReferralState:
    """Everything the worklist, stall clock and KPIs need, derived by :func:`fold`."""

    status: Status
    priority: str
    referred_to: str
    referring_provider: str
    specialty: str
    sent_at: datetime | None
    accepted_at: datetime | None
    scheduled_at: datetime | None
    appointment_at: datetime | None
    completed_at: datetime | None
    note_received_at: datetime | None
    closed_at: datetime | None
    appointments: tuple[Appointment, ...]
    documents: tuple[Document, ...]
    timeline: tuple[TimelineEntry, ...]
    on_hold: bool
    hold_reason: str = field(repr=False)
    hold_resume_at: datetime | None
    no_show_count: int
    #: The latest 360X state a message named (``data["x360"]`` of any event), "" when none did.
    reported_x360: str = ""

    @property
    def live_appointments(self) -> tuple[Appointment, ...]:
        """The appointments that count: deleted ones are shown for audit but were never really booked."""
        return tuple(a for a in self.appointments if a.status is not ApptStatus.DELETED)


@dataclass(frozen=True)
class FoldOptions:
    """Per-sender choices that change how events are read."""

    presume_attendance_hours: float | None = None

    def __post_init__(self) -> None:
        """A negative or infinite delay would presume before the visit or never; both are config bugs."""
        hours = self.presume_attendance_hours
        if hours is not None and (not math.isfinite(hours) or hours < 0):
            raise ValueError(f"presume_attendance_hours must be a finite number >= 0, not {hours!r}")


_DEFAULT_OPTIONS: Final = FoldOptions()


def _canonical(event: Event) -> tuple[datetime, tuple[int, int], str, str, str]:
    """A total order over events, so the choice between conflicting duplicates is deterministic."""
    payload = json.dumps(event.data, sort_keys=True, default=str)
    return (event.at, event.seq, event.kind, event.control_id, payload)


def ordered_events(events: Iterable[Event]) -> list[Event]:
    """Deduplicate on ``(seq, kind)`` and sort by ``(at, seq, kind)``: the one order every fold uses.

    ``kind`` is part of the key so that a manual event whose id happens to collide with a journal
    message's does not silently replace it.
    """
    chosen: dict[tuple[tuple[int, int], str], Event] = {}
    for event in events:
        key = (event.seq, event.kind)
        kept = chosen.get(key)
        if kept is None or _canonical(event) < _canonical(kept):
            chosen[key] = event
    return sorted(chosen.values(), key=lambda e: (e.at, e.seq, e.kind))


def paused_intervals(events: Iterable[Event]) -> list[tuple[datetime, datetime | None]]:
    """Hold spells as ``(start, end)``, with ``end`` None while still on hold, for the stall clock.

    A second ``hold_started`` during a hold extends the same spell instead of nesting, and a
    ``hold_ended`` outside a hold is ignored.
    """
    spells: list[tuple[datetime, datetime | None]] = []
    started: datetime | None = None
    for event in ordered_events(events):
        if event.kind == HOLD_STARTED and started is None:
            started = event.at
        elif event.kind == HOLD_ENDED and started is not None:
            spells.append((started, event.at))
            started = None
    if started is not None:
        spells.append((started, None))
    return spells


def _text(data: Mapping[str, Any], key: str) -> str:
    """A string field. Ints are accepted because some senders' IDs are numeric."""
    value = data.get(key)
    if isinstance(value, bool) or not isinstance(value, str | int):
        return ""
    return str(value).strip()


def _time(value: Any) -> datetime | None:
    """Parse an ISO time. Bad or naive values become "unknown" rather than failing the whole fold."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.utcoffset() is not None else None


def _fmt(moment: datetime | None) -> str:
    """Wall time as the source gave it; minutes are enough for a human timeline."""
    return moment.strftime("%Y-%m-%d %H:%M") if moment is not None else "an unknown time"


_START_CACHE: dict[str, tuple[datetime | None, str]] = {}
_START_CACHE_MAX: Final = 65536


def _time_fmt(value: Any) -> tuple[datetime | None, str]:
    """``(_time(value), _fmt(that))`` for an appointment start, memoised by the ISO string (PERF: every
    fold re-reads every booking, and parsing plus strftime were a third of a fold). Both are pure
    functions of the string, and datetimes are immutable, so sharing the result changes nothing."""
    if not isinstance(value, str):
        return None, _fmt(None)
    hit = _START_CACHE.get(value)
    if hit is None:
        parsed = _time(value)
        if len(_START_CACHE) >= _START_CACHE_MAX:
            _START_CACHE.clear()
        hit = _START_CACHE[value] = (parsed, _fmt(parsed))
    return hit


@dataclass(slots=True)
class _Appt:
    """Mutable record for one appointment during a replay."""

    appointment_id: str
    booked_at: datetime
    status: ApptStatus = ApptStatus.BOOKED
    start: datetime | None = None
    status_at: datetime | None = None
    status_pos: int = -1
    no_shows: int = 0
    deleted: bool = False


@dataclass(slots=True)
class _Doc:
    """Mutable record for one document during a replay."""

    document_id: str
    received_at: datetime
    final_at: datetime | None = None
    retracted: bool = False
    doc_type: str = ""


class _Replay:
    """Applies sorted events one by one. Each ``_on_*`` handler returns the timeline detail."""

    def __init__(self) -> None:
        self.details: dict[str, str] = dict.fromkeys(_DETAIL_FIELDS, "")
        self.sent_at: datetime | None = None
        self.accepted_at: datetime | None = None
        self.disposition: tuple[Status, datetime] | None = None
        self.appointments: dict[str, _Appt] = {}
        self.documents: dict[str, _Doc] = {}
        self.hold: tuple[str, datetime | None] | None = None
        self.timeline: list[TimelineEntry] = []
        self.position = 0
        self.reported_x360 = ""

    def apply(self, event: Event) -> None:
        detail = _HANDLERS[event.kind](self, event)
        if reported := _text(event.data, "x360"):
            self.reported_x360 = reported
        self.timeline.append(TimelineEntry(event.at, event.kind, event.control_id, detail))
        self.position += 1

    # -- referral ---------------------------------------------------------------------------------
    def _on_created(self, event: Event) -> str:
        if self.sent_at is None or event.at < self.sent_at:
            self.sent_at = event.at
        self._update_details(event.data)
        return "referral created"

    def _on_updated(self, event: Event) -> str:
        self._update_details(event.data)
        return "referral details updated"

    def _update_details(self, data: Mapping[str, Any]) -> None:
        for name in _DETAIL_FIELDS:
            if value := _text(data, name):
                self.details[name] = value

    def _on_cancelled(self, event: Event) -> str:
        self.disposition = (Status.CANCELLED, event.at)
        return "referral cancelled by the referrer"

    def _on_answered(self, event: Event) -> str:
        answer = _text(event.data, "answer").lower()
        if answer == ANSWER_ACCEPTED:
            if self.disposition is not None and self.disposition[0] in (Status.DECLINED, Status.EXPIRED):
                self.disposition = None
            if self.accepted_at is None:
                self.accepted_at = event.at
            return "referral accepted"
        if answer in (ANSWER_DECLINED, ANSWER_EXPIRED):
            self.disposition = (Status(answer), event.at)
            self.accepted_at = None
            return f"referral {answer}"
        return "referral answer recorded (no status change)"

    def _on_manual_closed(self, event: Event) -> str:
        self.disposition = (Status.CLOSED, event.at)
        actor = _text(event.data, "actor")
        return f"closed manually by {actor}" if actor else "closed manually"

    def _on_manual_reopened(self, event: Event) -> str:
        self.disposition = None
        return "reopened manually"

    # -- appointments ------------------------------------------------------------------------------
    def _appt(self, event: Event) -> _Appt | None:
        appointment_id = _text(event.data, "appointment_id")
        if not appointment_id:
            return None
        if appointment_id not in self.appointments:
            self.appointments[appointment_id] = _Appt(appointment_id, booked_at=event.at)
        return self.appointments[appointment_id]

    def _set_appt_status(self, event: Event, status: ApptStatus, verb: str) -> str:
        appt = self._appt(event)
        if appt is None:
            return f"appointment {verb} without an appointment id (ignored)"
        if appt.deleted:
            return f"appointment {appt.appointment_id} {verb} (ignored: appointment was deleted)"
        if status is ApptStatus.NO_SHOW and appt.status is not ApptStatus.NO_SHOW:
            appt.no_shows += 1
        appt.status, appt.status_at, appt.status_pos = status, event.at, self.position
        if status is ApptStatus.BOOKED:
            start, shown = _time_fmt(event.data.get("start"))
            if start is not None:
                appt.start = start
            else:
                shown = _fmt(appt.start)
            return f"appointment {appt.appointment_id} {verb} {shown}"
        return f"appointment {appt.appointment_id} {verb}"

    def _on_booked(self, event: Event) -> str:
        return self._set_appt_status(event, ApptStatus.BOOKED, "booked for")

    def _on_rescheduled(self, event: Event) -> str:
        return self._set_appt_status(event, ApptStatus.BOOKED, "rescheduled to")

    def _on_appt_cancelled(self, event: Event) -> str:
        return self._set_appt_status(event, ApptStatus.CANCELLED, "cancelled")

    def _on_no_show(self, event: Event) -> str:
        return self._set_appt_status(event, ApptStatus.NO_SHOW, "not attended (no-show)")

    def _on_appt_completed(self, event: Event) -> str:
        return self._set_appt_status(event, ApptStatus.COMPLETED, "attended")

    def _on_modified(self, event: Event) -> str:
        appt = self._appt(event)
        if appt is None:
            return "appointment modified without an appointment id (ignored)"
        if appt.deleted:
            return f"appointment {appt.appointment_id} modified (ignored: appointment was deleted)"
        fields = event.data.get("fields")
        start = event.data.get("start") or (fields.get("start") if isinstance(fields, Mapping) else None)
        appt.start = _time_fmt(start)[0] or appt.start
        return f"appointment {appt.appointment_id} modified"

    def _on_deleted(self, event: Event) -> str:
        appt = self._appt(event)
        if appt is None:
            return "appointment deleted without an appointment id (ignored)"
        appt.deleted = True
        return f"appointment {appt.appointment_id} deleted (entered in error; treated as never booked)"

    # -- documents ---------------------------------------------------------------------------------
    def _doc(self, event: Event) -> _Doc | None:
        document_id = _text(event.data, "document_id")
        if not document_id:
            return None
        if document_id not in self.documents:
            self.documents[document_id] = _Doc(document_id, received_at=event.at)
        return self.documents[document_id]

    def _note(self, event: Event, verb: str) -> str:
        doc = self._doc(event)
        if doc is None:
            return f"note {verb} without a document id (ignored)"
        doc.doc_type = _text(event.data, "doc_type") or doc.doc_type
        if event.data.get("final") is True and doc.final_at is None:
            doc.final_at = event.at
        kind = f" ({doc.doc_type})" if doc.doc_type else ""
        finality = "final" if doc.final_at is not None else "preliminary"
        suffix = " (ignored: note was retracted)" if doc.retracted else ""
        return f"note {doc.document_id}{kind} {verb}, {finality}{suffix}"

    def _on_note_received(self, event: Event) -> str:
        return self._note(event, "received")

    def _on_note_replaced(self, event: Event) -> str:
        return self._note(event, "replaced")

    def _on_note_retracted(self, event: Event) -> str:
        doc = self._doc(event)
        if doc is None:
            return "note retracted without a document id (ignored)"
        doc.retracted = True
        return f"note {doc.document_id} retracted"

    # -- bookkeeping -------------------------------------------------------------------------------
    def _on_hold_started(self, event: Event) -> str:
        resume_at = _time(event.data.get("resume_at"))
        self.hold = (_text(event.data, "reason"), resume_at)
        return f"on hold until {_fmt(resume_at)}" if resume_at else "on hold"

    def _on_hold_ended(self, event: Event) -> str:
        self.hold = None
        return "hold ended"

    def _on_coordinator_note(self, event: Event) -> str:
        return "coordinator note added"

    def _on_link_confirmed(self, event: Event) -> str:
        return "link confirmed by a coordinator"

    def _on_link_rejected(self, event: Event) -> str:
        return "link rejected by a coordinator"

    def _on_status_reported(self, event: Event) -> str:
        state = _text(event.data, "x360")
        return f"status reported: {state}" if state else "status reported"


_HANDLERS: Final[dict[str, Callable[[_Replay, Event], str]]] = {
    REFERRAL_CREATED: _Replay._on_created,
    REFERRAL_UPDATED: _Replay._on_updated,
    REFERRAL_CANCELLED: _Replay._on_cancelled,
    REFERRAL_ANSWERED: _Replay._on_answered,
    APPOINTMENT_BOOKED: _Replay._on_booked,
    APPOINTMENT_RESCHEDULED: _Replay._on_rescheduled,
    APPOINTMENT_MODIFIED: _Replay._on_modified,
    APPOINTMENT_CANCELLED: _Replay._on_appt_cancelled,
    APPOINTMENT_DELETED: _Replay._on_deleted,
    APPOINTMENT_NO_SHOW: _Replay._on_no_show,
    APPOINTMENT_COMPLETED: _Replay._on_appt_completed,
    NOTE_RECEIVED: _Replay._on_note_received,
    NOTE_REPLACED: _Replay._on_note_replaced,
    NOTE_RETRACTED: _Replay._on_note_retracted,
    MANUAL_CLOSED: _Replay._on_manual_closed,
    MANUAL_REOPENED: _Replay._on_manual_reopened,
    HOLD_STARTED: _Replay._on_hold_started,
    HOLD_ENDED: _Replay._on_hold_ended,
    COORDINATOR_NOTE: _Replay._on_coordinator_note,
    LINK_CONFIRMED: _Replay._on_link_confirmed,
    LINK_REJECTED: _Replay._on_link_rejected,
    REFERRAL_STATUS_REPORTED: _Replay._on_status_reported,
}


def _presumed_at(appt: _Appt, now: datetime | None, options: FoldOptions) -> datetime | None:
    """When a still-booked appointment counts as attended, or None if it doesn't (yet)."""
    hours = options.presume_attendance_hours
    if now is None or hours is None or appt.start is None or appt.status is not ApptStatus.BOOKED:
        return None
    due = appt.start + timedelta(hours=hours)
    return due if now >= due else None


def _appointments(
    replay: _Replay, now: datetime | None, options: FoldOptions
) -> tuple[list[Appointment], list[TimelineEntry], dict[str, int]]:
    """Final appointment views, timeline entries for presumptions, and each one's status position."""
    views: list[Appointment] = []
    presumed: list[TimelineEntry] = []
    positions: dict[str, int] = {}
    for appt in sorted(replay.appointments.values(), key=lambda a: (a.booked_at, a.appointment_id)):
        if appt.deleted:
            views.append(Appointment(appt.appointment_id, ApptStatus.DELETED, appt.start, appt.booked_at))
            continue
        positions[appt.appointment_id] = appt.status_pos
        due = _presumed_at(appt, now, options)
        if due is None:
            views.append(Appointment(appt.appointment_id, appt.status, appt.start, appt.booked_at))
            continue
        views.append(Appointment(appt.appointment_id, ApptStatus.COMPLETED, appt.start, appt.booked_at, True))
        detail = (
            f"appointment {appt.appointment_id} presumed attended "
            f"(no no-show/cancel {options.presume_attendance_hours:g} h after the appointment)"
        )
        presumed.append(TimelineEntry(due, PRESUMED_ATTENDANCE, "", detail))
    return views, presumed, positions


def _appointment_status(live: list[Appointment], positions: Mapping[str, int]) -> Status:
    """Rules 3 to 6: attended beats booked, booked beats the latest no-show or cancel."""
    statuses = {a.status for a in live}
    if ApptStatus.COMPLETED in statuses:
        return Status.COMPLETED
    if ApptStatus.BOOKED in statuses:
        return Status.SCHEDULED
    ended = [a for a in live if a.status in (ApptStatus.NO_SHOW, ApptStatus.CANCELLED)]
    latest = max(ended, key=lambda a: positions[a.appointment_id], default=None)
    return Status.NO_SHOW if latest is not None and latest.status is ApptStatus.NO_SHOW else Status.SENT


def _completed_at(replay: _Replay, live: list[Appointment], note_at: datetime | None) -> datetime | None:
    """The visit time: the earliest attended start, else the completion report, else the final note."""
    times = [
        a.start or replay.appointments[a.appointment_id].status_at or a.booked_at
        for a in live
        if a.status is ApptStatus.COMPLETED
    ]
    return min(times, default=note_at)


def _appointment_at(live: list[Appointment]) -> datetime | None:
    """The consult visit if one was attended, else the upcoming (earliest booked) one."""
    for wanted in (ApptStatus.COMPLETED, ApptStatus.BOOKED):
        starts = [a.start for a in live if a.status is wanted and a.start is not None]
        if starts:
            return min(starts)
    return None


def _document_view(doc: _Doc) -> Document:
    """Freeze a replay record; ``final`` is derived from ``final_at`` so the two never disagree."""
    return Document(
        doc.document_id, doc.final_at is not None, doc.retracted, doc.received_at, doc.doc_type, doc.final_at
    )


def fold(
    events: Iterable[Event], *, now: datetime | None = None, options: FoldOptions = _DEFAULT_OPTIONS
) -> ReferralState:
    """Derive a referral's state from its events, in any order and with duplicates.

    ``now`` is used only for presumed attendance. Passing it in, rather than reading a clock, keeps the
    fold a pure function that a test or a replay can reproduce exactly.
    """
    if now is not None and now.utcoffset() is None:
        raise ValueError("fold(now=...) must be timezone-aware")
    replay = _Replay()
    for event in ordered_events(events):
        replay.apply(event)

    views, presumed, positions = _appointments(replay, now, options)
    live = [a for a in views if a.status is not ApptStatus.DELETED]
    docs = sorted(replay.documents.values(), key=lambda d: (d.received_at, d.document_id))
    final_times = [d.final_at for d in docs if d.final_at is not None and not d.retracted]
    note_at = min(final_times, default=None)

    status = _appointment_status(live, positions)
    manual_close: datetime | None = None
    if replay.disposition is not None:
        status = replay.disposition[0]
        manual_close = replay.disposition[1] if status is Status.CLOSED else None
    if note_at is not None:
        status = Status.CLOSED
    closed_candidates = [t for t in (note_at, manual_close) if t is not None]

    reason, resume_at = replay.hold if replay.hold is not None else ("", None)
    return ReferralState(
        status=status,
        priority=replay.details["priority"],
        referred_to=replay.details["referred_to"],
        referring_provider=replay.details["referring_provider"],
        specialty=replay.details["specialty"],
        sent_at=replay.sent_at,
        accepted_at=replay.accepted_at,
        scheduled_at=min((a.booked_at for a in live), default=None),
        appointment_at=_appointment_at(live),
        completed_at=_completed_at(replay, live, note_at),
        note_received_at=note_at,
        closed_at=min(closed_candidates) if status is Status.CLOSED and closed_candidates else None,
        appointments=tuple(views),
        documents=tuple(_document_view(d) for d in docs),
        # A stable sort on ``at`` keeps replay order for ties and puts presumptions after real events.
        timeline=tuple(sorted(replay.timeline + presumed, key=lambda e: e.at)),
        on_hold=replay.hold is not None,
        hold_reason=reason,
        hold_resume_at=resume_at,
        no_show_count=sum(a.no_shows for a in replay.appointments.values() if not a.deleted),
        reported_x360=replay.reported_x360,
    )
