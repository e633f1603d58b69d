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
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from refloop import stall
from refloop.config.windows import windows_from_settings

if TYPE_CHECKING:
    from refloop.daemon.app import AppContext

log = logging.getLogger("refloop.scheduler")

JobFn = Callable[["AppContext"], Awaitable[object]]
JobRun = Callable[[], Coroutine[Any, Any, None]]


class Jobs:
    def __init__(self, server: AppContext) -> None:
        self.server = server
        self.scheduler = AsyncIOScheduler(event_loop=server.loop, timezone="UTC")
        self._jobs: dict[str, tuple[BaseTrigger, JobFn]] = {}

    def add(self, name: str, every_seconds: float, fn: JobFn) -> None:
        self._jobs[name] = (IntervalTrigger(seconds=every_seconds), fn)

    def add_daily(self, name: str, hour: int, zone: str, fn: JobFn) -> None:
        """Once a day at *hour* local time in *zone* (the clinic's, ``stall.timezone``), DST included."""
        self._jobs[name] = (CronTrigger(hour=hour, minute=0, timezone=zone), fn)

    def start(self) -> None:
        for name, (trigger, fn) in self._jobs.items():
            self.scheduler.add_job(self._wrap(name, fn), trigger, id=name, name=name,
                                   coalesce=True, max_instances=1, misfire_grace_time=None)
            # ... and once at start-up (missed runs are caught up by recomputing from the database).
            self.run_now(name)
        self.scheduler.start()

    def run_now(self, name: str) -> None:
        """One extra run of a job now (e.g. the scan after a window change), outside its schedule."""
        if name in self._jobs:
            self.server.spawn(self._wrap(name, self._jobs[name][1])())

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
    m.business_hours.set(1 if stall.business_hours(windows_from_settings(server.settings.stall),
                                                   server.clock.now()) else 0)
    total = sum(s.value for s in _samples(m.registry, "refloop_messages_total"))
    server.notifier.status(f"{len(server.connections)} connection(s), {int(total)} message(s) since start")


def _samples(registry: object, name: str) -> list[Any]:
    out = []
    for fam in registry.collect():  # type: ignore[attr-defined]
        for s in fam.samples:
            if s.name == name:
                out.append(s)
    return out
