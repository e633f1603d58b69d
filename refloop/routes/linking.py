"""Which referral a scheduling or document message belongs to, and how we know (``matched_by``).

Order of evidence, strongest first (docs/referral-loop.md): a coordinator's decision; an explicit
referral/order ID (SCH-26/27, ARQ-24/25, TXA-14/15, ORC-2, OBR-2/29, plus the sender's ``link_fields``)
found among placer IDs and aliases; an earlier message about the same appointment or document; an
explicit ID of a referral not seen yet (the message is *parked* until it arrives); and last a heuristic:
same patient (any identifier shared, see :mod:`refloop.store.identity`) and same referred-to provider
among open referrals. One heuristic candidate links, several
go to the review queue, none means the message is unrelated to any referral.

Unrelated traffic is the common case (most appointments are not referrals), so that path costs at most
two indexed queries and writes only the journal row and the patient's identifier rows (one INSERT, so
the message can be found by patient and adopted by a later referral).
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from refloop.config.windows import windows_from_settings
from refloop.message import Message
from refloop.routes.context import HandlerContext, HandlerResult
from refloop.routes.extract import PatientId, Provider, patient_ids, shared_ids, values_at
from refloop.store import effects, identity
from refloop.store import referrals as repo
from refloop.store.models import Outcome

UNRELATED = "unrelated"


@dataclass(frozen=True)
class Placement:
    referral_id: int | None
    state: str  # repo.LINKED / PARKED / REVIEW / REJECTED, or UNRELATED
    matched_by: str = ""
    pending_key: str = ""
    candidates: list[dict[str, Any]] = field(default_factory=list)
    patient_key: str = ""  # UNRELATED: whose message it is, so a later referral can adopt it
    patient_ids: tuple[PatientId, ...] = ()  # the message's identifiers (the sender's types), read once


def provider_match(candidate: Any, providers: Iterable[Provider]) -> list[str]:
    """Which referred-to fields a candidate shares with the message's providers (ids beat names)."""
    ref_id = (candidate.referred_to_id or "").strip().casefold()
    ref_family = (candidate.referred_to or "").split(",")[0].strip().casefold()
    matched: list[str] = []
    for p in providers:
        if ref_id and p.ident.casefold() == ref_id and "provider_id" not in matched:
            matched.append("provider_id")
        if ref_family and p.family and p.family == ref_family and "provider_name" not in matched:
            matched.append("provider_name")
    return matched


def place(ctx: HandlerContext, msg: Message, *, explicit_paths: tuple[str, ...],
          providers: list[Provider] | Callable[[], list[Provider]], subject: str) -> Placement:
    """Decide where a message's events go (see the module docstring for the order of evidence).

    ``providers`` may be a callable: it is only needed when the patient has open referrals, which most
    department-feed traffic does not, so the handler need not extract them up front."""
    ids = message_ids(ctx, msg)
    placement = _place(ctx, msg, ids, explicit_paths, providers, subject)
    # Only a link can teach the referral identifiers (see record), so only a link carries them on.
    return dataclasses.replace(placement, patient_ids=tuple(ids)) if placement.state == repo.LINKED else placement


def _place(ctx: HandlerContext, msg: Message, ids: list[PatientId], explicit_paths: tuple[str, ...],
           providers: list[Provider] | Callable[[], list[Provider]], subject: str) -> Placement:
    conn = ctx.conn
    if ctx.replay:
        prior = repo.link_row(conn, ctx.message_id)
        if prior is not None and prior.matched_by == "manual":
            return Placement(prior.referral_id, repo.LINKED, "manual")
        if prior is not None and prior.state == repo.REJECTED:
            return Placement(None, repo.REJECTED, "manual_unlink")

    explicit = values_at(msg, explicit_paths + tuple(ctx.profile.link_fields))
    if explicit:
        hit = repo.find_referral(conn, [v for _, v in explicit])
        if hit is not None:
            path = next(p for p, v in explicit if v == hit[1])
            how = "link_field" if path in ctx.profile.link_fields else "explicit"
            return Placement(hit[0], repo.LINKED, f"{how}:{path}")
    earlier = repo.by_subject(conn, subject)
    kind = "appointment" if subject.startswith("appt:") else "document"
    if earlier is not None and earlier[0] is not None:
        return Placement(earlier[0], repo.LINKED, kind)
    if explicit:
        path, value = explicit[0]
        how = "link_field" if path in ctx.profile.link_fields else "explicit"
        return Placement(None, repo.PARKED, f"{how}:{path}", pending_key=value)
    if earlier is not None and earlier[1]:
        return Placement(None, repo.PARKED, kind, pending_key=earlier[1])

    candidates: list[dict[str, Any]] = []
    open_refs = identity.open_referrals_for_ids(conn, shared_ids(ids, ctx.profile.patient_id_authorities))
    wanted = (providers() if callable(providers) else providers) if open_refs else []
    for cand in open_refs:
        matched = provider_match(cand, wanted)
        if matched:
            candidates.append({"id": int(cand.id), "matched": ["patient", *matched], "authority": cand.authority})
    if len(candidates) == 1:
        return Placement(candidates[0]["id"], repo.LINKED, heuristic_reason(candidates[0]))
    if candidates:
        return Placement(None, repo.REVIEW, "heuristic:ambiguous", candidates=candidates)
    return Placement(None, UNRELATED, patient_key=ids[0].key if ids else "")


#: Links strong enough to learn identifiers from: the referral ID is in the message itself. Not from the
#: heuristic, nor from "appointment"/"document" (the earlier message may itself have been a heuristic
#: link), so a wrong guess can never spread to other messages.
_LEARN_FROM = ("explicit:", "link_field:")


def heuristic_reason(candidate: dict[str, Any]) -> str:
    """``heuristic:patient@AUTHORITY+provider_id...``: which authority's identifier matched (never the ID;
    an identifier sent without an authority reads ``patient``)."""
    parts = list(candidate["matched"])
    if candidate.get("authority"):
        parts[0] = f"patient@{candidate['authority']}"
    return "heuristic:" + "+".join(parts)


def message_ids(ctx: HandlerContext, msg: Message) -> list[PatientId]:
    """The patient's identifiers (the sender's ``patient_id_types``), stored with the message so it can be
    found by patient and adopted by a later referral. Written only when there are some: an unrelated
    message without a PID costs nothing more."""
    ids = patient_ids(msg, ctx.profile.patient_id_types)
    if ids or ctx.replay:
        identity.set_message_ids(ctx.conn, ctx.message_id, ids, ctx.received_at, replace=ctx.replay)
    return ids


def unrelated(placement: Placement) -> HandlerResult:
    """What :func:`record` answers for an unrelated message, for handlers that skip building events."""
    return HandlerResult(Outcome.IGNORED, detail=UNRELATED, unlinked_patient=placement.patient_key)


def record(ctx: HandlerContext, msg: Message, placement: Placement, events: list[repo.NewEvent],
           *, presume_hours: float = 0.0) -> HandlerResult:
    """Write the events where :func:`place` decided, then refold every referral the message touched."""
    conn = ctx.conn
    touched = repo.forget_message(conn, ctx.message_id) if ctx.replay else set()
    if ctx.replay:
        identity.forget_learned(conn, ctx.message_id)
    if placement.state == UNRELATED:
        if ctx.replay:
            repo.drop_link(conn, ctx.message_id)
            _refresh_all(ctx, touched)
        return unrelated(placement)
    linked = placement.state == repo.LINKED
    rid = placement.referral_id if linked else None
    if rid is not None and placement.matched_by.startswith(_LEARN_FROM):
        # Linked by the referral's own ID: this patient's identifiers (those the sender shares) are the
        # referral's too, so a later message carrying only, say, the specialist's MRN can link.
        identity.learn(conn, rid, shared_ids(list(placement.patient_ids), ctx.profile.patient_id_authorities),
                       ctx.message_id)
    repo.add_events(conn, referral_id=rid, message_id=ctx.message_id, control_id=ctx.control_id, events=events,
                    pending_key=placement.pending_key if placement.state == repo.PARKED else "")
    repo.set_link(conn, ctx.message_id, referral_id=rid, state=placement.state, matched_by=placement.matched_by,
                  control_id=ctx.control_id, message_type=f"{msg.message_type}^{msg.trigger_event}".upper(),
                  candidates=placement.candidates, fresh=not ctx.replay)
    if rid is not None:
        if presume_hours > 0:
            repo.set_identity(conn, rid, presume_hours=presume_hours)
        touched.add(rid)
    _refresh_all(ctx, touched)
    detail = {
        repo.LINKED: f"referral {rid} ({placement.matched_by})",
        repo.PARKED: "parked until its referral arrives",
        repo.REVIEW: "review: candidates " + json.dumps([c["id"] for c in placement.candidates]),
        repo.REJECTED: "link rejected by a coordinator",
    }[placement.state]
    return HandlerResult(Outcome.PROCESSED, detail=detail[:255])


def _refresh_all(ctx: HandlerContext, referral_ids: Iterable[int]) -> None:
    now = ctx.clock.now()
    on_change = functools.partial(effects.on_projection_change, ctx.conn, ctx.settings, now)
    for rid in sorted(referral_ids):
        # A first delivery only appends events; a replay also removed some (see repo.refresh).
        repo.refresh(ctx.conn, rid, now, duplicate_window_days=ctx.profile.duplicate_window_days, on_change=on_change,
                     appended=not ctx.replay, windows=windows_from_settings(ctx.settings.stall))


_FAMILIES: dict[tuple[str, ...], frozenset[str]] = {}


def family_enabled(ctx: HandlerContext, msg: Message) -> bool:
    """``SenderProfile.message_families``: a sender can be limited to the feeds it is trusted for."""
    key = tuple(ctx.profile.message_families)
    families = _FAMILIES.get(key)
    if families is None:
        families = _FAMILIES[key] = frozenset(f.upper() for f in key)
    return msg.message_type.upper() in families


def disabled() -> HandlerResult:
    return HandlerResult(Outcome.IGNORED, detail="message family disabled for this sender")
