"""The SQL floor of a scan: the statements it ran, replayed with the sqlite3 module alone on a copy of the
store as it was before, in the same transactions. What is left of the scan's time beyond this is Python
(refloop's and SQLAlchemy's); what this costs is what the design (rows and index entries written per
change, one short transaction per chunk) costs before any Python runs.

Used by :mod:`bench.store` for the scan one day later: :class:`Recorder` keeps every statement the engine
sends (a reference to its parameters, no conversion: a few hundred nanoseconds each) and every COMMIT;
:func:`replay` runs them on the copy with the daemon's pragmas.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event

from refloop.store.engine import SQLITE_PRAGMAS


class Recorder:
    """Statements and commits an engine sends while attached, in order."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.log: list[tuple[str | None, Any]] = []

    def _statement(self, _conn: Any, _cur: Any, statement: str, params: Any, _ctx: Any, _many: bool) -> None:
        self.log.append((statement, params))

    def _commit(self, _conn: Any) -> None:
        self.log.append((None, None))

    def __enter__(self) -> Recorder:
        event.listen(self.engine, "before_cursor_execute", self._statement)
        event.listen(self.engine, "commit", self._commit)
        return self

    def __exit__(self, *_exc: object) -> None:
        event.remove(self.engine, "before_cursor_execute", self._statement)
        event.remove(self.engine, "commit", self._commit)


def snapshot(engine: Engine, db: Path) -> Path:
    """A copy of *db* as it is now (checkpointed first; the engine's connections are closed), synced to disk
    so that writing it back does not slow what is measured next."""
    engine.dispose()
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()
    copy = db.with_name(f"floor-{db.name}")
    shutil.copyfile(db, copy)
    os.sync()
    return copy


def _rows(params: Any) -> list[tuple[Any, ...]] | None:
    """executemany's rows, or None for one statement's parameters."""
    if isinstance(params, list | tuple) and params and isinstance(params[0], list | tuple | dict):
        return [tuple(p) for p in params]
    return None


def replay(copy: Path, log: list[tuple[str | None, Any]]) -> float:
    """Seconds to run *log* on *copy* with sqlite3 alone (autocommit off by hand: BEGIN was recorded)."""
    conn = sqlite3.connect(copy, isolation_level=None)
    try:
        for pragma in SQLITE_PRAGMAS:
            conn.execute(f"PRAGMA {pragma}")
        started = time.perf_counter()
        for statement, params in log:
            if statement is None:
                conn.execute("COMMIT")
            elif (rows := _rows(params)) is not None:
                conn.executemany(statement, rows)
            else:
                conn.execute(statement, tuple(params or ())).fetchall()
        return time.perf_counter() - started
    finally:
        conn.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{copy}{suffix}").unlink(missing_ok=True)
