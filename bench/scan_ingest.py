"""Ingest while the stall scan runs on a big store: does background work ever hold the listener hostage?

Method (the scenario of issue 10): a generated store of N referrals (``bench.store.cached_store``, the same
store the store benchmark uses), copied fresh; ``refloop serve`` on it with a stall scan every
``--scan-seconds``; one sender sends a SIU every 20 ms for ``--seconds`` and waits for each ACK. Reported:
every ACK code, the slowest ACK and p99, and how many scans ran meanwhile
(``refloop_scheduler_last_success_timestamp_seconds{task="stall_scan"}`` moving). Passes when every ACK is
AA and the slowest is under 1 s.

    .venv/bin/python -m bench.scan_ingest --referrals 100000 --seconds 30 --scan-seconds 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from bench import store
from bench.runner import REFLOOP, free_port, refloop_env, scrape

VT, FS, CR = b"\x0b", b"\x1c", b"\r"


def siu(n: int) -> bytes:
    cid = f"SCANING{n:07d}"
    return (f"MSH|^~\\&|SCHED|DEPT|REFLOOP|HOSP|20261205090000-0500||SIU^S12^SIU_S12|{cid}|P|2.5.1\r"
            f"SCH|A{n}^SCHED|A{n}^SCHED|||||||30|MIN|^^30^20261212090000-0500\r"
            f"PID|1||SCANMRN{n % 500}^^^CLINIC^MR||Testperson^Alma||19700101|F\r"
            f"AIP|1||9{n % 50:03d}^Someone^Else\r").encode()


def read_ack(sock: socket.socket, buf: bytearray) -> bytes:
    while FS + CR not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    end = buf.index(FS + CR)
    frame = bytes(buf[buf.index(VT) + 1:end])
    del buf[:end + 2]
    return frame


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scan_ingest")
    ap.add_argument("--referrals", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--scan-seconds", type=float, default=3.0)
    ap.add_argument("--every-ms", type=float, default=20.0)
    a = ap.parse_args(argv)
    src, meta = store.cached_store(a.referrals)
    work = Path(tempfile.mkdtemp(prefix="scan-ingest-"))
    db = work / "refloop.db"
    shutil.copy(src, db)
    mllp, http = free_port(), free_port()
    env = refloop_env(work, mllp, http, f"sqlite:///{db}", "WARNING",
                      {"REFLOOP_STALL_SCAN_MINUTES": str(a.scan_seconds / 60)})
    proc = subprocess.Popen([REFLOOP, "serve"], cwd=work, env=env, stdout=(work / "log").open("wb"),
                            stderr=subprocess.STDOUT)
    codes: dict[str, int] = {}
    lat: list[float] = []
    scans = set()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http}/readyz", timeout=2):
                    break
            except OSError:
                time.sleep(0.1)
        with socket.create_connection(("127.0.0.1", mllp), timeout=30) as sock:
            buf = bytearray()
            end = time.monotonic() + a.seconds
            n = 0
            while time.monotonic() < end:
                t0 = time.perf_counter()
                sock.sendall(VT + siu(n) + FS + CR)
                ack = read_ack(sock, buf).decode("latin-1")
                lat.append(time.perf_counter() - t0)
                msa = next(seg for seg in ack.split("\r") if seg.startswith("MSA|")).split("|")
                codes[msa[1]] = codes.get(msa[1], 0) + 1
                n += 1
                if n % 50 == 0:
                    scans.add(scrape(http, 'refloop_scheduler_last_success_timestamp_seconds{task="stall_scan"}'))
                time.sleep(max(a.every_ms / 1000 - (time.perf_counter() - t0), 0))
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    lat.sort()
    out = {"referrals": a.referrals, "store_cached": meta.get("cached"), "messages": len(lat), "acks": codes,
           "scans_seen": len({s for s in scans if s}), "p50_ms": round(statistics.median(lat) * 1000, 2),
           "p99_ms": round(lat[int(len(lat) * 0.99) - 1] * 1000, 2), "max_ms": round(lat[-1] * 1000, 2)}
    out["ok"] = set(codes) == {"AA"} and lat[-1] < 1.0
    print(json.dumps(out))
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
