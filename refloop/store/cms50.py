"""The CMS50 figure's first candidate per patient and year, kept on write (``referrals.cms50_first``).

Why: the figure counts each patient once, by their first candidate referral of the year
(:func:`refloop.report.cms50_firsts`). Found at read time that is a pass over every referral in patient
order (2x a bare pass over ``referrals`` at 1M); kept on write it is one range of a partial index. A
referral's mark can change only when its patient, its sent date or its cancellation changes, or when
another referral of the same patient changes: the writers of those call :func:`refresh` with the patient
keys concerned (the fold in :func:`refloop.store.referrals.recompute`, a new patient key in
:func:`refloop.store.referrals.get_or_create`, a merge of two patients in
:func:`refloop.store.identity.person_key`).

Why by year and in SQL: most patients have a handful of referrals, but a test patient that interface
analysts send for years can have thousands, and reading them all into Python on every new referral made
each apply of theirs grow with that count. Per year of the patient's referrals (found by index probes on
``ix_referrals_patient_first``, one a year) the first candidate is one ordered lookup, and one UPDATE
moves the mark within that year's range; nothing is read into Python but the ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection

from refloop import report as rp
from refloop.store import rawsql, sqlhot


def refresh(conn: Connection, patient_keys: Iterable[str]) -> None:
    """Re-mark the first candidates of these patients' referrals (in the caller's transaction). Driver-level
    SQL (:mod:`refloop.store.sqlhot`'s pattern): the fold calls this for every new referral, on the apply path."""
    sql = sqlhot.hot(conn)
    ph = sql.ph

    def t(moment: datetime) -> Any:
        return sqlhot.sqlite_time(moment) if sql.sqlite else moment

    for key in sorted({k for k in patient_keys if k}):
        rawsql.execute(conn, f"UPDATE referrals SET cms50_first = 0 WHERE patient_key = {ph} AND sent_at IS NULL "
                       "AND cms50_first <> 0", (key,))
        after: datetime | None = None
        while True:
            sent = rawsql.first(conn, f"SELECT sent_at FROM referrals WHERE patient_key = {ph} AND sent_at "
                                + (f">= {ph}" if after else "IS NOT NULL") + " ORDER BY sent_at LIMIT 1",
                                (key, t(after)) if after else (key,))
            if sent is None:
                break
            moment = sqlhot.sqlite_read_time(sent[0]) if sql.sqlite else sent[0]
            start, cutoff, after = rp.cms50_window(moment.astimezone(UTC).year)  # type: ignore[union-attr]
            first = rawsql.first(conn, f"SELECT id FROM referrals WHERE patient_key = {ph} AND sent_at >= {ph} "
                                 f"AND sent_at < {ph} AND status <> {ph} ORDER BY sent_at, id LIMIT 1",
                                 (key, t(start), t(cutoff), rp.CMS50_EXCLUDED))
            fid = int(first[0]) if first is not None else 0  # ids start at 1: 0 marks nothing
            mark = f"CASE WHEN id = {ph} THEN 1 ELSE 0 END"
            rawsql.execute(conn, f"UPDATE referrals SET cms50_first = {mark} WHERE patient_key = {ph} "
                           f"AND sent_at >= {ph} AND sent_at < {ph} AND cms50_first <> {mark}",
                           (fid, key, t(start), t(after), fid))
