"""What happens to one frame inside the writer's transaction: journal, check, dedup, route, ACK.

This runs on the writer thread (see ``writer.py``), inside a SAVEPOINT per message, so one failing
message never undoes the others committed in the same group. The ACK text is built here, before the
commit, and stored in the journal row; the writer releases it to the socket only after COMMIT returned.

Decision table (docs/hl7.md, "ACK decision table"):

========================================  ==============  ==================
situation                                  original mode   enhanced (MSH-15)
========================================  ==============  ==================
routed, effects committed                  AA              CA
well-formed, no route (``unsupported``)    AA (ignored)    CA
... or with ``unsupported = "reject"``     AR 200/201      CR 200/201
MSH-12 version not accepted                AR 203          CR 203
MSH-11 processing id not accepted          AR 202          CR 202
batch (FHS/BHS)                            AR 200          CR 200
MSH-9 or MSH-10 empty                      AR 101          CR 101
no parseable MSH                           AR 100          CR 100
oversize frame                             AR 207          CR 207
content error raised by a handler          AE 1xx          CE 1xx
handler crashed (bug): rolled back         AE 207          CE 207
database failure (nothing committed)       AR 207          CE 207
resend of a committed message              stored code     stored code (C*)
========================================  ==============  ==================
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from itertools import count
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from refloop.clock import Clock
from refloop.config import SenderProfile, Settings
from refloop.daemon.ack import AckError, build_ack
from refloop.daemon.framing import CR, FS, VT
from refloop.message import Message, MessageError, decode_payload, recover_control_id
from refloop.routes.context import ContentError, HandlerContext, HandlerResult
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


@dataclass
class Decision:
    outcome: str
    code: str  # original-mode code; mapped to CA/CE/CR when MSH-15 asks for enhanced mode
    error: AckError | None = None
    detail: str = ""
    duplicate_of: int | None = None
    flags: list[str] = field(default_factory=list)
    claim: bool = False  # accepted: claim the dedup key so resends are answered, not re-applied
    unlinked_patient: str = ""  # see HandlerResult.unlinked_patient


class _LazyRow:
    """The journal row of the message being processed, inserted on first need: when a handler asks for
    the message id (its effects cite it), or at the end with its final values (one INSERT, no UPDATE)."""

    def __init__(self, conn: Connection, values: dict[str, Any]) -> None:
        self.conn = conn
        self.values = values
        self.id: int | None = None

    def ensure(self) -> int:
        if self.id is None:
            self.id = journal.insert_message(self.conn, {**self.values, "outcome": "processing"})
        return self.id

    def finish(self, final: dict[str, Any]) -> int:
        if self.id is None:
            self.id = journal.insert_message(self.conn, {**self.values, **final})
        else:
            journal.update_message(self.conn, self.id, final)
        return self.id


def _reject(code: int, text: str, location: str) -> Decision:
    return Decision(Outcome.REJECTED, "AR", AckError(code, text, location, "E"))


class HandlerFailed(Exception):
    """The handler raised: its writes must be rolled back with the message's savepoint, then the message
    is journaled again with this decision (AE) without running the handler."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(decision.detail)
        self.decision = decision


class LostRace(Exception):
    """Another daemon committed the same message while we processed it: redo it as a duplicate."""


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


class Ingestor:
    """Turns jobs into journal rows, effects and ACKs. Holds no connection: the writer passes one in."""

    def __init__(self, settings: Settings, router: Router, clock: Clock) -> None:
        self.settings = settings
        self.router = router
        self.clock = clock
        self.ack_ids = AckIds()

    # -- helpers -------------------------------------------------------------------------------
    def _ack(self, msg: Message | None, code: str, error: AckError | None, hint: str = "") -> str:
        m = self.settings.mllp
        return build_ack(
            msg, code, ack_control_id=self.ack_ids(), now=self.clock.now(), app=m.ack_application,
            facility=m.ack_facility, error=error, control_id_hint=hint,
        )

    @staticmethod
    def _mode_code(msg: Message | None, code: str, retryable: bool) -> tuple[str, bool]:
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

    @staticmethod
    def _journal_row(job: Job, values: dict[str, Any]) -> dict[str, Any]:
        return {
            "received_at": job.received_at, "peer": _clip(job.peer, 64), "raw": job.payload,
            "size": job.received_size or len(job.payload), **values,
        }

    def _insert_journal(self, conn: Connection, job: Job, **values: Any) -> int:
        row = {
            "received_at": job.received_at,
            "peer": _clip(job.peer, 64),
            "raw": job.payload,
            "size": job.received_size or len(job.payload),
            "outcome": values.pop("outcome", "processing"),
            **values,
        }
        return journal.insert_message(conn, row)

    # -- the entry points ----------------------------------------------------------------------
    def process(self, conn: Connection, job: Job, forced: Decision | None = None) -> Result:
        """Journal and apply one job. ``forced``: the handler already failed on this job in a rolled-back
        savepoint; journal that outcome without running the handler again."""
        if job.kind == BROKEN:
            mid = self._insert_journal(
                conn, job, outcome=Outcome.BROKEN_FRAME, content_hash=content_hash(job.payload),
                detail=f"truncated: {job.reason}", control_id=_clip(recover_control_id(job.payload), 199),
            )
            return Result(outcome=Outcome.BROKEN_FRAME, message_id=mid)
        if job.kind == OVERSIZE:
            return self._oversize(conn, job)
        return self._frame(conn, job, forced)

    def storage_failure(self, job: Job) -> Result:
        """The group commit failed: nothing of this job is stored. Answer AR (CE in enhanced mode),
        which tells the sender to try again later: never AA for what was not committed."""
        if job.kind == BROKEN:
            return Result(outcome="lost_broken_frame")
        msg, hint = self._header(job.payload)
        code, send = self._mode_code(msg, "AR", retryable=True)
        err = AckError(207, "Storage unavailable, resend later", "", "E")
        text = self._ack(msg, code, err, hint)
        return Result(
            ack=frame(text) if send else None, close=job.kind == OVERSIZE, outcome="storage_failure",
            ack_code=code, err_code=207, message_type=msg.message_type if msg else "",
            control_id=msg.control_id if msg else hint,
        )

    def _header(self, payload: bytes) -> tuple[Message | None, str]:
        try:
            text, _codec, _fb = decode_payload(payload, self.settings.default_profile.encoding)
            return Message.parse(text), ""
        except MessageError:
            return None, recover_control_id(payload)

    def _oversize(self, conn: Connection, job: Job) -> Result:
        hint = recover_control_id(job.payload)
        msg, _ = self._header(job.payload)
        if msg is not None and msg.control_id != hint:
            msg = None  # the head was cut inside MSH: trust only the recovered ID
        limit = self.settings.mllp.max_frame_bytes
        err = AckError(207, f"Message exceeds the receiver's limit of {limit} bytes", "", "E")
        code, send = self._mode_code(msg, "AR", retryable=False)
        text = self._ack(msg, code, err, hint)
        mid = self._insert_journal(
            conn, job, outcome=Outcome.OVERSIZE, control_id=_clip(hint, 199), ack_code=code, err_code=207,
            ack=text, detail=f"oversize: {job.received_size}+ bytes, limit {limit}",
        )
        return Result(
            ack=frame(text) if send else None, close=True, outcome=Outcome.OVERSIZE, ack_code=code,
            err_code=207, control_id=hint, message_id=mid,
        )

    def _frame(self, conn: Connection, job: Job, forced: Decision | None = None) -> Result:
        settings = self.settings
        payload = job.payload
        digest = content_hash(payload)
        default = settings.default_profile
        text, codec, fallback = decode_payload(payload, default.encoding)
        try:
            msg: Message | None = Message.parse(text, default.segment_terminators)
        except MessageError as exc:
            msg = None
            parse_error = str(exc)
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
        if msg is None:
            hint = recover_control_id(payload)
            err = AckError(100, "No valid MSH segment", "MSH^1", "E")
            ack_text = self._ack(None, "AR", err, hint)
            mid = self._insert_journal(
                conn, job, outcome=Outcome.UNPARSEABLE, content_hash=digest, encoding=codec,
                control_id=_clip(hint, 199), ack_code="AR", err_code=100, ack=ack_text,
                detail=_clip(f"unparseable: {parse_error}", 255),
            )
            return Result(
                ack=frame(ack_text), outcome=Outcome.UNPARSEABLE, ack_code="AR", err_code=100,
                control_id=hint, message_id=mid, decode_fallback=fallback,
            )

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
        row = _LazyRow(conn, self._journal_row(job, base))
        d = self._decide(conn, job, msg, profile, row, base, forced)
        sent_code, send = self._mode_code(msg, d.code, retryable=False)
        ack_text = self._ack(msg, sent_code, d.error)
        mid = row.finish({
            "outcome": d.outcome, "ack_code": sent_code, "err_code": d.error.code if d.error else None,
            "ack": ack_text, "detail": _clip(result_detail(d.outcome, d.error, d.detail), 255),
            "flags": ",".join(d.flags), "duplicate_of": d.duplicate_of, "patient_key": d.unlinked_patient or None,
        })
        result.message_id = mid
        if d.claim:
            key = (base["sending_application"], base["sending_facility"], base["control_id"])
            self._claim(conn, key, base["content_hash"], mid, d.code, d.error)
        result.ack = frame(ack_text, codec) if send else None
        result.outcome, result.ack_code, result.duplicate_of = d.outcome, sent_code, d.duplicate_of
        result.err_code = d.error.code if d.error else None
        result.flags = tuple(d.flags)
        return result

    def _decide(
        self, conn: Connection, job: Job, msg: Message, profile: SenderProfile, row: _LazyRow,
        base: dict[str, str], forced: Decision | None = None,
    ) -> Decision:
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
        if route is None and self.settings.mllp.unsupported == "reject":
            if self.router.knows_type(msg.message_type):
                return _reject(201, "Unsupported event code", "MSH^1^9^1^2")
            return _reject(200, "Unsupported message type", "MSH^1^9^1^1")

        # Dedup: (sender, MSH-10) + content hash. Only committed, accepted outcomes hold keys.
        key = (base["sending_application"], base["sending_facility"], base["control_id"])
        rows = journal.find_keys(conn, *key)
        for content, message_id, ack_code, err_code, err_text, err_location in rows:
            if content == base["content_hash"]:
                err = AckError(err_code, err_text, err_location, "E") if err_code else None
                return Decision(Outcome.DUPLICATE, ack_code, err, f"resend of message {message_id}",
                                duplicate_of=message_id)
        flags = ["control_id_reused"] if rows else []
        if forced is not None:
            d = forced
            d.flags = flags
        elif route is None:
            d = Decision(Outcome.IGNORED, "AA", None, "no route", flags=flags)
        else:
            d = self._run_handler(conn, job, msg, profile, row, route.handler)
            d.flags = flags
        d.claim = True  # accepted (AA/AE): later resends are answered from this claim
        return d

    def _run_handler(
        self, conn: Connection, job: Job, msg: Message, profile: SenderProfile, row: _LazyRow,
        handler: Callable[[HandlerContext, Message], HandlerResult],
    ) -> Decision:
        ctx = HandlerContext(
            settings=self.settings, conn=conn, clock=self.clock, profile=profile, message_ref=row.ensure,
            control_id=msg.control_id, received_at=job.received_at,
        )
        # No savepoint of its own (two statements per message saved): if the handler fails, the writer
        # rolls back this message's savepoint and journals the failure with ``forced``.
        try:
            res = handler(ctx, msg)
        except ContentError as exc:
            raise HandlerFailed(Decision(
                Outcome.ERROR, "AE", exc.error, f"content error {exc.error.code} {exc.error.location}")) from None
        except DBAPIError:
            raise  # storage trouble: the writer fails the whole group with AR
        except Exception as exc:
            # A bug, not the sender's fault and not retryable by resending: AE keeps the engine's queue
            # moving; the frame is in the journal with outcome=failed for `refloop replay` after a fix.
            log.error(
                "handler failed", extra={"control_id": msg.control_id, "message_id": row.id,
                                         "error_type": type(exc).__name__},
            )
            raise HandlerFailed(Decision(Outcome.FAILED, "AE", AckError(207, "Application internal error", "", "E"),
                                         f"handler raised {type(exc).__name__}")) from None
        if res.outcome == Outcome.ERROR:
            return Decision(Outcome.ERROR, "AE", res.error, res.detail)
        return Decision(res.outcome, "AA", None, res.detail, unlinked_patient=res.unlinked_patient)

    @staticmethod
    def _claim(conn: Connection, key: tuple[str, str, str], digest: str, mid: int, code: str,
               err: AckError | None) -> None:
        values = {
            "sending_application": key[0], "sending_facility": key[1], "control_id": key[2],
            "content_hash": digest, "message_id": mid, "ack_code": code,
            "err_code": err.code if err else None, "err_text": _clip(err.text, 255) if err else "",
            "err_location": _clip(err.location, 64) if err else "",
        }
        # ON CONFLICT DO NOTHING RETURNING: a row back means we won (rowcount is -1 on PostgreSQL).
        if not journal.claim_key(conn, values):
            raise LostRace(mid)


def peer_may_be(profile: SenderProfile, peer: str, subject: str) -> bool:
    """Is this peer (address, certificate CN) allowed to speak as this sender profile?"""
    if profile.allowed_peers:
        from refloop.daemon.access import in_networks, networks

        if not in_networks(peer, networks(profile.allowed_peers)):
            return False
    return not (profile.allowed_subjects and subject not in profile.allowed_subjects)


def result_detail(outcome: str, err: AckError | None, detail: str) -> str:
    if detail:
        return detail
    if err is not None:
        return f"{outcome}: ERR {err.code} {err.location}".strip()
    return outcome
