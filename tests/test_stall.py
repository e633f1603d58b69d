"""Specs for the stall clock: stages, windows, business days, holds, levels and alert diffs."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refloop import referral as r
from refloop.referral import Status, paused_intervals
from refloop.stall import (
    NOTE,
    REBOOKING,
    SCHEDULING,
    VISIT,
    AlertDiff,
    Stall,
    Windows,
    diff_alerts,
    elapsed_days,
    evaluate,
    priority_class,
)
from tests.events import EventJournal

#: Monday 2 March 2026, 09:00 UTC: the referral is sent.
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
FRIDAY = datetime(2026, 3, 6, 9, 0, tzinfo=UTC)
CET = timezone(timedelta(hours=1))
DEFAULT = Windows()


def at(days: float = 0, hours: float = 0) -> datetime:
    """A moment relative to T0."""
    return T0 + timedelta(days=days, hours=hours)


class Journal(EventJournal):
    """Events of one referral, evaluated against stall windows (see tests/events.py)."""

    def evaluate(self, now: datetime, windows: Windows = DEFAULT) -> list[Stall]:
        return evaluate(self.state(), now, windows, paused_intervals(self.events))


def sent(priority: str = "R", when: datetime = T0, **details: str) -> Journal:
    """A referral sent at ``when`` and nothing else."""
    return Journal().add(r.REFERRAL_CREATED, when, priority=priority, **details)


def booked(start_day: float = 10) -> Journal:
    """Sent at T0, A1 booked on day 2 for ``start_day``."""
    return sent().add(r.APPOINTMENT_BOOKED, at(2), appointment_id="A1", start=at(start_day).isoformat())


def no_show() -> Journal:
    """Booked for day 10 and reported as a no-show at day 10 + 1 h."""
    return booked().add(r.APPOINTMENT_NO_SHOW, at(10, 1), appointment_id="A1")


def stages(stalls: list[Stall]) -> dict[str, int]:
    return {s.stage: s.level for s in stalls}


class TestStages:
    """Each stage runs only in its statuses, from its own start."""

    def test_sent_20_days_without_booking(self) -> None:
        """A referral sent 20 days ago with no booking is scheduling level 1, 6 days overdue."""
        assert sent().evaluate(at(20)) == [Stall(SCHEDULING, 1, 6.0, 14.0, T0)]

    def test_within_window_is_not_stalled(self) -> None:
        """Just before the 14-day window nothing is stalled; at the window it is level 1 with 0 overdue."""
        assert sent().evaluate(at(14) - timedelta(seconds=1)) == []
        assert sent().evaluate(at(14)) == [Stall(SCHEDULING, 1, 0.0, 14.0, T0)]

    def test_visit_stage_while_scheduled(self) -> None:
        """A booking stops the scheduling clock, but a visit booked far out still stalls the visit at 45 days."""
        journal = booked(start_day=60)
        assert journal.evaluate(at(44)) == []
        assert journal.evaluate(at(50)) == [Stall(VISIT, 1, 5.0, 45.0, T0)]

    def test_visit_and_scheduling_overlap_while_sent(self) -> None:
        """An unbooked referral at day 45 is late on both scheduling (level 3) and visit (level 1)."""
        assert stages(sent().evaluate(at(45))) == {SCHEDULING: 3, VISIT: 1}

    def test_note_stage_from_the_visit(self) -> None:
        """After attendance only the note clock runs, from the visit time, with a 7-day window."""
        journal = booked().add(r.APPOINTMENT_COMPLETED, at(10, 2), appointment_id="A1")
        assert journal.state().status is Status.COMPLETED
        assert journal.evaluate(at(16)) == []
        assert journal.evaluate(at(18)) == [Stall(NOTE, 1, 1.0, 7.0, at(10))]

    def test_rebooking_stage_from_the_no_show(self) -> None:
        """A no-show starts the rebooking clock at the no-show report, not at the sending."""
        stalls = no_show().evaluate(at(24, 1))
        assert stalls == [Stall(REBOOKING, 1, 0.0, 14.0, at(10, 1))]

    def test_resent_no_show_does_not_restart_the_clock(self) -> None:
        """A no-show message sent again later leaves the rebooking clock at the first report."""
        journal = no_show().add(r.APPOINTMENT_NO_SHOW, at(20), appointment_id="A1")
        assert journal.state().no_show_count == 1
        assert [s.started_at for s in journal.evaluate(at(25))] == [at(10, 1)]

    def test_second_no_show_escalates_at_once(self) -> None:
        """No-show, reschedule, no-show: rebooking is level 2 the moment the second no-show arrives."""
        journal = (
            no_show()
            .add(r.APPOINTMENT_RESCHEDULED, at(11), appointment_id="A1", start=at(15).isoformat())
            .add(r.APPOINTMENT_NO_SHOW, at(15, 1), appointment_id="A1")
        )
        assert journal.state().no_show_count == 2
        assert journal.evaluate(at(15, 1)) == [Stall(REBOOKING, 2, 0.0, 14.0, at(15, 1))]
        assert stages(journal.evaluate(at(15 + 42, 1))) == {REBOOKING: 3, VISIT: 1}

    def test_no_show_on_another_appointment_counts_from_its_own_report(self) -> None:
        """With two no-show appointments, the clock starts at the later one's report."""
        journal = (
            no_show()
            .add(r.APPOINTMENT_BOOKED, at(12), appointment_id="A2", start=at(20).isoformat())
            .add(r.APPOINTMENT_NO_SHOW, at(20, 3), appointment_id="A2")
        )
        assert [s.started_at for s in journal.evaluate(at(34, 3))] == [at(20, 3)]

    def test_without_sent_at_nothing_stalls(self) -> None:
        """Without referral_created there is no start to count from, so nothing stalls."""
        journal = Journal().add(r.APPOINTMENT_BOOKED, at(), appointment_id="A1", start=at(1).isoformat())
        journal.add(r.APPOINTMENT_NO_SHOW, at(1), appointment_id="A1")
        assert journal.state().sent_at is None
        assert journal.evaluate(at(400)) == []


class TestResolution:
    """A stage's stall ends when the referral moves on, and terminal statuses never stall."""

    def test_booking_resolves_scheduling(self) -> None:
        """Booking after a scheduling stall leaves no stall before the visit window."""
        journal = sent()
        assert stages(journal.evaluate(at(20))) == {SCHEDULING: 1}
        journal.add(r.APPOINTMENT_BOOKED, at(20), appointment_id="A1", start=at(30).isoformat())
        assert journal.evaluate(at(21)) == []

    def test_rebooking_resolves_rebooking(self) -> None:
        """A new booking after a no-show ends the rebooking stall."""
        journal = no_show()
        assert stages(journal.evaluate(at(30))) == {REBOOKING: 1}
        journal.add(r.APPOINTMENT_BOOKED, at(30), appointment_id="A2", start=at(35).isoformat())
        assert journal.evaluate(at(31)) == []

    def test_note_resolves_by_closing(self) -> None:
        """A final note closes the referral, so the note stall ends."""
        journal = booked().add(r.APPOINTMENT_COMPLETED, at(10, 2), appointment_id="A1")
        assert stages(journal.evaluate(at(30))) == {NOTE: 2}
        journal.add(r.NOTE_RECEIVED, at(30), document_id="D1", final=True)
        assert journal.evaluate(at(31)) == []

    @pytest.mark.parametrize(
        ("kind", "data", "status"),
        [
            (r.REFERRAL_CANCELLED, {}, Status.CANCELLED),
            (r.REFERRAL_ANSWERED, {"answer": "declined"}, Status.DECLINED),
            (r.REFERRAL_ANSWERED, {"answer": "expired"}, Status.EXPIRED),
            (r.MANUAL_CLOSED, {}, Status.CLOSED),
            (r.NOTE_RECEIVED, {"document_id": "D1", "final": True}, Status.CLOSED),
        ],
    )
    def test_terminal_statuses_never_stall(self, kind: str, data: dict[str, Any], status: Status) -> None:
        """Closed, cancelled, declined and expired referrals never stall, however old."""
        journal = sent().add(kind, at(1), **data)
        assert journal.state().status is status
        assert journal.evaluate(at(1000)) == []


class TestWindows:
    """Window resolution: organisation/specialty > priority > stage default."""

    @pytest.mark.parametrize(
        ("priority", "cls"),
        [
            ("S", "stat"), ("stat", "stat"), ("STAT", "stat"), ("S^STAT^HL70280", "stat"),
            ("A", "urgent"), ("asap", "urgent"), ("U", "urgent"), ("Urgent", "urgent"),
            ("R", "routine"), ("routine", "routine"), ("", "routine"), ("X", "routine"),
        ],
    )  # fmt: skip
    def test_priority_class(self, priority: str, cls: str) -> None:
        """RF1-2 codes and names map case-insensitively; unknown values are routine."""
        assert priority_class(priority) == cls

    @pytest.mark.parametrize(("priority", "days"), [("S", 1.0), ("A", 3.0), ("u", 3.0), ("R", 14.0), ("", 14.0)])
    def test_priority_scheduling_windows(self, priority: str, days: float) -> None:
        """STAT referrals must be booked within 1 day, urgent/ASAP within 3, the rest within 14."""
        assert DEFAULT.window_days(SCHEDULING, sent(priority).state()) == days
        assert DEFAULT.window_days(VISIT, sent(priority).state()) == 45.0

    def test_stat_referral_stalls_after_a_day(self) -> None:
        """A STAT referral unbooked after 2 days is scheduling level 2 (twice its 1-day window)."""
        assert sent("STAT").evaluate(at(2)) == [Stall(SCHEDULING, 2, 1.0, 1.0, T0)]

    def test_specialty_override_beats_priority(self) -> None:
        """A specialty override applies case-insensitively and beats the priority window."""
        windows = Windows(target_days={("Cardiology", SCHEDULING): 7.0})
        state = sent("S", specialty="  CARDIOLOGY").state()
        assert windows.window_days(SCHEDULING, state) == 7.0
        assert windows.window_days(VISIT, state) == 45.0
        assert windows.window_days(SCHEDULING, sent("S", specialty="Dermatology").state()) == 1.0

    def test_referred_to_override_beats_specialty(self) -> None:
        """An override for the referred-to organisation beats one for the specialty."""
        windows = Windows(target_days={("cardiology", SCHEDULING): 7.0, ("st mary heart clinic", SCHEDULING): 21.0})
        state = sent(specialty="Cardiology", referred_to="St Mary Heart Clinic").state()
        assert windows.window_days(SCHEDULING, state) == 21.0
        assert evaluate(state, at(20), windows) == []

    def test_stage_default_override(self) -> None:
        """Stage defaults can be changed; unspecified stages keep theirs."""
        windows = Windows(stage_days={VISIT: 30.0})
        assert stages(evaluate(booked(60).state(), at(30), windows)) == {VISIT: 1}
        assert windows.stage_days[NOTE] == 7.0

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"stage_days": {"visits": 1.0}}, "unknown stage 'visits'"),
            ({"stage_days": {VISIT: 0.0}}, "must be a finite number of days > 0"),
            ({"priority_days": {("P", SCHEDULING): 1.0}}, "unknown priority 'P'"),
            ({"target_days": {("cardiology", SCHEDULING): float("inf")}}, "finite"),
            ({"target_days": {(" ", SCHEDULING): 1.0}}, "empty specialty"),
        ],
    )
    def test_bad_windows_fail_at_construction(self, kwargs: dict[str, Any], message: str) -> None:
        """A bad window or key fails when built (start-up), not by silently never matching."""
        with pytest.raises(ValueError, match=message):
            Windows(**kwargs)


class TestLevels:
    """Level = floor(elapsed / window): 1 at the window, 2 at twice, 3 at three times."""

    @pytest.mark.parametrize(
        ("days", "level", "overdue"), [(13.9, 0, None), (14, 1, 0.0), (27.9, 1, 13.9), (28, 2, 14.0), (42, 3, 28.0)]
    )
    def test_levels(self, days: float, level: int, overdue: float | None) -> None:
        """The scheduling level steps up at each multiple of the 14-day window."""
        found = [s for s in sent().evaluate(at(days)) if s.stage == SCHEDULING]
        assert [s.level for s in found] == ([level] if level else [])
        if overdue is not None:
            assert found[0].overdue_days == pytest.approx(overdue)

    def test_fractional_window_multiples_are_exact(self) -> None:
        """Three times a 0.1-day window is level 3 despite float rounding."""
        windows = Windows(stage_days={SCHEDULING: 0.1})
        assert stages(evaluate(sent().state(), at(0.3), windows))[SCHEDULING] == 3


class TestBusinessDays:
    """Business days count only weekday time that is not a holiday, in UTC."""

    def test_weekend_is_skipped(self) -> None:
        """Friday 09:00 to Monday 09:00 is 3 calendar days but 1 business day."""
        monday = FRIDAY + timedelta(days=3)
        assert elapsed_days(FRIDAY, monday) == 3.0
        assert elapsed_days(FRIDAY, monday, business_days=True) == 1.0

    def test_holiday_is_skipped(self) -> None:
        """A Monday holiday leaves only Friday's remaining 15 hours."""
        monday = FRIDAY + timedelta(days=3)
        assert elapsed_days(FRIDAY, monday, business_days=True, holidays=(date(2026, 3, 9),)) == 0.625

    def test_weekend_holiday_changes_nothing(self) -> None:
        """A holiday on a Saturday does not count twice."""
        week_later = FRIDAY + timedelta(days=7)
        assert elapsed_days(FRIDAY, week_later, business_days=True, holidays=(date(2026, 3, 7),)) == 5.0

    def test_counted_in_utc(self) -> None:
        """Monday 00:30 at UTC+1 is Sunday 23:30 UTC, so its first half hour does not count."""
        start = datetime(2026, 3, 9, 0, 30, tzinfo=CET)
        assert elapsed_days(start, start + timedelta(hours=1), business_days=True) == pytest.approx(0.5 / 24)

    def test_business_window_in_evaluate(self) -> None:
        """With business days, a Friday referral hits a 2-day window on Tuesday, not on Sunday."""
        windows = Windows(stage_days={SCHEDULING: 2.0}, business_days=True, holidays=(date(2026, 12, 25),))
        journal = sent(when=FRIDAY)
        assert journal.evaluate(FRIDAY + timedelta(days=3), windows) == []
        assert journal.evaluate(FRIDAY + timedelta(days=4), windows) == [Stall(SCHEDULING, 1, 0.0, 2.0, FRIDAY)]

    def test_long_span(self) -> None:
        """A year of weekdays minus listed weekday holidays, computed without walking every day."""
        start = datetime(2026, 1, 5, tzinfo=UTC)  # a Monday
        holidays = (date(2026, 1, 1), date(2026, 12, 25), date(2026, 7, 4))  # Thu, Fri, Sat
        assert elapsed_days(start, start + timedelta(weeks=52), business_days=True, holidays=holidays) == 259.0


class TestPauses:
    """Holds stop the clock: closed, open and overlapping spells."""

    def test_closed_hold(self) -> None:
        """A 5-day hold pushes the scheduling stall back by 5 days."""
        journal = sent().add(r.HOLD_STARTED, at(5)).add(r.HOLD_ENDED, at(10))
        assert journal.evaluate(at(18)) == []
        assert journal.evaluate(at(20)) == [Stall(SCHEDULING, 1, 1.0, 14.0, T0)]

    def test_open_hold(self) -> None:
        """An open hold pauses until now, so the clock stands still while it lasts."""
        journal = sent().add(r.HOLD_STARTED, at(10))
        assert journal.state().on_hold
        assert journal.evaluate(at(400)) == []
        assert elapsed_days(T0, at(400), pauses=paused_intervals(journal.events)) == 10.0

    def test_overlapping_pauses_count_once(self) -> None:
        """Overlapping and nested spells are merged, and a spell before the start is ignored."""
        pauses = [(at(2), at(6)), (at(4), at(8)), (at(5), at(6)), (at(-10), at(-5)), (at(-1), at(1))]
        assert elapsed_days(T0, at(20), pauses=pauses) == 20 - 6 - 1

    def test_pause_in_business_days(self) -> None:
        """A pause over a weekend removes nothing extra in business-day mode."""
        weekend = (FRIDAY + timedelta(hours=15), FRIDAY + timedelta(days=2, hours=15))
        week_later = FRIDAY + timedelta(days=7)
        assert elapsed_days(FRIDAY, week_later, pauses=[weekend], business_days=True) == 5.0

    def test_naive_times_are_rejected(self) -> None:
        """A naive datetime is a bug in the caller, so it fails loudly rather than guessing a zone."""
        with pytest.raises(ValueError, match="timezone-aware"):
            elapsed_days(datetime(2026, 3, 2), T0)


def stall(stage: str, level: int) -> Stall:
    return Stall(stage, level, 0.0, 14.0, T0)


class TestDiffAlerts:
    """diff_alerts: raised, escalated, resolved, unchanged, in a deterministic order."""

    def test_raised_escalated_resolved_unchanged(self) -> None:
        """New stalls are raised, higher levels escalated, vanished ones resolved, the rest left alone."""
        open_alerts = {(1, SCHEDULING): 1, (2, VISIT): 2, (3, NOTE): 1, (4, SCHEDULING): 2, (6, REBOOKING): 1}
        stalls = {
            1: [stall(SCHEDULING, 2)],
            2: [stall(VISIT, 2)],
            3: [],
            4: [stall(SCHEDULING, 1)],
            5: [stall(REBOOKING, 1)],
        }
        assert diff_alerts(open_alerts, stalls) == AlertDiff(
            raised=((5, stall(REBOOKING, 1)),),
            escalated=((1, stall(SCHEDULING, 2)),),
            resolved=((3, NOTE), (6, REBOOKING)),
        )

    def test_nothing_changes(self) -> None:
        """A scan matching the open alerts changes nothing, and the diff is falsy."""
        diff = diff_alerts({(1, VISIT): 1}, {1: [stall(VISIT, 1)]})
        assert diff == AlertDiff() and not diff

    def test_order_is_deterministic(self) -> None:
        """Changes are sorted by referral id, then stage order, whatever the input order."""
        stalls = {9: [stall(NOTE, 1)], 2: [stall(VISIT, 1), stall(SCHEDULING, 1)]}
        open_alerts = {(7, VISIT): 1, (3, NOTE): 1, (3, SCHEDULING): 1}
        diff = diff_alerts(open_alerts, stalls)
        assert [(i, s.stage) for i, s in diff.raised] == [(2, SCHEDULING), (2, VISIT), (9, NOTE)]
        assert diff.resolved == ((3, SCHEDULING), (3, NOTE), (7, VISIT))

    def test_scan_then_booking_resolves(self) -> None:
        """End to end: a stall raised by one scan is resolved by the next once the referral is booked."""
        journal = sent()
        first = diff_alerts({}, {1: journal.evaluate(at(20))})
        assert [(i, s.stage, s.level) for i, s in first.raised] == [(1, SCHEDULING, 1)]
        open_alerts = {(i, s.stage): s.level for i, s in first.raised}
        assert diff_alerts(open_alerts, {1: journal.evaluate(at(28))}).escalated[0][1].level == 2
        journal.add(r.APPOINTMENT_BOOKED, at(29), appointment_id="A1", start=at(35).isoformat())
        assert diff_alerts(open_alerts, {1: journal.evaluate(at(30))}).resolved == ((1, SCHEDULING),)


moments = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2030, 12, 31), timezones=st.sampled_from([UTC, CET])
)
spans = st.timedeltas(min_value=timedelta(0), max_value=timedelta(days=400))
holiday_sets = st.lists(st.dates(min_value=date(2020, 1, 1), max_value=date(2031, 12, 31)), max_size=20)
pause_lists = st.lists(st.tuples(moments, st.one_of(st.none(), spans)), max_size=4).map(
    lambda raw: [(start, None if span is None else start + span) for start, span in raw]
)


class TestProperties:
    """Properties of elapsed_days that every scan relies on."""

    @settings(max_examples=200, deadline=None)
    @given(moments, spans, spans, st.booleans(), holiday_sets, pause_lists)
    def test_monotonic_and_never_negative(
        self,
        start: datetime,
        first: timedelta,
        extra: timedelta,
        business: bool,
        holidays: list[date],
        pauses: list[tuple[datetime, datetime | None]],
    ) -> None:
        """Elapsed time never decreases as now advances and is never negative, holds or not."""
        kwargs: dict[str, Any] = {"pauses": pauses, "business_days": business, "holidays": holidays}
        earlier = elapsed_days(start, start + first, **kwargs)
        later = elapsed_days(start, start + first + extra, **kwargs)
        assert 0.0 <= earlier <= later
        assert elapsed_days(start + first, start, **kwargs) == 0.0

    @settings(max_examples=200, deadline=None)
    @given(moments, spans, holiday_sets, pause_lists)
    def test_business_at_most_calendar(
        self, start: datetime, span: timedelta, holidays: list[date], pauses: list[tuple[datetime, datetime | None]]
    ) -> None:
        """Business time never exceeds calendar time, and holds never add time."""
        now = start + span
        calendar = elapsed_days(start, now, pauses=pauses)
        assert elapsed_days(start, now, pauses=pauses, business_days=True, holidays=holidays) <= calendar
        assert calendar <= elapsed_days(start, now)

    @settings(max_examples=200, deadline=None)
    @given(moments, st.integers(min_value=1, max_value=20))
    def test_full_weeks_are_five_business_days(self, start: datetime, weeks: int) -> None:
        """Any run of whole weeks without holidays is exactly 5 business days per week."""
        assert elapsed_days(start, start + timedelta(weeks=weeks), business_days=True) == 5.0 * weeks
