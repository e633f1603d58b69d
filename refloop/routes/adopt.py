"""A referral that arrives after its patient's booking or consult note adopts them.

Feeds do not arrive in order: the specialist's scheduler often books from a faxed or phoned referral
before the referrer's REF has crossed its interface engine, and such a booking rarely carries the
referral ID. Without a referral to match, :mod:`refloop.routes.linking` calls it unrelated, and the new
referral would sit at ``sent`` and stall although the patient is booked. So an unrelated scheduling or
document message keeps a marker on its journal row (``patient_key``) and its patient's identifiers in
``message_identifiers`` (hashed, never the MRN), and when a REF (or a
360X order) creates or updates a referral for that patient, the messages of the last
``SenderProfile.adopt_earlier_days`` are routed again, exactly as ``refloop replay`` would: the same
linking rules decide (same patient *and* a matching referred-to provider; several candidates go to the
review queue), so adopting is never looser than linking a message that arrives after the REF.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select, update

from refloop.message import Message, MessageError, decode_payload
from refloop.routes import linking
from refloop.routes.context import HandlerContext
from refloop.routes.extract import Provider
from refloop.store import identity
from refloop.store.models import Message as Journal
from refloop.store.models import Outcome, Referral

log = logging.getLogger("refloop.routes")

J = Journal.__table__
REFERRALS = Referral.__table__


Providers = Callable[[Message], list[Provider]]


def _providers() -> dict[str, Providers]:
    from refloop.routes import notes, siu

    return {"SIU": siu.providers, "MDM": notes.mdm_providers, "ORU": notes.oru_providers}


def adopt_earlier(ctx: HandlerContext, referral_id: int, patient_keys: list[str]) -> int:
    """Route this patient's recent unrelated messages again; returns how many now belong somewhere.

    Only messages whose providers match this referral's referred-to provider are routed again (nothing
    else can have changed for them), so a patient with many unrelated appointments costs a parse each."""
    days = ctx.profile.adopt_earlier_days
    if days <= 0 or not patient_keys:
        return 0
    since = ctx.received_at - timedelta(days=days)
    # Driver SQL: this runs for every REF, and almost always finds nothing. Any identifier of the
    # referral's patient finds the message; the handler's linking rules then apply the sender's own
    # ``patient_id_authorities``, as for a message arriving after the REF.
    ids = identity.adoptable_messages(ctx.conn, patient_keys, since)
    if not ids:
        return 0
    rows = ctx.conn.execute(
        select(J.c.id, J.c.raw, J.c.sending_application, J.c.sending_facility, J.c.control_id, J.c.received_at,
               J.c.message_type)
        .where(J.c.id.in_(ids), J.c.raw.is_not(None)).order_by(J.c.id)).all()
    handlers = _providers()
    referral = ctx.conn.execute(select(REFERRALS.c.referred_to, REFERRALS.c.referred_to_id)
                                .where(REFERRALS.c.id == referral_id)).one()
    adopted = 0
    for row in rows:
        providers_of = handlers.get(row.message_type)
        if providers_of is None:
            continue
        profile = ctx.settings.profile_for(row.sending_application, row.sending_facility)
        try:
            msg = Message.parse(decode_payload(row.raw, profile.encoding)[0], profile.segment_terminators)
        except MessageError:  # pragma: no cover - it was parsed when it arrived
            continue
        if not linking.provider_match(referral, providers_of(msg)):
            continue
        if ctx.reapply is None:  # pragma: no cover - every dispatch gives one
            continue
        # The one dispatch, in a savepoint of its own: whatever goes wrong with an old message must not cost
        # the referral its REF (a content error or a bug leaves the message unrelated).
        res = ctx.reapply(row)
        if res.outcome == Outcome.PROCESSED:
            ctx.conn.execute(update(Journal).where(Journal.id == row.id).values(
                outcome=Outcome.PROCESSED, detail=f"adopted: {res.detail}"[:255], patient_key=None,
                replayed_at=ctx.clock.now()))
            adopted += 1
    return adopted
