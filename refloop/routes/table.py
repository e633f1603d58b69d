"""DEFAULT_ROUTES: every message type refloop accepts, in one explicit list.

Referral-loop messages go to the handlers that turn them into referral events (``ref``, ``siu``,
``notes``, ``orders``); ``journal_only`` stays for callers that want to accept without effects.
"""

from __future__ import annotations

from refloop.message import Message
from refloop.routes.context import HandlerContext, HandlerResult
from refloop.routes.notes import handle_mdm, handle_oru
from refloop.routes.orders import handle_order
from refloop.routes.ref import handle_ref, handle_rri
from refloop.routes.router import Route
from refloop.routes.siu import handle_siu
from refloop.routes.status import handle_osu
from refloop.routes.validate import appointment_key, document_key, order_key, osu_status, referral_key, result_key


def journal_only(ctx: HandlerContext, msg: Message) -> HandlerResult:
    """Accept and keep: the journal row written by the ingest path is the whole effect."""
    return HandlerResult(detail="journaled")


def _routes(message_type: str, triggers: str, handler: object, name: str, validate: object) -> list[Route]:
    return [Route(message_type, t, handler, name, validate)  # type: ignore[arg-type]
            for t in triggers.split()]


REFERRAL_TRIGGERS = "I12 I13 I14 I15"
SIU_TRIGGERS = "S12 S13 S14 S15 S16 S17 S26"
MDM_TRIGGERS = "T01 T02 T03 T04 T05 T06 T07 T08 T09 T10 T11"

DEFAULT_ROUTES: tuple[Route, ...] = (
    *_routes("REF", REFERRAL_TRIGGERS, handle_ref, "ref", referral_key),
    *_routes("RRI", "I12 I13 I14", handle_rri, "rri", referral_key),
    *_routes("OMG", "O19", handle_order, "order", order_key),
    *_routes("ORM", "O01", handle_order, "order", order_key),
    *_routes("OSU", "O51", handle_osu, "osu", osu_status),
    *_routes("SIU", SIU_TRIGGERS, handle_siu, "siu", appointment_key),
    *_routes("MDM", MDM_TRIGGERS, handle_mdm, "mdm", document_key),
    *_routes("ORU", "R01", handle_oru, "oru", result_key),
)
