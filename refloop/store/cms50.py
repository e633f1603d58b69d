"""The CMS50 figure's first candidate per patient and year, kept on write (``referrals.cms50_first``).

Why: the figure counts each patient once, by their first candidate referral of the year
(:func:`refloop.report.cms50_firsts`). Found at read time that is a pass over every referral in patient
order (2x a bare pass over ``referrals`` at 1M); kept on write it is one range of a partial index. A
referral's mark can change only when its patient, its sent date or its cancellation changes, or when
another referral of the same patient changes: the writers of those call :func:`refresh` with the patient
keys concerned (the fold in :func:`refloop.store.referrals.recompute`, a new patient key in
:func:`refloop.store.referrals.get_or_create`, a merge of two patients in
:func:`refloop.store.identity.person_key`). A patient has a handful of referrals: one indexed read each.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection

from refloop import report as rp
from refloop.store import rawsql, sqlhot


def refresh(conn: Connection, patient_keys: Iterable[str]) -> None:
    """Re-mark the first candidates of these patients' referrals (in the caller's transaction). Driver-level
    SQL (:mod:`refloop.store.sqlhot`'s pattern): the fold calls this for every new referral, on the apply path."""
    sql = sqlhot.hot(conn)
    for key in sorted({k for k in patient_keys if k}):
        rows = rawsql.rows(conn, f"SELECT id, sent_at, status, cms50_first FROM referrals WHERE patient_key = {sql.ph}",
                           (key,))
        firsts = rp.cms50_firsts((int(r.id), sqlhot.sqlite_read_time(r.sent_at) if sql.sqlite else r.sent_at,
                                  str(r.status)) for r in rows)
        changed = [(int(r.id in firsts), r.id) for r in rows if int(r.cms50_first or 0) != int(r.id in firsts)]
        if changed:
            rawsql.executemany(conn, f"UPDATE referrals SET cms50_first = {sql.ph} WHERE id = {sql.ph}", changed)
