"""Retention: raw message bodies and document contents older than the configured age are purged.

Metadata (journal rows, referral events, milestones) stays, so reports keep working; only the PHI-bearing
payloads go. SQLite runs with ``secure_delete`` so purged bytes are overwritten, not left in free pages.
Every purge writes an audit row.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Engine, func, select, update

from refloop.store.audit import record
from refloop.store.models import Message, Outcome, ReferralDocument

_CHUNK = 500  # rows per transaction: the journal writer never waits more than one chunk's UPDATE


def purge(engine: Engine, *, now: datetime, older_than_days: int, actor: str, dry_run: bool = False) -> dict[str, int]:
    """Null out ``messages.raw`` and ``referral_documents.content`` received before now - N days.

    In chunks of short transactions (the listener's writer goes first between them), and never the raw
    frame of a row the projector has still to apply (``queued``/``requeued``)."""
    cutoff = now - timedelta(days=older_than_days)
    old_msgs = (Message.received_at < cutoff, Message.raw.is_not(None), Message.outcome.not_in(Outcome.UNAPPLIED))
    old_docs = (ReferralDocument.received_at < cutoff, ReferralDocument.content.is_not(None))
    with engine.connect() as conn:
        msgs = conn.execute(select(func.count()).select_from(Message).where(*old_msgs)).scalar_one()
        docs = conn.execute(select(func.count()).select_from(ReferralDocument).where(*old_docs)).scalar_one()
    if not dry_run and (msgs or docs):
        # nothing left to adopt once the raw frame is gone, so the patient key goes with it
        _chunked(engine, Message, old_msgs, {"raw": None, "patient_key": None})
        _chunked(engine, ReferralDocument, old_docs, {"content": None})
        with engine.begin() as conn:
            record(conn, now=now, actor=actor, action="purge", target=f"older_than_days={older_than_days}",
                   detail=f"messages={msgs} documents={docs}")
    return {"messages": int(msgs), "documents": int(docs), "dry_run": int(dry_run)}


def _chunked(engine: Engine, model: Any, where: tuple[Any, ...], values: dict[str, Any]) -> None:
    while True:
        with engine.begin() as conn:
            ids = [r[0] for r in conn.execute(select(model.id).where(*where).limit(_CHUNK))]
            if not ids:
                return
            conn.execute(update(model).where(model.id.in_(ids)).values(**values))
