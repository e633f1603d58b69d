"""Specs for the referral fold: one test per path through the loop, plus order-independence properties."""

from __future__ import annotations

import itertools
from dataclasses import fields
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refloop import referral as r
from refloop.referral import ApptStatus, Event, FoldOptions, Status, fold
from tests.events import EventJournal

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)
CET = timezone(timedelta(hours=1))


def at(days: float = 0, hours: float = 0) -> datetime:
    """A moment relative to T0, when the referral is sent."""
    return T0 + timedelta(days=days, hours=hours)


def iso(moment: datetime) -> str:
    """Event data carries times as ISO strings, as the journal stores them."""
    return moment.isoformat()


class Journal(EventJournal):
    """Events of one referral (see tests/events.py)."""


def booked_referral() -> Journal:
    """Sent at T0, appointment A1 booked on day 2 for day 10 at 09:00."""
    return (
        Journal()
        .add(r.REFERRAL_CREATED, at(), priority="R", specialty="Cardiology")
        .add(r.APPOINTMENT_BOOKED, at(2), appointment_id="A1", start=iso(at(10)))
    )


class TestPaths:
    """Each path through the loop lands on the documented status and dates."""

    def test_booked_completed_final_note_closes(self) -> None:
        """Booking schedules, attendance completes, and a final note closes with the visit as completed_at."""
        journal = booked_referral()
        assert journal.fold().status is Status.SCHEDULED
        journal.add(r.APPOINTMENT_COMPLETED, at(10, 1), appointment_id="A1")
        completed = journal.fold()
        assert completed.status is Status.COMPLETED
        journal.add(r.NOTE_RECEIVED, at(12), document_id="D7", final=True, doc_type="CN")
        state = journal.fold()
        assert state.status is Status.CLOSED
        assert (state.sent_at, state.scheduled_at, state.appointment_at) == (at(), at(2), at(10))
        assert (state.completed_at, state.note_received_at, state.closed_at) == (at(10), at(12), at(12))
        assert [e.event for e in state.timeline] == [
            r.REFERRAL_CREATED, r.APPOINTMENT_BOOKED, r.APPOINTMENT_COMPLETED, r.NOTE_RECEIVED,
        ]  # fmt: skip
        assert state.timeline[1].detail == "appointment A1 booked for 2026-03-11 09:00"

    def test_no_show_then_rebooked_is_scheduled(self) -> None:
        """A no-show shows as no_show until a new booking, and the count survives the rebooking."""
        journal = booked_referral().add(r.APPOINTMENT_NO_SHOW, at(10, 1), appointment_id="A1")
        no_show = journal.fold()
        assert (no_show.status, no_show.no_show_count) == (Status.NO_SHOW, 1)
        assert no_show.appointment_at is None
        journal.add(r.APPOINTMENT_BOOKED, at(11), appointment_id="A2", start=iso(at(20)))
        state = journal.fold()
        assert (state.status, state.no_show_count) == (Status.SCHEDULED, 1)
        assert (state.scheduled_at, state.appointment_at) == (at(2), at(20))

    def test_cancelled_appointment_goes_back_to_sent(self) -> None:
        """Cancelling the only booking means the referral needs booking again."""
        state = booked_referral().add(r.APPOINTMENT_CANCELLED, at(5), appointment_id="A1").fold()
        assert state.status is Status.SENT
        assert state.scheduled_at == at(2), "it was scheduled once; the KPI must still see that"
        assert state.appointments[0].status is ApptStatus.CANCELLED

    def test_cancel_with_another_live_booking_stays_scheduled(self) -> None:
        """A cancel does not unschedule the referral while another appointment is still booked."""
        journal = booked_referral().add(r.APPOINTMENT_BOOKED, at(3), appointment_id="A2", start=iso(at(15)))
        state = journal.add(r.APPOINTMENT_CANCELLED, at(5), appointment_id="A1").fold()
        assert (state.status, state.appointment_at) == (Status.SCHEDULED, at(15))

    def test_deleted_appointment_was_never_booked(self) -> None:
        """A deleted appointment leaves no trace in the status or dates, even if later events name it."""
        journal = booked_referral().add(r.APPOINTMENT_DELETED, at(3), appointment_id="A1")
        journal.add(r.APPOINTMENT_RESCHEDULED, at(4), appointment_id="A1", start=iso(at(12)))
        state = journal.fold()
        assert (state.status, state.scheduled_at, state.appointment_at) == (Status.SENT, None, None)
        assert [a.status for a in state.appointments] == [ApptStatus.DELETED]
        assert state.live_appointments == ()
        assert "ignored" in state.timeline[-1].detail

    def test_decline(self) -> None:
        """A decline ends the referral and voids any earlier acceptance time."""
        journal = booked_referral().add(r.REFERRAL_ANSWERED, at(1), answer="accepted")
        assert journal.fold().accepted_at == at(1)
        state = journal.add(r.REFERRAL_ANSWERED, at(3), answer="declined").fold()
        assert (state.status, state.accepted_at) == (Status.DECLINED, None)

    def test_accept_after_decline_reopens(self) -> None:
        """A later acceptance means the specialist changed their answer, so the referral is open again."""
        journal = booked_referral().add(r.REFERRAL_ANSWERED, at(1), answer="declined")
        state = journal.add(r.REFERRAL_ANSWERED, at(3), answer="accepted").fold()
        assert (state.status, state.accepted_at) == (Status.SCHEDULED, at(3))

    def test_expire(self) -> None:
        """An expired answer ends the referral with status expired."""
        journal = Journal().add(r.REFERRAL_CREATED, at())
        state = journal.add(r.REFERRAL_ANSWERED, at(30), answer="expired").fold()
        assert state.status is Status.EXPIRED
        assert state.status in r.TERMINAL_STATUSES

    def test_referrer_cancel(self) -> None:
        """A referrer cancel wins over a live booking, and a later acceptance does not undo it."""
        journal = booked_referral().add(r.REFERRAL_CANCELLED, at(4))
        assert journal.fold().status is Status.CANCELLED
        assert journal.add(r.REFERRAL_ANSWERED, at(5), answer="accepted").fold().status is Status.CANCELLED

    def test_final_note_closes_even_after_cancel(self) -> None:
        """The report exists, so the loop is closed whatever the referrer said before."""
        journal = booked_referral().add(r.REFERRAL_CANCELLED, at(4))
        state = journal.add(r.NOTE_RECEIVED, at(9), document_id="D1", final=True).fold()
        assert (state.status, state.closed_at, state.completed_at) == (Status.CLOSED, at(9), at(9))

    def test_preliminary_then_final_note(self) -> None:
        """A preliminary note is attached without changing status; the final version closes."""
        journal = booked_referral().add(r.NOTE_RECEIVED, at(11), document_id="D1", final=False)
        prelim = journal.fold()
        assert (prelim.status, prelim.note_received_at) == (Status.SCHEDULED, None)
        assert [(d.document_id, d.final) for d in prelim.documents] == [("D1", False)]
        state = journal.add(r.NOTE_RECEIVED, at(12), document_id="D1", final=True).fold()
        assert (state.status, state.note_received_at) == (Status.CLOSED, at(12))
        assert [(d.received_at, d.final_at) for d in state.documents] == [(at(11), at(12))]

    def test_retracted_note_reopens(self) -> None:
        """Retracting the only final note recomputes the status from the rest."""
        journal = booked_referral().add(r.APPOINTMENT_COMPLETED, at(10, 1), appointment_id="A1")
        journal.add(r.NOTE_RECEIVED, at(12), document_id="D1", final=True)
        state = journal.add(r.NOTE_RETRACTED, at(13), document_id="D1").fold()
        assert (state.status, state.note_received_at, state.closed_at) == (Status.COMPLETED, None, None)
        assert state.documents[0].retracted

    def test_retraction_keeps_closed_while_another_final_note_remains(self) -> None:
        """Only the last final note's retraction reopens the referral."""
        journal = booked_referral().add(r.NOTE_RECEIVED, at(12), document_id="D1", final=True)
        journal.add(r.NOTE_RECEIVED, at(14), document_id="D2", final=True)
        state = journal.add(r.NOTE_RETRACTED, at(15), document_id="D1").fold()
        assert (state.status, state.note_received_at) == (Status.CLOSED, at(14))

    def test_replaced_note_turning_final(self) -> None:
        """A replacement that reports the note final closes the referral at the replacement's time."""
        journal = booked_referral().add(r.NOTE_RECEIVED, at(11), document_id="D1", final=False)
        state = journal.add(r.NOTE_REPLACED, at(12), document_id="D1", final=True).fold()
        assert (state.status, state.note_received_at) == (Status.CLOSED, at(12))
        assert len(state.documents) == 1

    def test_manual_close_and_reopen(self) -> None:
        """A coordinator's close ends the loop and a reopen restores the appointment-derived status."""
        journal = booked_referral().add(r.MANUAL_CLOSED, at(5), reason="patient moved", actor="coord1")
        closed = journal.fold()
        assert (closed.status, closed.closed_at) == (Status.CLOSED, at(5))
        assert closed.timeline[-1].detail == "closed manually by coord1"
        reopened = journal.add(r.MANUAL_REOPENED, at(6), actor="coord1").fold()
        assert (reopened.status, reopened.closed_at) == (Status.SCHEDULED, None)

    def test_manual_reopen_does_not_undo_a_final_note(self) -> None:
        """A reopen clears dispositions, not evidence: the final note still closes."""
        journal = booked_referral().add(r.NOTE_RECEIVED, at(12), document_id="D1", final=True)
        assert journal.add(r.MANUAL_REOPENED, at(13)).fold().status is Status.CLOSED

    def test_hold_does_not_change_status(self) -> None:
        """A hold is tracked beside the status, and its reason is never shown in the timeline."""
        journal = booked_referral().add(r.HOLD_STARTED, at(3), reason="patient abroad", resume_at=iso(at(20)))
        held = journal.fold()
        assert (held.status, held.on_hold, held.hold_reason) == (Status.SCHEDULED, True, "patient abroad")
        assert held.hold_resume_at == at(20)
        assert "abroad" not in held.timeline[-1].detail
        released = journal.add(r.HOLD_ENDED, at(8)).fold()
        assert (released.on_hold, released.hold_reason, released.hold_resume_at) == (False, "", None)
        assert r.paused_intervals(journal.events) == [(at(3), at(8))]


class TestPresumedAttendance:
    """Presumption is a sender option that needs an explicit ``now``."""

    options = FoldOptions(presume_attendance_hours=24)

    def test_not_presumed_before_the_delay(self) -> None:
        """Until start + N hours the appointment is just booked."""
        state = booked_referral().fold(now=at(10, 23), options=self.options)
        assert state.status is Status.SCHEDULED
        assert not state.appointments[0].presumed

    def test_presumed_after_the_delay(self) -> None:
        """After start + N hours with no outcome, the visit counts as attended and the timeline says so."""
        state = booked_referral().fold(now=at(11), options=self.options)
        assert (state.status, state.completed_at) == (Status.COMPLETED, at(10))
        assert state.appointments[0].status is ApptStatus.COMPLETED
        assert state.appointments[0].presumed
        last = state.timeline[-1]
        assert (last.at, last.event) == (at(11), r.PRESUMED_ATTENDANCE)
        assert "presumed attended" in last.detail and "24 h" in last.detail

    def test_not_presumed_after_a_no_show(self) -> None:
        """A no-show, even one reported late, removes the presumption."""
        journal = booked_referral().add(r.APPOINTMENT_NO_SHOW, at(12), appointment_id="A1")
        state = journal.fold(now=at(13), options=self.options)
        assert (state.status, state.no_show_count) == (Status.NO_SHOW, 1)
        assert not state.appointments[0].presumed

    def test_never_presumed_without_now(self) -> None:
        """The fold reads no clock, so without ``now`` nothing is presumed."""
        assert booked_referral().fold(options=self.options).status is Status.SCHEDULED


class TestOrderingAndRobustness:
    """Out-of-order, tied, duplicated or partial input gives a well-defined state."""

    def test_missing_referral_created(self) -> None:
        """An SIU linked before its REF still folds; sent_at is simply unknown."""
        journal = Journal().add(r.APPOINTMENT_BOOKED, at(2), appointment_id="A1", start=iso(at(10)))
        state = journal.fold()
        assert (state.status, state.sent_at, state.scheduled_at) == (Status.SCHEDULED, None, at(2))

    def test_tied_times_apply_in_seq_order(self) -> None:
        """Events at the same instant apply in (message id, index) order, whatever the input order."""
        booked = Event(r.APPOINTMENT_BOOKED, at(2), (5, 0), "C5", {"appointment_id": "A1"})
        cancelled = Event(r.APPOINTMENT_CANCELLED, at(2), (5, 1), "C5", {"appointment_id": "A1"})
        assert fold([cancelled, booked]).status is Status.SENT
        assert fold([booked, cancelled]).status is Status.SENT

    def test_equal_instants_in_different_zones_fold_equally(self) -> None:
        """Occurrence times are compared as instants, not as wall-clock text."""
        events = booked_referral().events
        shifted = [Event(e.kind, e.at.astimezone(CET), e.seq, e.control_id, e.data) for e in events]
        assert fold(shifted) == fold(events)

    def test_conflicting_duplicates_resolve_deterministically(self) -> None:
        """Two different events with the same seq and kind keep the same one in any order."""
        one = Event(r.APPOINTMENT_BOOKED, at(2), (9, 0), "C9", {"appointment_id": "A1", "start": iso(at(10))})
        two = Event(r.APPOINTMENT_BOOKED, at(2), (9, 0), "C9", {"appointment_id": "A1", "start": iso(at(11))})
        assert fold([one, two]) == fold([two, one])
        assert len(fold([one, two]).timeline) == 1

    def test_resent_messages_are_idempotent(self) -> None:
        """A resend under a new message id repeats facts without changing the outcome."""
        journal = booked_referral().add(r.APPOINTMENT_NO_SHOW, at(10, 1), appointment_id="A1")
        journal.add(r.APPOINTMENT_NO_SHOW, at(10, 2), appointment_id="A1")
        journal.add(r.REFERRAL_CREATED, at(1), priority="R")
        state = journal.fold()
        assert (state.no_show_count, state.sent_at, len(state.appointments)) == (1, at(), 1)

    def test_late_retraction_timestamp_still_retracts(self) -> None:
        """A retraction stamped before the note (skewed clocks) still retracts it."""
        journal = booked_referral().add(r.NOTE_RETRACTED, at(5), document_id="D1")
        journal.add(r.NOTE_RECEIVED, at(6), document_id="D1", final=True)
        assert journal.fold().status is Status.SCHEDULED

    def test_details_later_wins_but_empty_never_erases(self) -> None:
        """An update overrides details it carries; empty fields mean 'not sent'."""
        journal = booked_referral().add(r.REFERRAL_UPDATED, at(1), priority="S", specialty="")
        state = journal.fold()
        assert (state.priority, state.specialty) == ("S", "Cardiology")

    def test_bad_start_time_is_unknown_not_fatal(self) -> None:
        """A naive or garbled start becomes None rather than breaking the fold."""
        journal = Journal().add(r.APPOINTMENT_BOOKED, at(2), appointment_id="A1", start="2026-03-10T09:00")
        journal.add(r.APPOINTMENT_BOOKED, at(2), appointment_id="A2", start="soon")
        state = journal.fold(now=at(40), options=FoldOptions(presume_attendance_hours=1))
        assert [a.start for a in state.appointments] == [None, None]
        assert state.status is Status.SCHEDULED

    def test_completed_at_from_note_without_visit(self) -> None:
        """A final note implies the visit happened; without an attended appointment it dates completion."""
        state = Journal().add(r.NOTE_RECEIVED, at(20), document_id="D1", final=True).fold()
        assert (state.status, state.completed_at, state.appointment_at) == (Status.CLOSED, at(20), None)


class TestContract:
    """The module's public names and guards that other modules rely on."""

    def test_every_kind_has_a_handler(self) -> None:
        """A new event kind cannot be added without deciding how it folds."""
        for kind in r.EVENT_KINDS:
            Journal().add(kind, at()).fold()

    def test_open_and_terminal_partition_statuses(self) -> None:
        """Every status is either open or terminal, never both."""
        assert set(Status) == r.OPEN_STATUSES | r.TERMINAL_STATUSES
        assert not r.OPEN_STATUSES & r.TERMINAL_STATUSES

    def test_event_rejects_naive_time_and_unknown_kind(self) -> None:
        """Handler bugs surface at construction, not as a wrong status later."""
        with pytest.raises(ValueError, match="time zone"):
            Event(r.REFERRAL_CREATED, datetime(2026, 3, 1), (1, 0))
        with pytest.raises(ValueError, match="unknown"):
            Event("referral_creatd", T0, (1, 0))

    def test_fold_rejects_naive_now(self) -> None:
        """A naive ``now`` would compare wrongly with aware starts, so it is refused."""
        with pytest.raises(ValueError, match="timezone-aware"):
            fold([], now=datetime(2026, 3, 1))

    def test_fold_options_reject_nonsense(self) -> None:
        """Negative or infinite presumption delays are configuration mistakes."""
        for hours in (-1.0, float("inf"), float("nan")):
            with pytest.raises(ValueError, match="presume_attendance_hours"):
                FoldOptions(presume_attendance_hours=hours)

    def test_reprs_leak_no_free_text(self) -> None:
        """Coordinator notes and hold reasons never reach a repr, so they can't reach a log."""
        journal = booked_referral().add(r.COORDINATOR_NOTE, at(3), text="SECRET-PHI")
        journal.add(r.HOLD_STARTED, at(4), reason="SECRET-REASON")
        assert all("SECRET" not in repr(e) for e in journal.events)
        assert "SECRET" not in repr(journal.fold())

    def test_events_are_hashable(self) -> None:
        """Events can go into sets even though their data is a dict."""
        assert len(set(booked_referral().events)) == 2

    def test_empty_fold(self) -> None:
        """No events at all is a sent referral with nothing known."""
        state = fold([])
        assert state.status is Status.SENT
        assert all(getattr(state, f.name) is None for f in fields(state) if f.name.endswith("_at"))


# -- property tests -------------------------------------------------------------------------------

_OUTCOMES = [
    None,
    r.APPOINTMENT_CANCELLED,
    r.APPOINTMENT_NO_SHOW,
    r.APPOINTMENT_COMPLETED,
    r.APPOINTMENT_DELETED,
]
_ANSWERS = ["accepted", "declined", "expired", "P"]


@st.composite
def referral_lives(draw: st.DrawFn) -> list[Event]:
    """A plausible referral history. Steps of zero hours are allowed, so ties in ``at`` are common."""
    events: list[Event] = []
    ids = itertools.count(1)
    step = st.integers(0, 3).map(lambda n: timedelta(hours=12 * n))

    def add(kind: str, when: datetime, **data: Any) -> None:
        msg = next(ids)
        events.append(Event(kind, when, (msg, draw(st.integers(0, 2))), f"C{msg}", data))

    clock = T0
    if draw(st.booleans()) or draw(st.booleans()):
        add(r.REFERRAL_CREATED, clock, priority=draw(st.sampled_from(["R", "S", ""])))
    if draw(st.booleans()):
        clock += draw(step)
        add(r.REFERRAL_ANSWERED, clock, answer=draw(st.sampled_from(_ANSWERS)))
    for n in range(draw(st.integers(0, 3))):
        appt_id, when = f"A{n}", clock + draw(step)
        add(r.APPOINTMENT_BOOKED, when, appointment_id=appt_id, start=iso(when + timedelta(days=7)))
        for _ in range(draw(st.integers(0, 2))):
            when += draw(step)
            add(r.APPOINTMENT_RESCHEDULED, when, appointment_id=appt_id, start=iso(when + timedelta(days=5)))
        if outcome := draw(st.sampled_from(_OUTCOMES)):
            add(outcome, when + timedelta(days=draw(st.integers(0, 9))), appointment_id=appt_id)
    for n in range(draw(st.integers(0, 2))):
        doc_id, when = f"D{n}", clock + timedelta(days=draw(st.integers(5, 20)))
        add(r.NOTE_RECEIVED, when, document_id=doc_id, final=draw(st.booleans()), doc_type="CN")
        if draw(st.booleans()):
            add(r.NOTE_REPLACED, when + draw(step), document_id=doc_id, final=True)
        if draw(st.booleans()):
            add(r.NOTE_RETRACTED, when + draw(step), document_id=doc_id)
    extras = [r.REFERRAL_CANCELLED, r.MANUAL_CLOSED, r.MANUAL_REOPENED, r.HOLD_STARTED, r.HOLD_ENDED]
    for kind in draw(st.lists(st.sampled_from(extras), max_size=3)):
        add(kind, T0 + timedelta(days=draw(st.integers(0, 20))))
    return events


fold_settings = st.fixed_dictionaries(
    {
        "now": st.none() | st.integers(0, 40).map(lambda d: T0 + timedelta(days=d)),
        "options": st.sampled_from([FoldOptions(), FoldOptions(presume_attendance_hours=24)]),
    }
)


class TestProperties:
    """The fold is a function of the event *set*."""

    @settings(deadline=None)
    @given(data=st.data(), events=referral_lives(), kwargs=fold_settings)
    def test_any_permutation_folds_equally(
        self, data: st.DataObject, events: list[Event], kwargs: dict[str, Any]
    ) -> None:
        """Delivering the same events in any order yields the same state."""
        permuted = data.draw(st.permutations(events))
        assert fold(permuted, **kwargs) == fold(events, **kwargs)

    @settings(deadline=None)
    @given(data=st.data(), events=referral_lives(), kwargs=fold_settings)
    def test_duplicates_with_same_seq_change_nothing(
        self, data: st.DataObject, events: list[Event], kwargs: dict[str, Any]
    ) -> None:
        """Replaying journal rows (same seq) any number of times, in any order, is idempotent."""
        extra = data.draw(st.lists(st.sampled_from(events), max_size=10)) if events else []
        noisy = data.draw(st.permutations(events + extra))
        assert fold(noisy, **kwargs) == fold(events, **kwargs)

    @settings(deadline=None)
    @given(events=referral_lives(), kwargs=fold_settings)
    def test_state_invariants(self, events: list[Event], kwargs: dict[str, Any]) -> None:
        """Whatever the history: timeline sorted, a live final note means closed, dates only when earned."""
        state = fold(events, **kwargs)
        assert [e.at for e in state.timeline] == sorted(e.at for e in state.timeline)
        if any(d.final and not d.retracted for d in state.documents):
            assert state.status is Status.CLOSED and state.closed_at is not None
        assert (state.closed_at is not None) == (state.status is Status.CLOSED)
        assert (state.scheduled_at is None) == (state.live_appointments == ())
        assert state.no_show_count >= sum(a.status is ApptStatus.NO_SHOW for a in state.live_appointments)
