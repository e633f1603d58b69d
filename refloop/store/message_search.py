"""Finding any message: the journal searched by sender, type, outcome, time, patient and referral.

One filter object and one query serve `refloop messages`, ``GET /api/messages`` and the dashboard's
message page, so the three answer the same question the same way. Listing returns metadata only (IDs,
codes, times); the raw message is PHI and comes only from :func:`raw_message`, which the callers audit.

A patient is given as ``ID^AUTHORITY`` and hashed here, at once, exactly as the handlers hash PID-3
(:func:`refloop.patient.hash_id`); the ID is never stored, logged or echoed back. Every filter is served by
an index: sender by ``ix_messages_sender_control``'s prefix, type and outcome by ``ix_messages_type_id`` /
``ix_messages_outcome_id``, time by ``ix_messages_received_at``, patient by ``ix_message_identifiers_hash``
and referral by ``ix_referral_links_referral``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, select

from refloop.message import MessageError, decode_payload
from refloop.patient import hash_id, parse_id
from refloop.store import referrals as repo
from refloop.store.models import Message, MessageIdentifier, Outcome, ReferralLink
from refloop.store.queries import iso

MAX_LIMIT = 10_000
#: The filter names, as query parameters and (with dashes) as CLI options.
FILTERS = ("sender", "type", "outcome", "since", "until", "patient", "referral", "control_id")


class FilterError(ValueError):
    """A filter value a person must correct; the text names the filter, never the value of ``patient``."""


@dataclass(frozen=True)
class MessageFilter:
    sending_application: str = ""
    sending_facility: str = ""
    message_type: str = ""
    trigger_event: str = ""
    outcome: str = ""
    since: datetime | None = None
    until: datetime | None = None
    patient_hash: str = ""
    referral: str = ""  # numeric id, placer ID or alias (resolved at query time)
    control_id: str = ""
    limit: int = 100


def _time(value: str, name: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise FilterError(f"{name}: not an ISO 8601 time") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_filter(values: Mapping[str, str | None], limit: str | int | None = None) -> MessageFilter:
    """Build a filter from CLI options or query parameters (empty means "any")."""
    def get(name: str) -> str:
        return (values.get(name) or "").strip()

    app, _, facility = get("sender").partition("^")
    mtype, _, trigger = get("type").upper().partition("^")
    outcome = get("outcome").lower()
    if outcome and outcome not in Outcome.ALL:
        raise FilterError(f"outcome: one of {', '.join(Outcome.ALL)}")
    patient = get("patient")
    patient_hash = ""
    if patient:
        ident, authority = parse_id(patient)
        if not ident:
            raise FilterError("patient: give ID^AUTHORITY (the authority as PID-3.4 sends it)")
        patient_hash = hash_id(ident, authority)
    try:
        n = int(limit) if limit not in (None, "") else 100
    except (TypeError, ValueError):
        raise FilterError("limit: not a number") from None
    if n < 1:
        raise FilterError("limit: at least 1")
    return MessageFilter(
        sending_application=app.strip(), sending_facility=facility.strip(), message_type=mtype.strip(),
        trigger_event=trigger.strip(), outcome=outcome, since=_time(get("since"), "since") if get("since") else None,
        until=_time(get("until"), "until") if get("until") else None, patient_hash=patient_hash,
        referral=get("referral"), control_id=get("control_id"), limit=min(n, MAX_LIMIT))


def search(conn: Connection, f: MessageFilter) -> list[dict[str, Any]]:
    """Journal rows matching every given filter, newest first (metadata only)."""
    m = Message.__table__
    stmt = select(m.c.id, m.c.received_at, m.c.sending_application, m.c.sending_facility, m.c.message_type,
                  m.c.trigger_event, m.c.control_id, m.c.outcome, m.c.ack_code, m.c.err_code, m.c.duplicate_of,
                  m.c.profile, m.c.flags, m.c.detail)
    if f.sending_application:
        stmt = stmt.where(m.c.sending_application == f.sending_application)
    if f.sending_facility:
        stmt = stmt.where(m.c.sending_facility == f.sending_facility)
    if f.message_type:
        stmt = stmt.where(m.c.message_type == f.message_type)
    if f.trigger_event:
        stmt = stmt.where(m.c.trigger_event == f.trigger_event)
    if f.outcome:
        stmt = stmt.where(m.c.outcome == f.outcome)
    if f.since is not None:
        stmt = stmt.where(m.c.received_at >= f.since)
    if f.until is not None:
        stmt = stmt.where(m.c.received_at < f.until)
    if f.control_id:
        stmt = stmt.where(m.c.control_id == f.control_id)
    if f.patient_hash:
        ids = MessageIdentifier.__table__
        stmt = stmt.where(m.c.id.in_(select(ids.c.message_id).where(ids.c.id_hash == f.patient_hash)))
    if f.referral:
        rid = repo.resolve_key(conn, f.referral)
        if rid is None:
            return []
        links = ReferralLink.__table__
        stmt = stmt.where(m.c.id.in_(select(links.c.message_id).where(links.c.referral_id == rid)))
    rows = conn.execute(stmt.order_by(m.c.id.desc()).limit(f.limit)).all()
    return [{
        "id": r.id, "received_at": iso(r.received_at),
        "sender": "^".join(x for x in (r.sending_application, r.sending_facility) if x),
        "type": f"{r.message_type}^{r.trigger_event}" if r.message_type else "", "control_id": r.control_id,
        "outcome": r.outcome, "ack_code": r.ack_code, "err_code": r.err_code, "duplicate_of": r.duplicate_of,
        "profile": r.profile, "flags": r.flags, "detail": r.detail,
    } for r in rows]


def message_meta(conn: Connection, message_id: int) -> dict[str, Any] | None:
    """One journal row's metadata plus how it was placed (no content)."""
    m = Message.__table__
    links = ReferralLink.__table__
    link = conn.execute(select(links.c.referral_id, links.c.state, links.c.matched_by)
                        .where(links.c.message_id == message_id)).first()
    meta = conn.execute(select(m.c.id, m.c.received_at, m.c.peer, m.c.size, m.c.encoding, m.c.sending_application,
                               m.c.sending_facility, m.c.message_type, m.c.trigger_event, m.c.control_id,
                               m.c.version, m.c.outcome, m.c.ack_code, m.c.err_code, m.c.detail, m.c.flags,
                               m.c.duplicate_of, m.c.raw.is_not(None).label("kept"))
                        .where(m.c.id == message_id)).first()
    if meta is None:
        return None
    return {
        "id": meta.id, "received_at": iso(meta.received_at), "peer": meta.peer, "size": meta.size,
        "sender": "^".join(x for x in (meta.sending_application, meta.sending_facility) if x),
        "type": f"{meta.message_type}^{meta.trigger_event}" if meta.message_type else "",
        "control_id": meta.control_id, "version": meta.version, "outcome": meta.outcome, "ack_code": meta.ack_code,
        "err_code": meta.err_code, "detail": meta.detail, "flags": meta.flags, "duplicate_of": meta.duplicate_of,
        "raw_kept": bool(meta.kept),
        "link": ({"referral_id": link.referral_id, "state": link.state, "matched_by": link.matched_by}
                 if link is not None else None),
    }


def raw_message(conn: Connection, message_id: int) -> str | None:
    """The stored frame, decoded as it was at receipt (its journaled codec); None if absent or purged.

    PHI: callers write an audit row for every call (`refloop messages --raw`, the API, the dashboard)."""
    m = Message.__table__
    row = conn.execute(select(m.c.raw, m.c.encoding).where(m.c.id == message_id)).first()
    if row is None or row.raw is None:
        return None
    try:
        text, _, _ = decode_payload(row.raw, row.encoding or "cp1252")
    except MessageError:
        return bytes(row.raw).decode("latin-1")
    return text
