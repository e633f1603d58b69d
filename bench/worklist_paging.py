"""Time the coordinator's worklist pages on a store with many open alerts (refloop.store.worklist_view).

    .venv/bin/python -m bench.worklist_paging [--alerts 100000] [--db PATH] [--postgres URL] [--repeat 5]

Builds (or reuses, with ``--db`` pointing at an existing file) a migrated store with N referrals, each with one
unresolved alert, spread over stages, levels, owners, specialties, practices and priorities like a bad month,
inserted directly (no HL7: this measures the read side only). Then times, as a coordinator would use them: the
first page for everyone, the 200th page by keyset (the cursor of each page fed to the next), "my items",
a specialty filter, the priority sort (no index: sorts the filtered set), the mode filter (SQL ``CASE``),
the counts above the table, the filter pick-lists, a full CSV-style walk, and the weekly review page.
Prints one JSON line per case (median and max milliseconds). No assertion: a laptop and a shared CI box
differ by 10x; compare runs.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

NOW = datetime(2026, 10, 1, tzinfo=UTC)
STAGES = ("scheduling", "visit", "rebooking", "note")
SPECIALTIES = ("CARD", "DERM", "ORTH", "PULM", "NEUR", "NEPH", "GAST", "OPHT")
OWNERS = tuple(f"owner{i}" for i in range(20))
PRIORITIES = ("R^Routine", "S^STAT", "A^ASAP", "R")


def build(url: str, n: int, seed: int = 7) -> None:
    """N referrals with one open alert each, in batches of 5000 rows per statement group."""
    from sqlalchemy import insert

    from refloop.config import DatabaseSettings
    from refloop.store import migrate
    from refloop.store.engine import make_engine
    from refloop.store.models import Alert, Referral

    engine = make_engine(DatabaseSettings(url=url))
    migrate.upgrade(engine)
    rnd = random.Random(seed)
    with engine.begin() as conn:
        for start in range(0, n, 5000):
            refs, alerts = [], []
            for i in range(start, min(start + 5000, n)):
                sent = NOW - timedelta(days=rnd.uniform(15, 300))
                refs.append({"id": i + 1, "placer_id": f"B{i:07d}", "authority": f"PRACTICE{i % 6}",
                             "status": "sent", "priority": PRIORITIES[i % 4], "referred_to": f"Dr {i % 40}",
                             "specialty": SPECIALTIES[i % 8], "patient_key": f"p{i}", "sent_at": sent,
                             "updated_at": NOW, "no_show_count": 0})
                level = 1 + int(rnd.expovariate(1.0))
                overdue = round(rnd.uniform(0, 200), 6)
                alerts.append({"referral_id": i + 1, "stage": STAGES[i % 4], "level": level,
                               "status": "open" if i % 5 else "acknowledged", "owner": OWNERS[i % 20],
                               "overdue_days": overdue, "raised_at": NOW - timedelta(days=3),
                               "due_at": NOW - timedelta(days=overdue),
                               "last_action": "raised", "last_action_at": NOW, "open_key": 0})
            conn.execute(insert(Referral.__table__), refs)
            conn.execute(insert(Alert.__table__), alerts)
    engine.dispose()


def _time(fn: Callable[[], Any], repeat: int) -> dict[str, float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return {"median_ms": round(statistics.median(times), 2), "max_ms": round(max(times), 2)}


def main(argv: list[str] | None = None) -> int:
    from refloop.config import DatabaseSettings, Settings
    from refloop.config.notify import WorklistSettings
    from refloop.store import weekly
    from refloop.store import worklist_view as wv
    from refloop.store.engine import make_engine

    ap = argparse.ArgumentParser(prog="python -m bench.worklist_paging")
    ap.add_argument("--alerts", type=int, default=100_000)
    ap.add_argument("--db", help="SQLite file to build or reuse (default: a temporary file)")
    ap.add_argument("--postgres", help="a PostgreSQL URL to an EMPTY database instead of SQLite")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--pages", type=int, default=200, help="keyset pages to walk for the deep-page case")
    args = ap.parse_args(argv)
    tmp = tempfile.TemporaryDirectory()
    path = Path(args.db) if args.db else Path(tmp.name) / "worklist.db"
    url = args.postgres or f"sqlite:///{path}"
    fresh = bool(args.postgres) or not path.exists()
    db = DatabaseSettings(url=url)
    if fresh:
        t0 = time.perf_counter()
        build(url, args.alerts)
        print(json.dumps({"case": "build", "alerts": args.alerts, "s": round(time.perf_counter() - t0, 1)}))
    settings = Settings(database=db, worklist=WorklistSettings(
        mode="active", relationship_modes=("PRACTICE1>*=observe", "PRACTICE2>DERM=observe")))
    engine = make_engine(db)
    everyone = wv.Filters.from_query({"owner": ""})
    try:
        with engine.connect() as conn:
            cursors = [""]
            for _ in range(args.pages):  # the cursor of each page, for the deep page
                p = wv.page(conn, settings, NOW, everyone, after=cursors[-1], with_counts=False)
                if not p.next_cursor:
                    break
                cursors.append(p.next_cursor)
            deep = cursors[-1]
            cases: dict[str, Callable[[], Any]] = {
                "first page, everyone": lambda: wv.page(conn, settings, NOW, everyone, with_counts=False),
                f"page {len(cursors)} by keyset": lambda: wv.page(conn, settings, NOW, everyone, after=deep,
                                                                  with_counts=False),
                "my items (owner7)": lambda: wv.page(conn, settings, NOW, wv.Filters.from_query(
                    {"owner": "owner7"}), with_counts=False),
                "specialty DERM": lambda: wv.page(conn, settings, NOW, wv.Filters.from_query(
                    {"owner": "", "specialty": "DERM"}), with_counts=False),
                "priority sort": lambda: wv.page(conn, settings, NOW, wv.Filters.from_query(
                    {"owner": "", "sort": "priority"}), with_counts=False),
                "mode observe": lambda: wv.page(conn, settings, NOW, wv.Filters.from_query(
                    {"owner": "", "mode": "observe"}), with_counts=False),
                "counts (stage x level)": lambda: wv.page(conn, settings, NOW, everyone, limit=1),
                "pick-lists": lambda: wv.facets(conn),
                "full walk (CSV export)": lambda: sum(1 for _ in wv.iterate(conn, settings, NOW, everyone)),
                "weekly review (2 weeks)": lambda: weekly.review(conn, settings, NOW,
                                                                                weekly.ZoneInfo("UTC")),
            }
            for name, fn in cases.items():
                repeat = 1 if name.startswith(("full walk", "weekly")) else args.repeat
                print(json.dumps({"case": name, "dialect": conn.dialect.name, **_time(fn, repeat)}))
    finally:
        engine.dispose()
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
