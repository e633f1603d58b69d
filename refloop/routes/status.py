"""OSU^O51 (360X order status): the specialist's accept, decline, interim communication, cancel
confirmation and outcome, on the referral named by ORC-2.

Applied under the same rule as 360X orders (``SenderProfile.order_mode``: MSH-21 ``360X``, or a profile
saying ``referral``); otherwise journaled only. ORC-1/ORC-5 go through :data:`refloop.x360.OSU_RULES`. The
referral is found by its ID (ORC-2, else OBR-2) like any explicit link, and an OSU that arrives before its
referral is parked until the OMG^O19 does. ORC-3 (the specialist's filler number) becomes an alias of the
referral on an accept or decline, as RF1-11 does for an RRI, so later messages citing it link too.

Content errors are answered AE with the ERR location (HL7 table 0357): no ORC is 100 (required segment
missing), no ORC-1 or ORC-2 is 101, an ORC-1/ORC-5 pair outside the table is 103 at ORC-1 (ORC-5 for SC).
"""

from __future__ import annotations

from typing import Any

from refloop import referral as rf
from refloop import x360
from refloop.message import Message
from refloop.routes import linking, validate
from refloop.routes.context import ContentError, HandlerContext, HandlerResult
from refloop.routes.extract import occurred_at, orders_are_referrals
from refloop.store import referrals as repo
from refloop.store.models import Outcome

EXPLICIT_PATHS = ("ORC-2.1", "OBR-2.1")


def handle_osu(ctx: HandlerContext, msg: Message) -> HandlerResult:
    if not orders_are_referrals(ctx.profile.order_mode, msg):
        return HandlerResult(Outcome.IGNORED, detail="order_mode off")
    if not linking.family_enabled(ctx, msg):
        return linking.disabled()
    error = validate.osu_status(ctx.profile, msg)
    if error is not None:
        raise ContentError(error)
    rule = x360.osu_rule(msg.get("ORC-1.1"), msg.get("ORC-5.1"), ctx.profile.osu_states)
    assert rule is not None  # osu_status checked it
    data: dict[str, Any] = {"x360": rule.state}
    subject = ""
    if rule.kind == rf.REFERRAL_ANSWERED:
        filler = msg.get("ORC-3.1")
        data.update(answer=rule.answer, aliases=[filler] if filler and filler != msg.get("ORC-2.1") else [])
    elif rule.kind == rf.NOTE_RECEIVED:
        # The outcome (the consult report) travels as C-CDA beside this message; the OSU is refloop's proof
        # that it was sent, so it counts as the final note that closes the loop.
        doc = f"360X-outcome:{msg.get('ORC-3.1') or msg.get('ORC-2.1') or msg.get('OBR-2.1')}"
        data.update(document_id=doc[:64], doc_type="360X outcome", final=True)
        subject = f"doc:{msg.sending_application}^{msg.sending_facility}|{doc}"
    event = repo.NewEvent(rule.kind, occurred_at(msg, ctx.profile.timezone, "ORC-9", "EVN-2"), data,
                          subject=subject[:255])
    placement = linking.place(ctx, msg, explicit_paths=EXPLICIT_PATHS, providers=[], subject=subject)
    return linking.record(ctx, msg, placement, [event])
