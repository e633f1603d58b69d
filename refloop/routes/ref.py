"""REF^I12-I15 (the referrer's EHR) and RRI^I12-I14 (the specialist's answer).

A REF carries the referral's own key (RF1-6), so it always creates or updates its referral and never
goes through the linking heuristics; creating the row is also what unparks scheduling and document
messages that arrived first. An RRI names the referral it answers, so it links explicitly or is parked
until that referral's REF arrives.
"""

from __future__ import annotations

import functools

from refloop import referral as rf
from refloop.config.windows import windows_from_settings
from refloop.message import Message
from refloop.routes import adopt, linking, validate
from refloop.routes.context import ContentError, HandlerContext, HandlerResult
from refloop.routes.extract import occurred_at, prd, values_at
from refloop.store import effects, identity
from refloop.store import referrals as repo
from refloop.store.models import Outcome

_REF_KINDS = {
    "I12": rf.REFERRAL_CREATED,
    "I13": rf.REFERRAL_UPDATED,
    "I14": rf.REFERRAL_CANCELLED,
    # I15 is a status query: recorded on the timeline as an update without details, so no status moves.
    "I15": rf.REFERRAL_UPDATED,
}
#: RF1-1 (table 0283) -> referral.py answers. Some senders spell a rejection RJ.
_ANSWERS = {"A": rf.ANSWER_ACCEPTED, "R": rf.ANSWER_DECLINED, "RJ": rf.ANSWER_DECLINED, "E": rf.ANSWER_EXPIRED}


def _required(msg: Message, path: str, location: str) -> str:
    value = msg.get(path).strip()
    if not value:
        raise ContentError(validate.missing(location))
    return value


def apply_referral(ctx: HandlerContext, msg: Message, *, placer_id: str, authority: str,
                   events: list[repo.NewEvent], referred_to_id: str) -> HandlerResult:
    """Shared by REF and 360X orders: the message *is* about this key, so create-or-update, then refold."""
    conn = ctx.conn
    touched = repo.forget_message(conn, ctx.message_id) if ctx.replay else set()
    # Identity goes into the INSERT of a new referral, or an UPDATE only when a value differs. The
    # referral's patient key is the person's (see identity.person_key); every identifier gets a row.
    ids = linking.message_ids(ctx, msg)
    pkey = identity.person_key(conn, ids)
    rid = repo.get_or_create(conn, placer_id[:199], authority[:180], ctx.clock.now(),
                             patient_key=pkey, referred_to_id=referred_to_id[:64])
    identity.add_referral_ids(conn, rid, ids)
    repo.add_events(conn, referral_id=rid, message_id=ctx.message_id, control_id=ctx.control_id, events=events)
    repo.set_link(conn, ctx.message_id, referral_id=rid, state=repo.LINKED, matched_by="referral_id",
                  control_id=ctx.control_id, message_type=f"{msg.message_type}^{msg.trigger_event}".upper(),
                  fresh=not ctx.replay)
    now = ctx.clock.now()
    windows = windows_from_settings(ctx.settings.stall)
    on_change = functools.partial(effects.on_projection_change, conn, ctx.settings, now)
    for other in sorted(touched - {rid}):
        repo.refresh(conn, other, now, duplicate_window_days=ctx.profile.duplicate_window_days, windows=windows,
                     on_change=on_change)
    state = repo.refresh(conn, rid, now, duplicate_window_days=ctx.profile.duplicate_window_days,
                         appended=not ctx.replay, windows=windows, on_change=on_change)
    adopted = adopt.adopt_earlier(ctx, rid, [i.key for i in ids]) if state.status in rf.OPEN_STATUSES else 0
    detail = f"referral {rid} {state.status.value}" + (f", adopted {adopted} earlier" if adopted else "")
    return HandlerResult(Outcome.PROCESSED, detail=detail)


def handle_ref(ctx: HandlerContext, msg: Message) -> HandlerResult:
    if not linking.family_enabled(ctx, msg):
        return linking.disabled()
    placer = _required(msg, "RF1-6.1", validate.REF_KEY)
    kind = _REF_KINDS.get(msg.trigger_event.upper(), rf.REFERRAL_UPDATED)
    referred_to = prd(msg, "RT")
    data: dict[str, str] = {}
    if msg.trigger_event.upper() in ("I12", "I13"):
        details = {
            "priority": msg.get("RF1-2.1"),
            "referred_to": referred_to.name or referred_to.ident,
            "referring_provider": prd(msg, "RP").name or prd(msg, "RP").ident,
            "specialty": msg.get("RF1-3.1"),
        }
        data = {k: v for k, v in details.items() if v}
    event = repo.NewEvent(kind, occurred_at(msg, ctx.profile.timezone, "EVN-2"), data)
    return apply_referral(ctx, msg, placer_id=placer, authority=msg.get("RF1-6.2"), events=[event],
                          referred_to_id=referred_to.ident)


def handle_rri(ctx: HandlerContext, msg: Message) -> HandlerResult:
    if not linking.family_enabled(ctx, msg):
        return linking.disabled()
    placer = _required(msg, "RF1-6.1", validate.REF_KEY)
    code = msg.get("RF1-1.1").upper()
    reps = msg.repetitions("RF1-11")
    alias_paths = tuple(f"RF1-11({n}).1" for n in range(1, len(reps) + 1))
    aliases = [v for _, v in values_at(msg, alias_paths) if v != placer]
    data = {"answer": _ANSWERS.get(code, code.lower() or "unknown"), "aliases": aliases}
    event = repo.NewEvent(rf.REFERRAL_ANSWERED, occurred_at(msg, ctx.profile.timezone, "EVN-2"), data)
    placement = linking.place(ctx, msg, explicit_paths=("RF1-6.1", *alias_paths), providers=[], subject="")
    return linking.record(ctx, msg, placement, [event])
