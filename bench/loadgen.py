"""Closed-loop MLLP load generator, run as its own process (``python -m bench.loadgen``).

C connections (raw ``asyncio.Protocol``), each lock-step: send one frame, wait for its ACK, check
MSA-1 in {AA, CA} and MSA-2 == the MSH-10 sent, send the next. Phases: ``--warmup`` frames per
connection, a barrier, then the measured phase: ``--count`` frames split over the connections, or,
with ``--count 0``, as many as fit in ``--seconds``. ``--max-seconds`` cuts the measured phase off
in any case, ``--ack-timeout`` bounds every single wait, and only 127.0.0.1 is allowed as a target.

Prints one JSON object on stdout. The control IDs that were accepted (AA/CA, warm-up included) go to
``--aa-file``, one a line, for the durability check.

``--idle N`` is the other mode: open N connections, report how many the server kept, and hold them
until stdin is closed (or ``--hold`` seconds pass), for the server-RSS measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import resource
import sys
import time
from pathlib import Path

from bench.messages import MessageFactory, run_tag

ALLOWED_HOSTS = ("127.0.0.1",)


class AckTimeout(Exception):
    pass


class Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None
        self.sent_at = 0.0
        self.lost = False
        self.unexpected = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        while True:
            end = buf.find(b"\x1c\r")
            if end < 0:
                return
            frame = bytes(buf[:end])
            del buf[: end + 2]
            w = self.waiter
            if w is not None and not w.done():
                self.waiter = None
                w.set_result(frame)
            else:
                self.unexpected += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        w = self.waiter
        if w is not None and not w.done():
            w.set_exception(ConnectionError("connection lost"))


def check_ack(frame: bytes, cid: str) -> str | None:
    """The MSA-1 code if the ACK is good for *cid*, else None. Looks for the MSA *segment* (``\\rMSA|``):
    a generated ACK control ID may itself end in "MSA"."""
    text = frame.decode("ascii", "replace")
    i = text.find("\rMSA|")
    if i < 0:
        return None
    j = text.find("\r", i + 1)
    fields = text[i + 1: j if j >= 0 else len(text)].split("|")
    if len(fields) < 3:
        return None
    code, echoed = fields[1], fields[2]
    if code in ("AA", "CA") and echoed == cid:
        return code
    return None


class Stats:
    def __init__(self) -> None:
        self.lat: list[float] = []
        self.accepted: list[str] = []
        self.errors: dict[str, int] = {}
        self.bad_acks = 0
        self.bad_examples: list[str] = []
        self.kinds: dict[str, int] = {}

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def drive(conn: Conn, fac: MessageFactory, n: int | None, deadline: float, ack_timeout: float,
                stats: Stats, measure: bool) -> bool:
    """Lock-step loop on one connection. Returns False if the connection is no longer usable."""
    loop = asyncio.get_running_loop()
    perf = time.perf_counter
    lat = stats.lat
    sent = 0
    while n is None or sent < n:
        if perf() >= deadline:
            break
        if conn.lost or conn.transport is None:
            stats.error("connection_lost")
            return False
        cid, data, kind = fac.next()
        fut: asyncio.Future[bytes] = loop.create_future()
        conn.waiter = fut
        t0 = perf()
        conn.sent_at = t0
        conn.transport.write(data)
        try:
            frame = await fut
        except AckTimeout:
            stats.error("ack_timeout")
            conn.transport.abort()
            return False
        except ConnectionError:
            stats.error("connection_lost")
            return False
        t1 = perf()
        sent += 1
        code = check_ack(frame, cid)
        if code is None:
            stats.bad_acks += 1
            if len(stats.bad_examples) < 3:
                stats.bad_examples.append(frame[:300].decode("ascii", "replace").replace("\r", "\\r"))
        else:
            stats.accepted.append(cid)
        if measure:
            lat.append(t1 - t0)
            stats.kinds[kind] = stats.kinds.get(kind, 0) + 1
    return True


async def watchdog(conns: list[Conn], ack_timeout: float) -> None:
    """One timer for all connections (cheaper than one per frame): fail a wait that is too old."""
    while True:
        await asyncio.sleep(min(0.25, ack_timeout / 4))
        now = time.perf_counter()
        for c in conns:
            w = c.waiter
            if w is not None and not w.done() and now - c.sent_at > ack_timeout:
                c.waiter = None
                w.set_exception(AckTimeout())


def pct(sorted_ms: list[float], p: float) -> float | None:
    if not sorted_ms:
        return None
    k = max(0, min(len(sorted_ms) - 1, math.ceil(p / 100 * len(sorted_ms)) - 1))
    return round(sorted_ms[k], 3)


async def connect_all(host: str, port: int, n: int, limit_s: float) -> list[Conn]:
    loop = asyncio.get_running_loop()
    conns: list[Conn] = []
    for _ in range(n):
        _, proto = await asyncio.wait_for(loop.create_connection(Conn, host, port), limit_s)
        conns.append(proto)
    return conns


async def run_load(a: argparse.Namespace) -> dict[str, object]:
    tag = a.tag or run_tag()
    stats = Stats()
    conns = await connect_all(a.host, a.port, a.connections, a.connect_timeout)
    facs = [MessageFactory(tag, i, a.seed) for i in range(len(conns))]
    dog = asyncio.create_task(watchdog(conns, a.ack_timeout))
    t_start = time.perf_counter()
    first_send_unix = time.time()  # wall clock: the runner compares it with when the server's lag hit 0
    # Warm-up, then the barrier (gather) so that every connection starts the measured phase together.
    warm_deadline = t_start + a.max_seconds
    alive = await asyncio.gather(*(drive(c, f, a.warmup, warm_deadline, a.ack_timeout, stats, False)
                                   for c, f in zip(conns, facs, strict=True)))
    warm_msgs = len(stats.accepted) + stats.bad_acks
    live = [(c, f) for c, f, ok in zip(conns, facs, alive, strict=True) if ok]
    per_conn = None if a.count <= 0 else max(1, math.ceil(a.count / len(conns)))
    budget = a.seconds if a.count <= 0 else a.max_seconds
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    deadline = t0 + min(budget, a.max_seconds)
    await asyncio.gather(*(drive(c, f, per_conn, deadline, a.ack_timeout, stats, True) for c, f in live))
    t1 = time.perf_counter()
    cpu1 = time.process_time()
    dog.cancel()
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    await asyncio.sleep(0)
    secs = t1 - t0
    lat_ms = sorted(x * 1000 for x in stats.lat)
    msgs = len(lat_ms)
    cut_off = per_conn is not None and msgs < per_conn * len(live)
    if a.aa_file:
        Path(a.aa_file).write_text("\n".join(stats.accepted) + "\n")  # noqa: ASYNC240 - after measuring
    out: dict[str, object] = {
        "tag": tag, "connections": a.connections, "warmup_msgs": warm_msgs, "msgs": msgs,
        "first_send_unix": first_send_unix,
        "seconds": round(secs, 4), "msg_per_s": round(msgs / secs, 1) if secs > 0 else 0.0,
        "p50_ms": pct(lat_ms, 50), "p90_ms": pct(lat_ms, 90), "p99_ms": pct(lat_ms, 99),
        "max_ms": round(lat_ms[-1], 3) if lat_ms else None,
        "errors": sum(stats.errors.values()), "error_kinds": stats.errors, "bad_acks": stats.bad_acks,
        "bad_ack_examples": stats.bad_examples, "unexpected_frames": sum(c.unexpected for c in conns),
        "accepted_total": len(stats.accepted), "cut_off": cut_off, "kinds": stats.kinds,
        "gen_cpu_pct": round(100 * (cpu1 - cpu0) / secs, 1) if secs > 0 else None,
    }
    if not a.aa_file:
        out["accepted_ids"] = stats.accepted
    return out


async def run_idle(a: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    conns: list[Conn] = []
    failed = 0
    for _ in range(a.idle):
        try:
            _, proto = await asyncio.wait_for(loop.create_connection(Conn, a.host, a.port), a.connect_timeout)
            conns.append(proto)
        except (TimeoutError, OSError):
            failed += 1
    await asyncio.sleep(1.0)  # let the server refuse what it refuses
    alive = sum(1 for c in conns if not c.lost)
    print(json.dumps({"opened": len(conns), "connect_failed": failed, "alive": alive}), flush=True)
    # Hold until the orchestrator closes our stdin (or the hold time runs out).
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(reader.read(), a.hold)
    alive_end = sum(1 for c in conns if not c.lost)
    for c in conns:
        if c.transport is not None:
            c.transport.close()
    print(json.dumps({"alive_at_end": alive_end}), flush=True)


def raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(max(n, soft), hard) if hard > 0 else n, hard))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-c", "--connections", type=int, default=1)
    p.add_argument("--warmup", type=int, default=50, help="frames per connection before the barrier")
    p.add_argument("--count", type=int, default=0, help="measured frames in all (0: run for --seconds)")
    p.add_argument("--seconds", type=float, default=3.0, help="measured phase length when --count is 0")
    p.add_argument("--max-seconds", type=float, default=12.0, help="hard cut-off of each phase")
    p.add_argument("--ack-timeout", type=float, default=10.0)
    p.add_argument("--connect-timeout", type=float, default=5.0)
    p.add_argument("--tag", default="", help="6-character run tag (control-ID prefix); random if empty")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--aa-file", default="", help="write the accepted control IDs here")
    p.add_argument("--idle", type=int, default=0, help="open this many idle connections and hold them")
    p.add_argument("--hold", type=float, default=60.0)
    a = p.parse_args(argv)
    if a.host not in ALLOWED_HOSTS:
        p.error("traffic goes to 127.0.0.1 only")
    if a.idle:
        raise_nofile(a.idle + 64)
        asyncio.run(run_idle(a))
        return 0
    out = asyncio.run(run_load(a))
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
