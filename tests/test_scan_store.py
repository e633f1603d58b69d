"""The scan on a store made by the bench generator (bench/store.py): the first scan raises exactly what the
clock says, a scan at the same instant writes nothing, and a scan a day later writes only the referrals
whose level changed."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest

from bench import store as bench_store
from refloop import stall
from refloop.config import DatabaseSettings, Settings
from refloop.config.notify import WorklistSettings
from refloop.config.windows import windows_from_settings
from refloop.store import referrals as repo
from refloop.store import scan as stall_scan
from refloop.store.engine import make_engine
from tests.utils import make_settings

AS_OF = bench_store.AS_OF
N = 3000


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gen") / "store.db"
    bench_store.generate(path, N)
    assert bench_store.verify_projection(path, 500) == 0  # the generator writes what the real fold writes
    return path


@pytest.fixture
def store(generated: Path, tmp_path: Path) -> Iterator[tuple[str, Settings]]:
    path = tmp_path / "work.db"
    shutil.copy(generated, path)
    url = f"sqlite:///{path}"
    yield url, replace(make_settings(url), worklist=WorklistSettings(mode="observe"))


def dump(url: str) -> dict[str, dict[int, tuple[object, ...]]]:
    db = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        return {t: {r[0]: tuple(r) for r in db.execute(f"SELECT * FROM {t} ORDER BY id")}
                for t in ("referrals", "alerts")}
    finally:
        db.close()


def expected_levels(url: str, settings: Settings, at: object) -> dict[tuple[int, str], int]:
    """The clock evaluated on read for every open referral (the generator makes no holds)."""
    windows = windows_from_settings(settings.stall)
    engine = make_engine(DatabaseSettings(url=url))
    out: dict[tuple[int, str], int] = {}
    with engine.connect() as conn:
        for row in conn.execute(repo.REFERRALS.select().where(repo.REFERRALS.c.status.in_(repo.OPEN))):
            for s in stall.evaluate(repo.clock_input(row), at, windows):  # type: ignore[arg-type]
                out[(row.id, s.stage)] = s.level
    engine.dispose()
    return out


def open_levels(url: str) -> dict[tuple[int, str], int]:
    db = sqlite3.connect(url.removeprefix("sqlite:///"))
    try:
        rows = db.execute("SELECT referral_id, stage, level FROM alerts WHERE open_key = 0")
        return {(r, s): lv for r, s, lv in rows}
    finally:
        db.close()


def test_successive_scans_write_only_what_changed(store: tuple[str, Settings]) -> None:
    url, settings = store
    engine = make_engine(DatabaseSettings(url=url))
    first = stall_scan.run_scan(engine, settings, AS_OF)
    assert first is not None and first.rows("raised")
    assert open_levels(url) == expected_levels(url, settings, AS_OF)

    before = dump(url)
    again = stall_scan.run_scan(engine, settings, AS_OF)
    assert again is not None and again.as_json() == {"raised": [], "escalated": [], "resolved": []}
    assert dump(url) == before  # the same instant: not one row written

    later = AS_OF + timedelta(days=1)
    changed_levels = {k for k, v in expected_levels(url, settings, later).items() if open_levels(url).get(k) != v}
    assert changed_levels  # a day later some referrals do reach a new level
    result = stall_scan.run_scan(engine, settings, later)
    assert result is not None
    after = dump(url)
    assert open_levels(url) == expected_levels(url, settings, later)
    touched_refs = {rid for rid, row in after["referrals"].items() if before["referrals"][rid] != row}
    touched_alerts = {row[1] for aid, row in after["alerts"].items() if before["alerts"].get(aid) != row}
    assert touched_refs | touched_alerts == {rid for rid, _ in changed_levels}
    engine.dispose()
