"""The projector: applies journaled rows to the referral state, in journal order, in batches.

The ACK path (``ingest.py``) only journals. Everything a message *does* (events, projection, links, outbox
rows) happens here, on a thread of its own with its own connection: the oldest unapplied rows, one
transaction per batch, each through the one dispatch (:func:`refloop.routes.dispatch.apply_row`). A
handler that raises is redone in a savepoint and its row marked ``failed`` (metric, log with IDs only,
``refloop replay`` after the fix); the batch goes on. Each row records ``applied_at`` in the same
transaction as its effects, so a crash before COMMIT leaves it ``queued`` and it is applied again from
scratch on start-up, never twice.

On SQLite the journal writer goes first (:mod:`refloop.daemon.gate`). On PostgreSQL several daemons may
share the database: exactly one projects at a time (a session advisory lock), the others journal and
acknowledge; with ``ack_after = "applied"`` they learn of the leader's commits by polling.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

from refloop.clock import Clock
from refloop.config import Settings
from refloop.daemon.gate import SLICE, WriteGate
from refloop.daemon.ingest import Acks, frame
from refloop.daemon.metrics import Metrics
from refloop.routes.dispatch import Applied, HandlerCrashed, apply_row
from refloop.routes.router import Router
from refloop.store import journal, rawsql
from refloop.store.engine import sqlite_path
from refloop.store.models import Outcome

log = logging.getLogger("refloop.projector")

#: pg_advisory_lock key held by the one projecting daemon ("rflp").
ADVISORY_KEY = 0x72666C70
#: Rows read by a batch's first query; each further read takes four times more, up to the batch size. A
#: batch that gives the lock back to the journal writer after :data:`~refloop.daemon.gate.SLICE` has
#: applied a few rows: reading (and decoding) a full batch of raw frames for those cost more than applying.
FIRST_PAGE = 8
#: How often the lag is re-read from the database while busy (in between, the in-memory count is used).
REFRESH_SECONDS = 0.5


@dataclass(frozen=True)
class ApplyResult:
    """What a waiting connection needs once its message is applied (``ack_after = "applied"``)."""

    ack: bytes | None
    ack_code: str
    err_code: int | None
    outcome: str


@dataclass
class Lag:
    """Journaled but not yet applied: how many, and the age of the oldest (refreshed from the database)."""

    messages: int = 0
    seconds: float = 0.0


class Core:
    """The batch logic without a thread: used by the daemon's projector, ``refloop replay`` and tests."""

    def __init__(self, settings: Settings, router: Router, clock: Clock, acks: Acks | None = None,
                 gate: WriteGate | None = None, metrics: Metrics | None = None, batch_size: int = 200) -> None:
        self.settings = settings
        self.router = router
        self.clock = clock
        self.acks = acks or Acks(settings, clock)
        self.gate = gate or WriteGate(enabled=False)
        self.metrics = metrics
        self.batch_size = batch_size

    def batch(self, conn: Connection) -> list[tuple[Any, Applied, ApplyResult]]:
        """Apply one batch and commit it; returns what was applied (empty: nothing waits)."""
        failing: set[int] = set()
        while True:
            try:
                with self.gate.background(), conn.begin():
                    return self._apply_rows(conn, failing)
            except HandlerCrashed as crashed:  # rolled back: redo the batch with a savepoint around that row
                failing.add(int(crashed.args[0]))

    def _apply_rows(self, conn: Connection, failing: set[int]) -> list[tuple[Any, Applied, ApplyResult]]:
        done: list[tuple[Any, Applied, ApplyResult]] = []
        t0 = time.perf_counter()
        page, after = FIRST_PAGE, 0
        while len(done) < self.batch_size:
            rows = journal.unapplied(conn, min(page, self.batch_size - len(done)), after)
            if not rows:
                break
            for row in rows:
                if done and self.gate.writer_waiting and time.perf_counter() - t0 >= SLICE:
                    return done  # the journal writer goes first: commit what is applied, give it the lock
                fresh = row.outcome == Outcome.QUEUED
                applied = apply_row(conn, row, settings=self.settings, router=self.router, clock=self.clock,
                                    replay=not fresh, savepoint=int(row.id) in failing)
                done.append((row, applied, self._record(conn, row, applied, fresh)))
            after, page = int(rows[-1].id), page * 4
        return done

    def _record(self, conn: Connection, row: Any, applied: Applied, fresh: bool) -> ApplyResult:
        now = self.clock.now()
        err = applied.error
        ack_text, ack_code, send = row.ack, row.ack_code, False
        if fresh and self.settings.mllp.ack_after == "applied":
            ack_code, send = self.acks.mode_code(applied.message, applied.code, retryable=False)
            ack_text = self.acks.text(applied.message, ack_code, err)
        journal.mark_applied(conn, int(row.id), {
            "outcome": applied.outcome, "ack_code": ack_code, "err_code": err.code if err else None,
            "ack": ack_text, "detail": (applied.detail or applied.outcome)[:255],
            "patient_key": applied.unlinked_patient or None, "applied_at": now,
            "replayed_at": None if fresh else now,
        })
        if not fresh or self.settings.mllp.ack_after == "applied":
            # A resend is answered with what the sender was (or would now be) told.
            journal.update_key(conn, int(row.id), applied.code, err.code if err else None,
                               err.text if err else "", err.location if err else "")
        if applied.outcome == Outcome.FAILED:
            log.error("message failed to apply", extra={"message_id": int(row.id), "control_id": row.control_id})
        if self.metrics is not None:
            self.metrics.applied.labels(applied.outcome).inc()
        # Framed for every fresh row in applied mode, not only those expected when the batch ran: a resend
        # on this daemon may start waiting for this row while the batch is being applied.
        data = frame(ack_text, row.encoding or "latin-1") if (send and ack_text) else None
        return ApplyResult(data, ack_code, err.code if err else None, applied.outcome)

    def drain(self, engine: Engine, max_batches: int = 1_000_000) -> Counter[str]:
        """Apply until nothing waits (``refloop replay``, tests); returns outcomes applied."""
        outcomes: Counter[str] = Counter()
        with engine.connect() as conn:
            conn = conn.execution_options(sqlite_begin="IMMEDIATE")
            for _ in range(max_batches):
                done = self.batch(conn)
                if not done:
                    break
                outcomes.update(a.outcome for _, a, _ in done)
        return outcomes


class Waiters:
    """ACKs waiting for the projector (``ack_after = "applied"``), by journal id.

    The writer registers an id *before* its COMMIT (so the projector, which cannot see the row earlier,
    always finds it); the event loop awaits it; the projector hands results over after its own COMMIT.
    Several ACKs may wait on one row (a resend that arrived while the original was still queued)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._results: dict[int, ApplyResult | None] = {}
        self._refs: dict[int, int] = {}
        self._futures: dict[int, list[asyncio.Future[ApplyResult]]] = {}

    def expect(self, ids: list[int]) -> None:
        with self._lock:
            for mid in ids:
                self._results.setdefault(mid, None)
                self._refs[mid] = self._refs.get(mid, 0) + 1

    def forget(self, ids: list[int]) -> None:
        """The journal COMMIT that registered these waits failed: nobody will wait for them."""
        with self._lock:
            for mid in ids:
                self._release(mid)

    def _release(self, mid: int) -> None:
        left = self._refs.get(mid, 0) - 1
        if left > 0:
            self._refs[mid] = left
        else:
            self._refs.pop(mid, None)
            self._results.pop(mid, None)

    def pending(self) -> list[int]:
        with self._lock:
            return [mid for mid, r in self._results.items() if r is None]

    def deliver(self, results: dict[int, ApplyResult]) -> None:
        """Projector thread, after COMMIT."""
        with self._lock:
            wanted = [mid for mid in results if mid in self._results and self._results[mid] is None]
            for mid in wanted:
                self._results[mid] = results[mid]
        if wanted:
            self.loop.call_soon_threadsafe(self._wake, wanted)

    def _wake(self, ids: list[int]) -> None:
        for mid in ids:
            for fut in self._futures.pop(mid, []):
                with self._lock:
                    res = self._results.get(mid)
                    if res is not None:
                        self._release(mid)
                if res is not None and not fut.done():
                    fut.set_result(res)

    async def wait(self, mid: int) -> ApplyResult:
        with self._lock:
            res = self._results.get(mid)
            if res is not None:
                self._release(mid)
                return res
        fut: asyncio.Future[ApplyResult] = self.loop.create_future()
        self._futures.setdefault(mid, []).append(fut)
        return await fut


class Projector:
    """The daemon's projector thread (see the module docstring)."""

    def __init__(self, engine: Engine, core: Core, metrics: Metrics, loop: asyncio.AbstractEventLoop,
                 on_lag: Callable[[Lag], None] | None = None, idle_seconds: float = 0.5) -> None:
        self.engine = engine
        self.core = core
        self.metrics = metrics
        self.loop = loop
        self.on_lag = on_lag
        #: Back-pressure thresholds, kept here so the threads only wake the event loop when a side is crossed:
        #: ``limit`` is mllp.max_apply_lag, ``paused`` whether the listener is paused (both set by the server).
        self.limit = core.settings.mllp.max_apply_lag
        self.paused = False
        self.idle_seconds = idle_seconds
        self.waiters = Waiters(loop)
        self.lag = Lag()
        self.leader = engine.dialect.name == "sqlite"  # PostgreSQL: set when the advisory lock is ours
        self._sqlite = self.leader
        self._wake = threading.Event()
        self._stopping = False
        self._synchronous = ""  # SQLite: the projector connection's PRAGMA synchronous (see _connection)
        self._conn: Connection | None = None
        self._lock_conn: Connection | None = None
        self._thread = threading.Thread(target=self._run, name="refloop-projector", daemon=True)
        self._last_refresh = 0.0
        self._last_poll = 0.0
        # SQLite: a connection opened while the file is renamed away would create an empty database in its
        # place (the writer refuses the same way, see Writer._check_file).
        self._db_file = sqlite_path(engine.url.render_as_string()) if self._sqlite else None

    # -- event-loop side -----------------------------------------------------------------------
    def start(self) -> None:
        self._refresh_lag()
        self._thread.start()

    def journaled(self, queued: int) -> None:
        """Writer thread, after its COMMIT: more rows wait."""
        if queued:
            self.lag.messages += queued
            self._signal()
            self._wake.set()

    async def stop(self, grace: float) -> None:
        """Apply what is queued (bounded by ``grace`` seconds), then end the thread."""
        deadline = time.monotonic() + grace
        while self.leader and self.lag.messages > 0 and time.monotonic() < deadline and self._thread.is_alive():
            self._wake.set()
            await asyncio.sleep(0.02)
        self._stopping = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join, max(deadline - time.monotonic(), 1.0))

    # -- projector thread ----------------------------------------------------------------------
    def _run(self) -> None:
        backoff = 0.1
        while not self._stopping:
            if self.file_missing():
                self._drop()
                self._wake.wait(self.idle_seconds)
                continue
            try:
                if not self.leader:
                    self._try_lead()
                done = []
                if self.leader:
                    cpu = time.thread_time()
                    done = self.core.batch(self._connection())
                    self.metrics.apply_cpu.inc(time.thread_time() - cpu)
                if done:
                    self.waiters.deliver({int(row.id): res for row, _, res in done})
                # ACKs waiting on rows another process applied (the PostgreSQL leader; on SQLite a second
                # daemon or `refloop replay` may take a batch too).
                waiting = self._poll_others()
                backoff = 0.1
            except (SQLAlchemyError, OSError) as exc:
                # The text of a database error can quote message contents: the type only.
                log.error("projector batch failed; retrying", extra={"error_type": type(exc).__name__})
                self._drop()
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            except Exception as exc:  # a bug must not end the thread: log, back off, retry
                log.exception("projector crashed on a batch", extra={"error_type": type(exc).__name__})
                self._drop()
                time.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if done:
                self.lag.messages = max(self.lag.messages - len(done), 0)
                if time.monotonic() - self._last_refresh > REFRESH_SECONDS:
                    self._refresh_lag()
                self._signal()
                continue
            if self.lag.messages or time.monotonic() - self._last_refresh > REFRESH_SECONDS:
                self._refresh_lag()  # caught up: make sure (another process may have journaled meanwhile)
            self._signal()
            self._wake.wait(0.05 if waiting else self.idle_seconds)
            self._wake.clear()
        self._drop()

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self.engine.connect().execution_options(sqlite_begin="IMMEDIATE")
            self._synchronous = ""
        if self._sqlite:
            # In journal mode the projector's commits need not reach the disk on their own: WAL frames are
            # written in order and the journal writer's next FULL commit syncs them too; a power cut that
            # loses the tail loses the ``applied_at`` marks with the effects, so those rows are applied again
            # on start-up, never half. "applied" mode acknowledges on this commit and keeps FULL (checked on
            # every batch: SIGHUP may switch modes). The connection is invalidated, never pooled, when the
            # projector lets it go (``_drop``), so the setting never reaches another thread.
            want = "NORMAL" if self.core.settings.mllp.ack_after == "journal" else "FULL"
            if want != self._synchronous:
                cur = self._conn.connection.cursor()  # the DBAPI's: a PRAGMA inside BEGIN would be refused
                cur.execute(f"PRAGMA synchronous={want}")
                cur.close()
                self._synchronous = want
        return self._conn

    def _drop(self) -> None:
        for conn in (self._conn, self._lock_conn):
            if conn is not None:
                try:
                    conn.invalidate()
                    conn.close()
                except Exception as exc:  # already broken
                    log.debug("closing a broken connection failed", extra={"error_type": type(exc).__name__})
        self._conn = self._lock_conn = None
        if not self._sqlite:
            self.leader = False  # the session lock went with its connection

    def _try_lead(self) -> None:
        """PostgreSQL: take the advisory lock on a session of its own; held until that session ends."""
        if self._lock_conn is None:
            self._lock_conn = self.engine.connect()
        got = self._lock_conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": ADVISORY_KEY}).scalar()
        self._lock_conn.commit()
        if got:
            self.leader = True
            log.info("projecting (advisory lock taken)")

    def _poll_others(self) -> bool:
        """Release ACKs waiting on rows applied by another process; True while some still wait."""
        ids = self.waiters.pending()
        if not ids or time.monotonic() - self._last_poll < 0.05:
            return bool(ids)
        self._last_poll = time.monotonic()
        conn = self._connection()
        ph = "?" if self._sqlite else "%s"
        with conn.begin():
            rows = rawsql.rows(conn, "SELECT id, ack, ack_code, err_code, outcome, encoding FROM messages "
                               f"WHERE id IN ({', '.join([ph] * len(ids))}) AND applied_at IS NOT NULL", tuple(ids))
        done = {int(r.id): ApplyResult(frame(r.ack, r.encoding or "latin-1") if r.ack else None, r.ack_code,
                                       r.err_code, r.outcome) for r in rows}
        if done:
            self.waiters.deliver(done)
        return len(done) < len(ids)

    def file_missing(self) -> bool:
        return self._db_file is not None and not self._db_file.exists()

    def _refresh_lag(self) -> None:
        self._last_refresh = time.monotonic()
        if self.file_missing():
            return
        try:
            with self.engine.connect() as conn:
                count, seconds = journal.apply_lag(conn, self.core.clock.now())
        except SQLAlchemyError as exc:
            log.warning("apply lag not measured", extra={"error_type": type(exc).__name__})
            return
        self.lag.messages, self.lag.seconds = count, seconds
        self.metrics.apply_lag_messages.set(count)
        self.metrics.apply_lag_seconds.set(seconds)

    def _signal(self) -> None:
        """Wake the event loop only when the lag crosses a back-pressure threshold."""
        crossing = (self.lag.messages >= self.limit) if not self.paused else (self.lag.messages <= self.limit // 2)
        if crossing and self.on_lag is not None:
            self.loop.call_soon_threadsafe(self.on_lag, self.lag)
