"""The ACK path: what happens to a frame between "complete" and "ACK written", on the writer thread.

Journal-first: every check that needs no referral state runs here (the decision table's rows down to
"unsupported type", plus each type's structural validator, so content errors still get AE with the ERR
location in the same exchange); then the whole group commit is journaled with a few statements (one dedup
lookup, one multi-row journal insert, one claim insert) and committed. No referral table is touched here:
accepted frames are journaled ``queued`` and the projector (``projector.py``) applies them in journal order.
``mllp.ack_after`` only chooses which commit releases the ACK: this one ("journal") or the projector's
("applied", which answers AE for handler failures as before).

Decision table (docs/ingest.md and docs/hl7.md have it with both modes):

========================================  ==============  ==================  ==================
situation                                  original mode   enhanced (MSH-15)   ack_after
========================================  ==============  ==================  ==================
routed, journaled (queued)                 AA              CA                  journal
routed, effects committed                  AA              CA                  applied
well-formed, no route (``unsupported``)    AA (ignored)    CA                  both
... or with ``unsupported = "reject"``     AR 200/201      CR 200/201          both
MSH-12 version not accepted                AR 203          CR 203              both
MSH-11 processing id not accepted          AR 202          CR 202              both
batch (FHS/BHS)                            AR 200          CR 200              both
MSH-9 or MSH-10 empty                      AR 101          CR 101              both
no parseable MSH                           AR 100          CR 100              both
oversize frame                             AR 207          CR 207              both
structural content error (validator)       AE 101          CE 101              both
content error raised by a handler          AE 1xx          CE 1xx              applied
handler crashed (bug): rolled back         AE 207          CE 207              applied
database failure (nothing committed)       AR 207          CE 207              both
resend of a committed message              stored code     stored code (C*)    both
========================================  ==============  ==================  ==================
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from itertools import count
from typing import Any

from sqlalchemy import Connection

from refloop.clock import Clock
from refloop.config import SenderProfile, Settings
from refloop.daemon.access import in_networks, networks
from refloop.daemon.ack import AckError, build_ack
from refloop.daemon.framing import CR, FS, VT
from refloop.message import Message, MessageError, decode_payload, recover_control_id
from refloop.routes.router import Router
from refloop.store import journal
from refloop.store.models import Message as Journal
from refloop.store.models import MessageKey, Outcome

log = logging.getLogger("refloop.ingest")

JOURNAL = Journal.__table__
KEYS = MessageKey.__table__

FRAME, BROKEN, OVERSIZE = "frame", "broken", "oversize"

# Original-mode code -> enhanced accept-ack code. AR splits: protocol rejects are CR, our own trouble CE.
_ENHANCED = {"AA": "CA", "AE": "CE", "AR": "CR"}


@dataclass
class Job:
    """One unit of work for the writer. ``kind`` is FRAME, BROKEN (truncated frame) or OVERSIZE."""

    kind: str
    payload: bytes
    peer: str
    received_at: datetime
    reason: str = ""  # BROKEN: vt_in_frame, disconnect, deadline, shutdown
    received_size: int = 0  # OVERSIZE: bytes received before the limit tripped
    peer_subject: str = ""  # client-certificate CN (mTLS), for sender identity checks
    started: float = field(default_factory=time.perf_counter)


@dataclass
class Result:
    """What the connection does after the commit, plus what metrics and logs need (no PHI)."""

    ack: bytes | None = None  # MLLP-framed ACK, or None (broken frame, MSH-15 says not to answer)
    close: bool = False
    outcome: str = ""
    ack_code: str = ""
    err_code: int | None = None
    message_type: str = ""
    trigger: str = ""
    control_id: str = ""
    profile: str = "unknown"
    message_id: int | None = None
    duplicate_of: int | None = None
    flags: tuple[str, ...] = ()
    decode_fallback: bool = False
    app_ack_requested: bool = False
    #: ``ack_after = "applied"``: the ACK waits for the projector's commit of row ``awaits`` (this message's
    #: own row, or for a resend the original's, while that is still queued).
    await_apply: bool = False
    awaits: int | None = None
    queued: bool = False  # journaled for the projector (counts towards the apply lag)


@dataclass
class Decision:
    outcome: str
    code: str  # original-mode code; mapped to CA/CE/CR when MSH-15 asks for enhanced mode
    error: AckError | None = None
    detail: str = ""
    duplicate_of: int | None = None
    flags: list[str] = field(default_factory=list)
    claim: bool = False  # accepted: claim the dedup key so resends are answered, not re-applied


@dataclass
class Prepared:
    """One job after the checks that need no database: its journal row and its (tentative) decision."""

    job: Job
    row: dict[str, Any]
    result: Result
    decision: Decision
    msg: Message | None = None
    hint: str = ""  # MSA-2 recovered from a frame without a usable MSH
    codec: str = "latin-1"
    key: tuple[str, str, str] | None = None  # dedup key, when the decision accepts the message
    digest: str = ""
    send: bool = True
    ack_text: str = ""
    in_group_of: int | None = None  # index of an earlier identical message in the same group
    wait_for: int | None = None  # applied mode, a resend of a queued original: that row's id


def _reject(code: int, text: str, location: str) -> Decision:
    return Decision(Outcome.REJECTED, "AR", AckError(code, text, location, "E"))


class LostRace(Exception):
    """Another daemon committed one of this group's messages meanwhile: redo the group (now a duplicate)."""


class StorageError(Exception):
    """The database cannot be trusted to keep what we write (e.g. its file was removed)."""


def frame(ack_text: str, codec: str = "latin-1") -> bytes:
    """MLLP-frame an ACK in the codec the message was decoded with, so the echoed MSH-10 in MSA-2 is
    byte-for-byte what the sender sent (the rest of an ACK is ASCII)."""
    try:
        data = ack_text.encode(codec, "replace")
    except LookupError:  # pragma: no cover - codecs come from message.py's fixed list
        data = ack_text.encode("latin-1", "replace")
    return VT + data + FS + CR


def content_hash(payload: bytes) -> str:
    """SHA-256 of the payload with segment terminators normalised: a resend through another engine
    that turns CR into CRLF is still the same message (docs/hl7.md, "Resends")."""
    norm = payload.replace(b"\r\n", b"\r").replace(b"\n", b"\r").strip(b"\r \t\x00")
    return hashlib.sha256(norm).hexdigest()


def _clip(value: str, n: int) -> str:
    return value if len(value) <= n else value[:n]


class AckIds:
    """New MSH-10 values for ACKs: a per-process random prefix plus a counter (unique across daemons
    sharing a database, and at most 20 characters as HL7 v2.5.1 allows)."""

    def __init__(self) -> None:
        self._prefix = "RL" + secrets.token_hex(4).upper()
        self._n = count(1)

    def __call__(self) -> str:
        return f"{self._prefix}{next(self._n):010d}"


class Acks:
    """Builds ACK text the same way for the ACK path and the projector (``ack_after = "applied"``)."""

    def __init__(self, settings: Settings, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.ids = AckIds()

    def text(self, msg: Message | None, code: str, error: AckError | None, hint: str = "") -> str:
        m = self.settings.mllp
        return build_ack(
            msg, code, ack_control_id=self.ids(), now=self.clock.now(), app=m.ack_application,
            facility=m.ack_facility, error=error, control_id_hint=hint,
        )

    @staticmethod
    def mode_code(msg: Message | None, code: str, retryable: bool) -> tuple[str, bool]:
        """Map an original-mode decision to what is actually sent, and whether to send at all."""
        accept = (msg.accept_ack_type.strip().upper() if msg is not None else "")
        if not accept:
            return code, True
        enhanced = "CE" if (code == "AR" and retryable) else _ENHANCED.get(code, code)
        if accept == "NE":
            send = False
        elif accept == "ER":
            send = enhanced != "CA"
        elif accept == "SU":
            send = enhanced == "CA"
        else:  # AL, or a value outside table 0155: answer rather than leave the sender waiting
            send = True
        return enhanced, send


class Ingestor:
    """Turns a group of jobs into journal rows and ACKs. Holds no connection: the writer passes one in."""

    def __init__(self, settings: Settings, router: Router, clock: Clock) -> None:
        self.settings = settings
        self.router = router
        self.clock = clock
        self.acks = Acks(settings, clock)

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        self.acks.settings = settings

    @staticmethod
    def _row(job: Job, **values: Any) -> dict[str, Any]:
        return {"received_at": job.received_at, "peer": _clip(job.peer, 64), "raw": job.payload,
                "size": job.received_size or len(job.payload), **values}

    # -- phase 1: no database ------------------------------------------------------------------
    def prepare(self, job: Job) -> Prepared:
        """Every check that needs neither the database nor referral state."""
        if job.kind == BROKEN:
            hint = recover_control_id(job.payload)
            row = self._row(job, content_hash=content_hash(job.payload), detail=f"truncated: {job.reason}",
                            control_id=_clip(hint, 199))
            return Prepared(job, row, Result(outcome=Outcome.BROKEN_FRAME),
                            Decision(Outcome.BROKEN_FRAME, ""), hint=hint, send=False)
        if job.kind == OVERSIZE:
            return self._oversize(job)
        return self._frame(job)

    def _header(self, payload: bytes) -> tuple[Message | None, str]:
        try:
            text, _codec, _fb = decode_payload(payload, self.settings.default_profile.encoding)
            return Message.parse(text), ""
        except MessageError:
            return None, recover_control_id(payload)

    def storage_failure(self, job: Job) -> Result:
        """The group commit failed: nothing of this job is stored. Answer AR (CE in enhanced mode),
        which tells the sender to try again later: never AA for what was not committed."""
        if job.kind == BROKEN:
            return Result(outcome="lost_broken_frame")
        msg, hint = self._header(job.payload)
        code, send = self.acks.mode_code(msg, "AR", retryable=True)
        err = AckError(207, "Storage unavailable, resend later", "", "E")
        text = self.acks.text(msg, code, err, hint)
        return Result(
            ack=frame(text) if send else None, close=job.kind == OVERSIZE, outcome="storage_failure",
            ack_code=code, err_code=207, message_type=msg.message_type if msg else "",
            control_id=msg.control_id if msg else hint,
        )

    def _oversize(self, job: Job) -> Prepared:
        hint = recover_control_id(job.payload)
        msg, _ = self._header(job.payload)
        if msg is not None and msg.control_id != hint:
            msg = None  # the head was cut inside MSH: trust only the recovered ID
        limit = self.settings.mllp.max_frame_bytes
        err = AckError(207, f"Message exceeds the receiver's limit of {limit} bytes", "", "E")
        row = self._row(job, control_id=_clip(hint, 199), detail=f"oversize: {job.received_size}+ bytes, limit {limit}")
        return Prepared(job, row, Result(close=True, outcome=Outcome.OVERSIZE, control_id=hint),
                        Decision(Outcome.OVERSIZE, "AR", err), msg=msg, hint=hint)

    def _parse(self, payload: bytes) -> tuple[Message | None, str, str, bool, SenderProfile]:
        settings = self.settings
        default = settings.default_profile
        text, codec, fallback = decode_payload(payload, default.encoding)
        try:
            msg: Message | None = Message.parse(text, default.segment_terminators)
            parse_error = ""
        except MessageError as exc:
            msg, parse_error = None, str(exc)
        profile = default
        if msg is not None:
            profile = settings.profile_for(msg.sending_application, msg.sending_facility)
            if profile is not default and (
                fallback or profile.segment_terminators != default.segment_terminators
            ):
                if fallback and profile.encoding != default.encoding:
                    text, codec, fallback = decode_payload(payload, profile.encoding)
                try:
                    msg = Message.parse(text, profile.segment_terminators)
                except MessageError as exc:  # pragma: no cover - same first segment as above
                    msg, parse_error = None, str(exc)
        return msg, codec, parse_error, fallback, profile

    def _frame(self, job: Job) -> Prepared:
        payload = job.payload
        digest = content_hash(payload)
        msg, codec, parse_error, fallback, profile = self._parse(payload)
        if msg is None:
            hint = recover_control_id(payload)
            row = self._row(job, content_hash=digest, encoding=codec, control_id=_clip(hint, 199),
                            detail=_clip(f"unparseable: {parse_error}", 255))
            return Prepared(job, row, Result(outcome=Outcome.UNPARSEABLE, control_id=hint, decode_fallback=fallback),
                            Decision(Outcome.UNPARSEABLE, "AR", AckError(100, "No valid MSH segment", "MSH^1", "E")),
                            hint=hint, codec=codec, digest=digest)
        base = {
            "content_hash": digest,
            "encoding": codec,
            "sending_application": _clip(msg.sending_application, 180),
            "sending_facility": _clip(msg.sending_facility, 180),
            "message_type": _clip(msg.message_type.upper(), 8),
            "trigger_event": _clip(msg.trigger_event.upper(), 8),
            "control_id": _clip(msg.control_id, 199),
            "version": _clip(msg.version, 16),
            "processing_id": _clip(msg.processing_id, 8),
            "profile": profile.name,
        }
        result = Result(
            message_type=base["message_type"], trigger=base["trigger_event"], control_id=msg.control_id,
            profile=profile.name, decode_fallback=fallback,
            app_ack_requested=msg.app_ack_type.strip().upper() not in ("", "NE"),
        )
        d = self._decide(job, msg, profile)
        key = (base["sending_application"], base["sending_facility"], base["control_id"]) if d.claim else None
        return Prepared(job, self._row(job, **base), result, d, msg=msg, codec=codec, key=key, digest=digest)

    def _decide(self, job: Job, msg: Message, profile: SenderProfile) -> Decision:
        if msg.is_batch():
            return _reject(200, "Batch messages (FHS/BHS) are not supported; send one message per frame", "")
        if not msg.message_type:
            return _reject(101, "Required field missing", "MSH^1^9")
        if not msg.control_id:
            return _reject(101, "Required field missing", "MSH^1^10")
        if msg.version not in profile.versions:
            return _reject(203, "Unsupported version ID", "MSH^1^12")
        if msg.processing_id.upper() not in self.settings.mllp.processing_ids:
            return _reject(202, "Unsupported processing ID", "MSH^1^11")
        if not peer_may_be(profile, job.peer, job.peer_subject):
            # Neutral text: do not tell a stranger which senders or addresses would have been accepted.
            d = _reject(207, "Sender not permitted on this connection", "MSH^1^3")
            d.flags = ["sender_not_permitted"]
            return d
        route = self.router.resolve(msg.message_type, msg.trigger_event)
        if route is None:
            if self.settings.mllp.unsupported == "reject":
                if self.router.knows_type(msg.message_type):
                    return _reject(201, "Unsupported event code", "MSH^1^9^1^2")
                return _reject(200, "Unsupported message type", "MSH^1^9^1^1")
            return Decision(Outcome.IGNORED, "AA", None, "no route", claim=True)
        error = route.validate(profile, msg) if route.validate is not None else None
        if error is not None:
            return Decision(Outcome.ERROR, "AE", error, f"content error {error.code} {error.location}", claim=True)
        return Decision(Outcome.QUEUED, "AA", None, "queued", claim=True)

    # -- phase 2: the group's statements, inside the writer's transaction -----------------------
    def journal_group(self, conn: Connection, preps: list[Prepared]) -> list[Result]:
        """Dedup, journal and claim a whole group with one statement each; ACK texts are built here.

        Raises :class:`LostRace` when another daemon claimed one of these keys after our lookup: the
        writer rolls the group back and runs it again, when the lookup finds that claim."""
        self._dedup(conn, preps)
        applied_mode = self.settings.mllp.ack_after == "applied"
        rows: list[dict[str, Any]] = []
        for p in preps:
            d = p.decision
            deferred = applied_mode and (d.outcome == Outcome.QUEUED or p.wait_for is not None or (
                p.in_group_of is not None and preps[p.in_group_of].decision.outcome == Outcome.QUEUED))
            if d.code:
                sent, send = self.acks.mode_code(p.msg, d.code, retryable=False)
                p.send = p.send and send
                if not deferred:
                    p.ack_text = self.acks.text(p.msg, sent, d.error, p.hint)
                p.result.ack_code = sent
            p.result.await_apply = deferred
            p.result.queued = d.outcome == Outcome.QUEUED
            rows.append({
                **p.row, "outcome": d.outcome, "ack_code": p.result.ack_code,
                "err_code": d.error.code if d.error else None, "ack": p.ack_text,
                "detail": _clip(p.row.get("detail") or result_detail(d.outcome, d.error, d.detail), 255),
                "flags": ",".join(d.flags),
                "duplicate_of": d.duplicate_of,
            })
        ids = journal.insert_many(conn, rows)
        claims = []
        for i, (p, mid) in enumerate(zip(preps, ids, strict=True)):
            d = p.decision
            p.result.message_id = mid
            if p.result.await_apply:
                first = p.in_group_of
                p.result.awaits = p.wait_for or (ids[first] if first is not None else mid)
            if p.in_group_of is not None:
                d.duplicate_of = ids[p.in_group_of]
                journal.update_message(conn, mid, {**rows[i], "duplicate_of": d.duplicate_of})
            if d.claim and p.key is not None:
                err = d.error
                claims.append({
                    "sending_application": p.key[0], "sending_facility": p.key[1], "control_id": p.key[2],
                    "content_hash": p.digest, "message_id": mid, "ack_code": d.code,
                    "err_code": err.code if err else None, "err_text": _clip(err.text, 255) if err else "",
                    "err_location": _clip(err.location, 64) if err else "",
                })
        if claims and len(journal.claim_many(conn, claims)) != len(claims):
            raise LostRace()
        out = []
        for p in preps:
            r, d = p.result, p.decision
            r.outcome, r.duplicate_of = d.outcome, d.duplicate_of
            r.err_code = d.error.code if d.error else None
            r.flags = tuple(d.flags)
            if p.ack_text and p.send:
                r.ack = frame(p.ack_text, p.codec)
            out.append(r)
        return out

    def _dedup(self, conn: Connection, preps: list[Prepared]) -> None:
        """(sender, MSH-10) + content hash. Only committed, accepted outcomes hold keys; a message repeated
        inside one group is a duplicate of its first copy."""
        keyed = [p for p in preps if p.key is not None]
        if not keyed:
            return
        found: dict[tuple[str, str, str], list[Any]] = {}
        for k in journal.find_keys_many(conn, sorted({p.key for p in keyed if p.key})):
            found.setdefault((k.sending_application, k.sending_facility, k.control_id), []).append(k)
        first: dict[tuple[str, str, str, str], int] = {}
        for i, p in enumerate(preps):
            if p.key is None:
                continue
            claims = found.get(p.key, [])
            same = next((c for c in claims if c.content_hash == p.digest), None)
            if same is not None:
                err = AckError(same.err_code, same.err_text, same.err_location, "E") if same.err_code else None
                p.decision = Decision(Outcome.DUPLICATE, same.ack_code, err, f"resend of message {same.message_id}",
                                      duplicate_of=same.message_id)
                if same.outcome == Outcome.QUEUED and self.settings.mllp.ack_after == "applied":
                    p.wait_for = int(same.message_id)  # answer what the original will be answered
                p.key = None
                continue
            ident = (*p.key, p.digest)
            if ident in first:
                earlier = preps[first[ident]].decision
                p.decision = Decision(Outcome.DUPLICATE, earlier.code, earlier.error, "resend in the same group")
                p.in_group_of = first[ident]
                p.key = None
                continue
            first[ident] = i
            if claims or any(q.key is not None and q.key == p.key and q is not p for q in preps[:i]):
                p.decision.flags.append("control_id_reused")


def peer_may_be(profile: SenderProfile, peer: str, subject: str) -> bool:
    """Is this peer (address, certificate CN) allowed to speak as this sender profile?"""
    if profile.allowed_peers and not in_networks(peer, networks(profile.allowed_peers)):
        return False
    return not (profile.allowed_subjects and subject not in profile.allowed_subjects)


def result_detail(outcome: str, err: AckError | None, detail: str) -> str:
    if detail:
        return detail
    if err is not None:
        return f"{outcome}: ERR {err.code} {err.location}".strip()
    return outcome
