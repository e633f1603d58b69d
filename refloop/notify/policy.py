"""Who owns an alert, which rollout mode a relationship is in, and which channels an event goes to.

Pure functions over settings and a referral's identifying columns, so the scan, the coordinator actions,
the dispatcher's dead-letter notice and the digest all decide the same way, and tests need no database.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

from refloop.config.notify import NotifySettings, WorklistSettings, parse_owner, parse_relationship

WEBHOOK: Final = "webhook"
EMAIL: Final = "email"
MLLP: Final = "mllp"
PATIENT: Final = "patient"
CHANNELS: Final = (WEBHOOK, EMAIL, MLLP, PATIENT)

ACTIVE: Final = "active"
OBSERVE: Final = "observe"


@dataclass(frozen=True)
class Parties:
    """The columns of a referral that ownership and rollout rules match on (no PHI)."""

    practice: str = ""  # RF1-6.2, the referring practice's assigning authority
    referred_to: str = ""
    referred_to_id: str = ""
    specialty: str = ""

    @classmethod
    def of(cls, row: object) -> Parties:
        """From a ``referrals`` row (or anything with the same attributes)."""
        return cls(getattr(row, "authority", "") or "", getattr(row, "referred_to", "") or "",
                   getattr(row, "referred_to_id", "") or "", getattr(row, "specialty", "") or "")


def owner_for(ws: WorklistSettings, parties: Parties) -> str:
    """First rule by kind precedence (referred_to, specialty, practice), else the default owner.

    The referred-to provider is the most specific, the referring practice the broadest, so a practice
    coordinator keeps everything except what a specialty desk has claimed.
    """
    rules = [parse_owner(r) for r in ws.owners]
    for kind, values in (("referred_to", (parties.referred_to, parties.referred_to_id)),
                         ("specialty", (parties.specialty,)), ("practice", (parties.practice,))):
        wanted = {v.strip().casefold() for v in values if v.strip()}
        for rule_kind, value, owner in rules:
            if rule_kind == kind and value in wanted:
                return owner
    return ws.default_owner


def mode_for(ws: WorklistSettings, parties: Parties) -> str:
    """The rollout mode of the referring practice × referred-to relationship; exact beats ``*``."""
    source = parties.practice.strip().casefold()
    targets = {v.strip().casefold() for v in (parties.referred_to, parties.referred_to_id, parties.specialty)
               if v.strip()}
    best: tuple[int, str] | None = None
    for rule_source, rule_target, mode in map(parse_relationship, ws.relationship_modes):
        if rule_source not in ("*", source) or (rule_target != "*" and rule_target not in targets):
            continue
        score = (rule_source != "*") + (rule_target != "*")
        if best is None or score > best[0]:
            best = (score, mode)
    return best[1] if best is not None else ws.mode


def owner_email(ns: NotifySettings, owner: str) -> str:
    """An owner named like an address is mailed directly; others via ``smtp_to_default``."""
    return owner if "@" in owner else ns.smtp_to_default


def owner_channels(ns: NotifySettings, ws: WorklistSettings, owner: str, *, digest_email: bool = False) -> list[
        tuple[str, str]]:
    """``(channel, target)`` pairs for a notice to an alert owner; e-mail only if the digest mode allows it."""
    out: list[tuple[str, str]] = []
    if ns.webhook_url:
        out.append((WEBHOOK, owner))
    email = owner_email(ns, owner)
    wants_email = digest_email or ws.digest in ("immediate", "both")
    if ns.smtp_host and email and wants_email:
        out.append((EMAIL, email))
    return out


def referrer_channels(ns: NotifySettings) -> list[tuple[str, str]]:
    """Loop-closed notice to the referring provider: webhook, e-mail and the note forwarded over MLLP."""
    out: list[tuple[str, str]] = []
    if ns.webhook_url:
        out.append((WEBHOOK, "referrer"))
    if ns.smtp_host and ns.smtp_to_default:
        out.append((EMAIL, ns.smtp_to_default))
    if ns.mllp_port:
        out.append((MLLP, f"{ns.mllp_host}:{ns.mllp_port}"))
    return out


def retry_delay(ns: NotifySettings, attempts: int, key: str) -> float:
    """Seconds until the next attempt after ``attempts`` failed ones: exponential from ``backoff_seconds``,
    capped at ``backoff_max_seconds``, then "equal jitter" (between half and all of it).

    The jitter is drawn from a hash of the idempotency key and the attempt, not from a random generator:
    notifications that failed together (a receiver outage) still spread out, while one row's schedule is
    reproducible, so a test or an operator can say exactly when the next attempt is due.
    """
    ceiling = min(ns.backoff_max_seconds, ns.backoff_seconds * 2 ** max(attempts - 1, 0))
    digest = hashlib.sha256(f"{key}:{attempts}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return ceiling / 2 + ceiling / 2 * fraction


def patient_channels(ns: NotifySettings) -> list[tuple[str, str]]:
    return [(PATIENT, "patient")] if ns.patient_webhook_url else []
