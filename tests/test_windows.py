"""The [stall] settings: defaults, the compact override form, holidays, and the Windows they build."""

from __future__ import annotations

import re
from dataclasses import fields
from datetime import UTC, date, datetime
from typing import Any

import pytest

from refloop import referral as r
from refloop import stall
from refloop.config.loader import ConfigError, _build
from refloop.config.windows import WindowSettings, parse_holiday, parse_override, windows_from_settings
from refloop.referral import Event, fold

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


def test_defaults_match_the_stall_defaults() -> None:
    """Default settings build exactly the Windows that stall.Windows() defaults to."""
    built = windows_from_settings(WindowSettings())
    default = stall.Windows()
    assert dict(built.stage_days) == dict(default.stage_days) == dict(stall.DEFAULT_DAYS)
    assert dict(built.priority_days) == dict(default.priority_days)
    assert (dict(built.target_days), built.business_days, built.holidays) == ({}, False, ())
    assert WindowSettings().scan_minutes == 5.0


def test_every_field_is_documented() -> None:
    """Every field carries the doc text that the example config and README reference need."""
    for f in fields(WindowSettings):
        assert f.metadata.get("doc"), f.name


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("cardiology:scheduling=7", ("cardiology", "scheduling", 7.0)),
        (" St Mary: Sleep Clinic : Visit = 90.5 ", ("St Mary: Sleep Clinic", "visit", 90.5)),
        ("ENT:note=0.5", ("ENT", "note", 0.5)),
    ],
)
def test_parse_override(text: str, parsed: tuple[str, str, float]) -> None:
    """TARGET:STAGE=DAYS; the last colon splits, so targets may contain colons and spaces."""
    assert parse_override(text) == parsed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("cardiology=7", "is not 'TARGET:STAGE=DAYS' like 'cardiology:scheduling=7'"),
        ("cardiology:scheduling", "is not 'TARGET:STAGE=DAYS'"),
        (":scheduling=7", "is not 'TARGET:STAGE=DAYS'"),
        ("cardiology:schedule=7", "unknown stage 'schedule' \\(known: scheduling, rebooking, visit, note\\)"),
        ("cardiology:scheduling=soon", "days 'soon' is not a number"),
        ("cardiology:scheduling=0", "days must be a finite number > 0"),
        ("cardiology:scheduling=-3", "days must be a finite number > 0"),
        ("cardiology:scheduling=inf", "days must be a finite number > 0"),
    ],
)
def test_bad_override_says_what_is_wrong(text: str, message: str) -> None:
    """A bad override names itself and the fix, both from the parser and from the setting's check."""
    with pytest.raises(ValueError, match=message):
        parse_override(text)
    with pytest.raises(ValueError, match=re.escape(f"stall.overrides: override '{text}'")):
        WindowSettings(overrides=(text,))


def test_duplicate_override_is_rejected() -> None:
    """Two overrides for one target and stage (case-insensitively) are a conflict, not a silent pick."""
    with pytest.raises(ValueError, match="set the same target and stage"):
        WindowSettings(overrides=("Cardiology:scheduling=7", "cardiology :scheduling=9"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("25/12/2026", "holiday '25/12/2026' is not an ISO date like '2026-12-25'"),
        ("20261225", "holiday '20261225' is not an ISO date"),
        ("2026-W52-5", "holiday '2026-W52-5' is not an ISO date"),
        ("2026-02-30", "holiday '2026-02-30' is not a real date"),
    ],
)
def test_bad_holiday_says_what_is_wrong(text: str, message: str) -> None:
    """Holidays must be real YYYY-MM-DD dates; the message quotes the bad value."""
    with pytest.raises(ValueError, match=message):
        parse_holiday(text)
    with pytest.raises(ValueError, match=re.escape("stall.holidays: ") + message):
        WindowSettings(holidays=("2026-12-25", text))


@pytest.mark.parametrize("name", ["scheduling_days", "visit_days", "note_days", "rebooking_days",
                                  "stat_scheduling_days", "urgent_scheduling_days"])  # fmt: skip
@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_window_days(name: str, value: float) -> None:
    """Zero, negative and non-finite windows are refused, naming the setting."""
    with pytest.raises(ValueError, match=re.escape(f"stall.{name}: must be a finite number of days greater than 0")):
        kwargs: dict[str, Any] = {name: value}
        WindowSettings(**kwargs)


def test_bad_scan_minutes() -> None:
    """A scan interval must be a positive number of minutes."""
    with pytest.raises(ValueError, match=re.escape("stall.scan_minutes: must be a finite number of minutes")):
        WindowSettings(scan_minutes=0.0)


def test_settings_build_windows() -> None:
    """Every setting reaches the Windows: stage days, priority days, overrides, business days, holidays."""
    ws = WindowSettings(
        scheduling_days=10.0, visit_days=30.0, note_days=5.0, rebooking_days=7.0,
        stat_scheduling_days=0.5, urgent_scheduling_days=2.0, business_days=True,
        holidays=("2026-12-25", "2026-01-01"), overrides=("Cardiology:scheduling=7", "ent:visit=60"),
    )  # fmt: skip
    windows = windows_from_settings(ws)
    assert dict(windows.stage_days) == {"scheduling": 10.0, "visit": 30.0, "note": 5.0, "rebooking": 7.0}
    assert dict(windows.priority_days) == {("stat", "scheduling"): 0.5, ("urgent", "scheduling"): 2.0}
    assert dict(windows.target_days) == {("cardiology", "scheduling"): 7.0, ("ent", "visit"): 60.0}
    assert windows.business_days
    assert windows.holidays == (date(2026, 1, 1), date(2026, 12, 25))


def test_override_applies_to_a_referral() -> None:
    """An override from settings decides the window of a matching referral, case-insensitively."""
    windows = windows_from_settings(WindowSettings(overrides=("CARDIOLOGY:scheduling=7",)))
    state = fold([Event(r.REFERRAL_CREATED, T0, (1, 0), "C1", {"priority": "S", "specialty": "Cardiology"})])
    assert windows.window_days(stall.SCHEDULING, state) == 7.0


def test_loader_names_the_key() -> None:
    """Through the loader, a bad override from the environment is a ConfigError naming the variable."""
    env = {"REFLOOP_STALL_OVERRIDES": "cardiology:scheduling=7, oops"}
    with pytest.raises(ConfigError) as caught:
        _build(WindowSettings, {}, "stall", env, "stall")
    assert caught.value.key == "REFLOOP_STALL_OVERRIDES (stall.overrides)"
    assert "override 'oops' is not 'TARGET:STAGE=DAYS'" in caught.value.reason
    built = _build(WindowSettings, {"holidays": ["2026-12-25"]}, "stall", {"REFLOOP_STALL_BUSINESS_DAYS": "yes"},
                   "stall")  # fmt: skip
    assert (built.business_days, built.holidays) == (True, ("2026-12-25",))


def test_zone_calendar_levels_and_escalation_owners() -> None:
    """stall.timezone, holiday_calendar (the optional holidays package), max_level and level names reach the
    clock; bad values fail at load with the key named."""
    ws = WindowSettings(timezone="America/New_York", holiday_calendar="US-NY", business_days=True, max_level=2,
                        level_names=("late", "very late"))
    windows = windows_from_settings(ws)
    assert (windows.zone, windows.max_level) == ("America/New_York", 2)
    assert date(2026, 11, 26) in windows.holidays and date(2027, 1, 18) in windows.holidays  # Thanksgiving, MLK
    assert windows.version != windows_from_settings(WindowSettings()).version
    from refloop.config.windows import level_name

    assert [level_name(ws, k) for k in (1, 2, 3)] == ["late", "very late", "level 3"]
    for key, value, message in (("timezone", "Mars/Olympus", "unknown IANA time zone"),
                                ("holiday_calendar", "XX", "unknown country code"),
                                ("max_level", 0, "between 1 and 9")):
        with pytest.raises(ValueError, match=message):
            WindowSettings(**{key: value})
    from refloop.config.notify import WorklistSettings

    with pytest.raises(ValueError, match="LEVEL=OWNER"):
        WorklistSettings(escalation_owners=("lead",))
