"""The referral handlers' hot statements, as plain SQL prepared once per dialect (the journal.py pattern).

An unrelated SIU costs two of these, a linked SIU about seven, a REF about nine, all on the writer thread
inside the group commit. As prebuilt SQLAlchemy statements with bind parameters each cost 50-80 µs of
Python (parameter processing, cache keying, result setup); as driver-level SQL executed with
``conn.exec_driver_sql(sql, params_tuple)`` about 20 µs. Cold paths (CLI, API, coordinator actions,
replays) keep the SQLAlchemy constructs in ``referrals.py``. Column lists come from the models, so the SQL
cannot drift from the schema.

Driver SQL skips SQLAlchemy's type processing, so this module does it where it matters, exactly as the
``DateTime(timezone=True)`` type would on each dialect: on SQLite a datetime is stored as SQLAlchemy's
``YYYY-MM-DD HH:MM:SS.ffffff`` UTC string and read back as UTC (returned here already aware, which is
what every caller made of SQLAlchemy's naive value with ``referrals.aware``); PostgreSQL values pass
through untouched (psycopg returns aware datetimes).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Connection, DateTime, Table
from sqlalchemy.exc import MultipleResultsFound, NoResultFound

from refloop import referral as rf
from refloop.store import rawsql
from refloop.store.models import Referral, ReferralEvent, ReferralLink

_REFERRALS = cast(Table, Referral.__table__)
_EVENTS = cast(Table, ReferralEvent.__table__)
_LINKS = cast(Table, ReferralLink.__table__)

REFERRAL_COLUMNS = tuple(c.name for c in _REFERRALS.columns)
EVENT_COLUMNS = tuple(c.name for c in _EVENTS.columns)
_EVENT_INSERT_COLUMNS = tuple(c for c in EVENT_COLUMNS if c != "id")
_LINK_INSERT_COLUMNS = tuple(c.name for c in _LINKS.columns if c.name != "id")
_REFERRAL_INSERT_COLUMNS = tuple(c for c in REFERRAL_COLUMNS if c != "id")
_REFERRAL_TIMES = frozenset(c.name for c in _REFERRALS.columns if isinstance(c.type, DateTime))
_REFERRAL_TIME_IDX = tuple(i for i, c in enumerate(REFERRAL_COLUMNS) if c in _REFERRAL_TIMES)
# What SQLAlchemy's INSERT adds for a column the caller did not give: its Python-side default, else NULL
# (the migrations declare no server defaults, so an explicit NULL is the same as leaving it out).
_REFERRAL_DEFAULTS: dict[str, Any] = {
    c.name: (c.default.arg if c.default is not None and c.default.is_scalar else None)  # type: ignore[attr-defined]
    for c in _REFERRALS.columns if c.name != "id"
}
_OPEN_SQL = ", ".join(f"'{s}'" for s in sorted(s.value for s in rf.OPEN_STATUSES))
_MESSAGE = "message"  # referrals.MESSAGE (an origin value)


def sqlite_time(value: datetime) -> str:
    """SQLAlchemy's own SQLite storage format for DateTime (UTC, no offset)."""
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def bind_time(conn: Connection, moment: datetime) -> Any:
    """A time as a driver-level parameter: SQLite's stored text (:func:`sqlite_time`), else the datetime."""
    return sqlite_time(moment) if conn.dialect.name == "sqlite" else moment


def sqlite_read_time(value: str | None) -> datetime | None:
    """A stored SQLite DateTime string as an aware UTC datetime (SQLAlchemy's value, then ``aware``)."""
    if value is None:
        return None
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


class ReferralSql:
    def __init__(self, dialect: str) -> None:
        self.sqlite = sqlite = dialect == "sqlite"
        self.ph = ph = "?" if sqlite else "%s"
        self._in: dict[tuple[str, int], str] = {}
        self._updates: dict[tuple[str, ...], str] = {}
        ref_cols = ", ".join(REFERRAL_COLUMNS)
        self.find_one = (
            f"SELECT id AS rid, placer_id AS value, 0 AS src FROM referrals WHERE placer_id = {ph} "
            f"UNION ALL SELECT referral_id, alias_value, 1 FROM referral_aliases WHERE alias_value = {ph} "
            "ORDER BY src, rid"
        )
        self.by_subject = (
            "SELECT referral_id, pending_key FROM referral_events "
            f"WHERE subject = {ph} AND origin = '{_MESSAGE}' AND (referral_id IS NOT NULL OR pending_key != '') "
            "ORDER BY referral_id IS NULL, id LIMIT 1"
        )
        self.open_for_patient = (
            "SELECT id, placer_id, referred_to, referred_to_id, specialty FROM referrals "
            f"WHERE patient_key = {ph} AND status IN ({_OPEN_SQL}) ORDER BY id"
        )
        self.by_placer = (
            f"SELECT id, patient_key, referred_to_id FROM referrals WHERE placer_id = {ph} AND authority = {ph}"
        )
        conflict = "" if sqlite else " ON CONSTRAINT uq_referrals_placer"
        self.create = (
            f"INSERT INTO referrals ({', '.join(_REFERRAL_INSERT_COLUMNS)}) "
            f"VALUES ({', '.join([ph] * len(_REFERRAL_INSERT_COLUMNS))}) "
            f"ON CONFLICT{conflict} DO NOTHING RETURNING id"
        )
        # FOR UPDATE on PostgreSQL only, as SQLAlchemy's SQLite compiler drops it (one writer anyway).
        self.referral_row = f"SELECT {ref_cols} FROM referrals WHERE id = {ph}" + ("" if sqlite else " FOR UPDATE")
        self.events_of = f"SELECT {', '.join(EVENT_COLUMNS)} FROM referral_events WHERE referral_id = {ph}"
        self.insert_event = (
            f"INSERT INTO referral_events ({', '.join(_EVENT_INSERT_COLUMNS)}) "
            f"VALUES ({', '.join([ph] * len(_EVENT_INSERT_COLUMNS))})"
        )
        self.insert_link = (
            f"INSERT INTO referral_links ({', '.join(_LINK_INSERT_COLUMNS)}) "
            f"VALUES ({', '.join([ph] * len(_LINK_INSERT_COLUMNS))})"
        )
        self.parked_one = (
            "SELECT DISTINCT message_id FROM referral_events "
            f"WHERE referral_id IS NULL AND origin = '{_MESSAGE}' AND pending_key = {ph}"
        )
        # a range of ix_referrals_patient_first (patient, sent_at) bounded by the window: a patient with
        # thousands of open referrals (a test patient) costs what the window holds, not all of them
        self.earlier_open_same_specialty = (
            f"SELECT 1 FROM referrals WHERE patient_key = {ph} AND sent_at >= {ph} AND sent_at <= {ph} "
            f"AND status IN ({_OPEN_SQL}) AND specialty = {ph} AND id != {ph} AND (sent_at < {ph} OR id < {ph}) "
            "LIMIT 1"
        )

    def marks(self, n: int) -> str:
        return ", ".join([self.ph] * n)

    def find_many(self, n: int) -> str:
        sql = self._in.get(("find", n))
        if sql is None:
            m = self.marks(n)
            sql = self._in[("find", n)] = (
                f"SELECT id AS rid, placer_id AS value, 0 AS src FROM referrals WHERE placer_id IN ({m}) "
                f"UNION ALL SELECT referral_id, alias_value, 1 FROM referral_aliases WHERE alias_value IN ({m}) "
                "ORDER BY src, rid"
            )
        return sql

    def parked_many(self, n: int) -> str:
        sql = self._in.get(("parked", n))
        if sql is None:
            sql = self._in[("parked", n)] = (
                "SELECT DISTINCT message_id FROM referral_events "
                f"WHERE referral_id IS NULL AND origin = '{_MESSAGE}' AND pending_key IN ({self.marks(n)})"
            )
        return sql

    def update_referral(self, columns: tuple[str, ...]) -> str:
        sql = self._updates.get(columns)
        if sql is None:
            for c in columns:
                if c not in _REFERRAL_DEFAULTS:
                    raise KeyError(f"referrals has no column {c!r}")
            sets = ", ".join(f"{c} = {self.ph}" for c in columns)
            sql = self._updates[columns] = f"UPDATE referrals SET {sets} WHERE id = {self.ph}"
        return sql


_CACHE: dict[str, ReferralSql] = {}


def hot(conn: Connection) -> ReferralSql:
    name = conn.dialect.name
    sql = _CACHE.get(name)
    if sql is None:
        sql = _CACHE[name] = ReferralSql(name)
    return sql


# -- lookups ----------------------------------------------------------------------------------------
def find(conn: Connection, values: Sequence[str]) -> list[Any]:
    """``(rid, value, src)`` rows: placer-ID hits first, then aliases, each by referral id."""
    sql = hot(conn)
    if len(values) == 1:
        return rawsql.rows(conn, sql.find_one, (values[0], values[0]))
    params = tuple(values)
    return rawsql.rows(conn, sql.find_many(len(params)), params + params)


def by_subject(conn: Connection, subject: str) -> Any | None:
    return rawsql.first(conn, hot(conn).by_subject, (subject,))


def open_for_patient(conn: Connection, patient_key: str) -> list[Any]:
    return rawsql.rows(conn, hot(conn).open_for_patient, (patient_key,))


def by_placer(conn: Connection, placer_id: str, authority: str) -> Any | None:
    return rawsql.first(conn, hot(conn).by_placer, (placer_id, authority))


def parked_messages(conn: Connection, keys: Sequence[str]) -> list[int]:
    sql = hot(conn)
    if len(keys) == 1:
        found = rawsql.rows(conn, sql.parked_one, (keys[0],))
    else:
        found = rawsql.rows(conn, sql.parked_many(len(keys)), tuple(keys))
    return [m for (m,) in found]


def earlier_open_same_specialty(conn: Connection, patient_key: str, rid: int, specialty: str, sent: datetime,
                                window: timedelta) -> bool:
    """Whether the patient has another open referral in *specialty* sent within *window* before *sent*
    (or at the same instant with a lower id): one bounded index range, no row read into Python."""
    at = bind_time(conn, sent)
    params = (patient_key, bind_time(conn, sent - window), at, specialty, rid, at, rid)
    return rawsql.first(conn, hot(conn).earlier_open_same_specialty, params) is not None


class ReferralRow:
    """A ``referrals`` row read by driver SQL, with times as SQLAlchemy (plus ``aware``) would give them."""

    __slots__ = REFERRAL_COLUMNS

    def __init__(self, values: Iterable[Any]) -> None:
        for name, value in zip(REFERRAL_COLUMNS, values, strict=True):
            setattr(self, name, value)


def referral_row(conn: Connection, rid: int) -> Any:  # a ReferralRow
    """The projection row, locked FOR UPDATE on PostgreSQL; raises like ``Result.one()`` when missing."""
    sql = hot(conn)
    rows = rawsql.rows(conn, sql.referral_row, (rid,))
    if len(rows) != 1:  # the exceptions Result.one() raises
        if not rows:
            raise NoResultFound("No row was found when one was required")
        raise MultipleResultsFound("Multiple rows were found when exactly one was required")
    values = list(rows[0])
    if sql.sqlite:
        for i in _REFERRAL_TIME_IDX:
            values[i] = sqlite_read_time(values[i])
    return ReferralRow(values)


class EventRow:
    """A ``referral_events`` row read by driver SQL (``occurred_at`` aware). ``event`` caches the
    :class:`refloop.referral.Event` built from it (``referrals._event``), so a row read again by a later
    message is not parsed again."""

    __slots__ = (*EVENT_COLUMNS, "event")

    def __init__(self, values: Iterable[Any]) -> None:
        for name, value in zip(EVENT_COLUMNS, values, strict=True):
            setattr(self, name, value)
        self.event: rf.Event | None = None


_EVENT_ROWS: dict[Any, EventRow] = {}
_EVENT_ROWS_MAX = 65536
_OCCURRED_AT = EVENT_COLUMNS.index("occurred_at")


def events_of(conn: Connection, rid: int) -> list[EventRow]:
    """Every event of a referral, in the database's order (no ORDER BY: the fold orders them).

    Rows are immutable once written except for being re-pointed (referral_id, pending_key), so a row
    read with exactly the same values as before is the same row: those are served from a bounded cache.
    """
    sql = hot(conn)
    out: list[EventRow] = []
    cache = _EVENT_ROWS
    for raw in rawsql.execute(conn, sql.events_of, (rid,)).fetchall():
        key = tuple(raw)
        row = cache.get(key)
        if row is None:
            values = list(key)
            if sql.sqlite:
                values[_OCCURRED_AT] = sqlite_read_time(values[_OCCURRED_AT])
            row = EventRow(values)
            if len(cache) >= _EVENT_ROWS_MAX:
                cache.clear()
            cache[key] = row
        out.append(row)
    return out


# -- writes -----------------------------------------------------------------------------------------
def create_referral(conn: Connection, values: dict[str, Any]) -> int | None:
    """INSERT ... ON CONFLICT DO NOTHING RETURNING id: the new id, or None if another writer has the key."""
    sql = hot(conn)
    row = {**_REFERRAL_DEFAULTS, **values}
    for k in values:
        if k not in _REFERRAL_DEFAULTS:
            raise KeyError(f"referrals has no column {k!r}")
    if sql.sqlite:
        for k in _REFERRAL_TIMES:
            if row[k] is not None:
                row[k] = sqlite_time(row[k])
    created = rawsql.execute(conn, sql.create, tuple(row[c] for c in _REFERRAL_INSERT_COLUMNS)).fetchone()
    return int(created[0]) if created is not None else None


def update_referral(conn: Connection, rid: int, values: dict[str, Any]) -> None:
    sql = hot(conn)
    columns = tuple(values)
    params = list(values.values())
    if sql.sqlite:
        for i, c in enumerate(columns):
            if c in _REFERRAL_TIMES and params[i] is not None:
                params[i] = sqlite_time(params[i])
    params.append(rid)
    rawsql.execute(conn, sql.update_referral(columns), tuple(params))


def insert_events(conn: Connection, rows: list[dict[str, Any]]) -> None:
    """``rows`` carry every insert column (referrals.add_events builds them so)."""
    sql = hot(conn)
    params = []
    for r in rows:
        if sql.sqlite:
            at = r["occurred_at"]
            r = {**r, "occurred_at": sqlite_time(at) if at is not None else None}
        params.append(tuple(r[c] for c in _EVENT_INSERT_COLUMNS))
    (rawsql.execute(conn, sql.insert_event, params[0]) if len(params) == 1
     else rawsql.executemany(conn, sql.insert_event, params))


def insert_link(conn: Connection, row: dict[str, Any]) -> None:
    rawsql.execute(conn, hot(conn).insert_link, tuple(row[c] for c in _LINK_INSERT_COLUMNS))
