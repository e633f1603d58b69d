"""Retention: raw message bodies and document contents older than the configured age are purged.

Metadata (journal rows, referral events, milestones) stays, so reports keep working; only the PHI-bearing
payloads go. SQLite runs with ``secure_delete`` so purged bytes are overwritten, not left in free pages.
Every purge writes an audit row.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Engine, func, select, update

from refloop.store.audit import record
from refloop.store.models import Message, ReferralDocument


def purge(engine: Engine, *, now: datetime, older_than_days: int, actor: str, dry_run: bool = False) -> dict[str, int]:
    """Null out ``messages.raw`` and ``referral_documents.content`` received before now - N days."""
    cutoff = now - timedelta(days=older_than_days)
    with engine.begin() as conn:
        msgs = conn.execute(
            select(func.count()).select_from(Message).where(Message.received_at < cutoff, Message.raw.is_not(None))
        ).scalar_one()
        docs = conn.execute(
            select(func.count()).select_from(ReferralDocument).where(
                ReferralDocument.received_at < cutoff, ReferralDocument.content.is_not(None))
        ).scalar_one()
        if not dry_run and (msgs or docs):
            conn.execute(update(Message).where(Message.received_at < cutoff, Message.raw.is_not(None))
                         .values(raw=None, patient_key=None))  # nothing left to adopt, nothing to keep
            conn.execute(update(ReferralDocument).where(
                ReferralDocument.received_at < cutoff, ReferralDocument.content.is_not(None)).values(content=None))
            record(conn, now=now, actor=actor, action="purge", target=f"older_than_days={older_than_days}",
                   detail=f"messages={msgs} documents={docs}")
    return {"messages": int(msgs), "documents": int(docs), "dry_run": int(dry_run)}
