"""The journal writer: group commit on its own thread, ACKs released only after COMMIT returned.

Why this shape: one fsync per message caps SQLite at ~3k msg/s (docs/performance.md); committing every
message that queued up while the previous commit ran (drain, no timer) gives ~4x at 16 connections;
doing it on a thread keeps the event loop free for framing and sockets. The group is journaled with a few
statements for all its messages (``Ingestor.journal_group``) and touches no referral table, so there is
nothing for one message to undo for another; a failed COMMIT fails the whole group, and every message in
it is answered AR (never AA for what was not stored). Accepted frames wait for the projector.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from refloop.daemon.gate import WriteGate
from refloop.daemon.ingest import Ingestor, Job, LostRace, Result, StorageError
from refloop.daemon.metrics import Metrics
from refloop.daemon.projector import Projector
from refloop.store.engine import is_sqlite, sqlite_path

log = logging.getLogger("refloop.writer")

_STOP = object()

Item = tuple[Job, asyncio.Future[Result]]


class Writer:
    def __init__(self, engine: Engine, ingestor: Ingestor, metrics: Metrics,
                 loop: asyncio.AbstractEventLoop, name: str = "refloop-writer", *,
                 gate: WriteGate | None = None, projector: Projector | None = None) -> None:
        self.engine = engine
        self.gate = gate or WriteGate(enabled=False)
        self.projector = projector
        self.ingestor = ingestor
        self.metrics = metrics
        self.loop = loop
        self._q: queue.SimpleQueue[Item | object] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._db_file: Path | None = sqlite_path(engine.url.render_as_string()) if is_sqlite(
            str(engine.url)) else None
        self._db_identity: tuple[int, int] | None = None
        self.healthy = False
        self._conn: Connection | None = None
        # frames handed in and frames committed (or failed); each counter is written by one thread only, so
        # background work can ask whether ingest is waiting (idle) without a lock
        self._submitted = 0
        self._finished = 0

    # -- event-loop side -----------------------------------------------------------------------
    def start(self) -> None:
        self._db_identity = self._identity()
        self._thread.start()

    def submit(self, job: Job) -> asyncio.Future[Result]:
        fut: asyncio.Future[Result] = self.loop.create_future()
        self._submitted += 1
        self._q.put((job, fut))
        return fut

    def idle(self) -> bool:
        """No frame queued or being committed: background writers (the stall scan) go between frames."""
        return self._submitted == self._finished

    async def stop(self) -> None:
        """Finish everything queued, then end the thread."""
        self._q.put(_STOP)
        await asyncio.to_thread(self._thread.join)

    # -- writer thread -------------------------------------------------------------------------
    def _identity(self) -> tuple[int, int] | None:
        if self._db_file is None:
            return None
        try:
            st = os.stat(self._db_file)
        except FileNotFoundError:
            return None
        return (st.st_dev, st.st_ino)

    def _check_file(self) -> None:
        """SQLite keeps writing to a file that was deleted or replaced under it: those writes would
        vanish at the next restart. Refuse (AR) while the path is gone; follow a restored file."""
        if self._db_file is None:
            return
        now = self._identity()
        if now is None:
            raise StorageError("database file missing")
        if now != self._db_identity:
            log.warning("database file replaced; reconnecting")
            self._drop_connection()
            self.engine.dispose()
            self._db_identity = now

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._q.get()
            if first is _STOP:
                break
            items: list[Item] = [first]  # type: ignore[list-item]
            while True:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                items.append(nxt)  # type: ignore[arg-type]
            self._commit_group(items)
            self._finished += len(items)
        self._drop_connection()

    def _commit_group(self, items: list[Item]) -> None:
        t0 = time.perf_counter()
        results: list[Result] = []
        preps = [self.ingestor.prepare(job) for job, _ in items]  # no database: parse, checks, validators
        waiting: list[int] = []
        try:
            self._check_file()
            conn = self._connection()
            for _attempt in range(4):
                try:
                    with self.gate.writer(), conn.begin():
                        results = self.ingestor.journal_group(conn, preps)
                        waiting = [r.awaits for r in results if r.await_apply and r.awaits is not None]
                        if waiting and self.projector is not None:
                            self.projector.waiters.expect(waiting)  # before COMMIT: the projector cannot be faster
                    break
                except LostRace:  # another daemon committed one of these meanwhile: the retry sees its claim
                    preps = [self.ingestor.prepare(job) for job, _ in items]
            else:
                raise StorageError("dedup race did not settle")
            ok = True
        except (SQLAlchemyError, StorageError, OSError) as exc:
            ok = False
            self.metrics.storage_failures.inc()
            # str(exc) of a database error can quote message contents: log the type only.
            log.error("group commit failed", extra={"error_type": type(exc).__name__, "messages": len(items)})
        except Exception as exc:  # a bug must not kill the writer thread: fail this group, keep going
            ok = False
            self.metrics.storage_failures.inc()
            log.exception("writer crashed on a group", extra={"error_type": type(exc).__name__})
        if not ok:
            self._drop_connection()  # reconnect next time: the database may be back by then
            results = [self.ingestor.storage_failure(job) for job, _ in items]
            if waiting and self.projector is not None:
                self.projector.waiters.forget(waiting)  # rolled back: those ids will never be applied
        elif self.projector is not None:
            self.projector.journaled(sum(1 for r in results if r.queued))
        self.healthy = ok
        self.metrics.database_up.set(1 if ok else 0)
        self.metrics.commit_seconds.observe(time.perf_counter() - t0)
        self.metrics.batch_size.observe(len(items))
        self.loop.call_soon_threadsafe(_resolve_all, [f for _, f in items], results)

    def _connection(self) -> Connection:
        """One connection held by the writer thread across groups (a pool checkout per group costs more
        than a message); dropped and re-opened after any failure."""
        if self._conn is None or self._conn.closed:
            self._conn = self.engine.connect().execution_options(sqlite_begin="IMMEDIATE")
        return self._conn

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.invalidate()
                conn.close()
            except Exception as exc:  # already broken: nothing more to release
                log.debug("closing a broken connection failed", extra={"error_type": type(exc).__name__})

    # -- used by replay and tests --------------------------------------------------------------
    def run_sync(self, fn: Callable[[Connection], object]) -> object:  # pragma: no cover - helper
        with self.engine.begin() as conn:
            return fn(conn)


def _resolve_all(futures: list[asyncio.Future[Result]], results: list[Result]) -> None:
    for fut, res in zip(futures, results, strict=True):
        if not fut.done():
            fut.set_result(res)
