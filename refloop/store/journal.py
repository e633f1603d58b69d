"""The journal's hot statements, as plain SQL prepared once per dialect.

The ACK path costs three statements per *group* (one dedup lookup, one journal insert, one claim insert,
each covering every message of the group commit); the projector reads a batch of unapplied rows with one
query and records each applied row with one update. Built with SQLAlchemy constructs they cost 50–200 µs
each on this machine kind, most of it statement construction and cache keying; as driver-level SQL they
cost ~20 µs. The column lists come from the models, so the SQL cannot drift from the schema
(``tests/test_store.py`` runs it on both databases).
"""

from __future__ import annotations

import functools
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
    "applied_at": None,
}
#: What the projector writes when it has applied a row.
APPLIED = ("outcome", "ack_code", "err_code", "ack", "detail", "patient_key", "applied_at", "replayed_at")
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
        self.ph = ph
        self.journal_marks = f"({marks})"
        self.key_marks = f"({kmarks})"
        self.insert_head = f"INSERT INTO messages ({cols}) VALUES "
        self.claim_head = f"INSERT INTO message_keys ({kcols}) VALUES "
        self.claim_tail = f" ON CONFLICT{conflict} DO NOTHING RETURNING message_id"
        applied = ", ".join(f"{c} = {ph}" for c in APPLIED)
        self.applied = f"UPDATE messages SET {applied} WHERE id = {ph}"
        self.unapplied = (
            "SELECT id, raw, received_at, sending_application, sending_facility, control_id, content_hash, "
            "outcome, ack, ack_code, encoding FROM messages WHERE outcome IN ('queued', 'requeued') "
            f"AND id > {ph} ORDER BY id LIMIT {ph}"
        )
        self.key_update = (f"UPDATE message_keys SET ack_code = {ph}, err_code = {ph}, err_text = {ph}, "
                           f"err_location = {ph} WHERE message_id = {ph}")


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


def _row_params(sql: HotSql, row: dict[str, Any]) -> tuple[Any, ...]:
    values = {**_DEFAULTS, **row}
    if sql.sqlite:
        values["received_at"] = sqlite_time(values["received_at"])
    return tuple(values[c] for c in JOURNAL_COLUMNS)


#: Rows per multi-row statement (PostgreSQL allows 65,535 parameters per statement; a journal row has ~30).
CHUNK = 1000


def insert_many(conn: Connection, rows: list[dict[str, Any]]) -> list[int]:
    """Journal a whole group; returns the ids in the order of ``rows``.

    PostgreSQL: one multi-row INSERT (one round trip for the group); the ids come from one sequence,
    drawn row by row in VALUES order, so sorting what RETURNING gives restores the order. SQLite: one
    ``executemany`` inside the writer's IMMEDIATE transaction, which holds the database's only write
    lock, so the group's rowids are consecutive and end at ``last_insert_rowid()``."""
    if not rows:
        return []
    sql = hot(conn)
    params = [_row_params(sql, r) for r in rows]
    if sql.sqlite:
        if len(params) == 1:
            return [int(rawsql.execute(conn, sql.insert, params[0]).lastrowid)]
        rawsql.executemany(conn, sql.insert, params)
        last = int(rawsql.execute(conn, "SELECT last_insert_rowid()").fetchone()[0])
        return list(range(last - len(params) + 1, last + 1))
    ids: list[int] = []
    for i in range(0, len(params), CHUNK):
        part = params[i:i + CHUNK]
        stmt = sql.insert_head + ", ".join([sql.journal_marks] * len(part)) + " RETURNING id"
        flat = tuple(v for p in part for v in p)
        ids += sorted(int(r[0]) for r in rawsql.execute(conn, stmt, flat).fetchall())
    return ids


#: Keys per lookup statement: each is an indexed search of ``uq_message_keys_key`` (three parameters).
KEY_CHUNK = 200


def find_keys_many(conn: Connection, keys: list[tuple[str, str, str]]) -> list[Any]:
    """Every dedup claim for any of these (sending application, sending facility, control ID) keys, with
    its message's current outcome (callers match the content hash themselves).

    Written as an OR of whole keys, not ``control_id IN (...)``: ``uq_message_keys_key`` leads with the
    sender, so only the whole key is an index search on both databases; a control ID alone would read the
    whole table on every group commit, a cost that grows with the journal."""
    found: list[Any] = []
    for i in range(0, len(keys), KEY_CHUNK):
        part = keys[i:i + KEY_CHUNK]
        found += rawsql.rows(conn, keys_sql(hot(conn).ph, len(part)), tuple(v for key in part for v in key))
    return found


@functools.lru_cache(maxsize=64)
def keys_sql(ph: str, n: int) -> str:
    """The lookup of *n* whole keys (placeholder *ph*); separate so a test can ask for its query plan, and
    cached because every group commit asks for one (group sizes repeat)."""
    one = f"(k.sending_application = {ph} AND k.sending_facility = {ph} AND k.control_id = {ph})"
    return ("SELECT k.sending_application, k.sending_facility, k.control_id, k.content_hash, k.message_id, "
            "k.ack_code, k.err_code, k.err_text, k.err_location, m.outcome FROM message_keys k "
            f"JOIN messages m ON m.id = k.message_id WHERE {' OR '.join([one] * n)}")


def claim_many(conn: Connection, rows: list[dict[str, Any]]) -> set[int]:
    """Claim every key of a group; returns the message ids that won (a lost one: another daemon has it)."""
    if not rows:
        return set()
    sql = hot(conn)
    if sql.sqlite:
        won: set[int] = set()
        for row in rows:  # no round trips on SQLite: one statement per claim costs microseconds
            if claim_key(conn, row):
                won.add(int(row["message_id"]))
        return won
    won = set()
    for i in range(0, len(rows), CHUNK):
        part = rows[i:i + CHUNK]
        stmt = sql.claim_head + ", ".join([sql.key_marks] * len(part)) + sql.claim_tail
        flat = tuple(row[c] for row in part for c in KEY_COLUMNS)
        won |= {int(r[0]) for r in rawsql.execute(conn, stmt, flat).fetchall()}
    return won


def unapplied(conn: Connection, limit: int, after: int = 0) -> list[Any]:
    """The oldest rows waiting for the projector after id *after*, in journal order."""
    return rawsql.rows(conn, hot(conn).unapplied, (after, limit))


def mark_applied(conn: Connection, message_id: int, values: dict[str, Any]) -> None:
    sql = hot(conn)
    merged = {**_DEFAULTS, **values}
    for c in ("applied_at", "replayed_at"):
        if sql.sqlite and merged[c] is not None:
            merged[c] = sqlite_time(merged[c])
    rawsql.execute(conn, sql.applied, (*(merged[c] for c in APPLIED), message_id))


def update_key(conn: Connection, message_id: int, code: str, err_code: int | None, err_text: str,
               err_location: str) -> None:
    """The code a resend is answered with, once the applied outcome decided the ACK (``ack_after``)."""
    rawsql.execute(conn, hot(conn).key_update, (code, err_code, err_text[:255], err_location[:64], message_id))


def apply_lag(conn: Connection, now: datetime) -> tuple[int, float]:
    """(rows journaled but not yet applied, age in seconds of the oldest freshly queued one)."""
    row = rawsql.execute(conn, "SELECT count(*), min(CASE WHEN outcome = 'queued' THEN received_at END) "
                               "FROM messages WHERE outcome IN ('queued', 'requeued')").fetchone()
    count, oldest = int(row[0]), row[1]
    if oldest is None:
        return count, 0.0
    if isinstance(oldest, str):  # SQLite: our own storage format (see sqlite_time)
        oldest = datetime.strptime(oldest[:26], "%Y-%m-%d %H:%M:%S.%f" if "." in oldest else "%Y-%m-%d %H:%M:%S")
    if oldest.tzinfo is None:
        oldest = oldest.replace(tzinfo=UTC)
    return count, max((now - oldest).total_seconds(), 0.0)
