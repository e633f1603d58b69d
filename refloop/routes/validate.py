"""Structural checks per message type: pure functions of (sender profile, message), no database.

They run on the ACK path, before the frame is journaled, so a sender still gets AE with the ERR location
in the same exchange although the message's effects are applied later by the projector (``ack_after =
"journal"``). Only rules that need no referral state belong here: a required key field that is missing.
The handlers enforce the same rules through :func:`require` (one rule, one place) in case a message
reaches them another way (replay of an old row, a profile changed since).
"""

from __future__ import annotations

from collections.abc import Callable

from refloop.config import SenderProfile
from refloop.daemon.ack import AckError
from refloop.message import Message
from refloop.routes.extract import orders_are_referrals
from refloop.x360 import osu_rule

Validator = Callable[[SenderProfile, Message], AckError | None]

#: Where each type keeps the key its handler cannot do without (ERR-2 location of the AE).
REF_KEY = "RF1^1^6^1"
SIU_KEY = "SCH^1^2^1"
MDM_KEY = "TXA^1^12^1"
ORU_KEY = "OBR^1^3^1"
ORDER_KEY = "ORC^1^2^1"


def missing(location: str) -> AckError:
    return AckError(101, "Required field missing", location, "E")


def _enabled(profile: SenderProfile, msg: Message) -> bool:
    """A family disabled for this sender is ignored by its handler, so it has nothing to validate."""
    t = msg.message_type.upper()
    return any(f.upper() == t for f in profile.message_families)


def referral_key(profile: SenderProfile, msg: Message) -> AckError | None:
    """REF and RRI: RF1-6.1, the referral's own ID."""
    if _enabled(profile, msg) and not msg.get("RF1-6.1").strip():
        return missing(REF_KEY)
    return None


def appointment_key(profile: SenderProfile, msg: Message) -> AckError | None:
    """SIU: SCH-2.1 (filler appointment ID), else SCH-1.1."""
    if _enabled(profile, msg) and not (msg.get("SCH-2.1") or msg.get("SCH-1.1")):
        return missing(SIU_KEY)
    return None


def document_key(profile: SenderProfile, msg: Message) -> AckError | None:
    """MDM: TXA-12.1 (or TXA-13.1 for the replacing triggers T09/T10)."""
    trigger = msg.trigger_event.upper()
    doc = (msg.get("TXA-13.1") if trigger in ("T09", "T10") else "") or msg.get("TXA-12.1")
    if _enabled(profile, msg) and not doc:
        return missing(MDM_KEY)
    return None


def result_key(profile: SenderProfile, msg: Message) -> AckError | None:
    """ORU: OBR-3.1 (filler order number), the document's key."""
    if _enabled(profile, msg) and not msg.get("OBR-3.1"):
        return missing(ORU_KEY)
    return None


def order_key(profile: SenderProfile, msg: Message) -> AckError | None:
    """OMG/ORM as 360X referrals (``order_mode = "referral"``, or ``auto`` with MSH-21 naming 360X): ORC-2.1,
    else OBR-2.1."""
    if not orders_are_referrals(profile.order_mode, msg) or not _enabled(profile, msg):
        return None
    if not (msg.get("ORC-2.1") or msg.get("OBR-2.1")):
        return missing(ORDER_KEY)
    return None


def osu_status(profile: SenderProfile, msg: Message) -> AckError | None:
    """OSU^O51 (360X status): an ORC, the order's ID (ORC-2.1 or OBR-2.1), an order control code (ORC-1)
    and a control/status pair that the 360X table (or the sender's ``osu_states``) knows."""
    if not orders_are_referrals(profile.order_mode, msg) or not _enabled(profile, msg):
        return None
    if msg.segment("ORC") is None:
        return AckError(100, "Segment sequence error", "ORC", "E")
    if not (msg.get("ORC-2.1") or msg.get("OBR-2.1")):
        return missing(ORDER_KEY)
    control, status = msg.get("ORC-1.1"), msg.get("ORC-5.1")
    if not control:
        return missing("ORC^1^1")
    if osu_rule(control, status, profile.osu_states) is None:
        location = "ORC^1^5" if control.strip().upper() == "SC" else "ORC^1^1"
        return AckError(103, "Table value not found", location, "E")
    return None
