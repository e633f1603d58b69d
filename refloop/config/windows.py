"""Stall-clock settings: the ``[stall]`` section, and how it becomes a :class:`refloop.stall.Windows`.

Kept out of ``settings.py`` so that the stall feature owns its knobs and their parsing; the fields are
declared with the same :func:`~refloop.config.settings.setting` helper, so the loader, the example config
and the docs test treat them like every other section.

Overrides use a compact one-string form because the loader (and ``REFLOOP_STALL_OVERRIDES``, a
comma-separated list) only carries flat strings::

    TARGET:STAGE=DAYS        e.g.  "cardiology:scheduling=7", "St Mary Sleep Clinic:visit=90"

``TARGET`` is a specialty or a referred-to organisation/provider, matched case-insensitively (referred-to
first). It may contain spaces and colons (the *last* colon separates the stage) but not commas, which would
split the environment variable. ``STAGE`` is one of ``scheduling``, ``rebooking``, ``visit``, ``note``.
``DAYS`` is a number > 0 (fractions allowed, e.g. ``0.5``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from datetime import date
from functools import lru_cache
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from refloop import stall
from refloop.config.fields import setting

_OVERRIDE_SHAPE = "'TARGET:STAGE=DAYS' like 'cardiology:scheduling=7'"
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def parse_override(text: str) -> tuple[str, str, float]:
    """``"cardiology:scheduling=7"`` → ``("cardiology", "scheduling", 7.0)``; ValueError says what is wrong."""
    target_stage, eq, days_text = text.rpartition("=")
    target, colon, stage = target_stage.rpartition(":")
    target, stage = target.strip(), stage.strip().casefold()
    if not eq or not colon or not target or not stage:
        raise ValueError(f"override {text!r} is not {_OVERRIDE_SHAPE}")
    if stage not in stall.STAGES:
        raise ValueError(f"override {text!r}: unknown stage {stage!r} (known: {', '.join(stall.STAGES)})")
    try:
        days = float(days_text.strip())
    except ValueError:
        raise ValueError(f"override {text!r}: days {days_text.strip()!r} is not a number") from None
    if not math.isfinite(days) or days <= 0:
        raise ValueError(f"override {text!r}: days must be a finite number > 0")
    return target, stage, days


def parse_holiday(text: str) -> date:
    """Strict ``YYYY-MM-DD``: ``date.fromisoformat`` alone would also take ``20261225`` and week dates."""
    if not _ISO_DATE.fullmatch(text.strip()):
        raise ValueError(f"holiday {text!r} is not an ISO date like '2026-12-25'")
    try:
        return date.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"holiday {text!r} is not a real date") from None


def _window(v: float) -> str | None:
    """Zero or negative would alert on every scan; infinite would silently disable the stage."""
    return None if math.isfinite(v) and v > 0 else "must be a finite number of days greater than 0"


def _scan_interval(v: float) -> str | None:
    return None if math.isfinite(v) and v > 0 else "must be a finite number of minutes greater than 0"


def _holidays(v: tuple[str, ...]) -> str | None:
    for text in v:
        try:
            parse_holiday(text)
        except ValueError as exc:
            return str(exc)
    return None


def _zone(v: str) -> str | None:
    try:
        ZoneInfo(v)
    except (ZoneInfoNotFoundError, ValueError):
        return f"unknown IANA time zone {v!r} (e.g. 'UTC', 'America/New_York')"
    return None


def _max_level(v: int) -> str | None:
    return None if 1 <= v <= 9 else "must be a level between 1 and 9"


def _level_names(v: tuple[str, ...]) -> str | None:
    return None if all(name.strip() for name in v) else "level names must not be empty"


def _calendar(v: str) -> str | None:
    if not v:
        return None
    try:
        calendar_holidays(v, 2026)
    except ValueError as exc:
        return str(exc)
    return None


def calendar_holidays(code: str, *years: int) -> list[date]:
    """Public holidays of ``code`` ('US', 'US-NY', 'DE-BY') in *years* from the ``holidays`` package."""
    country, _, subdivision = code.strip().partition("-")
    try:
        import holidays as package  # optional dependency: only a configured calendar needs it
    except ImportError:
        raise ValueError("holiday_calendar needs the 'holidays' package: pip install 'refloop[holidays]'") from None
    try:
        found = package.country_holidays(country.upper(), subdiv=subdivision.upper() or None, years=years)
    except NotImplementedError:
        raise ValueError(f"holiday_calendar {code!r}: unknown country code") from None
    except Exception as exc:  # the package raises its own errors for an unknown subdivision
        raise ValueError(f"holiday_calendar {code!r}: {exc}") from None
    return sorted(found)


#: Years the holiday calendar is expanded for: a store's referrals are never older, a due instant never later.
CALENDAR_YEARS = range(2000, 2061)


def _overrides(v: tuple[str, ...]) -> str | None:
    """Also rejects two overrides for the same target and stage, since which one wins would be a guess."""
    seen: dict[tuple[str, str], str] = {}
    for text in v:
        try:
            target, stage, _ = parse_override(text)
        except ValueError as exc:
            return str(exc)
        key = (" ".join(target.split()).casefold(), stage)
        if key in seen:
            return f"overrides {seen[key]!r} and {text!r} set the same target and stage"
        seen[key] = text
    return None


@dataclass(frozen=True)
class WindowSettings:
    """When a referral counts as stalled (target windows per stage) and how often to look."""

    scheduling_days: float = setting(14.0, "Days from sending to the first booking before a referral stalls.", _window)
    visit_days: float = setting(45.0, "Days from sending to the attended visit before a referral stalls.", _window)
    note_days: float = setting(7.0, "Days from the attended visit to the final consult note.", _window)
    rebooking_days: float = setting(
        14.0, "Days from a no-show to a new booking (a second no-show alerts at once).", _window
    )
    stat_scheduling_days: float = setting(1.0, "Scheduling window for STAT referrals (RF1-2 S/STAT).", _window)
    urgent_scheduling_days: float = setting(
        3.0, "Scheduling window for urgent referrals (RF1-2 A/ASAP, U/Urgent).", _window
    )
    business_days: bool = setting(
        False, "Count only local weekdays that are not holidays, e.g. for 'within 2 business days' policies."
    )
    holidays: tuple[str, ...] = setting(
        (), "ISO dates (e.g. '2026-12-25') that do not count when business_days is on.", _holidays
    )
    timezone: str = setting(
        "UTC", "IANA time zone of the clinic (e.g. 'America/New_York'): business days, holidays, the digest hour "
        "and quiet hours are local to it.", _zone
    )
    holiday_calendar: str = setting(
        "", "Public holidays from the optional 'holidays' package (pip install 'refloop[holidays]'): a country "
        "code, optionally with a subdivision, e.g. 'US' or 'US-NY'; added to holidays.", _calendar
    )
    max_level: int = setting(3, "Highest alert level; past it nothing is re-notified or rewritten.", _max_level)
    level_names: tuple[str, ...] = setting(
        ("due", "overdue", "escalated"), "Names of the levels 1..max_level, shown on the worklist and in "
        "notifications (missing names read 'level N').", _level_names
    )
    scan_minutes: float = setting(5.0, "Minutes between stall scans.", _scan_interval)
    overrides: tuple[str, ...] = setting(
        (),
        "Per-specialty or per-organisation windows as 'TARGET:STAGE=DAYS' (e.g. 'cardiology:scheduling=7'); "
        "they beat priority windows.",
        _overrides,
    )

    def __post_init__(self) -> None:
        """Run the field checks for direct construction too (the loader runs them first, naming the key)."""
        for f in fields(self):
            check = f.metadata.get("check")
            if check is not None and (problem := check(getattr(self, f.name))):
                raise ValueError(f"stall.{f.name}: {problem}")


@lru_cache(maxsize=8)
def windows_from_settings(ws: WindowSettings) -> stall.Windows:
    """Build the pure :class:`refloop.stall.Windows`; the loader has already validated every string."""
    return stall.Windows(
        stage_days={
            stall.SCHEDULING: ws.scheduling_days,
            stall.VISIT: ws.visit_days,
            stall.NOTE: ws.note_days,
            stall.REBOOKING: ws.rebooking_days,
        },
        priority_days={
            (stall.STAT, stall.SCHEDULING): ws.stat_scheduling_days,
            (stall.URGENT, stall.SCHEDULING): ws.urgent_scheduling_days,
        },
        target_days={(target, stage): days for target, stage, days in map(parse_override, ws.overrides)},
        business_days=ws.business_days,
        holidays=(*(parse_holiday(h) for h in ws.holidays),
                  *(calendar_holidays(ws.holiday_calendar, *CALENDAR_YEARS) if ws.holiday_calendar else ())),
        zone=ws.timezone,
        max_level=ws.max_level,
    )


def level_name(ws: WindowSettings, level: int) -> str:
    """A level's name for people (worklist, notifications); 'level N' where none is configured."""
    return ws.level_names[level - 1] if 1 <= level <= len(ws.level_names) else f"level {level}"
