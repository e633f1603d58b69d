"""Engines from :class:`DatabaseSettings`, with the settings durability depends on.

SQLite: WAL (readers never block the writer), ``synchronous=FULL`` (a COMMIT that returned survives a
power cut: the promise behind every AA), foreign keys, and a busy timeout so lock contention becomes an
AR instead of a hang. pysqlite's own transaction handling is switched off and BEGIN is emitted by us
(SQLAlchemy's documented recipe) so that SAVEPOINTs work. Every engine hides bound parameters from
error text, because those parameters are message contents (PHI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

from refloop.config import DatabaseSettings


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL, or None for in-memory."""
    db = make_url(url).database
    if not db or db == ":memory:":
        return None
    return Path(db)


#: Set on every SQLite connection (after ``busy_timeout``): WAL, FULL commits (what an ACK waits for is on
#: disk), foreign keys, and deleted PHI overwritten in the file rather than left in free pages.
SQLITE_PRAGMAS: Final = ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON", "secure_delete=ON")


def make_engine(db: DatabaseSettings, **kw: Any) -> Engine:
    url = db.url
    if is_sqlite(url):
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, hide_parameters=True, connect_args={"check_same_thread": False}, **kw
        )
        busy = int(db.busy_timeout_ms)

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (savepoints need it)
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={busy}")
            for pragma in SQLITE_PRAGMAS:
                cur.execute(f"PRAGMA {pragma}")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Any) -> None:
            mode = conn.get_execution_options().get("sqlite_begin", "")
            conn.exec_driver_sql(f"BEGIN {mode}".strip())

        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    # The writers hold their connections for the daemon's life; HTTP reads, the scan and the dispatcher
    # need theirs besides, without opening and closing overflow connections all day.
    kw.setdefault("pool_size", db.writer_count() + 5)
    return create_engine(url, hide_parameters=True, pool_pre_ping=True, **kw)
