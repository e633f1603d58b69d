"""Time the cohort report alone on a copy of a generated store (see bench/store.py for the full benchmark).

    .venv/bin/python -m bench.report_timing DB [--scan] [--module PATH] [--by FIELD] [--out JSON] [--repeat N]

``DB`` is used in place (pass a copy of bench/results/store-*.db). ``--scan`` first runs the stall scan once at
``AS_OF``, as bench/store.py does before it times the report, so ``alerts``/``outbox`` hold what they hold there.
``--module`` times another version of ``refloop/store/report_queries.py`` (e.g. a saved copy of the old one),
``--out`` writes the report JSON so two versions can be compared with ``cmp``. ``--profile`` adds a cProfile of
one run (top 25 by cumulative time) on stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import json
import pstats
import sys
import time
from typing import Any

from bench.store import AS_OF


def _load(path: str | None) -> Any:
    if not path:
        from refloop.store import report_queries
        return report_queries
    spec = importlib.util.spec_from_file_location("report_queries_alt", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    from refloop.config import DatabaseSettings, Settings
    from refloop.config.windows import windows_from_settings
    from refloop.store import scan as stall_scan
    from refloop.store.engine import make_engine

    ap = argparse.ArgumentParser(prog="python -m bench.report_timing")
    ap.add_argument("db")
    ap.add_argument("--scan", action="store_true")
    ap.add_argument("--module")
    ap.add_argument("--by")
    ap.add_argument("--start")
    ap.add_argument("--out")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--leak-limit", type=int)
    ap.add_argument("--business-days", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args(argv)
    rq = _load(args.module)
    settings = Settings(database=DatabaseSettings(url=f"sqlite:///{args.db}"))
    engine = make_engine(settings.database)
    try:
        if args.scan:
            t0 = time.perf_counter()
            stall_scan.run_scan(engine, settings, AS_OF)
            sys.stderr.write(f"scan {time.perf_counter() - t0:.2f} s\n")
        windows = windows_from_settings(settings.stall)
        if args.business_days:
            from dataclasses import replace
            windows = replace(windows, business_days=True)
        params = rq.default_params(AS_OF, by=args.by, start=args.start)
        if args.leak_limit is not None:
            from dataclasses import replace
            params = replace(params, leak_limit=args.leak_limit)
        times: list[float] = []
        doc: Any = None
        with engine.connect() as conn:
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                doc = rq.build_report(conn, params, windows)
                times.append(time.perf_counter() - t0)
            if args.profile:
                prof = cProfile.Profile()
                prof.enable()
                rq.build_report(conn, params, windows)
                prof.disable()
                pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
        median = sorted(times)[len(times) // 2]
        print(json.dumps({"runs_s": [round(t, 3) for t in times], "median_s": round(median, 3)}))
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(doc, fh, indent=1, sort_keys=True)
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
