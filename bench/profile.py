"""Profile refloop under load with py-spy: ``python -m bench.profile [-c 16] [--seconds 8] [--side refloop-sqlite]``.

Starts the daemon as `make bench` does (taskset -c 0, fresh database), drives it with the load
generator (taskset -c 1) and attaches ``py-spy record --format raw --threads`` (all threads, wall
clock samples of on-CPU *and* idle/waiting stacks unless ``--idle`` is off; we pass ``--nonblocking``
off so stacks are exact). Prints per-thread sample shares, the top self-time functions, and the top
inclusive functions under refloop's own code. The raw folded file stays in bench/results/.
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.runner import PY, RESULTS, ROOT, cleanup_side, cpu_seconds, start_side, stop_side, taskset


def frame_name(f: str) -> str:
    # py-spy raw frames look like "function (path/to/file.py:123)"
    name, _, loc = f.partition(" (")
    loc = loc.rstrip(")")
    path, _, _line = loc.rpartition(":")
    p = path
    for marker in ("site-packages/", "/lib/python3.11/", "/work/main/"):
        if marker in p:
            p = p.split(marker, 1)[1]
    return f"{name} ({p})"


def summarise(raw: Path, top: int) -> dict[str, Any]:
    threads: collections.Counter[str] = collections.Counter()
    self_t: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        cnt = int(n)
        frames = stack.split(";")
        thread = frames[0]
        frames = frames[1:]
        total += cnt
        threads[thread] += cnt
        if frames:
            self_t[frame_name(frames[-1])] += cnt
        for f in {frame_name(f) for f in frames}:
            incl[f] += cnt

    def pct(c: collections.Counter[str], k: int) -> list[tuple[str, float]]:
        return [(name, round(100 * v / total, 1)) for name, v in c.most_common(k)] if total else []

    return {"samples": total, "threads": pct(threads, 10), "self": pct(self_t, top),
            "inclusive": pct(collections.Counter({k: v for k, v in incl.items()
                                                  if "refloop/" in k or "sqlalchemy/" in k or "logging/" in k}),
                             top)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile")
    ap.add_argument("-c", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--side", default="refloop-sqlite")
    ap.add_argument("--rate", type=int, default=200)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--idle", action="store_true", help="include idle (waiting) stacks")
    ap.add_argument("--gil", action="store_true", help="only samples of the thread holding the GIL (Python CPU)")
    a = ap.parse_args(argv)
    spy = shutil.which("py-spy") or str(Path(PY).with_name("py-spy"))
    base = Path(tempfile.mkdtemp(prefix="refloop-prof-"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    raw = RESULTS / f"profile-{a.side}-c{a.c}-{time.strftime('%Y%m%dT%H%M%S')}.txt"
    run = start_side(a.side, base)
    try:
        cmd = [spy, "record", "--pid", str(run.proc.pid), "--format", "raw", "--threads", "--rate", str(a.rate),
               "--duration", str(int(a.seconds + 1)), "-o", str(raw)]
        if a.idle:
            cmd.append("--idle")
        if a.gil:
            cmd.append("--gil")
        prof = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)
        cpu0 = cpu_seconds(run.proc.pid)
        gen = subprocess.run([*taskset(1), PY, "-m", "bench.loadgen", "--port", str(run.port), "-c", str(a.c),
                              "--seconds", str(a.seconds), "--max-seconds", str(a.seconds + 5)],
                             cwd=ROOT, capture_output=True, timeout=a.seconds * 3 + 60)
        cpu1 = cpu_seconds(run.proc.pid)
        _, err = prof.communicate(timeout=60)
        res = json.loads(gen.stdout.decode().strip().splitlines()[-1])
        res.pop("accepted_ids", None)
        n = int(res["msgs"]) + int(res["warmup_msgs"])
        print(json.dumps({k: res[k] for k in ("connections", "msgs", "msg_per_s", "p50_ms", "p99_ms",
                                              "errors", "bad_acks")}))
        print(f"server CPU {cpu1 - cpu0:.2f} s for {n} messages = {(cpu1 - cpu0) / n * 1e6:.0f} µs/msg")
        if not raw.exists():
            print("py-spy wrote nothing:", err.decode()[-500:])
            return 1
        s = summarise(raw, a.top)
        print(f"\npy-spy samples: {s['samples']} (rate {a.rate}/s, {'with' if a.idle else 'without'} idle stacks)")
        print("\nthreads (% of samples):")
        for name, p in s["threads"]:
            print(f"  {p:5.1f}%  {name}")
        print("\ntop self time:")
        for name, p in s["self"]:
            print(f"  {p:5.1f}%  {name}")
        print("\ntop inclusive (refloop / sqlalchemy / logging frames):")
        for name, p in s["inclusive"]:
            print(f"  {p:5.1f}%  {name}")
        print(f"\nraw folded stacks: {raw.relative_to(ROOT)}")
    finally:
        stop_side(run, kill=True)
        cleanup_side(run)
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
