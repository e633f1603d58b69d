"""The handler contract: what a handler gets (per-message context) and what it returns.

Handlers run inside the writer's transaction, in a savepoint of their own: whatever they write commits
together with the journal row, or not at all. They are synchronous because they run on the writer
thread, next to the database, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Connection

from refloop.clock import Clock
from refloop.config import SenderProfile, Settings
from refloop.daemon.ack import AckError
from refloop.message import Message
from refloop.store.models import Outcome


@dataclass(frozen=True)
class HandlerContext:
    settings: Settings
    conn: Connection  # inside the message's savepoint; never commit or roll back here
    clock: Clock
    profile: SenderProfile
    message_ref: int | Callable[[], int]  # the journal row id, or how to get it (see message_id)
    control_id: str
    received_at: datetime
    replay: bool = False
    #: Apply another journal row again through the one dispatch (adoption of earlier messages), in a
    #: savepoint of its own inside this transaction; given by :mod:`refloop.routes.dispatch`.
    reapply: Reapply | None = None

    @property
    def message_id(self) -> int:
        """The journal row; every effect cites it so replays can be idempotent. The ingest path writes
        the row lazily: a handler that writes nothing (an unrelated SIU) never forces the insert, so
        the row is written once, with its final outcome, instead of inserted and then updated."""
        ref = self.message_ref
        return ref if isinstance(ref, int) else ref()


@dataclass(frozen=True)
class HandlerResult:
    outcome: str = Outcome.PROCESSED
    error: AckError | None = None  # with outcome ERROR: the ACK is AE with this ERR
    detail: str = ""  # IDs and codes only; stored in the journal and logged
    unlinked_patient: str = ""  # unrelated to any referral yet: the patient key a later referral adopts by


class Reapply(Protocol):
    def __call__(self, other: Any) -> HandlerResult: ...


class ContentError(Exception):
    """Raised by a handler for a content problem (required field missing, bad value): answered AE."""

    def __init__(self, error: AckError) -> None:
        super().__init__(f"{error.code} at {error.location or '?'}")
        self.error = error


class Handler(Protocol):
    def __call__(self, ctx: HandlerContext, msg: Message) -> HandlerResult: ...
