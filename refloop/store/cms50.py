"""The CMS50 figure's first candidate per patient and year, kept on write (``referrals.cms50_first``).

Why: the figure counts each patient once, by their first candidate referral of the year
(:func:`refloop.report.cms50_firsts`). Found at read time that is a pass over every referral in patient
order (2x a bare pass over ``referrals`` at 1M); kept on write it is one range of a partial index. A
referral's mark can change only when its patient, its sent date or its cancellation changes, or when
another referral of the same patient changes: the writers of those call :func:`refresh` with the patient
keys concerned (the fold in :func:`refloop.store.referrals.recompute`, a new patient key in
:func:`refloop.store.referrals.get_or_create`, a merge of two patients in
:func:`refloop.store.identity.person_key`).

Why in SQL: most patients have a handful of referrals, but a test patient that interface analysts send
for years can have thousands, and reading them all into Python on every new referral of theirs made each
apply grow with that count. One statement ranks the patient's candidates per year inside the database
and returns only the rows whose mark must change (usually none), so the common case stays one round trip
and the test patient's costs a sort inside the database, not a transfer of every row.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache

from sqlalchemy import Connection

from refloop import report as rp
from refloop.store import rawsql, sqlhot


@cache
def _changes_sql(dialect: str) -> str:
    """One patient's rows whose mark differs from the rule of :func:`refloop.report.cms50_candidate` and
    :func:`refloop.report.cms50_firsts`: candidates (sent 1 January to 31 October, UTC, not cancelled)
    ranked by ``(sent_at, id)`` within their year; the first of each year is marked."""
    if dialect == "sqlite":  # stored as 'YYYY-MM-DD HH:MM:SS.ffffff' in UTC
        year, month, ph = "substr(sent_at, 1, 4)", "CAST(substr(sent_at, 6, 2) AS INTEGER)", "?"
    else:
        year, month, ph = ("extract(year FROM sent_at AT TIME ZONE 'UTC')",
                           "extract(month FROM sent_at AT TIME ZONE 'UTC')", "%s")
    candidate = f"(sent_at IS NOT NULL AND {month} <= 10 AND status <> '{rp.CMS50_EXCLUDED}')"
    rank = f"row_number() OVER (PARTITION BY {candidate}, {year} ORDER BY sent_at, id)"
    return (f"SELECT id, mark FROM (SELECT id, cms50_first, CASE WHEN {candidate} AND {rank} = 1 THEN 1 ELSE 0 END "
            f"AS mark FROM referrals WHERE patient_key = {ph}) AS ranked WHERE mark <> cms50_first")


def refresh(conn: Connection, patient_keys: Iterable[str]) -> None:
    """Re-mark the first candidates of these patients' referrals (in the caller's transaction). Driver-level
    SQL (:mod:`refloop.store.sqlhot`'s pattern): the fold calls this for every new referral, on the apply path."""
    sql = sqlhot.hot(conn)
    find = _changes_sql(conn.dialect.name)
    for key in sorted({k for k in patient_keys if k}):
        changed = [(int(mark), int(rid)) for rid, mark in rawsql.rows(conn, find, (key,))]
        if changed:
            rawsql.executemany(conn, f"UPDATE referrals SET cms50_first = {sql.ph} WHERE id = {sql.ph}", changed)
