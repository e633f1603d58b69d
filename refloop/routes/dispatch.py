"""The one dispatch: a journal row in, its route's effects written, what happened out.

Used by the projector for every accepted frame, by ``refloop replay`` (rows marked ``requeued``) and by a
referral adopting earlier messages (:mod:`refloop.routes.adopt`, through ``HandlerContext.reapply``), so
the three can never decode, route or roll back differently. It runs inside the caller's transaction;
``savepoint=True`` wraps the handler so a failure undoes only this message's writes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from refloop.clock import Clock
from refloop.config import Settings
from refloop.daemon.ack import AckError
from refloop.message import Message, MessageError, decode_payload
from refloop.routes.context import ContentError, HandlerContext, HandlerResult
from refloop.routes.router import Router
from refloop.store import rawsql
from refloop.store.models import Outcome

log = logging.getLogger("refloop.dispatch")


@dataclass
class Applied:
    """What applying one row decided: the outcome, the original-mode ACK code and ERR, and the detail."""

    outcome: str
    code: str  # AA or AE (what ``ack_after = "applied"`` answers)
    error: AckError | None = None
    detail: str = ""
    unlinked_patient: str = ""
    message: Message | None = None  # for building the ACK in applied mode


class HandlerCrashed(Exception):
    """A handler raised outside a savepoint: the caller must roll back and run this row in one."""


def _aware(value: Any) -> datetime:
    if isinstance(value, str):  # SQLite rows read with driver SQL
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def parse_row(settings: Settings, row: Any) -> tuple[Message | None, Any]:
    """Decode and parse a stored frame with its sender's profile (as the ACK path did)."""
    profile = settings.profile_for(row.sending_application, row.sending_facility)
    if row.raw is None:
        return None, profile
    text, _codec, _fb = decode_payload(bytes(row.raw), profile.encoding)
    try:
        return Message.parse(text, profile.segment_terminators), profile
    except MessageError:
        return None, profile


def apply_row(conn: Connection, row: Any, *, settings: Settings, router: Router, clock: Clock, replay: bool,
              savepoint: bool) -> Applied:
    """Run ``row``'s route. ``row`` needs id, raw, received_at, sending_application, sending_facility.

    Storage errors propagate (the caller's transaction is lost anyway). Any other exception: with
    ``savepoint`` the handler's writes are rolled back and the row is ``failed``; without, it raises
    :class:`HandlerCrashed` so the caller can redo its batch with a savepoint around this row only."""
    msg, profile = parse_row(settings, row)
    if msg is None:
        return Applied(Outcome.FAILED, "AE", AckError(207, "Application internal error", "", "E"),
                       "raw purged or unparseable on apply")
    route = router.resolve(msg.message_type, msg.trigger_event)
    if route is None:
        return Applied(Outcome.IGNORED, "AA", None, "no route", message=msg)
    def again(other: Any) -> HandlerResult:
        done = apply_row(conn, other, settings=settings, router=router, clock=clock, replay=True, savepoint=True)
        return HandlerResult(done.outcome, done.error, done.detail, done.unlinked_patient)

    ctx = HandlerContext(settings=settings, conn=conn, clock=clock, profile=profile, message_ref=int(row.id),
                         control_id=msg.control_id, received_at=_aware(row.received_at), replay=replay,
                         reapply=again)
    if savepoint:
        rawsql.execute(conn, "SAVEPOINT apply")
    try:
        res = route.handler(ctx, msg)
    except DBAPIError:
        raise
    except ContentError as exc:
        if not savepoint:
            raise HandlerCrashed(int(row.id)) from None
        rawsql.rollback_to(conn, "apply")
        return Applied(Outcome.ERROR, "AE", exc.error, f"content error {exc.error.code} {exc.error.location}",
                       message=msg)
    except Exception as exc:
        if not savepoint:
            raise HandlerCrashed(int(row.id)) from None
        rawsql.rollback_to(conn, "apply")
        # A bug, not the sender's fault: IDs and the exception type only (its text may quote the message).
        log.error("handler failed", extra={"control_id": msg.control_id, "message_id": int(row.id),
                                           "error_type": type(exc).__name__})
        return Applied(Outcome.FAILED, "AE", AckError(207, "Application internal error", "", "E"),
                       f"handler raised {type(exc).__name__}", message=msg)
    if savepoint:
        rawsql.execute(conn, "RELEASE SAVEPOINT apply")
    if res.outcome == Outcome.ERROR:
        return Applied(Outcome.ERROR, "AE", res.error, res.detail, message=msg)
    return Applied(res.outcome, "AA", None, res.detail, res.unlinked_patient, message=msg)
