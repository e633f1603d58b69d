"""Run ``refloop serve`` in-process with SQL statement counting (bench-only; the daemon is unchanged).

A global SQLAlchemy ``before/after_cursor_execute`` listener on :class:`sqlalchemy.engine.Engine`
counts every statement and the time spent inside the DB-API ``execute``; on exit (SIGTERM, which
refloop handles gracefully) the counts are written as JSON to ``$BENCH_SQLCOUNT_OUT``. Used by
``python -m bench.sqlcount [-c 16] [--count 3000]``, which starts the daemon that way (taskset -c 0,
fresh SQLite database), sends ``--count`` frames with the load generator and prints statements per
message and DB-API time per statement.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import sys
import time
from collections import defaultdict
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Engine

_count: dict[str, int] = defaultdict(int)
_secs: dict[str, float] = defaultdict(float)
_norm = re.compile(r"\s+")


@event.listens_for(Engine, "before_cursor_execute")
def _before(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
    conn.info["bench_t0"] = time.perf_counter()


@event.listens_for(Engine, "after_cursor_execute")
def _after(conn: Any, cursor: Any, statement: str, params: Any, context: Any, executemany: bool) -> None:
    key = _norm.sub(" ", statement)[:110]
    _count[key] += 1
    _secs[key] += time.perf_counter() - conn.info.pop("bench_t0", time.perf_counter())


@event.listens_for(Engine, "commit")
def _commit(conn: Any) -> None:
    _count["<COMMIT>"] += 1


def _dump() -> None:
    out = os.environ.get("BENCH_SQLCOUNT_OUT")
    if out:
        with open(out, "w") as fh:
            json.dump({"count": _count, "seconds": _secs}, fh)


atexit.register(_dump)

def drive(c: int, count: int) -> None:
    import signal
    import subprocess
    import tempfile
    from pathlib import Path

    from bench.runner import PY, ROOT, _wait_http_ready, cpu_seconds, free_port, refloop_env, taskset

    wd = Path(tempfile.mkdtemp(prefix="refloop-sqlcount-"))
    mllp, http = free_port(), free_port()
    env = refloop_env(wd, mllp, http, f"sqlite:///{wd / 'refloop.db'}", "WARNING",
                      {"BENCH_SQLCOUNT_OUT": str(wd / "counts.json"), "PYTHONPATH": str(ROOT)})
    log = wd / "refloop.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen([*taskset(0), PY, "-m", "bench.sqlcount", "serve"], cwd=wd, env=env,
                                stdout=fh, stderr=subprocess.STDOUT)
    try:
        _wait_http_ready(proc, http, log, 60)
        cpu0 = cpu_seconds(proc.pid)
        gen = subprocess.run([*taskset(1), PY, "-m", "bench.loadgen", "--port", str(mllp), "-c", str(c),
                              "--warmup", "0", "--count", str(count), "--max-seconds", "60"],
                             cwd=ROOT, capture_output=True, timeout=180)
        cpu1 = cpu_seconds(proc.pid)
        r = json.loads(gen.stdout.decode().splitlines()[-1])
        n = int(r["msgs"])
        print(f"C={c}: {n} msgs, {r['msg_per_s']} msg/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
              f"errors {r['errors']}, bad ACKs {r['bad_acks']}, kinds {r['kinds']}, "
              f"server CPU {(cpu1 - cpu0) / n * 1e6:.0f} µs/msg")
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        d = json.loads((wd / "counts.json").read_text())
        stmts = sum(v for k, v in d["count"].items() if k != "<COMMIT>")
        secs = sum(d["seconds"].values())
        print(f"statements {stmts} = {stmts / n:.1f}/msg; commits {d['count'].get('<COMMIT>')}; "
              f"time inside DB-API execute {secs:.2f} s = {secs / n * 1e6:.0f} µs/msg")
        for k, v in sorted(d["count"].items(), key=lambda kv: -kv[1])[:25]:
            print(f"{v / n:6.2f}/msg {d['seconds'].get(k, 0) / max(v, 1) * 1e6:7.0f} µs/stmt  {k}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"]:
        from refloop.cli import main

        try:
            rc = main(sys.argv[1:])
        finally:
            _dump()
        sys.exit(rc)
    import argparse

    ap = argparse.ArgumentParser(prog="python -m bench.sqlcount")
    ap.add_argument("-c", type=int, default=16)
    ap.add_argument("--count", type=int, default=3000)
    a = ap.parse_args()
    drive(a.c, a.count)
