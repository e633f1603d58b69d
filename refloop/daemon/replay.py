"""`refloop replay`: run stored messages through the current routes and profiles again.

Used after an upgrade that adds or fixes a handler. Idempotent because every handler keys its effects
on the journal row (``ctx.message_id``), so running a message twice replaces, never adds. Only messages
that were accepted (processed, ignored, error, failed) are replayed: a rejected (AR) message was never
accepted and its sender resends it; duplicates and broken frames have nothing to apply.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime

from sqlalchemy import Engine, select, update

from refloop.clock import Clock
from refloop.config import Settings
from refloop.daemon.ingest import Decision
from refloop.message import Message, MessageError, decode_payload
from refloop.routes.context import ContentError, HandlerContext
from refloop.routes.router import Router
from refloop.store.models import Message as Journal
from refloop.store.models import MessageKey, Outcome

REPLAYABLE = (Outcome.PROCESSED, Outcome.IGNORED, Outcome.ERROR, Outcome.FAILED)


def replay(engine: Engine, settings: Settings, router: Router, clock: Clock, *,
           since: datetime | None = None, message_id: int | None = None) -> dict[str, object]:
    stmt = select(Journal.id).where(Journal.outcome.in_(REPLAYABLE), Journal.raw.is_not(None))
    if since is not None:
        stmt = stmt.where(Journal.received_at >= since)
    if message_id is not None:
        stmt = stmt.where(Journal.id == message_id)
    with engine.connect() as conn:
        ids = [r[0] for r in conn.execute(stmt.order_by(Journal.id))]
    outcomes: Counter[str] = Counter()
    for mid in ids:
        with engine.begin() as conn:
            row = conn.execute(select(Journal).where(Journal.id == mid)).one()
            d = _replay_one(conn, row, settings, router, clock)
            now = clock.now()
            conn.execute(update(Journal).where(Journal.id == mid).values(
                outcome=d.outcome, err_code=d.error.code if d.error else None, replayed_at=now,
                detail=(d.detail or d.outcome)[:255],
            ))
            conn.execute(update(MessageKey).where(MessageKey.message_id == mid).values(
                ack_code=d.code, err_code=d.error.code if d.error else None,
                err_text=d.error.text[:255] if d.error else "", err_location=d.error.location[:64] if d.error else "",
            ))
        outcomes[d.outcome] += 1
    return {"replayed": len(ids), "outcomes": dict(outcomes)}


def _replay_one(conn, row, settings: Settings, router: Router, clock: Clock) -> Decision:  # type: ignore[no-untyped-def]
    profile = settings.profile_for(row.sending_application, row.sending_facility)
    text, _codec, _fb = decode_payload(row.raw, profile.encoding)
    try:
        msg = Message.parse(text, profile.segment_terminators)
    except MessageError:
        return Decision(Outcome.FAILED, "AE", None, "unparseable on replay")
    route = router.resolve(msg.message_type, msg.trigger_event)
    if route is None:
        return Decision(Outcome.IGNORED, "AA", None, "no route")
    ctx = HandlerContext(settings=settings, conn=conn, clock=clock, profile=profile, message_ref=row.id,
                         control_id=msg.control_id, received_at=row.received_at, replay=True)
    nested = conn.begin_nested()
    try:
        res = route.handler(ctx, msg)
    except ContentError as exc:
        nested.rollback()
        return Decision(Outcome.ERROR, "AE", exc.error, f"content error {exc.error.code}")
    except Exception as exc:
        nested.rollback()
        return Decision(Outcome.FAILED, "AE", None, f"handler raised {type(exc).__name__}")
    nested.commit()
    if res.outcome == Outcome.ERROR:
        return Decision(Outcome.ERROR, "AE", res.error, res.detail)
    return Decision(res.outcome, "AA", None, res.detail)
