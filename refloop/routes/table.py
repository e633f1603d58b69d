"""DEFAULT_ROUTES: every message type refloop accepts, in one explicit list.

Until the referral handlers land, every referral-loop message is journaled and acknowledged (the
"journal-only" handler); `refloop replay` later runs the stored messages through the real handlers.
"""

from __future__ import annotations

from refloop.message import Message
from refloop.routes.context import HandlerContext, HandlerResult
from refloop.routes.router import Route


def journal_only(ctx: HandlerContext, msg: Message) -> HandlerResult:
    """Accept and keep: the journal row written by the ingest path is the whole effect."""
    return HandlerResult(detail="journaled")


def _routes(message_type: str, triggers: str, handler: object, name: str) -> list[Route]:
    return [Route(message_type, t, handler, name) for t in triggers.split()]  # type: ignore[arg-type]


REFERRAL_TRIGGERS = "I12 I13 I14 I15"
SIU_TRIGGERS = "S12 S13 S14 S15 S16 S17 S26"
MDM_TRIGGERS = "T01 T02 T03 T04 T05 T06 T07 T08 T09 T10 T11"

DEFAULT_ROUTES: tuple[Route, ...] = (
    *_routes("REF", REFERRAL_TRIGGERS, journal_only, "journal_only"),
    *_routes("RRI", REFERRAL_TRIGGERS, journal_only, "journal_only"),
    *_routes("OMG", "O19", journal_only, "journal_only"),
    *_routes("ORM", "O01", journal_only, "journal_only"),
    *_routes("SIU", SIU_TRIGGERS, journal_only, "journal_only"),
    *_routes("MDM", MDM_TRIGGERS, journal_only, "journal_only"),
    *_routes("ORU", "R01", journal_only, "journal_only"),
)
