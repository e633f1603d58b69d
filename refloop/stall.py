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

**Level** is ``floor(elapsed / window)`` once it reaches 1: level 1 at the window, 2 at twice the window,
and so on, so reminders escalate without a separate schedule. ``overdue_days`` is ``elapsed - window``.
A **second no-show** (``no_show_count >= 2``) makes ``rebooking`` level 2 at once: a patient who has
missed twice is unlikely to rebook on their own, so the wait for the window would only lose time. Its
``overdue_days`` is then clamped at 0 rather than reported as negative.

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

**Time** is counted in UTC. With ``business_days`` only time on weekdays (Monday to Friday) that are not
listed holidays counts, to the second, so a referral sent on Friday afternoon is not overdue on Monday.
Hold spells (:func:`refloop.referral.paused_intervals`) are subtracted; an open hold pauses until ``now``.

**Alerts** are diffed, not recomputed: :func:`diff_alerts` compares the open alerts with a fresh scan, so a
notification goes out once per new stall and once per escalation, and an alert's level is never lowered in
place (a longer window or a new hold does not "un-escalate" what someone was already told).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from types import MappingProxyType
from typing import Final

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
#: Absorbs float rounding so that exactly twice the window is level 2, not 1.999... → 1.
_LEVEL_EPSILON: Final = 1e-9
_APPOINTMENT_OUTCOMES: Final = frozenset(
    {APPOINTMENT_BOOKED, APPOINTMENT_RESCHEDULED, APPOINTMENT_CANCELLED, APPOINTMENT_NO_SHOW, APPOINTMENT_COMPLETED}
)

Pause = tuple[datetime, datetime | None]


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

    def __post_init__(self) -> None:
        """Validate and freeze the mappings (a frozen dataclass holding a dict is only shallowly frozen)."""
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

    def window_days(self, stage: str, state: ReferralState) -> float:
        """The window for one stage of one referral: referred_to > specialty > priority > stage default."""
        _check_stage("window_days", stage)
        for name in (state.referred_to, state.specialty):
            if name and (days := self.target_days.get((_key(name), stage))) is not None:
                return days
        days = self.priority_days.get((priority_class(state.priority), stage))
        return days if days is not None else self.stage_days[stage]


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


def _merged(pauses: Iterable[Pause], start: datetime, now: datetime) -> list[tuple[datetime, datetime]]:
    """Hold spells clipped to ``[start, now]`` and merged, so overlapping holds are not subtracted twice."""
    clipped: list[tuple[datetime, datetime]] = []
    for begin, end in pauses:
        lo = max(_utc(begin, "pause start"), start)
        hi = min(_utc(end, "pause end") if end is not None else now, now)
        if hi > lo:
            clipped.append((lo, hi))
    merged: list[tuple[datetime, datetime]] = []
    for lo, hi in sorted(clipped):
        if merged and lo <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _counts(day: date, holidays: frozenset[date]) -> bool:
    return day.weekday() < 5 and day not in holidays


def _weekdays(first: date, last: date) -> int:
    """Weekdays in ``[first, last)``: whole weeks arithmetically, so a year-long span costs no more than a week."""
    days = (last - first).days
    if days <= 0:
        return 0
    weeks, rest = divmod(days, 7)
    return weeks * 5 + sum(1 for i in range(rest) if (first + timedelta(days=i)).weekday() < 5)


def _business_time(lo: datetime, hi: datetime, holidays: frozenset[date]) -> timedelta:
    """The part of ``[lo, hi)`` (UTC) that falls on counted days."""
    if hi <= lo:
        return timedelta(0)
    first, last = lo.date(), hi.date()
    if first == last:
        return hi - lo if _counts(first, holidays) else timedelta(0)
    total = timedelta(0)
    if _counts(first, holidays):
        total += datetime.combine(first + _DAY, time(), UTC) - lo
    if _counts(last, holidays):
        total += hi - datetime.combine(last, time(), UTC)
    inner_first, inner_last = first + _DAY, last
    full = _weekdays(inner_first, inner_last)
    full -= sum(1 for h in holidays if inner_first <= h < inner_last and h.weekday() < 5)
    return total + full * _DAY


def elapsed_days(
    start: datetime,
    now: datetime,
    *,
    pauses: Iterable[Pause] = (),
    business_days: bool = False,
    holidays: Iterable[date] = (),
) -> float:
    """Days the clock has run from ``start`` to ``now``, minus holds; 0 if ``now`` is before ``start``.

    Exact ``timedelta`` arithmetic is used until the final conversion, so the result is monotonic in
    ``now`` and business time never exceeds calendar time.
    """
    lo, hi = _utc(start, "start"), _utc(now, "now")
    if hi <= lo:
        return 0.0
    spells = _merged(pauses, lo, hi)
    running: list[tuple[datetime, datetime]] = []
    cursor = lo
    for p_lo, p_hi in spells:
        if p_lo > cursor:
            running.append((cursor, p_lo))
        cursor = max(cursor, p_hi)
    if hi > cursor:
        running.append((cursor, hi))
    if business_days:
        off = frozenset(holidays)
        total = sum((_business_time(a, b, off) for a, b in running), timedelta(0))
    else:
        total = sum((b - a for a, b in running), timedelta(0))
    return max(total / _DAY, 0.0)


# -- evaluation ----------------------------------------------------------------------------------------


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


def _clocks(state: ReferralState) -> list[tuple[str, datetime]]:
    """The stages whose clock runs for this state, with their start, in :data:`STAGES` order."""
    if state.sent_at is None:
        return []
    status = state.status
    clocks: list[tuple[str, datetime]] = []
    if status is Status.SENT:
        clocks.append((SCHEDULING, state.sent_at))
    if status is Status.NO_SHOW and (no_show_at := latest_no_show(state)) is not None:
        clocks.append((REBOOKING, no_show_at))
    if status in (Status.SENT, Status.SCHEDULED, Status.NO_SHOW):
        clocks.append((VISIT, state.sent_at))
    if status is Status.COMPLETED and state.completed_at is not None:
        clocks.append((NOTE, state.completed_at))
    return clocks


def evaluate(state: ReferralState, now: datetime, windows: Windows, pauses: Iterable[Pause] = ()) -> list[Stall]:
    """The stages of one referral that are past their window at ``now``, in :data:`STAGES` order.

    ``pauses`` should be :func:`refloop.referral.paused_intervals` of the referral's events; they are
    passed in rather than read from ``state.on_hold`` because only the events know when each hold began.
    """
    spells = list(pauses)
    stalls: list[Stall] = []
    for stage, started_at in _clocks(state):
        window = windows.window_days(stage, state)
        elapsed = elapsed_days(
            started_at, now, pauses=spells, business_days=windows.business_days, holidays=windows.holidays
        )
        level = math.floor(elapsed / window + _LEVEL_EPSILON)
        if stage == REBOOKING and state.no_show_count >= 2:
            level = max(level, 2)
        if level >= 1:
            stalls.append(Stall(stage, level, max(elapsed - window, 0.0), window, started_at))
    return stalls


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
