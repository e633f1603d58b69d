"""The daemon's lifecycle, read top to bottom: startup -> serve -> shutdown.

Resources are acquired in order (engine, schema check, projector, writers, HTTP, MLLP listener) on an
``AsyncExitStack`` and released in reverse, also when start-up fails half-way (a port already in use
must not leave writer threads behind). READY=1 goes to systemd only when all of them are up. SIGTERM
stops accepting and asks every connection to finish and ACK the frames it already received (bounded by
``shutdown_grace``) and close; then the resources go in reverse order.
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
from collections.abc import Coroutine, Mapping
from dataclasses import replace
from typing import Any

from prometheus_client import CollectorRegistry
from sqlalchemy import Engine, text

from refloop.clock import Clock, SystemClock
from refloop.config import Settings, load_settings
from refloop.config.windows import windows_from_settings
from refloop.daemon.access import networks as _networks
from refloop.daemon.connections import ConnContext, Connection, Hub, Live
from refloop.daemon.gate import WriteGate
from refloop.daemon.ingest import Ingestor, Job, Result
from refloop.daemon.metrics import Metrics, type_label
from refloop.daemon.projector import Core, Lag, Projector
from refloop.daemon.protocol import MllpProtocol
from refloop.daemon.systemd import Notifier, listen_fds, watchdog_interval, watchdog_loop
from refloop.daemon.writer import Writer
from refloop.routes.router import Route, Router
from refloop.routes.table import DEFAULT_ROUTES
from refloop.store import journal, migrate
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
        self.projector: Projector = None  # type: ignore[assignment]  # set in startup
        self.gate: WriteGate | None = None  # set in startup
        self.live = Live(settings, None, _networks(settings.mllp.allow_cidrs))
        self.hub: Hub = None  # type: ignore[assignment]  # set in startup (needs the running loop)
        self.mllp_server: asyncio.base_events.Server | None = None
        self.http: Any = None
        self.mllp_port = 0
        self.http_port = 0
        self.started_at = time.time()
        self._stop: asyncio.Event | None = None
        self._stack: contextlib.AsyncExitStack | None = None
        self.jobs: Any = None
        self.extra_jobs: list[tuple[str, float, Any]] = []
        self._listening = False
        self._inherited: list[Any] = []  # socket-activated listeners (systemd)
        self._deadline = 0.0  # monotonic end of shutdown_grace, once shutdown has begun

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

    @property
    def connections(self) -> set[Connection]:
        return self.hub.connections if self.hub is not None else set()

    @property
    def lag_paused(self) -> bool:
        return self.hub is not None and self.hub.lag_paused

    @property
    def tls_context(self) -> ssl.SSLContext | None:
        return self.live.tls_context

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        return self.hub.spawn(coro)

    # -- startup -------------------------------------------------------------------------------
    async def startup(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.hub = Hub(self.loop, self.live)
        async with contextlib.AsyncExitStack() as stack:
            await self._acquire(stack)
            self._stack = stack.pop_all()  # success: shutdown() releases them
        s = self.settings
        self._install_signals()
        self._start_jobs()
        interval = watchdog_interval(self.environ)
        if interval:
            self.spawn(watchdog_loop(self.notifier, interval))
        self.notifier.ready(f"listening on MLLP port {self.mllp_port}, HTTP port {self.http_port}")
        log.info("refloop ready", extra={"mllp_port": self.mllp_port, "http_port": self.http_port,
                                         "socket_activated": bool(self._inherited), "ack_after": s.mllp.ack_after})

    async def _acquire(self, stack: contextlib.AsyncExitStack) -> None:
        """Every resource in order, each with its release on ``stack`` (unwound if a later one fails)."""
        s = self.settings
        self._load_tls(s)
        self.engine = engine = make_engine(s.database)
        stack.callback(engine.dispose)
        await asyncio.to_thread(self._check_schema, engine)
        self.metrics.database_up.set(1)
        self.gate = gate = WriteGate(enabled=is_sqlite(s.database.url))
        core = Core(s, self.router, self.clock, self.ingestor.acks, gate, self.metrics)
        self.projector = Projector(engine, core, self.metrics, self.loop, on_lag=self.on_lag)
        self.projector.start()  # resumes from the oldest unapplied row
        # What was acknowledged is applied before we go, within what is left of shutdown_grace (systemd's
        # TimeoutStopSec counts on it); what is left is safe in the journal and applied at the next start.
        stack.push_async_callback(lambda: self.projector.stop(self._grace_left()))
        self.writers = [Writer(engine, self.ingestor, self.metrics, self.loop, name=f"refloop-writer-{i}",
                               gate=gate, projector=self.projector)
                        for i in range(s.database.writer_count())]
        for writer in self.writers:
            writer.start()
            stack.push_async_callback(writer.stop)
        from refloop.daemon.http import HttpApi  # aiohttp import kept off the CLI's fast paths

        self.http = HttpApi(self)
        self.http_port = await self.http.start(s.http.host, s.http.port)
        stack.push_async_callback(self.http.stop)
        ctx = ConnContext(self.live, self.hub, self.metrics, self.clock, self.loop, self.writer_for_connection,
                          self.projector.waiters.wait, self.observe)
        self._inherited = listen_fds(self.environ, unset_environment=True).get("mllp", [])
        if self._inherited:
            sock = self._inherited[0]
            sock.setblocking(False)
            self.mllp_server = await self.loop.create_server(lambda: MllpProtocol(ctx), sock=sock)
        else:
            self.mllp_server = await self.loop.create_server(
                lambda: MllpProtocol(ctx), s.mllp.host, s.mllp.port, reuse_address=True, backlog=512
            )
        stack.push_async_callback(self._close_listener)
        sockname = self.mllp_server.sockets[0].getsockname()
        self.mllp_port = int(sockname[1])
        self._listening = self.hub.accepting = True

    async def _close_listener(self) -> None:
        if self.mllp_server is not None:
            self.mllp_server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.mllp_server.wait_closed(), 1.0)

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
            self.live.tls_context = server_context(s.mllp)
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

    def on_lag(self, lag: Lag) -> None:
        """Back-pressure, on the event loop: past ``mllp.max_apply_lag`` no socket is read until the
        projector is down to half of it. Frames already read are journaled and ACKed as usual: a sender
        sees a slower peer, never an AR for lag."""
        limit = self.settings.mllp.max_apply_lag
        if not self.hub.lag_paused and lag.messages >= limit:
            log.warning("apply lag at its limit; pausing reads", extra={"lag": lag.messages, "limit": limit})
            self.hub.set_lag_paused(True)
        elif self.hub.lag_paused and lag.messages <= limit // 2:
            log.info("apply lag down; reading again", extra={"lag": lag.messages})
            self.hub.set_lag_paused(False)
        else:
            return
        self.projector.paused = self.hub.lag_paused
        self.metrics.backpressure.set(1 if self.hub.lag_paused else 0)

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
        old_version = windows_from_settings(self.settings.stall).version
        windows_changed = windows_from_settings(kept.stall).version != old_version
        self.settings = self.live.settings = kept
        self.ingestor.reconfigure(kept)
        if self.projector is not None:
            self.projector.core.settings = kept
            self.projector.limit = kept.mllp.max_apply_lag
        self.live.allowed_networks = _networks(kept.mllp.allow_cidrs)
        if windows_changed and self.jobs is not None:
            # stale due times are recomputed by the scan in short chunks (rows are evaluated on read till then)
            log.info("stall windows changed; recomputing due times", extra={"outcome": "recompute"})
            self.jobs.run_now("stall_scan")
        self.metrics.profiles = frozenset(p.name for p in kept.profiles)
        log.info("configuration reloaded", extra={"profiles": len(kept.profiles)})
        self.notifier.ready("configuration reloaded")

    # -- shutdown ------------------------------------------------------------------------------
    async def shutdown(self) -> None:
        self.notifier.stopping("draining connections")
        if self.jobs is not None:
            self.jobs.shutdown()
        if self.mllp_server is not None:
            self.mllp_server.close()  # no new connections; the open ones are asked to finish below
        # Frames already received are committed and ACKed; a half-received one is journaled as broken.
        self._deadline = time.monotonic() + self.settings.mllp.shutdown_grace
        cut = await self.hub.shutdown(self.settings.mllp.shutdown_grace) if self.hub is not None else 0
        if self._stack is not None:
            await self._stack.aclose()  # listener, HTTP, writers, projector, engine: the reverse of start-up
        if self.hub is not None:
            self.hub.cancel_tasks()
        self._listening = False
        log.info("refloop stopped", extra={"frames_cut": cut})

    def _grace_left(self) -> float:
        return max(self._deadline - time.monotonic(), 1.0) if self._deadline else self.settings.mllp.shutdown_grace

    def apply_lag(self) -> tuple[int, float] | None:
        """For /readyz: (messages journaled but not applied, age of the oldest in seconds), read now."""
        assert self.engine is not None
        if self.projector is not None and self.projector.file_missing():
            return None
        try:
            with self.engine.connect() as conn:
                return journal.apply_lag(conn, self.clock.now())
        except Exception:
            return None

    def ingest_idle(self) -> bool:
        """No frame queued or being committed by any journal writer: background writers go between frames."""
        return all(w.idle() for w in self.writers)

    def background_turn(self) -> contextlib.AbstractContextManager[None]:
        """The write gate's background turn (the scan's chunks; a no-op before start-up and on PostgreSQL)."""
        return self.gate.background() if self.gate is not None else contextlib.nullcontext()

    def database_ping(self) -> bool:
        """For /readyz: a fresh connection and a trivial query (not the writer's)."""
        assert self.engine is not None
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
            return True
        except Exception:
            return False


