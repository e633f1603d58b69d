"""The daemon's lifecycle, read top to bottom: startup -> serve -> shutdown.

Resources are acquired in order (engine, schema check, writer, HTTP, MLLP listener) and released in
reverse. READY=1 goes to systemd only when all of them are up. SIGTERM stops accepting, lets every
connection finish and ACK the frames it already received (bounded by ``shutdown_grace``), then closes.
SIGHUP re-reads the configuration and applies sender profiles and limits without dropping connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import time
from collections import Counter as Tally
from collections.abc import Coroutine, Mapping
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, text

from refloop.clock import Clock, SystemClock
from refloop.config import Settings, load_settings
from refloop.config.windows import windows_from_settings
from refloop.daemon.access import in_networks as _in_networks
from refloop.daemon.access import networks as _networks
from refloop.daemon.ingest import Ingestor, Job, Result
from refloop.daemon.metrics import Metrics, type_label
from refloop.daemon.protocol import MllpProtocol
from refloop.daemon.systemd import Notifier, listen_fds, watchdog_interval, watchdog_loop
from refloop.daemon.writer import Writer
from refloop.routes.router import Route, Router
from refloop.routes.table import DEFAULT_ROUTES
from refloop.store import migrate
from refloop.store.engine import is_sqlite, make_engine

log = logging.getLogger("refloop.server")


class StartupError(Exception):
    """Start-up cannot continue; the message is one line an operator can act on."""


class Server:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        routes: tuple[Route, ...] = DEFAULT_ROUTES,
        registry: CollectorRegistry | None = None,
        environ: Mapping[str, str] | None = None,
        migrate_schema: bool = False,
    ) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.router = Router(routes)
        self.environ = dict(os.environ if environ is None else environ)
        self.migrate_schema = migrate_schema
        self.metrics = Metrics(registry, tuple(p.name for p in settings.profiles))
        self.notifier = Notifier.from_environ(self.environ)
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]  # set in startup
        self.engine: Engine | None = None
        self.writers: list[Writer] = []  # set in startup; one per database.writers
        self._next_writer = 0
        self.ingestor = Ingestor(settings, self.router, self.clock)
        self.connections: set[MllpProtocol] = set()
        self.per_ip: Tally[str] = Tally()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.mllp_server: asyncio.base_events.Server | None = None
        self.http: Any = None
        self.mllp_port = 0
        self.http_port = 0
        self.started_at = time.time()
        self._stop: asyncio.Event | None = None
        self.tls_context: ssl.SSLContext | None = None
        self.allowed_networks = _networks(settings.mllp.allow_cidrs)
        self.jobs: Any = None
        self.extra_jobs: list[tuple[str, float, Any]] = []
        self._accepting = False
        self._listening = False

    # -- public --------------------------------------------------------------------------------
    async def serve(self) -> None:
        self._stop = asyncio.Event()
        await self.startup()
        try:
            await self._stop.wait()
        finally:
            await self.shutdown()

    def request_stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def writer_for_connection(self) -> Writer:
        """Round robin over the writers, fixed for a connection's life so its messages stay in order."""
        writer = self.writers[self._next_writer % len(self.writers)]
        self._next_writer += 1
        return writer

    @property
    def listening(self) -> bool:
        return self._listening

    # -- startup -------------------------------------------------------------------------------
    async def startup(self) -> None:
        self.loop = asyncio.get_running_loop()
        s = self.settings
        self._load_tls(s)
        self.engine = make_engine(s.database)
        await asyncio.to_thread(self._check_schema, self.engine)
        self.metrics.database_up.set(1)
        self.writers = [Writer(self.engine, self.ingestor, self.metrics, self.loop, name=f"refloop-writer-{i}")
                        for i in range(s.database.writer_count())]
        for writer in self.writers:
            writer.start()
        from refloop.daemon.http import HttpApi  # aiohttp import kept off the CLI's fast paths

        self.http = HttpApi(self)
        self.http_port = await self.http.start(s.http.host, s.http.port)
        inherited = listen_fds(self.environ, unset_environment=True).get("mllp", [])
        if inherited:
            sock = inherited[0]
            sock.setblocking(False)
            self.mllp_server = await self.loop.create_server(lambda: MllpProtocol(self), sock=sock)
        else:
            self.mllp_server = await self.loop.create_server(
                lambda: MllpProtocol(self), s.mllp.host, s.mllp.port, reuse_address=True, backlog=512
            )
        sockname = self.mllp_server.sockets[0].getsockname()
        self.mllp_port = int(sockname[1])
        self._listening = self._accepting = True
        self._install_signals()
        self._start_jobs()
        interval = watchdog_interval(self.environ)
        if interval:
            self.spawn(watchdog_loop(self.notifier, interval))
        self.notifier.ready(f"listening on MLLP port {self.mllp_port}, HTTP port {self.http_port}")
        log.info("refloop ready", extra={"mllp_port": self.mllp_port, "http_port": self.http_port,
                                         "socket_activated": bool(inherited)})

    def _start_jobs(self) -> None:
        from refloop.daemon.scheduler import Jobs, purge_job, status_job

        self.jobs = Jobs(self)
        self.jobs.add("retention_purge", self.settings.retention.check_hours * 3600, purge_job)
        self.jobs.add("status", 30.0, status_job)
        from refloop.notify.scan import digest_job, dispatch_job, scan_job

        self.jobs.add("stall_scan", self.settings.stall.scan_minutes * 60, scan_job)
        self.jobs.add("outbox_dispatch", self.settings.notify.dispatch_seconds, dispatch_job)
        self.jobs.add_daily("digest", self.settings.worklist.digest_hour, self.settings.stall.timezone, digest_job)
        for name, every, fn in self.extra_jobs:
            self.jobs.add(name, every, fn)
        self.jobs.start()

    def _load_tls(self, s: Settings) -> None:
        from refloop.daemon.tls import TlsConfigError, certificate_expiry, server_context

        try:
            self.tls_context = server_context(s.mllp)
        except TlsConfigError as exc:
            raise StartupError(str(exc)) from None
        if s.mllp.tls_cert:
            expiry = certificate_expiry(s.mllp.tls_cert)
            if expiry is not None:
                self.metrics.certificate_expiry().set(expiry)

    def _check_schema(self, engine: Engine) -> None:
        try:
            up_to_date = migrate.is_up_to_date(engine)
        except Exception as exc:
            raise StartupError(f"cannot open the database ({type(exc).__name__})") from None
        if up_to_date:
            return
        if self.migrate_schema or self.settings.database.auto_migrate or is_sqlite(self.settings.database.url):
            log.info("applying database migrations")
            migrate.upgrade(engine)
            return
        raise StartupError("the database schema is out of date: run `refloop db upgrade` (or serve --migrate)")

    def _install_signals(self) -> None:
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            self.loop.add_signal_handler(signal.SIGTERM, self.request_stop)
            self.loop.add_signal_handler(signal.SIGINT, self.request_stop)
            self.loop.add_signal_handler(signal.SIGHUP, lambda: self.spawn(self.reload()))

    # -- connections ---------------------------------------------------------------------------
    def admit(self, proto: MllpProtocol) -> str | None:
        limits = self.settings.mllp
        if not self._accepting:
            return "shutting_down"
        if len(self.connections) >= limits.max_connections:
            return "max_connections"
        if self.per_ip[proto.peer] >= limits.max_connections_per_ip:
            return "max_per_ip"
        if self.allowed_networks and not _in_networks(proto.peer, self.allowed_networks):
            return "not_allowed"
        self.connections.add(proto)
        self.per_ip[proto.peer] += 1
        return None

    def release(self, proto: MllpProtocol) -> None:
        if proto in self.connections:
            self.connections.discard(proto)
            self.per_ip[proto.peer] -= 1
            if self.per_ip[proto.peer] <= 0:
                del self.per_ip[proto.peer]

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Tasks are held strongly until done (the loop only keeps weak references)."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def observe(self, job: Job, result: Result) -> None:
        """Metrics and the one log line per message: IDs, codes and durations only, never content."""
        m = self.metrics
        sender = m.sender_label(result.profile)
        if result.outcome:
            m.outcomes.labels(result.outcome).inc()
        if result.message_type or result.outcome in ("processed", "ignored", "rejected", "error",
                                                     "failed", "duplicate"):
            m.messages.labels(type_label(result.message_type), sender).inc()
            m.last_message.labels(sender).set(time.time())
        if result.duplicate_of is not None:
            m.duplicates.inc()
        if "sender_not_permitted" in result.flags:
            m.sender_rejected.inc()
            log.warning("sender not permitted for this peer", extra={"control_id": result.control_id,
                                                                    "sender": result.profile})
        if "control_id_reused" in result.flags:
            m.control_id_reused.inc()
        if result.decode_fallback:
            m.decode_fallback.labels(sender).inc()
        if result.app_ack_requested:
            m.app_ack_unsupported.inc()
        log.info(
            "message",
            extra={
                "message_id": result.message_id, "control_id": result.control_id,
                "type": f"{result.message_type}^{result.trigger}" if result.message_type else "",
                "sender": result.profile, "outcome": result.outcome, "ack": result.ack_code,
                "err": result.err_code, "duplicate_of": result.duplicate_of,
                "ms": round((time.perf_counter() - job.started) * 1000, 3),
            },
        )

    # -- reload --------------------------------------------------------------------------------
    async def reload(self) -> None:
        """SIGHUP: new profiles and limits; addresses and the database need a restart."""
        self.notifier.reloading("reloading configuration")
        try:
            new = load_settings(self.settings.config_path or None, self.environ)
        except Exception as exc:
            log.error("reload failed; keeping the running configuration", extra={"error": str(exc)})
            self.notifier.ready("reload failed; running configuration kept")
            return
        kept = replace(
            new, database=self.settings.database,
            mllp=replace(new.mllp, host=self.settings.mllp.host, port=self.settings.mllp.port),
            http=self.settings.http,
        )
        try:
            self._load_tls(kept)  # new certificate and key files are picked up here
        except StartupError as exc:
            log.error("reload failed; keeping the running configuration", extra={"error": str(exc)})
            self.notifier.ready("reload failed; running configuration kept")
            return
        version = windows_from_settings(self.settings.stall).version
        windows_changed = windows_from_settings(kept.stall).version != version
        self.settings = kept
        self.ingestor.settings = kept
        if windows_changed and self.jobs is not None:
            # stale due times are recomputed by the scan in short chunks (rows are evaluated on read till then)
            log.info("stall windows changed; recomputing due times", extra={"outcome": "recompute"})
            self.jobs.run_now("stall_scan")
        self.allowed_networks = _networks(kept.mllp.allow_cidrs)
        self.metrics.profiles = frozenset(p.name for p in kept.profiles)
        log.info("configuration reloaded", extra={"profiles": len(kept.profiles)})
        self.notifier.ready("configuration reloaded")

    # -- shutdown ------------------------------------------------------------------------------
    async def shutdown(self) -> None:
        self._accepting = False
        self.notifier.stopping("draining connections")
        if self.jobs is not None:
            self.jobs.shutdown()
        if self.mllp_server is not None:
            self.mllp_server.close()
        for proto in list(self.connections):
            proto.draining = True
        grace = self.settings.mllp.shutdown_grace
        deadline = self.loop.time() + grace
        # Frames already received are committed and ACKed (no new frame starts: protocols are draining).
        in_flight = [p.pump for p in self.connections if p.pump is not None]
        if in_flight:
            await asyncio.wait(in_flight, timeout=grace)
        cut = sum(len(p.pending) + (1 if p.framer.in_frame else 0) for p in self.connections)
        for proto in list(self.connections):
            # A frame half-received when we stop is journaled as broken, so nothing is lost silently.
            proto.abandon_partial("shutdown")
            proto.close("shutdown")
        for _ in range(3):
            await asyncio.sleep(0)  # connection_lost callbacks queue the broken frames
        pumps = [p.pump for p in list(self.connections) if p.pump is not None]
        pumps += [t for t in self.tasks if t.get_coro().__qualname__.endswith("_pump")]  # type: ignore[union-attr]
        if pumps:
            await asyncio.wait(pumps, timeout=max(deadline - self.loop.time(), 1.0))
        for writer in self.writers:
            await writer.stop()
        if self.http is not None:
            await self.http.stop()
        if self.mllp_server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.mllp_server.wait_closed(), 1.0)
        for task in list(self.tasks):
            task.cancel()
        if self.engine is not None:
            self.engine.dispose()
        self._listening = False
        log.info("refloop stopped", extra={"frames_cut": cut})

    def database_ping(self) -> bool:
        """For /readyz: a fresh connection and a trivial query (not the writer's)."""
        assert self.engine is not None
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False


