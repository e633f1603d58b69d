"""MDM^T01-T11 and ORU^R01 (the specialist's document system) -> consult-note events and documents.

A document is keyed by (sender, TXA-12) or (sender, OBR-3), so edits, replacements and retractions of
the same note update one record. What counts as *final* differs by message: MDM uses TXA-17 completion
status AU/LA while TXA-19 availability is AV (or not sent); ORU uses OBR-25, else OBX-11, F or C. The
profile's ``note_final_rule`` lets a sender whose notes never leave "preliminary" close the loop anyway.
Note text is PHI: it is stored in ``referral_documents.content`` and never logged or put into events.
"""

from __future__ import annotations

from dataclasses import dataclass

from refloop import referral as rf
from refloop.message import Message
from refloop.routes import linking, validate
from refloop.routes.context import ContentError, HandlerContext, HandlerResult
from refloop.routes.extract import NoteBody, Provider, note_body, occurred_at, xcn
from refloop.store import referrals as repo

_RECEIVED = frozenset({"T01", "T02", "T03", "T04", "T05", "T06"})
_REPLACED = frozenset({"T07", "T08", "T09", "T10"})
_WITH_CONTENT = frozenset({"T02", "T04", "T06", "T08", "T10"})
MDM_EXPLICIT = ("TXA-14.1", "TXA-15.1", "ORC-2.1", "OBR-2.1", "OBR-29.1")
ORU_EXPLICIT = ("ORC-2.1", "OBR-2.1", "OBR-29.1")


@dataclass(frozen=True)
class _Note:
    document_id: str
    kind: str
    status: str
    final: bool
    doc_type: str
    body: NoteBody


def _finalise(ctx: HandlerContext, note: _Note) -> _Note:
    if note.kind != rf.NOTE_RETRACTED and ctx.profile.note_final_rule == "include_preliminary" and not note.final:
        return _Note(note.document_id, note.kind, note.status, True, note.doc_type, note.body)
    return note


def _store(ctx: HandlerContext, msg: Message, note: _Note, at_paths: tuple[str, ...], explicit: tuple[str, ...],
           providers: list[Provider]) -> HandlerResult:
    note = _finalise(ctx, note)
    sender = f"{msg.sending_application}^{msg.sending_facility}"
    data: dict[str, object] = {"document_id": note.document_id[:64], "doc_type": note.doc_type[:64]}
    if note.kind != rf.NOTE_RETRACTED:
        data["final"] = note.final
    event = repo.NewEvent(note.kind, occurred_at(msg, ctx.profile.timezone, *at_paths), data,
                          subject=f"doc:{sender}|{note.document_id}")
    placement = linking.place(ctx, msg, explicit_paths=explicit, providers=providers, subject=event.subject)
    if placement.state != linking.UNRELATED:
        # The document first: the refold in record() may close the loop, and its notice cites the note.
        repo.upsert_document(
            ctx.conn, sender=sender, document_id=note.document_id, message_id=ctx.message_id,
            referral_id=placement.referral_id if placement.state == repo.LINKED else None,
            status="retracted" if note.kind == rf.NOTE_RETRACTED else note.status, final=note.final,
            doc_type=note.doc_type, content=note.body.content, content_type=note.body.content_type,
            received_at=ctx.received_at,
        )
    return linking.record(ctx, msg, placement, [event])


def handle_mdm(ctx: HandlerContext, msg: Message) -> HandlerResult:
    if not linking.family_enabled(ctx, msg):
        return linking.disabled()
    trigger = msg.trigger_event.upper()
    doc_id = (msg.get("TXA-13.1") if trigger in ("T09", "T10") else "") or msg.get("TXA-12.1")
    if not doc_id:
        raise ContentError(validate.missing(validate.MDM_KEY))
    kind = rf.NOTE_RECEIVED if trigger in _RECEIVED else rf.NOTE_REPLACED if trigger in _REPLACED \
        else rf.NOTE_RETRACTED
    status = msg.get("TXA-17.1").upper()
    available = msg.get("TXA-19.1").upper() in ("", "AV")
    body = note_body(msg) if trigger in _WITH_CONTENT else NoteBody(None, "")
    note = _Note(doc_id, kind, status, status in ("AU", "LA") and available, msg.get("TXA-2.1"), body)
    return _store(ctx, msg, note, ("EVN-2", "TXA-4"), MDM_EXPLICIT, mdm_providers(msg))


def mdm_providers(msg: Message) -> list[Provider]:
    """Who wrote the note: TXA-5 (primary activity provider), TXA-22 (authenticator), TXA-9 (originator)."""
    txa = msg.segment("TXA")
    return [p for p in (xcn(txa, 5), xcn(txa, 22), xcn(txa, 9)) if p.ident or p.name]


def oru_providers(msg: Message) -> list[Provider]:
    """OBR-32 (principal result interpreter) and OBX-16 (responsible observer)."""
    obr = msg.segment("OBR")
    providers = [Provider(obr.get("32.1.1"), obr.get("32.1.2")) if obr is not None else Provider()]
    providers += [xcn(o, 16) for o in msg.segments_named("OBX")]
    return [p for p in providers if p.ident or p.name]


def handle_oru(ctx: HandlerContext, msg: Message) -> HandlerResult:
    if not linking.family_enabled(ctx, msg):
        return linking.disabled()
    doc_id = msg.get("OBR-3.1")
    if not doc_id:
        raise ContentError(validate.missing(validate.ORU_KEY))
    status = (msg.get("OBR-25.1") or msg.get("OBX-11.1")).upper()
    withdrawn = status == "X" or any(o.get("11.1").upper() == "W" for o in msg.segments_named("OBX"))
    kind = rf.NOTE_RETRACTED if withdrawn else rf.NOTE_REPLACED if status == "C" else rf.NOTE_RECEIVED
    note = _Note(doc_id, kind, status, status in ("F", "C"), msg.get("OBR-4.1"), note_body(msg))
    return _store(ctx, msg, note, ("OBR-22", "OBR-7"), ORU_EXPLICIT, oru_providers(msg))
