"""Driver-level execution for the few statements every message runs.

Even ``Connection.exec_driver_sql`` spends ~30 µs per statement in SQLAlchemy (execution context, result
proxy, events) against ~10 µs in the driver. The writer runs 7–10 statements per message, so the hot
path executes them on the connection's own DBAPI cursor, inside the transaction SQLAlchemy began.
Driver errors are re-raised as SQLAlchemy's ``DBAPIError`` (parameters hidden), so callers handle one
exception family: a database problem still turns the whole group into AR answers.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

_ROW_TYPES: dict[tuple[str, ...], Any] = {}


def _cursor(conn: Connection) -> Any:
    """One cursor per DB-API connection, kept in the pool record's ``info`` (dropped with the connection
    when it is invalidated). A psycopg cursor costs ~20 µs to create (it copies the adapters map), ten times
    a message; every caller here reads its rows before the next statement, so sharing one is safe."""
    fairy = conn.connection
    cur = fairy.info.get("refloop_cursor")
    if cur is None:
        cur = fairy.info["refloop_cursor"] = fairy.dbapi_connection.cursor()  # type: ignore[union-attr]
    return cur


def _wrap(conn: Connection, sql: str, exc: Exception) -> Exception:
    dbapi = conn.dialect.loaded_dbapi
    return DBAPIError.instance(sql, None, exc, dbapi.Error, hide_parameters=True, dialect=conn.dialect,
                               ismulti=False)


def execute(conn: Connection, sql: str, params: Sequence[Any] = ()) -> Any:
    """Run one statement; returns the DBAPI cursor (``lastrowid``, ``fetchone``...)."""
    cur = _cursor(conn)
    try:
        cur.execute(sql, params)
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _wrap(conn, sql, exc) from None
    return cur


def rollback_to(conn: Connection, name: str) -> None:
    """Undo everything since ``SAVEPOINT name`` and drop the savepoint (the transaction goes on)."""
    execute(conn, f"ROLLBACK TO SAVEPOINT {name}")
    execute(conn, f"RELEASE SAVEPOINT {name}")


def executemany(conn: Connection, sql: str, seq: Iterable[Sequence[Any]]) -> None:
    cur = _cursor(conn)
    try:
        cur.executemany(sql, list(seq))
    except conn.dialect.loaded_dbapi.Error as exc:
        raise _wrap(conn, sql, exc) from None


def _row_type(cur: Any) -> Any:
    names = tuple(d[0] for d in cur.description)
    row_type = _ROW_TYPES.get(names)
    if row_type is None:
        row_type = _ROW_TYPES[names] = namedtuple("Row", names, rename=True)
    return row_type


def first(conn: Connection, sql: str, params: Sequence[Any] = ()) -> Any | None:
    """The first row (attribute access by column name), or None."""
    cur = execute(conn, sql, params)
    raw = cur.fetchone()
    return None if raw is None else _row_type(cur)._make(raw)


def rows(conn: Connection, sql: str, params: Sequence[Any] = ()) -> list[Any]:
    """All rows, each with attribute access by column name."""
    cur = execute(conn, sql, params)
    found = cur.fetchall()
    if not found:
        return []
    make = _row_type(cur)._make
    return [make(r) for r in found]
