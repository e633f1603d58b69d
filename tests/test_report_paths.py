"""The cohort report's shortcuts give the plain definitions' numbers.

``build_report`` reads most figures through shortcuts that only pay off on big stores (status indexes, counts
store-wide less what lies outside the cohort, day figures from windows around the median and p90, see
:mod:`refloop.store.report_queries`). Here they are forced onto small stores: once on the hand-computed
fixture of ``test_report`` (both backends), once on a generated store with awkward data (negative and
boundary durations, unsampled priorities, shared and unlinked appointment subjects, repeat patients),
compared with the report the plain queries give. No timings are asserted.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from bench.store import AS_OF, generate
from refloop.config import DatabaseSettings
from refloop.config.windows import WindowSettings, windows_from_settings
from refloop.store import report_queries as rq
from refloop.store.engine import make_engine
from tests import test_report as base


@pytest.fixture
def shortcuts(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every shortcut on, whatever the store's size; counts which of them answered."""
    monkeypatch.setattr(rq, "_OUTSIDE_SHARE", 100.0)
    monkeypatch.setattr(rq, "_SAMPLE_IDS", 8)
    monkeypatch.setattr(rq, "_MIN_SAMPLE", 5)
    used: Counter[str] = Counter()
    for name in ("_status_figures", "_appointments_outside", "_marked_store_wide", "_windowed", "_one_series"):
        original = getattr(rq, name)

        def spy(*args: Any, _name: str = name, _original: Any = original, **kw: Any) -> Any:
            result = _original(*args, **kw)
            used[_name + ("" if result is not None else ":none")] += 1
            return result

        monkeypatch.setattr(rq, name, spy)
    return used


def plain(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every shortcut off: the plain queries (day values read in full, counts over the cohort)."""
    monkeypatch.setattr(rq, "_day_plan", lambda conn, params: None)
    monkeypatch.setattr(rq, "_few_outside", lambda conn, params, size: False)


def test_fixture_figures_through_the_shortcuts(db_url: str, shortcuts: Counter[str]) -> None:
    base.test_report_figures(db_url)
    assert shortcuts["_status_figures"] and shortcuts["_appointments_outside"] and shortcuts["_marked_store_wide"]


def test_fixture_cms50_through_the_shortcuts(db_url: str, shortcuts: Counter[str]) -> None:
    base.test_cms50_edges(db_url)


def _ts(column: str, shift: str) -> str:
    return f"strftime('%Y-%m-%d %H:%M:%f', {column}, '{shift}') || '000'"


def _awkward_store(path: Path, n: int = 4000, seed: int = 7) -> None:
    generate(path, n, seed=seed)
    rng = random.Random(seed)
    db = sqlite3.connect(path)
    ids = range(1, n + 1)

    def each(share: float) -> list[int]:
        return rng.sample(ids, int(n * share))

    for rid in each(0.03):
        db.execute("UPDATE referrals SET priority = ? WHERE id = ?", (rng.choice(["Z", "stat", " u ", "", "s"]), rid))
    for rid in each(0.03):  # booked before sent, on the day, on a window's end, on a rounding tie (3 h = 0.125 d)
        shift = rng.choice(["-2 days", "+0 seconds", "+14 days", "+3 days", "+1 days", "+3 hours", "+9 hours",
                            "+86460 seconds", "+259260 seconds", "+1209660 seconds"])  # a minute past a window
        db.execute(f"UPDATE referrals SET scheduled_at = {_ts('sent_at', shift)} WHERE id = ?", (rid,))
    for rid in each(0.02):
        db.execute(f"UPDATE referrals SET note_received_at = {_ts('appointment_at', '-1 days')} "
                   "WHERE id = ? AND note_received_at IS NOT NULL AND appointment_at IS NOT NULL", (rid,))
    for rid in each(0.01):
        db.execute("UPDATE referrals SET sent_at = NULL WHERE id = ?", (rid,))
    for rid in each(0.02):
        db.execute("UPDATE referrals SET sent_at = '2024-01-05 10:00:00.000000' WHERE id = ?", (rid,))
    for rid in each(0.02):
        db.execute("UPDATE referrals SET status = ? WHERE id = ?", (rng.choice(["expired", "declined", "odd"]), rid))
    for rid in each(0.05):  # repeat patients, some referred at the same instant
        other = rng.randrange(1, n + 1)
        db.execute("UPDATE referrals SET patient_key = (SELECT patient_key FROM referrals WHERE id = ?) WHERE id = ?",
                   (other, rid))
        if rng.random() < 0.3:
            db.execute("UPDATE referrals SET sent_at = (SELECT sent_at FROM referrals WHERE id = ?) WHERE id = ?",
                       (other, rid))
    edges = [("sent", "S", "sent_at", 1), ("sent", "U", "sent_at", 3), ("sent", "R", "sent_at", 14),
             ("scheduled", "R", "sent_at", 45), ("no_show", "R", "sent_at", 45), ("completed", "R", "completed_at", 7)]
    for (status, priority, clock, days), rid in zip(edges * 3, each(0.01), strict=False):  # a window ends right there
        at = AS_OF.replace(tzinfo=None) - rq.timedelta(days=days, microseconds=rng.choice([-1, 0, 1]))
        db.execute(f"UPDATE referrals SET status = ?, priority = ?, {clock} = ? WHERE id = ? AND sent_at IS NOT NULL",
                   (status, priority, at.isoformat(" ", "microseconds"), rid))
    for rid in rng.sample(ids, 2):  # priorities a sample will hardly see, on open referrals
        db.execute("UPDATE referrals SET priority = 'S^STAT', status = 'sent', sent_at = ? WHERE id = ?",
                   ((AS_OF.replace(tzinfo=None) - rq.timedelta(days=2)).isoformat(" ", "microseconds"), rid))
    events = [e for (e,) in db.execute("SELECT id FROM referral_events WHERE subject LIKE 'appt:%'")]
    for eid in rng.sample(events, len(events) // 50):  # an appointment on two referrals
        db.execute("UPDATE referral_events SET subject = (SELECT subject FROM referral_events WHERE id = ?) "
                   "WHERE id = ?", (rng.choice(events), eid))
    for eid in rng.sample(events, len(events) // 100):
        db.execute("UPDATE referral_events SET referral_id = NULL WHERE id = ?", (eid,))
    for eid in rng.sample(events, len(events) // 100):
        db.execute("UPDATE referral_events SET subject = 'APPT:' || substr(subject, 6) WHERE id = ?", (eid,))
    done = [r for (r,) in db.execute("SELECT id FROM referrals WHERE completed_at IS NOT NULL")]
    for rid in rng.sample(done, len(done) // 10):
        db.execute("INSERT INTO alerts (referral_id, stage, level, status, owner, overdue_days, raised_at, open_key, "
                   f"last_action) SELECT id, 'visit', 1, 'resolved', '', 1.0, {_ts('completed_at', '-3 days')}, id, '' "
                   "FROM referrals WHERE id = ?", (rid,))
    for rid in each(0.02):
        db.execute("INSERT INTO outbox (idempotency_key, channel, target, event, referral_id, payload, status, "
                   "attempts, next_attempt_at, last_error, created_at) VALUES (?, 'webhook', '', 'x', ?, '{}', "
                   "'pending', 0, '2026-11-01 00:00:00.000000', '', ?)",
                   (f"k{rid}", rid, f"2026-{rng.randint(1, 10):02d}-15 12:00:00.000000"))
    db.commit()
    db.close()


@pytest.fixture(scope="module")
def awkward(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("store") / "awkward.db"
    _awkward_store(path)
    return f"sqlite:///{path}"


CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # (default_params, Windows) arguments
    "default": ({}, {}),
    "by month": ({"by": "month"}, {}),
    "filtered": ({"filters": {"specialty": "CARD"}}, {}),
    "windows by name": ({}, {"target_days": {("dr card 3", "scheduling"): 2.0, ("derm", "visit"): 30.0}}),
    "business days": ({}, {"business_days": True}),
    "one month": ({"start": "2026-05-01", "end": "2026-06-01"}, {}),
    "cms50 2025": ({"year": 2025}, {}),
}


def _report(url: str, case: str, leak_limit: int = 1000) -> str:
    kw, window_kw = CASES[case]
    params = replace(rq.default_params(AS_OF, **kw), leak_limit=leak_limit)
    windows = replace(windows_from_settings(WindowSettings()), **window_kw)
    engine = make_engine(DatabaseSettings(url=url))
    with engine.connect() as conn:
        doc = rq.build_report(conn, params, windows)
    engine.dispose()
    return json.dumps(doc, sort_keys=True)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("windows", ["sampled", "missed"])
def test_shortcuts_equal_plain_queries(awkward: str, case: str, windows: str, monkeypatch: pytest.MonkeyPatch,
                                       shortcuts: Counter[str]) -> None:
    monkeypatch.setattr(rq, "_SAMPLE_IDS", 256)  # a sample of about 200 differences per metric
    monkeypatch.setattr(rq, "_MIN_SAMPLE", 50)
    if windows == "missed":  # windows far from every median and p90: each metric is read in full
        monkeypatch.setattr(rq, "_window", lambda sample: rq._Window(((None, rq._BELOW_ZERO), (900.0, 901.0))))
    fast = _report(awkward, case), _report(awkward, case, leak_limit=3)
    if case == "default":
        assert shortcuts["_status_figures"] and shortcuts["_appointments_outside"]
        assert shortcuts["_windowed"] if windows == "sampled" else shortcuts["_one_series"]
    with monkeypatch.context() as m:
        plain(m)
        assert (_report(awkward, case), _report(awkward, case, leak_limit=3)) == fast
