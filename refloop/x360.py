"""The 360X closed-loop referral vocabulary: OSU^O51 order status -> refloop events, and 360X state names.

Why a table of our own: the ONC 360X guide (HL7 v2 payload definition, 2022) names the messages (OMG^O19
request, OSU^O51 status, SIU^S12/S26 appointments) and the loop states (Initiated, Accepted, Declined,
Canceled, InterimCommunicated, CancelConfirmed, Finalized), but the exact ORC-1/ORC-5 codes for each
state could not be verified, so this table follows HL7's own order-control (table 0119) and order-status
(table 0038) meanings. One place to change if a sender proves different. Pure: no I/O, no HL7 parsing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from refloop import referral as rf

#: What MSH-21 (message profile identifier, EI-1) says for a 360X message.
PROFILE_ID: Final = "360X"

INITIATED, ACCEPTED, DECLINED, CANCELED = "Initiated", "Accepted", "Declined", "Canceled"
INTERIM, CANCEL_CONFIRMED, FINALIZED = "InterimCommunicated", "CancelConfirmed", "Finalized"


@dataclass(frozen=True)
class StatusRule:
    """One row of the OSU table: which 360X state a code pair means and which refloop event records it."""

    state: str
    kind: str  # a refloop.referral event kind
    answer: str = ""  # referral_answered: accepted / declined


#: (ORC-1 order control, ORC-5 order status or "*") -> rule. Looked up exactly first, then with "*".
OSU_RULES: Final[dict[tuple[str, str], StatusRule]] = {
    ("OK", "*"): StatusRule(ACCEPTED, rf.REFERRAL_ANSWERED, rf.ANSWER_ACCEPTED),  # order accepted & OK
    ("UA", "*"): StatusRule(DECLINED, rf.REFERRAL_ANSWERED, rf.ANSWER_DECLINED),  # unable to accept order
    ("CR", "*"): StatusRule(CANCEL_CONFIRMED, rf.REFERRAL_CANCELLED),  # canceled as requested
    ("SC", "IP"): StatusRule(INTERIM, rf.REFERRAL_STATUS_REPORTED),  # status changed: in process
    ("SC", "A"): StatusRule(INTERIM, rf.REFERRAL_STATUS_REPORTED),  # some, not all, results available
    ("SC", "SC"): StatusRule(ACCEPTED, rf.REFERRAL_ANSWERED, rf.ANSWER_ACCEPTED),  # in process, scheduled
    ("SC", "CM"): StatusRule(FINALIZED, rf.NOTE_RECEIVED),  # order completed: the outcome was sent
    ("SC", "CA"): StatusRule(CANCEL_CONFIRMED, rf.REFERRAL_CANCELLED),  # order was canceled
    ("SC", "DC"): StatusRule(CANCEL_CONFIRMED, rf.REFERRAL_CANCELLED),  # order was discontinued
    ("SC", "HD"): StatusRule("OnHold", rf.REFERRAL_STATUS_REPORTED),  # order on hold (no 360X state)
}


#: What each 360X state does to the referral, for a sender's own codes (``SenderProfile.osu_states``).
STATE_RULES: Final[dict[str, StatusRule]] = {
    ACCEPTED: StatusRule(ACCEPTED, rf.REFERRAL_ANSWERED, rf.ANSWER_ACCEPTED),
    DECLINED: StatusRule(DECLINED, rf.REFERRAL_ANSWERED, rf.ANSWER_DECLINED),
    CANCEL_CONFIRMED: StatusRule(CANCEL_CONFIRMED, rf.REFERRAL_CANCELLED),
    INTERIM: StatusRule(INTERIM, rf.REFERRAL_STATUS_REPORTED),
    FINALIZED: StatusRule(FINALIZED, rf.NOTE_RECEIVED),
}


def parse_override(entry: str) -> tuple[tuple[str, str], StatusRule]:
    """``"ORC1/ORC5=State"`` (ORC-5 may be ``*``) as a table row; ValueError names what is wrong."""
    codes, sep, state = entry.partition("=")
    control, _, status = codes.partition("/")
    rule = STATE_RULES.get(state.strip())
    if not sep or not control.strip() or rule is None:
        raise ValueError(f"{entry!r} is not ORC1/ORC5=STATE with STATE one of {', '.join(STATE_RULES)}")
    return (control.strip().upper(), (status.strip() or "*").upper()), rule


def osu_rule(order_control: str, order_status: str, overrides: tuple[str, ...] = ()) -> StatusRule | None:
    """The rule for an ORC-1/ORC-5 pair (case-insensitive), or None when the pair means nothing known.
    A sender's ``overrides`` are looked up first, in the same exact-then-``*`` order."""
    control, status = order_control.strip().upper(), order_status.strip().upper()
    if overrides:
        mine = dict(parse_override(e) for e in overrides)
        found = mine.get((control, status)) or mine.get((control, "*"))
        if found is not None:
            return found
    return OSU_RULES.get((control, status)) or OSU_RULES.get((control, "*"))


def state_name(state: rf.ReferralState) -> str:
    """The referral's state in 360X words, shown beside refloop's status.

    refloop's status decides (a closed loop is Finalized whatever was reported); within an open referral a
    reported interim communication is shown as such, an accepted or booked one as Accepted."""
    status = state.status
    if status is rf.Status.CLOSED:
        return FINALIZED
    if status is rf.Status.CANCELLED:
        return CANCEL_CONFIRMED if state.reported_x360 == CANCEL_CONFIRMED else CANCELED
    if status in (rf.Status.DECLINED, rf.Status.EXPIRED):
        return DECLINED
    if state.reported_x360 == INTERIM:
        return INTERIM
    if state.accepted_at is not None or status is not rf.Status.SENT or state.scheduled_at is not None:
        return ACCEPTED
    return INITIATED
