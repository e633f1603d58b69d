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
from datetime import UTC, datetime

from sqlalchemy import Connection, Table, bindparam, select, update

from refloop import report as rp
from refloop.store.models import Referral

R: Table = Referral.__table__  # type: ignore[assignment]
_MARK = update(R).where(R.c.id == bindparam("b_id")).values(cms50_first=bindparam("b_first"))


def _utc(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment  # SQLite: naive UTC


def refresh(conn: Connection, patient_keys: Iterable[str]) -> None:
    """Re-mark the first candidates of these patients' referrals (in the caller's transaction)."""
    for key in sorted({k for k in patient_keys if k}):
        rows = conn.execute(select(R.c.id, R.c.sent_at, R.c.status, R.c.cms50_first)
                            .where(R.c.patient_key == key)).all()
        firsts = rp.cms50_firsts((int(r.id), _utc(r.sent_at), str(r.status)) for r in rows)
        changed = [{"b_id": r.id, "b_first": int(r.id in firsts)} for r in rows
                   if int(r.cms50_first or 0) != int(r.id in firsts)]
        if changed:
            conn.execute(_MARK, changed)
