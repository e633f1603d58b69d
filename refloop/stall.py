"""The stall clock: which open referrals have waited too long at which step, and how badly.

A referral *stalls* when the step it is waiting on takes longer than that step's target window. This
module only decides that; the scanner that runs it, stores alerts and notifies people lives elsewhere.
It has no I/O and never reads a clock: every function takes ``now``, so a scan can be replayed exactly.

Stages
------

===============  =========================================  ============================  ==========
stage            runs while the status is                   clock starts at               default
===============  =========================================  ============================  ==========
``scheduling``   ``sent``                                   ``sent_at``                   14 days
``rebooking``    ``no_show``                                the latest no-show (below)    14 days
``visit``        ``sent``, ``scheduled``, ``no_show``       ``sent_at``                   45 days
``note``         ``completed``                              ``completed_at``              7 days
===============  =========================================  ============================  ==========

``scheduling`` and ``visit`` overlap on purpose: an unbooked referral is late to be booked long before the
patient is late to be seen, and a referral booked for a date months away is still late to be *seen*.
``closed``, ``cancelled``, ``declined`` and ``expired`` never stall, and neither does a referral without
``sent_at`` (there is no start to count from; the worklist flags those separately).

**Levels** are bounded and named: level ``k`` (1 ≤ k ≤ ``max_level``, default 3: *due*, *overdue*,
*escalated*) is reached when the clock has run ``k`` windows. Past the top level nothing changes any more (no
re-notification, no rewrite); how long it has been overdue is computed when read. ``overdue_days`` is
``elapsed - window``. A **second no-show** (``no_show_count >= 2``) makes ``rebooking`` level 2 at once:
a patient who has missed twice is unlikely to rebook on their own, so the wait for the window would only
lose time. Its ``overdue_days`` is then clamped at 0 rather than reported as negative.

**The latest no-show** is not a field of :class:`~refloop.referral.ReferralState`, so it is derived from
the timeline: for each live appointment whose status is ``no_show``, the first ``appointment_no_show``
entry of its last run of no-shows (the entry details start with ``"appointment <id> "``; entries marked
``ignored`` are skipped). A resent no-show message therefore does not restart the clock. If no entry can be
matched (an unexpected detail format), the latest non-ignored ``appointment_no_show`` entry is used.

**Priority** is RF1-2 (or an order's priority), compared case-insensitively on its first component:
``S``/``STAT`` → ``stat``; ``A``/``ASAP`` and ``U``/``URGENT`` → ``urgent``; ``R``/``ROUTINE`` and anything
else → ``routine``. Unknown codes fall back to routine rather than failing, because one odd sender value must
not stop the clock for that referral; a priority-specific window is only ever a tightening.

**Window resolution** for one stage: an override for the referral's ``referred_to`` (the organisation or
provider), else one for its ``specialty``, else the priority override, else the stage default. Keys are
compared case-insensitively. ``referred_to`` beats ``specialty`` because it is the more specific target.

**Time** is counted in the clinic's zone (``Windows.zone``, an IANA name, default UTC). Calendar windows
count every second. With ``business_days`` only time on local weekdays (Monday to Friday) whose local date is
not a holiday counts, measured on the local wall clock, so a stage that starts on a Sunday evening starts
counting at Monday 00:00 local, and a 2-business-day window that spans a DST change ends at the same local
time of day it started. Hold spells (:func:`refloop.referral.paused_intervals`) are subtracted; an open hold
pauses until ``now``.

**Due instants** (:func:`clocks`): for every running stage the instant each level is reached, so a store can
keep the next one on the row (``next_due_at``) and a scan need only read rows whose instant has passed. The
level at ``now`` is the number of due instants at or before ``now``; :func:`evaluate` is defined that way, so
a stored instant and a fresh evaluation can never disagree.

**Leak stage** (:func:`leak`): where an unclosed referral leaked out of the loop, for the cohort report:
``never_scheduled`` (sent, scheduling window over), ``not_seen`` (booked, visit window over),
``no_show_not_rebooked`` (rebooking or visit window over, the earlier), ``seen_no_note`` (note window over),
and ``declined`` (declined or expired) and ``cancelled`` at once. Its instant is the first-level due instant
of that stage, so "is it a leak at ``now``" is one comparison.

**Alerts** are diffed, not recomputed: :func:`diff_alerts` compares the open alerts with a fresh scan, so a
notification goes out once per new stall and once per escalation, and an alert's level is never lowered in
place (a longer window or a new hold does not "un-escalate" what someone was already told).
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, tzinfo
from functools import lru_cache
from types import MappingProxyType
from typing import Final, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from refloop.referral import (
    APPOINTMENT_BOOKED,
    APPOINTMENT_CANCELLED,
    APPOINTMENT_COMPLETED,
    APPOINTMENT_NO_SHOW,
    APPOINTMENT_RESCHEDULED,
    ApptStatus,
    ReferralState,
    Status,
)

SCHEDULING: Final = "scheduling"
REBOOKING: Final = "rebooking"
VISIT: Final = "visit"
NOTE: Final = "note"

#: Every stage, in the order stalls and alert changes are reported.
STAGES: Final[tuple[str, ...]] = (SCHEDULING, REBOOKING, VISIT, NOTE)

#: Stage defaults in days (see the module docstring).
DEFAULT_DAYS: Final[Mapping[str, float]] = MappingProxyType({SCHEDULING: 14.0, REBOOKING: 14.0, VISIT: 45.0, NOTE: 7.0})

STAT: Final = "stat"
URGENT: Final = "urgent"
ROUTINE: Final = "routine"
PRIORITY_CLASSES: Final[tuple[str, ...]] = (STAT, URGENT, ROUTINE)

#: RF1-2 / order priority codes and names (case-folded) → priority class. Anything else is routine.
PRIORITY_CODES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "s": STAT, "stat": STAT,
        "a": URGENT, "asap": URGENT, "u": URGENT, "urgent": URGENT,
        "r": ROUTINE, "routine": ROUTINE,
    }
)  # fmt: skip

#: Priority overrides by default: STAT referrals should be booked within a day, urgent within three.
DEFAULT_PRIORITY_DAYS: Final[Mapping[tuple[str, str], float]] = MappingProxyType(
    {(STAT, SCHEDULING): 1.0, (URGENT, SCHEDULING): 3.0}
)

_DAY: Final = timedelta(days=1)
_MICROSECOND: Final = timedelta(microseconds=1)
_APPOINTMENT_OUTCOMES: Final = frozenset(
    {APPOINTMENT_BOOKED, APPOINTMENT_RESCHEDULED, APPOINTMENT_CANCELLED, APPOINTMENT_NO_SHOW, APPOINTMENT_COMPLETED}
)

Pause = tuple[datetime, datetime | None]
# the statuses a clock runs in, as stored (an enum member's .value is a property lookup on every read)
_SENT, _SCHEDULED, _NO_SHOW, _COMPLETED = (s.value for s in (Status.SENT, Status.SCHEDULED, Status.NO_SHOW,
                                                             Status.COMPLETED))


def priority_class(priority: str) -> str:
    """Normalise an RF1-2 value (``"S"``, ``"stat"``, ``"A^ASAP^HL70280"``...) to stat/urgent/routine."""
    code = priority.split("^", 1)[0].strip().casefold()
    return PRIORITY_CODES.get(code, ROUTINE)


def _key(name: str) -> str:
    """Override keys and referral fields are compared like this, so 'Cardiology ' matches 'cardiology'."""
    return " ".join(name.split()).casefold()


def _check_days(what: str, days: float) -> float:
    """A zero, negative or infinite window is a configuration bug: it would alert constantly or never."""
    if isinstance(days, bool) or not isinstance(days, int | float) or not math.isfinite(days) or days <= 0:
        raise ValueError(f"{what}: window must be a finite number of days > 0, not {days!r}")
    return float(days)


def _check_stage(what: str, stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"{what}: unknown stage {stage!r} (known: {', '.join(STAGES)})")


@dataclass(frozen=True)
class Windows:
    """Target windows in days. Built once from settings; see the module docstring for how one is chosen.

    ``priority_days`` is keyed ``(priority, stage)``, where the priority may be a class (``"stat"``) or any
    code that :func:`priority_class` understands (``"S"``). ``target_days`` is keyed ``(name, stage)``,
    where the name is matched against the referral's ``referred_to`` first, then its ``specialty``. Keys are
    normalised (case-folded) and validated here, so a typo fails at start-up instead of silently never
    matching.
    """

    stage_days: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_DAYS))
    priority_days: Mapping[tuple[str, str], float] = field(default_factory=lambda: dict(DEFAULT_PRIORITY_DAYS))
    target_days: Mapping[tuple[str, str], float] = field(default_factory=dict)
    business_days: bool = False
    holidays: tuple[date, ...] = ()
    zone: str = "UTC"
    max_level: int = 3

    def __post_init__(self) -> None:
        """Validate and freeze the mappings (a frozen dataclass holding a dict is only shallowly frozen)."""
        if isinstance(self.max_level, bool) or not isinstance(self.max_level, int) or self.max_level < 1:
            raise ValueError(f"max_level must be an integer >= 1, not {self.max_level!r}")
        try:
            tz: tzinfo = UTC if self.zone == "UTC" else ZoneInfo(self.zone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"zone: unknown IANA time zone {self.zone!r}") from None
        object.__setattr__(self, "_tz", tz)
        stages = dict(DEFAULT_DAYS)
        for stage, days in self.stage_days.items():
            _check_stage(f"stage_days[{stage!r}]", stage)
            stages[stage] = _check_days(f"stage_days[{stage!r}]", days)
        priorities: dict[tuple[str, str], float] = {}
        for (priority, stage), days in self.priority_days.items():
            what = f"priority_days[{(priority, stage)!r}]"
            code = priority.split("^", 1)[0].strip().casefold()
            if code not in PRIORITY_CODES:
                raise ValueError(f"{what}: unknown priority {priority!r} (known: {', '.join(PRIORITY_CODES)})")
            _check_stage(what, stage)
            priorities[(PRIORITY_CODES[code], stage)] = _check_days(what, days)
        targets: dict[tuple[str, str], float] = {}
        for (name, stage), days in self.target_days.items():
            what = f"target_days[{(name, stage)!r}]"
            if not _key(name):
                raise ValueError(f"{what}: empty specialty/organisation name")
            _check_stage(what, stage)
            targets[(_key(name), stage)] = _check_days(what, days)
        object.__setattr__(self, "stage_days", MappingProxyType(stages))
        object.__setattr__(self, "priority_days", MappingProxyType(priorities))
        object.__setattr__(self, "target_days", MappingProxyType(targets))
        object.__setattr__(self, "holidays", tuple(sorted(set(self.holidays))))
        object.__setattr__(self, "_off", frozenset(self.holidays))
        object.__setattr__(self, "_windows", {})
        text = repr((sorted(self.stage_days.items()), sorted(self.priority_days.items()),
                     sorted(self.target_days.items()), self.business_days, self.holidays, self.zone, self.max_level))
        object.__setattr__(self, "_version", hashlib.sha256(text.encode()).hexdigest()[:16])

    @property
    def tz(self) -> tzinfo:
        """The zone business days are counted in."""
        return self._tz  # type: ignore[attr-defined]

    @property
    def version(self) -> str:
        """A short hash of everything that moves a due instant: rows stored under another version are stale."""
        return self._version  # type: ignore[attr-defined]

    def window_days(self, stage: str, details: Details) -> float:
        """The window for one stage of one referral: referred_to > specialty > priority > stage default."""
        # without target overrides the names cannot matter: keyed without them, the cache holds a store's
        # few (stage, priority) pairs; keyed by provider too, a day-later scan of 1M referrals (970 providers)
        # missed 5,425 times, and past 10,000 entries nothing more is cached
        names = (details.referred_to, details.specialty) if self.target_days else ("", "")
        key = (stage, *names, details.priority)
        cache: dict[tuple[str, str, str, str], float] = self._windows  # type: ignore[attr-defined]
        if (found := cache.get(key)) is not None:
            return found
        _check_stage("window_days", stage)
        days = None
        for name in names:
            if name and (days := self.target_days.get((_key(name), stage))) is not None:
                break
        if days is None:
            days = self.priority_days.get((priority_class(details.priority), stage))
        if days is None:
            days = self.stage_days[stage]
        if len(cache) < 10_000:  # distinct (stage, target, specialty, priority) values: a few hundred
            cache[key] = days
        return days


class Details(Protocol):
    """What window resolution reads of a referral: a fold state, a projection row or a :class:`ClockInput`."""

    @property
    def priority(self) -> str: ...
    @property
    def referred_to(self) -> str: ...
    @property
    def specialty(self) -> str: ...


@dataclass(frozen=True)
class Stall:
    """One stage of one referral past its window. ``started_at`` is when that stage's clock started."""

    stage: str
    level: int
    overdue_days: float
    window_days: float
    started_at: datetime


@dataclass(frozen=True)
class AlertDiff:
    """What a scan changes: alerts to open, to raise a level, and to close. Each tuple is sorted.

    ``raised`` and ``escalated`` carry the fresh :class:`Stall` (its level is the new level);
    ``resolved`` carries only ``(referral_id, stage)``.
    """

    raised: tuple[tuple[int, Stall], ...] = ()
    escalated: tuple[tuple[int, Stall], ...] = ()
    resolved: tuple[tuple[int, str], ...] = ()

    def __bool__(self) -> bool:
        """True when the scan changed anything, so a caller can skip an empty transaction."""
        return bool(self.raised or self.escalated or self.resolved)


# -- elapsed time ---------------------------------------------------------------------------------------


def _utc(moment: datetime, what: str) -> datetime:
    if moment.utcoffset() is None:
        raise ValueError(f"{what} must be timezone-aware, not {moment.isoformat()}")
    return moment.astimezone(UTC)


def _running(pauses: Iterable[Pause], start: datetime) -> list[tuple[datetime, datetime | None]]:
    """The spells from ``start`` on during which the clock runs (holds merged and cut out); the last one
    ends None (runs on) unless a hold is still open, which stops the clock for good until it ends."""
    if not pauses:  # no holds (most referrals): the clock runs from the start
        return [(start, None)]
    spells = sorted(((max(_utc(b, "pause start"), start), _utc(e, "pause end") if e is not None else None)
                     for b, e in pauses), key=lambda spell: (spell[0], spell[1] is None, spell[1] or spell[0]))
    running: list[tuple[datetime, datetime | None]] = []
    cursor: datetime | None = start
    for lo, hi in spells:
        if cursor is None:
            break
        if hi is not None and hi <= cursor:
            continue
        if lo > cursor:
            running.append((cursor, lo))
        cursor = None if hi is None else max(cursor, hi)
    if cursor is not None:
        running.append((cursor, None))
    return running


def _counts(day: date, holidays: frozenset[date]) -> bool:
    return day.weekday() < 5 and day not in holidays


def _weekdays(first: date, last: date) -> int:
    """Weekdays in ``[first, last)``: whole weeks arithmetically, so a year-long span costs no more than a week."""
    days = (last - first).days
    if days <= 0:
        return 0
    weeks, rest = divmod(days, 7)
    return weeks * 5 + sum(1 for i in range(rest) if (first + timedelta(days=i)).weekday() < 5)


def _midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day)


def _business_wall(lo: datetime, hi: datetime, holidays: frozenset[date]) -> timedelta:
    """The part of ``[lo, hi)`` (naive local wall-clock times) that falls on counted local dates."""
    if hi <= lo:
        return timedelta(0)
    first, last = lo.date(), hi.date()
    if first == last:
        return hi - lo if _counts(first, holidays) else timedelta(0)
    total = timedelta(0)
    if _counts(first, holidays):
        total += _midnight(first + _DAY) - lo
    if _counts(last, holidays):
        total += hi - _midnight(last)
    inner_first, inner_last = first + _DAY, last
    full = _weekdays(inner_first, inner_last)
    return total + (full - _weekday_holidays(holidays, inner_first, inner_last)) * _DAY


@lru_cache(maxsize=16)
def _weekday_list(holidays: frozenset[date]) -> list[date]:
    """The holidays that fall on weekdays, sorted (a frozenset caches its hash, so this lookup is cheap)."""
    return sorted(h for h in holidays if h.weekday() < 5)


def _weekday_holidays(holidays: frozenset[date], first: date, last: date) -> int:
    """Weekday holidays in ``[first, last)``."""
    days = _weekday_list(holidays)
    return bisect_left(days, last) - bisect_left(days, first)


def _advance_wall(lo: datetime, amount: timedelta, holidays: frozenset[date]) -> datetime:
    """The earliest wall time ``t >= lo`` with ``_business_wall(lo, t) == amount``."""
    day = lo.date()
    if not _counts(day, holidays):
        while not _counts(day, holidays):
            day += _DAY
        lo = _midnight(day)
    left = amount
    while True:
        end = _midnight(day + _DAY)
        if lo + left <= end:
            return lo + left
        left -= end - lo
        day += _DAY
        while True:
            while not _counts(day, holidays):
                day += _DAY
            if day.weekday() == 0 and left > 5 * _DAY:
                # whole weeks at once: each is five business days less its weekday holidays, and fewer are
                # skipped than ``left`` needs, so the day-by-day steps finish the count exactly
                weeks = (left - _MICROSECOND) // (5 * _DAY)
                left -= (5 * weeks - _weekday_holidays(holidays, day, day + 7 * weeks * _DAY)) * _DAY
                day += 7 * weeks * _DAY
                continue
            break
        lo = _midnight(day)


class Calendar:
    """Elapsed clock time between instants, and its inverse, in calendar or business time of one zone."""

    def __init__(self, windows: Windows) -> None:
        self.business = windows.business_days
        self.tz = windows.tz
        self.holidays: frozenset[date] = windows._off  # type: ignore[attr-defined]

    def _wall(self, moment: datetime) -> datetime:
        return moment.astimezone(self.tz).replace(tzinfo=None)

    def between(self, lo: datetime, hi: datetime) -> timedelta:
        if hi <= lo:
            return timedelta(0)
        if not self.business:
            return hi - lo
        return _business_wall(self._wall(lo), self._wall(hi), self.holidays)

    def advance(self, lo: datetime, amount: timedelta) -> datetime:
        """The earliest instant ``t`` with ``between(lo, t) >= amount``."""
        if not self.business:
            return lo + amount
        wall = _advance_wall(self._wall(lo), amount, self.holidays)
        moment = wall.replace(tzinfo=self.tz).astimezone(UTC)
        # a wall time in a spring-forward gap maps to an instant before it; step past the gap
        return moment if moment >= lo else lo


def business_hours(windows: Windows, moment: datetime, start_hour: int = 8, end_hour: int = 18) -> bool:
    """Whether *moment* is within local business hours (a local weekday, not a holiday, ``start_hour`` to
    ``end_hour``): what the shipped alert rules read, so "business hours" means the clinic's, DST included."""
    local = _utc(moment, "moment").astimezone(windows.tz)
    return _counts(local.date(), windows._off) and start_hour <= local.hour < end_hour  # type: ignore[attr-defined]


def elapsed(calendar: Calendar, start: datetime, now: datetime, pauses: Iterable[Pause] = ()) -> timedelta:
    """Clock time from ``start`` to ``now`` minus holds; zero if ``now`` is before ``start``."""
    lo, hi = _utc(start, "start"), _utc(now, "now")
    total = timedelta(0)
    for a, b in _running(pauses, lo):
        if a >= hi:
            break
        total += calendar.between(a, hi if b is None else min(b, hi))
    return total


def elapsed_days(start: datetime, now: datetime, *, pauses: Iterable[Pause] = (), business_days: bool = False,
                 holidays: Iterable[date] = (), zone: str = "UTC") -> float:
    """:func:`elapsed` in days (exact ``timedelta`` arithmetic until this final division)."""
    windows = Windows(business_days=business_days, holidays=tuple(holidays), zone=zone)
    return elapsed(Calendar(windows), start, now, pauses) / _DAY


def _reach(calendar: Calendar, running: list[tuple[datetime, datetime | None]], amount: timedelta
           ) -> datetime | None:
    """When the clock started at ``start`` has run ``amount``; None while an open hold stops it first."""
    left = amount
    for a, b in running:
        span = None if b is None else calendar.between(a, b)
        if span is None or span >= left:
            return calendar.advance(a, left)
        left -= span
    return None


@lru_cache(maxsize=256)
def _need(level: int, window: float) -> timedelta:
    """Level ``k`` is reached once the clock has run ``k`` windows, rounded to the microsecond (so three
    0.1-day windows are 0.3 days despite float rounding, and due instants can be stored exactly)."""
    return timedelta(microseconds=round(level * window * 86_400_000_000))


# -- the clock ---------------------------------------------------------------------------------------


def latest_no_show(state: ReferralState) -> datetime | None:
    """When the current no-show began (see the module docstring), or None if there is none."""
    no_show_ids = [a.appointment_id for a in state.live_appointments if a.status is ApptStatus.NO_SHOW]
    candidates: list[datetime] = []
    for appointment_id in no_show_ids:
        prefix = f"appointment {appointment_id} "
        run_start: datetime | None = None
        for entry in state.timeline:
            if entry.event not in _APPOINTMENT_OUTCOMES or not entry.detail.startswith(prefix):
                continue
            if "(ignored" in entry.detail:
                continue
            # A booking, cancel or attendance ends the run; a repeated no-show keeps its first time.
            run_start = (run_start or entry.at) if entry.event == APPOINTMENT_NO_SHOW else None
        if run_start is not None:
            candidates.append(run_start)
    if candidates:
        return max(candidates)
    fallback = [e.at for e in state.timeline if e.event == APPOINTMENT_NO_SHOW and "(ignored" not in e.detail]
    return max(fallback, default=None)




@dataclass(frozen=True)
class ClockInput:
    """What the clock reads of a referral: its fold (:meth:`of_state`) or its projection row."""

    status: str
    sent_at: datetime | None
    completed_at: datetime | None
    no_show_at: datetime | None
    no_show_count: int
    priority: str
    referred_to: str
    specialty: str
    pauses: tuple[Pause, ...] = ()

    @classmethod
    def of_state(cls, state: ReferralState, pauses: Iterable[Pause] = ()) -> ClockInput:
        return cls(state.status.value, state.sent_at, state.completed_at, latest_no_show(state),
                   state.no_show_count, state.priority, state.referred_to, state.specialty, tuple(pauses))


@dataclass(frozen=True)
class StageClock:
    """One running stage: when it started, its window, and the instant each level is reached.

    ``due[k - 1]`` is when level ``k`` is reached (None: never while a hold is open). A level held from
    the start (a second no-show's level 2) is due at the stage's start.
    """

    stage: str
    started_at: datetime
    window_days: float
    due: tuple[datetime | None, ...]

    def level(self, now: datetime) -> int:
        return sum(1 for d in self.due if d is not None and d <= now)

    def next_due(self, after: datetime | None) -> datetime | None:
        """The first due instant after ``after``, or the first at all."""
        return min((d for d in self.due if d is not None and (after is None or d > after)), default=None)


def _starts(inp: ClockInput) -> list[tuple[str, datetime]]:
    """The stages whose clock runs for this referral, with their start, in :data:`STAGES` order."""
    if inp.sent_at is None:
        return []
    out: list[tuple[str, datetime]] = []
    status = inp.status
    if status == _SENT:
        out.append((SCHEDULING, inp.sent_at))
    if status == _NO_SHOW and inp.no_show_at is not None:
        out.append((REBOOKING, inp.no_show_at))
    if status in (_SENT, _SCHEDULED, _NO_SHOW):
        out.append((VISIT, inp.sent_at))
    if status == _COMPLETED and inp.completed_at is not None:
        out.append((NOTE, inp.completed_at))
    return out


def clocks(inp: ClockInput, windows: Windows, levels: int | None = None) -> list[StageClock]:
    """Every running stage of one referral with its due instants (see the module docstring); ``levels``:
    only the first so many levels' instants (the rest None), when no more are needed."""
    calendar = Calendar(windows)
    out: list[StageClock] = []
    for stage, started in _starts(inp):
        start = _utc(started, "stage start")
        window = windows.window_days(stage, inp)
        running = _running(inp.pauses, start)
        forced = 2 if stage == REBOOKING and inp.no_show_count >= 2 else 0
        top = windows.max_level if levels is None else min(levels, windows.max_level)
        due = tuple(start if k <= forced else _reach(calendar, running, _need(k, window)) if k <= top else None
                    for k in range(1, windows.max_level + 1))
        out.append(StageClock(stage, start, window, due))
    return out


def evaluate(inp: ClockInput | ReferralState, now: datetime, windows: Windows, pauses: Iterable[Pause] = ()
             ) -> list[Stall]:
    """The stages of one referral that are past their window at ``now``, in :data:`STAGES` order."""
    if isinstance(inp, ReferralState):
        inp = ClockInput.of_state(inp, pauses)
    return stalls_at(inp, clocks(inp, windows), now, windows)


def stalls_at(inp: ClockInput, found: Iterable[StageClock], now: datetime, windows: Windows) -> list[Stall]:
    """:func:`evaluate` from clocks already computed (a scan computes them once for the stall and the next due)."""
    calendar = Calendar(windows)
    stalls: list[Stall] = []
    for clock in found:
        level = clock.level(now)
        if level >= 1:
            days = elapsed(calendar, clock.started_at, now, inp.pauses) / _DAY
            stalls.append(Stall(clock.stage, level, max(days - clock.window_days, 0.0), clock.window_days,
                                clock.started_at))
    return stalls


def next_due(found: Iterable[StageClock], after: datetime | None = None) -> datetime | None:
    """The next instant any level is reached after ``after`` (the first of all without it)."""
    return min((d for c in found if (d := c.next_due(after)) is not None), default=None)


#: Which running stages end in which leak, per status (see the module docstring).
LEAK_OF: Final[Mapping[str, tuple[str, tuple[str, ...]]]] = MappingProxyType({
    Status.SENT.value: ("never_scheduled", (SCHEDULING,)),
    Status.SCHEDULED.value: ("not_seen", (VISIT,)),
    Status.NO_SHOW.value: ("no_show_not_rebooked", (REBOOKING, VISIT)),
    Status.COMPLETED.value: ("seen_no_note", (NOTE,)),
})
FINAL_LEAKS: Final[Mapping[str, str]] = MappingProxyType(
    {Status.CANCELLED.value: "cancelled", Status.DECLINED.value: "declined", Status.EXPIRED.value: "declined"})


def leak(status: str, found: Iterable[StageClock], decided_at: datetime | None) -> tuple[str, datetime | None]:
    """``(leak stage, instant it leaks)`` of an unclosed referral; ``("", None)`` when it never can.

    Final answers leak at once (``decided_at``: when the referral was decided, or its start)."""
    if status in FINAL_LEAKS:
        return FINAL_LEAKS[status], decided_at
    stage, stages = LEAK_OF.get(status, ("", ()))
    dues = [c.due[0] for c in found if c.stage in stages and c.due and c.due[0] is not None]
    return (stage, min(dues)) if stage and dues else ("", None)


def _order(item: tuple[int, str]) -> tuple[int, int, str]:
    referral_id, stage = item
    return (referral_id, STAGES.index(stage) if stage in STAGES else len(STAGES), stage)


def diff_alerts(open_alerts: Mapping[tuple[int, str], int], stalls: Mapping[int, list[Stall]]) -> AlertDiff:
    """Compare open alerts ``{(referral_id, stage): level}`` with a fresh scan ``{referral_id: stalls}``.

    ``stalls`` must cover every referral that has an open alert: a referral missing from it (for example
    because it closed and so left the scan) has nothing stalled, and its alerts are resolved. A stall at
    the same or a lower level than its open alert is unchanged, because levels are never lowered in place.
    """
    fresh: dict[tuple[int, str], Stall] = {}
    for referral_id, found in stalls.items():
        for stall in found:
            fresh[(referral_id, stall.stage)] = stall
    raised: list[tuple[int, Stall]] = []
    escalated: list[tuple[int, Stall]] = []
    for key in sorted(fresh, key=_order):
        stall = fresh[key]
        level = open_alerts.get(key)
        if level is None:
            raised.append((key[0], stall))
        elif stall.level > level:
            escalated.append((key[0], stall))
    resolved = sorted((key for key in open_alerts if key not in fresh), key=_order)
    return AlertDiff(tuple(raised), tuple(escalated), tuple(resolved))
