"""APScheduler 3 wiring: periodic jobs in the daemon's event loop, their database work in threads.

Nothing depends on the scheduler's own state: every job recomputes what to do from the database and
``now``, so a run missed while the daemon was down is simply caught up by the next one, and several
daemons sharing PostgreSQL can run the same job safely (the jobs are idempotent; see each job).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.asyncio import AsyncIOScheduler

if TYPE_CHECKING:
    from refloop.daemon.app import AppContext

log = logging.getLogger("refloop.scheduler")

JobFn = Callable[["AppContext"], Awaitable[object]]
JobRun = Callable[[], Coroutine[Any, Any, None]]


class Jobs:
    def __init__(self, server: AppContext) -> None:
        self.server = server
        self.scheduler = AsyncIOScheduler(event_loop=server.loop, timezone="UTC")
        self._jobs: list[tuple[str, float, JobFn]] = []

    def add(self, name: str, every_seconds: float, fn: JobFn) -> None:
        self._jobs.append((name, every_seconds, fn))

    def start(self) -> None:
        for name, every, fn in self._jobs:
            self.scheduler.add_job(self._wrap(name, fn), "interval", seconds=every, id=name, name=name,
                                   coalesce=True, max_instances=1, misfire_grace_time=None)
            # ... and once at start-up (missed runs are caught up by recomputing from the database).
            self.server.spawn(self._wrap(name, fn)())
        self.scheduler.start()

    def shutdown(self) -> None:
        if self.scheduler.running:
            self.scheduler.shutdown(wait=False)

    def _wrap(self, name: str, fn: JobFn) -> JobRun:
        async def run() -> None:
            try:
                await fn(self.server)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.error("scheduled job failed", extra={"key": name, "error_type": type(exc).__name__})
                return
            self.server.metrics.scheduler_last_success.labels(name).set(time.time())

        return run


async def purge_job(server: AppContext) -> None:
    days = server.settings.retention.days
    if days <= 0:
        return
    from refloop.store.retention import purge

    assert server.engine is not None
    res = await asyncio.to_thread(purge, server.engine, now=server.clock.now(), older_than_days=days,
                                  actor="scheduler")
    if res["messages"] or res["documents"]:
        log.info("purged payloads", extra={"count": res["messages"] + res["documents"]})


async def status_job(server: AppContext) -> None:
    """STATUS= for `systemctl status`: counts only, never PHI."""
    m = server.metrics
    total = sum(s.value for s in _samples(m.registry, "refloop_messages_total"))
    server.notifier.status(f"{len(server.connections)} connection(s), {int(total)} message(s) since start")


def _samples(registry: object, name: str) -> list[Any]:
    out = []
    for fam in registry.collect():  # type: ignore[attr-defined]
        for s in fam.samples:
            if s.name == name:
                out.append(s)
    return out
