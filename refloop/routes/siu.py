"""SIU^S12-S17/S26 (the specialist's scheduling system) -> appointment events.

The trigger says what happened, but some systems send every change as S14 (or even S12) and put the real
outcome in SCH-25 filler status (table 0278), so a recognised SCH-25 value of Complete, Noshow, Cancelled,
Dc or Deleted overrides a booking/modification trigger. Compared case-insensitively, because senders do
not agree on case.
"""

from __future__ import annotations

from refloop import referral as rf
from refloop.message import Message
from refloop.routes import linking, validate
from refloop.routes.context import ContentError, HandlerContext, HandlerResult
from refloop.routes.extract import Provider, appointment_id, appointment_start, occurred_at, xcn
from refloop.store import referrals as repo

_TRIGGERS = {
    "S12": rf.APPOINTMENT_BOOKED,
    "S13": rf.APPOINTMENT_RESCHEDULED,
    "S14": rf.APPOINTMENT_MODIFIED,
    "S15": rf.APPOINTMENT_CANCELLED,
    "S16": rf.APPOINTMENT_CANCELLED,  # discontinue: the rest of the series will not happen
    "S17": rf.APPOINTMENT_DELETED,
    "S26": rf.APPOINTMENT_NO_SHOW,
}
_FILLER_STATUS = {
    "complete": rf.APPOINTMENT_COMPLETED,
    "completed": rf.APPOINTMENT_COMPLETED,
    "noshow": rf.APPOINTMENT_NO_SHOW,
    "no-show": rf.APPOINTMENT_NO_SHOW,
    "cancelled": rf.APPOINTMENT_CANCELLED,
    "canceled": rf.APPOINTMENT_CANCELLED,
    "dc": rf.APPOINTMENT_CANCELLED,
    "deleted": rf.APPOINTMENT_DELETED,
}
_OVERRIDABLE = frozenset({rf.APPOINTMENT_BOOKED, rf.APPOINTMENT_RESCHEDULED, rf.APPOINTMENT_MODIFIED})
EXPLICIT_PATHS = ("SCH-26.1", "SCH-27.1", "ARQ-24.1", "ARQ-25.1")


def providers(msg: Message) -> list[Provider]:
    """Who the appointment is with: AIP-3 people, AIL-3 locations (point of care, facility), AIG-3 resources."""
    out = [xcn(seg, 3) for seg in msg.segments_named("AIP")]
    for seg in msg.segments_named("AIL"):
        out += [Provider(seg.get("3.1")), Provider(seg.get("3.4.1"))]
    out += [Provider(seg.get("3.1"), seg.get("3.2")) for seg in msg.segments_named("AIG")]
    return [p for p in out if p.ident or p.name]


def handle_siu(ctx: HandlerContext, msg: Message) -> HandlerResult:
    if not linking.family_enabled(ctx, msg):
        return linking.disabled()
    appt = appointment_id(msg)
    if not appt:
        raise ContentError(validate.missing(validate.SIU_KEY))
    kind = _TRIGGERS.get(msg.trigger_event.upper(), rf.APPOINTMENT_MODIFIED)
    filler = _FILLER_STATUS.get(msg.get("SCH-25.1").strip().casefold())
    if filler is not None and kind in _OVERRIDABLE:
        kind = filler
    subject = f"appt:{msg.sending_application}^{msg.sending_facility}|{appt}"
    placement = linking.place(ctx, msg, explicit_paths=EXPLICIT_PATHS, providers=lambda: providers(msg),
                              subject=subject)
    if placement.state == linking.UNRELATED and not ctx.replay:
        # Most scheduling traffic is about appointments that are not referrals: no event to build.
        return linking.unrelated(placement)
    data: dict[str, str] = {"appointment_id": appt[:64]}
    start = appointment_start(msg, ctx.profile.timezone)
    if start is not None:
        data["start"] = start.isoformat()
    event = repo.NewEvent(kind, occurred_at(msg, ctx.profile.timezone, "EVN-2"), data, subject=subject)
    return linking.record(ctx, msg, placement, [event], presume_hours=ctx.profile.presume_attendance_hours)
