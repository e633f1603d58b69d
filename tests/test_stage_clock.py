"""The one stage clock (refloop.stall): due instants agree with evaluation, levels are bounded, and
business days are counted on the clinic's local calendar (America/New_York here), DST included."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from refloop import stall
from refloop.stall import ClockInput, Windows, clocks, evaluate, leak, next_due

NY = ZoneInfo("America/New_York")
DAY = timedelta(days=1)


def sent_input(sent: datetime, *, status: str = "sent", pauses: tuple[stall.Pause, ...] = (),
               no_show_at: datetime | None = None, no_show_count: int = 0, completed_at: datetime | None = None,
               priority: str = "R") -> ClockInput:
    return ClockInput(status, sent, completed_at, no_show_at, no_show_count, priority, "Heartwell", "CARD", pauses)


def _reference_elapsed(start: datetime, now: datetime, pauses: tuple[stall.Pause, ...]) -> timedelta:
    """Calendar time from start to now minus holds, the plain way: second by second would be too slow, so
    by sorting the spell edges; written independently of the module."""
    if now <= start:
        return timedelta(0)
    paused: list[tuple[datetime, datetime]] = []
    for lo, hi in pauses:
        lo, hi = max(lo, start), min(hi or now, now)
        if hi > lo:
            paused.append((lo, hi))
    paused.sort()
    total, cursor = timedelta(0), start
    for lo, hi in paused:
        if lo > cursor:
            total += lo - cursor
        cursor = max(cursor, hi)
    return total + max(now - cursor, timedelta(0))


STATUSES = ("sent", "scheduled", "no_show", "completed", "closed", "cancelled")
BASE = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
offsets = st.integers(min_value=0, max_value=200 * 86400).map(lambda s: BASE + timedelta(seconds=s))


@st.composite
def inputs(draw: st.DrawFn) -> tuple[ClockInput, Windows, datetime]:
    sent = draw(offsets)
    status = draw(st.sampled_from(STATUSES))
    later = st.integers(min_value=0, max_value=90 * 86400).map(lambda s: sent + timedelta(seconds=s))
    pauses: list[stall.Pause] = []
    for lo in draw(st.lists(later, max_size=2)):
        length = draw(st.none() | st.integers(min_value=1, max_value=20 * 86400))
        pauses.append((lo, None if length is None else lo + timedelta(seconds=length)))
    windows = Windows(stage_days={stage: draw(st.sampled_from((0.5, 1.0, 3.0, 7.0, 14.0, 45.0)))
                                  for stage in stall.STAGES},
                      max_level=draw(st.integers(min_value=1, max_value=4)))
    inp = ClockInput(status, sent, draw(st.none() | later), draw(st.none() | later),
                     draw(st.integers(min_value=0, max_value=3)), draw(st.sampled_from(("R", "S", "A", ""))),
                     "Heartwell", "CARD", tuple(pauses))
    return inp, windows, draw(offsets)


@given(inputs())
def test_utc_levels_are_todays_rule_bounded(case: tuple[ClockInput, Windows, datetime]) -> None:
    """With UTC calendar days level k is reached after k windows (plus the second-no-show rule), capped at
    max_level: the rule the scan used before levels were bounded."""
    inp, windows, now = case
    expected = {}
    for c in clocks(inp, windows):
        days = _reference_elapsed(c.started_at, now, inp.pauses) / DAY
        run = _reference_elapsed(c.started_at, now, inp.pauses)
        level = sum(1 for k in range(1, windows.max_level + 1)
                    if run >= timedelta(microseconds=round(k * c.window_days * 86_400_000_000)))
        if c.stage == stall.REBOOKING and inp.no_show_count >= 2 and now >= c.started_at:
            level = max(level, min(2, windows.max_level))  # at once, from the (second) no-show
        if level >= 1:
            expected[c.stage] = (min(level, windows.max_level), round(max(days - c.window_days, 0.0), 6))
    got = {s.stage: (s.level, round(s.overdue_days, 6)) for s in evaluate(inp, now, windows)}
    assert got == expected


@given(inputs())
def test_due_instants_are_where_levels_change(case: tuple[ClockInput, Windows, datetime]) -> None:
    """Each due instant is exactly where the level goes up: one microsecond before it the level is lower."""
    inp, windows, _ = case
    for c in clocks(inp, windows):
        for k, due in enumerate(c.due, 1):
            if due is None or due == c.started_at:
                continue
            before = {s.stage: s.level for s in evaluate(inp, due - timedelta(microseconds=1), windows)}
            after = {s.stage: s.level for s in evaluate(inp, due, windows)}
            assert after.get(c.stage, 0) >= k > before.get(c.stage, 0)


@given(inputs())
def test_next_due_is_the_next_level_change(case: tuple[ClockInput, Windows, datetime]) -> None:
    """Between ``now`` and the next due instant no level changes; past the top level there is none."""
    inp, windows, now = case
    found = clocks(inp, windows)
    nxt = next_due(found, now)
    levels = {s.stage: s.level for s in evaluate(inp, now, windows)}
    if nxt is None:
        assert all(levels.get(c.stage, 0) == windows.max_level or None in c.due for c in found)
    else:
        assert nxt > now
        just_before = {s.stage: s.level for s in evaluate(inp, nxt - timedelta(microseconds=1), windows)}
        assert just_before == levels


def test_year_overdue_sits_at_the_top_level() -> None:
    """A STAT referral never booked: level 3 after three days, and nothing after that."""
    windows = Windows()
    inp = sent_input(BASE, priority="S")
    stalls = evaluate(inp, BASE + 365 * DAY, windows)
    assert {s.stage: s.level for s in stalls} == {stall.SCHEDULING: 3, stall.VISIT: 3}
    assert next_due(clocks(inp, windows), BASE + 365 * DAY) is None


def test_leak_stage_and_instant() -> None:
    windows = Windows()
    assert leak("sent", clocks(sent_input(BASE), windows), None) == ("never_scheduled", BASE + 14 * DAY)
    ns = sent_input(BASE, status="no_show", no_show_at=BASE + 40 * DAY, no_show_count=1)
    assert leak("no_show", clocks(ns, windows), None) == ("no_show_not_rebooked", BASE + 45 * DAY)
    assert leak("cancelled", [], BASE) == ("cancelled", BASE)
    assert leak("closed", [], BASE) == ("", None)


class TestNewYorkBusinessDays:
    """Weekends and holidays are local dates; the window ends at a local instant."""

    windows = Windows(stage_days={stall.SCHEDULING: 2.0}, business_days=True, zone="America/New_York",
                      holidays=(date(2026, 1, 19),))

    def test_sunday_evening_starts_monday_midnight_local(self) -> None:
        """Sent Sunday 21:00 in New York (Monday 02:00 UTC): counting starts Monday 00:00 local, so 2
        business days end Wednesday 00:00 local (05:00 UTC), not Tuesday 02:00 UTC + 2 days."""
        sent = datetime(2026, 3, 1, 21, 0, tzinfo=NY)
        (sched, _visit) = clocks(sent_input(sent), self.windows)
        assert sched.due[0] == datetime(2026, 3, 4, 0, 0, tzinfo=NY)
        counted_in_utc = Windows(stage_days={stall.SCHEDULING: 2.0}, business_days=True)
        assert clocks(sent_input(sent), counted_in_utc)[0].due[0] == datetime(2026, 3, 4, 2, 0, tzinfo=UTC)

    def test_monday_holiday_is_skipped_by_local_date(self) -> None:
        """Martin Luther King Day (Monday 19 Jan 2026) does not count: sent Friday 16 Jan 10:00 local, the
        2 business days are Friday (14 h) and Tuesday, ending Wednesday 10:00 local."""
        sent = datetime(2026, 1, 16, 10, 0, tzinfo=NY)
        assert clocks(sent_input(sent), self.windows)[0].due[0] == datetime(2026, 1, 21, 10, 0, tzinfo=NY)
        # Sunday 18 Jan 20:00 local is already Monday (the holiday) in UTC: still skipped as a local Sunday
        sunday = datetime(2026, 1, 18, 20, 0, tzinfo=NY)
        assert clocks(sent_input(sunday), self.windows)[0].due[0] == datetime(2026, 1, 22, 0, 0, tzinfo=NY)

    def test_november_dst_window_ends_at_the_local_instant(self) -> None:
        """DST ends Sunday 1 Nov 2026: sent Friday 30 Oct 15:00 EDT (19:00 UTC), 2 business days end
        Tuesday 3 Nov 15:00 EST, which is 20:00 UTC (an hour later in UTC than it started)."""
        sent = datetime(2026, 10, 30, 15, 0, tzinfo=NY)
        due = clocks(sent_input(sent), self.windows)[0].due[0]
        assert due == datetime(2026, 11, 3, 15, 0, tzinfo=NY)
        assert due is not None and due.astimezone(UTC) == datetime(2026, 11, 3, 20, 0, tzinfo=UTC)
        levels = {s.stage: s.level for s in evaluate(sent_input(sent), due - timedelta(seconds=1), self.windows)}
        assert stall.SCHEDULING not in levels
        assert {s.stage: s.level for s in evaluate(sent_input(sent), due, self.windows)}[stall.SCHEDULING] == 1

    def test_unknown_zone_fails_at_construction(self) -> None:
        try:
            Windows(zone="Mars/Olympus")
        except ValueError as exc:
            assert "Mars/Olympus" in str(exc)
        else:
            raise AssertionError("an unknown zone was accepted")


@given(start=st.integers(min_value=0, max_value=400 * 86400).map(lambda s: BASE + timedelta(seconds=s)),
       amount=st.integers(min_value=1, max_value=200 * 86400).map(lambda s: timedelta(seconds=s)),
       zone=st.sampled_from(("UTC", "America/New_York", "Europe/Berlin")),
       holidays=st.lists(st.dates(min_value=date(2026, 1, 1), max_value=date(2027, 12, 31)), max_size=25))
def test_business_advance_is_the_inverse_of_business_time(start: datetime, amount: timedelta, zone: str,
                                                          holidays: list[date]) -> None:
    """The due instant is the first at which exactly that much business time has run (whole weeks are
    skipped arithmetically, so this pins the shortcut to the day-by-day definition)."""
    cal = stall.Calendar(Windows(business_days=True, zone=zone, holidays=tuple(holidays)))
    due = cal.advance(start, amount)
    assert cal.between(start, due) == amount
    assert cal.between(start, due - timedelta(microseconds=1)) < amount
