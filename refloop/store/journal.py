"""The journal's hot statements, as plain SQL prepared once per dialect.

Every message costs four of these (insert, dedup lookup, claim, final update), inside the writer's
group commit. Built with SQLAlchemy constructs they cost 50–200 µs each on this machine kind, most of it
statement construction and cache keying; as driver-level SQL they cost ~20 µs. The column lists come from
the models, so the SQL cannot drift from the schema (``tests/test_store.py`` runs it on both databases).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection

from refloop.store import rawsql
from refloop.store.models import Message, MessageKey

JOURNAL_COLUMNS = tuple(c.name for c in Message.__table__.columns if c.name != "id")
KEY_COLUMNS = tuple(c.name for c in MessageKey.__table__.columns if c.name != "id")

_DEFAULTS: dict[str, Any] = {
    "peer": "", "raw": None, "size": 0, "content_hash": "", "encoding": "", "sending_application": "",
    "sending_facility": "", "message_type": "", "trigger_event": "", "control_id": "", "version": "",
    "processing_id": "", "profile": "", "outcome": "", "ack_code": "", "err_code": None, "ack": "",
    "detail": "", "flags": "", "duplicate_of": None, "replayed_at": None, "patient_key": None,
}
UPDATABLE = ("outcome", "ack_code", "err_code", "ack", "detail", "flags", "duplicate_of", "patient_key")


def sqlite_time(value: datetime) -> str:
    """SQLAlchemy's own SQLite storage format (UTC, no offset), so ORM reads and SQL comparisons agree."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


class HotSql:
    def __init__(self, dialect: str) -> None:
        self.sqlite = dialect == "sqlite"
        ph = "?" if self.sqlite else "%s"
        cols = ", ".join(JOURNAL_COLUMNS)
        marks = ", ".join([ph] * len(JOURNAL_COLUMNS))
        self.insert = f"INSERT INTO messages ({cols}) VALUES ({marks})" + ("" if self.sqlite else " RETURNING id")
        sets = ", ".join(f"{c} = {ph}" for c in UPDATABLE)
        self.update = f"UPDATE messages SET {sets} WHERE id = {ph}"
        self.find_keys = (
            "SELECT content_hash, message_id, ack_code, err_code, err_text, err_location FROM message_keys "
            f"WHERE sending_application = {ph} AND sending_facility = {ph} AND control_id = {ph}"
        )
        kcols = ", ".join(KEY_COLUMNS)
        kmarks = ", ".join([ph] * len(KEY_COLUMNS))
        conflict = "" if self.sqlite else " ON CONSTRAINT uq_message_keys_key"
        self.claim = (f"INSERT INTO message_keys ({kcols}) VALUES ({kmarks}) "
                      f"ON CONFLICT{conflict} DO NOTHING RETURNING id")


_CACHE: dict[str, HotSql] = {}


def hot(conn: Connection) -> HotSql:
    name = conn.dialect.name
    sql = _CACHE.get(name)
    if sql is None:
        sql = _CACHE[name] = HotSql(name)
    return sql


def insert_message(conn: Connection, row: dict[str, Any]) -> int:
    sql = hot(conn)
    values = {**_DEFAULTS, **row}
    if sql.sqlite:
        values["received_at"] = sqlite_time(values["received_at"])
    params = tuple(values[c] for c in JOURNAL_COLUMNS)
    cur = rawsql.execute(conn, sql.insert, params)
    if sql.sqlite:
        return int(cur.lastrowid)
    return int(cur.fetchone()[0])


def update_message(conn: Connection, message_id: int, values: dict[str, Any]) -> None:
    params = (*(values.get(c, _DEFAULTS[c]) for c in UPDATABLE), message_id)
    rawsql.execute(conn, hot(conn).update, params)


def find_keys(conn: Connection, app: str, facility: str, control_id: str) -> list[Any]:
    return rawsql.execute(conn, hot(conn).find_keys, (app, facility, control_id)).fetchall()


def claim_key(conn: Connection, row: dict[str, Any]) -> bool:
    """True when this message now holds the key; False when another message (or daemon) has it."""
    params = tuple(row[c] for c in KEY_COLUMNS)
    return rawsql.execute(conn, hot(conn).claim, params).fetchone() is not None
