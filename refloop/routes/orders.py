"""OMG^O19 / ORM^O01 as referrals (360X style): for messages whose MSH-21 names the 360X profile, and for
senders with ``order_mode = "referral"`` (``"off"`` turns even 360X messages off).

In the 360X closed-loop profile the referral *is* an order: ORC-2 (or OBR-2) is the referral ID, ORC-1
NW creates it and CA/OC/DC cancels it. Most order feeds are lab or imaging orders, so an order without the
360X declaration is only journaled unless a sender profile says otherwise.
"""

from __future__ import annotations

from refloop import referral as rf
from refloop.message import Message
from refloop.routes import linking, validate
from refloop.routes.context import ContentError, HandlerContext, HandlerResult
from refloop.routes.extract import occurred_at, orders_are_referrals, prd, xcn
from refloop.routes.ref import apply_referral
from refloop.store import referrals as repo
from refloop.store.models import Outcome

_CANCELS = frozenset({"CA", "OC", "DC", "OD", "DR", "CR"})


def handle_order(ctx: HandlerContext, msg: Message) -> HandlerResult:
    if not orders_are_referrals(ctx.profile.order_mode, msg):
        return HandlerResult(Outcome.IGNORED, detail="order_mode off")
    if not linking.family_enabled(ctx, msg):
        return linking.disabled()
    placer = msg.get("ORC-2.1") or msg.get("OBR-2.1")
    if not placer:
        raise ContentError(validate.missing(validate.ORDER_KEY))
    authority = msg.get("ORC-2.2") or msg.get("OBR-2.2")
    control = msg.get("ORC-1.1").upper()
    kind = rf.REFERRAL_CREATED if control == "NW" else rf.REFERRAL_CANCELLED if control in _CANCELS \
        else rf.REFERRAL_UPDATED
    referred_to = prd(msg, "RT")
    data: dict[str, str] = {}
    if kind != rf.REFERRAL_CANCELLED:
        orc = msg.segment("ORC")
        details = {
            "priority": msg.get("TQ1-9.1") or msg.get("ORC-7.6") or msg.get("OBR-27.6"),
            "referred_to": referred_to.name or referred_to.ident,
            "referring_provider": xcn(orc, 12).name or prd(msg, "RP").name,
            "specialty": msg.get("OBR-4.1"),
        }
        data = {k: v for k, v in details.items() if v}
    event = repo.NewEvent(kind, occurred_at(msg, ctx.profile.timezone, "ORC-9", "EVN-2"), data)
    return apply_referral(ctx, msg, placer_id=placer, authority=authority, events=[event],
                          referred_to_id=referred_to.ident)
