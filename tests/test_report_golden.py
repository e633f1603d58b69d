"""The report over the clock-keeping projection gives the same JSON as the report before it.

``tests/data/report_golden_4000.json.gz`` was written by the previous ``report_queries`` (sampled windows
around medians, SQL-built windows per priority) on a store the bench generator makes (4000 referrals, the
default seed, times in whole seconds, windows UTC). The generator is deterministic, so the same store is made
here and every report must match it, figure for figure.

The one tolerated difference: the old code took day figures from SQLite's ``julianday()`` differences, a
float that is a few 1e-10 days off the exact value; where the exact value lies on a rounding tie (a
median of 0.125 days, i.e. exactly 3 h) the old figure could fall either side. Such a figure may differ by
0.01, and only when the exact value (from the stored seconds) is within 1e-6 of a tie.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench import store as bench_store
from refloop.config import DatabaseSettings
from refloop.config.windows import WindowSettings, windows_from_settings
from refloop.store import report_queries as rq
from refloop.store.engine import make_engine

GOLDEN = Path(__file__).parent / "data" / "report_golden_4000.json.gz"
CASES = {"year": ({}, 300), "by_specialty": ({"by": "specialty"}, 20), "by_month": ({"by": "month"}, 20),
         "filtered": ({"filters": {"priority": "R"}, "by": "referred_to"}, 20),
         "half": ({"start": "2026-03-01", "end": "2026-09-01", "by": "priority"}, 20)}


@pytest.fixture(scope="module")
def reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = tmp_path_factory.mktemp("golden") / "store.db"
    bench_store.generate(path, 4000)
    engine = make_engine(DatabaseSettings(url=f"sqlite:///{path}"))
    windows = windows_from_settings(WindowSettings())
    with engine.connect() as conn:
        out = {name: rq.build_report(conn, replace(rq.default_params(bench_store.AS_OF, **kw), leak_limit=limit),
                                     windows)
               for name, (kw, limit) in CASES.items()}
    engine.dispose()
    return out


def _differences(old: Any, new: Any, where: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        if set(old) != set(new):
            return [(where, sorted(old), sorted(new))]
        return [d for k in old for d in _differences(old[k], new[k], f"{where}.{k}")]
    if isinstance(old, list) and isinstance(new, list):
        if len(old) != len(new):
            return [(where, len(old), len(new))]
        return [d for i, (a, b) in enumerate(zip(old, new, strict=True)) for d in _differences(a, b, f"{where}[{i}]")]
    return [] if old == new and type(old) is type(new) else [(where, old, new)]


def _tie(value: float) -> bool:
    """A day figure whose exact value (a whole number of seconds, or a half of one) sits on a 0.005 tie."""
    hundredths = value * 100
    return abs(hundredths - round(hundredths) - 0.5) < 1e-4 or abs(hundredths - round(hundredths) + 0.5) < 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_report_json_is_todays(reports: dict[str, Any], case: str) -> None:
    with gzip.open(GOLDEN, "rt") as f:
        golden = json.load(f)[case]
    diffs = _differences(golden, reports[case])
    # a day figure at a rounding tie may fall the other way (see the module docstring); nothing else may differ
    loose = [d for d in diffs if ".days." in d[0] and isinstance(d[1], float) and isinstance(d[2], float)
             and abs(d[1] - d[2]) <= 0.0100001 and _tie((d[1] + d[2]) / 2)]
    assert [d for d in diffs if d not in loose] == []
