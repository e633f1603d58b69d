"""Daemon jobs: the stall scan, the outbox dispatcher and the daily digest.

Each recomputes from the database and ``now`` (nothing depends on APScheduler's state), runs its database
work in a worker thread, and is safe when several daemons share PostgreSQL: the scan takes an advisory
lock, the dispatcher claims rows with SKIP LOCKED, and the digest is idempotent per owner and day.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, func, select

from refloop import referral as rf
from refloop.notify.dispatch import dispatch_once
from refloop.store import alerts, digest, outbox
from refloop.store import referrals as repo
from refloop.store import scan as stall_scan

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from refloop.daemon.app import AppContext
    from refloop.daemon.metrics import Metrics

log = logging.getLogger("refloop.scan")


def gauges(conn: Connection) -> dict[str, Any]:
    """Counts for the Prometheus gauges, refreshed at the end of each scan."""
    a, r = alerts.ALERTS, repo.REFERRALS
    summed: dict[tuple[str, str], int] = defaultdict(int)
    for stage, level, n in conn.execute(select(a.c.stage, a.c.level, func.count())
                                        .where(a.c.open_key == 0).group_by(a.c.stage, a.c.level)):
        summed[(stage, alerts.level_label(int(level)))] += int(n)  # levels 3, 4, ... share the "3+" label
    statuses: dict[str, int] = dict(conn.execute(select(r.c.status, func.count()).group_by(r.c.status)).all())
    return {"alerts": [(stage, label, n) for (stage, label), n in sorted(summed.items())],
            "referrals": {s.value: int(statuses.get(s.value, 0)) for s in rf.Status},
            "outbox": outbox.counts(conn)}


def update_gauges(engine: Engine, metrics: Metrics) -> None:
    """Alert, referral and outbox gauges from the database, so every daemon reports the same truth."""
    with engine.connect() as conn:
        g = gauges(conn)
    metrics.alerts_open.clear()
    for stage, level, n in g["alerts"]:
        metrics.alerts_open.labels(stage, level).set(n)
    for status, n in g["referrals"].items():
        metrics.referrals.labels(status).set(n)
    metrics.outbox_backlog.set(g["outbox"]["pending"] + g["outbox"]["failed"])
    metrics.outbox_dead_letters.set(g["outbox"]["dead"])


async def scan_job(server: AppContext) -> None:
    engine = server.engine
    assert engine is not None
    now = server.clock.now()
    result = await asyncio.to_thread(functools.partial(stall_scan.run_scan, pause=_ingest_first(server),
                                                       turn=server.background_turn),
                                     engine, server.settings, now)
    if result is None:
        log.info("stall scan skipped", extra={"outcome": "skipped"})
    else:
        log.info("stall scan", extra={"outcome": "done", "count": sum(result.counts().values()),
                                      "messages": result.notifications})
    await asyncio.to_thread(update_gauges, engine, server.metrics)


def _ingest_first(server: AppContext) -> Callable[[], None]:
    return ingest_first(server.ingest_idle)


def ingest_first(idle: Callable[[], bool], *, share: float = 0.2, most: float = 0.5,
                 clock: Callable[[], float] = time.monotonic) -> Callable[[], None]:
    """Before each scan chunk: wait while a writer has frames to commit, but only for a bounded time that
    leaves the scan at least *share* of the wall clock: the wait is at most ``(1 - share) / share`` times
    the previous chunk's duration (measured from the end of the last wait to this call), and never more
    than *most* seconds. A fixed 0.5 s wait per chunk starved the first scan of a big store for minutes
    under sustained traffic (one 20 ms chunk per 0.5 s); with a share of 0.2 a 20 ms chunk waits at most
    80 ms, so ingest still goes first four fifths of the time and the scan finishes."""
    ratio = (1.0 - share) / share
    last_end: list[float] = []

    def pause() -> None:
        start = clock()
        budget = most if not last_end else min(most, ratio * max(start - last_end[0], 0.0))
        deadline = start + budget
        while not idle() and clock() < deadline:
            time.sleep(0.001)
        last_end[:] = [clock()]

    return pause


async def dispatch_job(server: AppContext) -> None:
    engine = server.engine
    assert engine is not None
    await asyncio.to_thread(dispatch_once, engine, server.settings, server.clock.now(),
                            counter=server.metrics.notifications)


async def digest_job(server: AppContext) -> None:
    engine = server.engine
    assert engine is not None

    def run() -> int:
        with engine.begin() as conn:
            return digest.digest(conn, server.settings, server.clock.now())

    if n := await asyncio.to_thread(run):
        log.info("digest enqueued", extra={"count": n})
