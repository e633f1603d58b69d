"""Patient identity as a set of hashed identifiers: the rows behind linking, adoption, search and CMS50.

Why a set: a specialist's scheduler sends its own MRN first and the referrer's MRN as a later PID-3
repetition; an enterprise ID may be typed PI; a v2.3 feed puts one in PID-2. A single "patient key" per
message misses all of these, so every identifier is a row (``referral_identifiers``,
``message_identifiers``) and a message matches a referral when any identifier is shared.

``referrals.patient_key`` remains one value per referral: the *person* key, the same for every referral
of one person however many identifiers they were sent with (the first referral's first identifier). The
CMS50 figure and the duplicate guard group by it, so a patient is counted once across identifiers.

Statements are driver SQL prepared once per dialect (the :mod:`refloop.store.sqlhot` pattern), because
linking runs on the writer thread for every scheduling and document message. Nothing here logs.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Connection

from refloop import referral as rf
from refloop.store import cms50, rawsql
from refloop.store.sqlhot import bind_time

_OPEN_SQL = ", ".join(f"'{s}'" for s in sorted(s.value for s in rf.OPEN_STATUSES))


class Identifier(Protocol):
    """What the store needs of one identifier (``refloop.routes.extract.PatientId`` has it)."""

    @property
    def key(self) -> str: ...

    @property
    def authority(self) -> str: ...

    @property
    def id_type(self) -> str: ...


_SQL: dict[tuple[str, str, int], str] = {}


def _marks(conn: Connection, n: int) -> str:
    return ", ".join(["?" if conn.dialect.name == "sqlite" else "%s"] * n)


def _open_sql(conn: Connection, n: int) -> str:
    """The candidates query for *n* identifiers, built once per dialect and size (it runs per message)."""
    key = ("open", conn.dialect.name, n)
    sql = _SQL.get(key)
    if sql is None:
        sql = _SQL[key] = (
            "SELECT r.id, r.placer_id, r.referred_to, r.referred_to_id, r.specialty, i.id_hash AS key, i.authority "
            "FROM referral_identifiers i JOIN referrals r ON r.id = i.referral_id "
            f"WHERE i.id_hash IN ({_marks(conn, n)}) AND r.status IN ({_OPEN_SQL}) ORDER BY r.id")
    return sql


def _ph(conn: Connection) -> str:
    return "?" if conn.dialect.name == "sqlite" else "%s"


# -- writes -----------------------------------------------------------------------------------------
def add_referral_ids(conn: Connection, referral_id: int, ids: Sequence[Identifier]) -> None:
    """Add identifiers to a referral's set (a REF^I13 may bring more); existing ones are kept."""
    if not ids:
        return
    ph = _ph(conn)
    sql = ("INSERT INTO referral_identifiers (referral_id, id_hash, authority, id_type) "
           f"VALUES ({ph}, {ph}, {ph}, {ph}) ON CONFLICT (referral_id, id_hash) DO UPDATE SET learned_from = NULL")
    # A referral's own identifier is never "learned": an unlink of the message it was first seen in keeps it.
    rawsql.executemany(conn, sql, [(referral_id, i.key, i.authority[:180], i.id_type[:16]) for i in ids])


def learn(conn: Connection, referral_id: int, ids: Sequence[Identifier], message_id: int) -> None:
    """Identifiers of a message linked to the referral by its referral ID (a booking naming SCH-26, an RRI):
    the specialist's own MRN, say. A later message carrying only that identifier can then link by the
    heuristic. Kept with the message's id, so :func:`forget_learned` takes them back."""
    if not ids:
        return
    ph = _ph(conn)
    sql = ("INSERT INTO referral_identifiers (referral_id, id_hash, authority, id_type, learned_from) "
           f"VALUES ({ph}, {ph}, {ph}, {ph}, {ph}) ON CONFLICT (referral_id, id_hash) DO NOTHING")
    rawsql.executemany(conn, sql, [(referral_id, i.key, i.authority[:180], i.id_type[:16], message_id)
                                   for i in ids])


def forget_learned(conn: Connection, message_id: int) -> None:
    """A replayed, moved or unlinked message takes back what the referral learned from it."""
    rawsql.execute(conn, f"DELETE FROM referral_identifiers WHERE learned_from = {_ph(conn)}", (message_id,))


def set_message_ids(conn: Connection, message_id: int, ids: Sequence[Identifier], received_at: datetime, *,
                    replace: bool = False) -> None:
    """The identifiers of a message's patient; ``replace`` (a replay) drops the ones written before."""
    ph = _ph(conn)
    if replace:
        rawsql.execute(conn, f"DELETE FROM message_identifiers WHERE message_id = {ph}", (message_id,))
    if not ids:
        return
    at = bind_time(conn, received_at)
    sql = ("INSERT INTO message_identifiers (message_id, id_hash, authority, received_at) "
           f"VALUES ({ph}, {ph}, {ph}, {ph})")
    rows = [(message_id, i.key, i.authority[:180], at) for i in ids]
    if len(rows) == 1:
        rawsql.execute(conn, sql, rows[0])
    else:
        rawsql.executemany(conn, sql, rows)


def person_key(conn: Connection, ids: Sequence[Identifier]) -> str:
    """The person key for a referral with these identifiers: an existing referral's key when one shares an
    identifier, else the first MR identifier's hash (the key refloop always stored), else the first one.

    When the identifiers bridge two people known apart so far (referral A had only the clinic MRN, B only
    the enterprise ID, this REF carries both), their referrals are re-keyed to the oldest one's key, so
    the CMS50 figure counts one patient."""
    if not ids:
        return ""
    keys = [i.key for i in ids]
    found = rawsql.rows(conn, (
        "SELECT r.patient_key AS pk, MIN(r.id) AS first_id FROM referral_identifiers i JOIN referrals r "
        f"ON r.id = i.referral_id WHERE i.id_hash IN ({_marks(conn, len(keys))}) AND r.patient_key != '' "
        "GROUP BY r.patient_key ORDER BY first_id"), tuple(keys))
    if not found:
        return next((i.key for i in ids if i.id_type == "MR"), ids[0].key)
    canonical = str(found[0].pk)
    others = [str(r.pk) for r in found[1:]]
    if others:
        ph = _ph(conn)
        rawsql.execute(conn, f"UPDATE referrals SET patient_key = {ph} WHERE patient_key IN "
                             f"({_marks(conn, len(others))})", (canonical, *others))
        cms50.refresh(conn, [canonical])  # one patient now: one first candidate per year
    return canonical


# -- lookups ----------------------------------------------------------------------------------------
def open_referrals_for_ids(conn: Connection, ids: Sequence[Identifier]) -> list[Any]:
    """Heuristic candidates: open referrals sharing any identifier, each once, with the authority of the
    first shared identifier (in the message's order) as ``authority``."""
    if not ids:
        return []
    order = {i.key: n for n, i in enumerate(ids)}
    keys = tuple(order)
    rows = rawsql.rows(conn, _open_sql(conn, len(keys)), keys)
    best: dict[int, Any] = {}
    for row in rows:
        have = best.get(row.id)
        if have is None or order[row.key] < order[have.key]:
            best[row.id] = row
    return [best[rid] for rid in sorted(best)]


def adoptable_messages(conn: Connection, keys: Sequence[str], since: datetime) -> list[int]:
    """Unrelated messages (``messages.patient_key`` still set) sharing an identifier, received since."""
    if not keys:
        return []
    ph = _ph(conn)
    found = rawsql.rows(conn, (
        "SELECT DISTINCT i.message_id FROM message_identifiers i JOIN messages m ON m.id = i.message_id "
        f"WHERE i.id_hash IN ({_marks(conn, len(keys))}) AND i.received_at >= {ph} AND m.patient_key IS NOT NULL "
        "ORDER BY i.message_id"), (*keys, bind_time(conn, since)))
    return [int(r.message_id) for r in found]


def referrals_for_key(conn: Connection, key: str) -> list[int]:
    """Every referral whose patient carries this identifier (``refloop find``)."""
    found = rawsql.rows(conn, f"SELECT DISTINCT referral_id FROM referral_identifiers WHERE id_hash = {_ph(conn)} "
                              "ORDER BY referral_id", (key,))
    return [int(r.referral_id) for r in found]
