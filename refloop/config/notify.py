"""Worklist and notification settings: the ``[worklist]`` and ``[notify]`` sections.

Kept out of ``settings.py`` so that the alerting feature owns its knobs and their parsing, like
``windows.py`` does for ``[stall]``. Mappings use compact one-string forms because the loader (and the
comma-separated ``REFLOOP_*`` environment variables) only carry flat strings::

    owners              "KIND:VALUE=OWNER"      e.g. "practice:CLINIC=alice", "specialty:CARD=bob"
    relationship_modes  "FROM>TO=MODE"          e.g. "CLINIC>Heartwell Hana=active", "CLINIC>*=observe"

``KIND`` is ``practice`` (the referral's assigning authority, RF1-6.2, i.e. the referring practice),
``specialty`` (RF1-3) or ``referred_to`` (the referred-to provider's name or id). Values are compared
case-insensitively. In a relationship, ``FROM`` is the referring practice and ``TO`` the referred-to
provider (name or id) or specialty; ``*`` matches anything. The most specific matching rule wins, then
the first listed; with no match the global ``mode`` applies.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

from refloop.config.fields import Check, setting

OWNER_KINDS = ("practice", "specialty", "referred_to")
MODES = ("observe", "active")
DIGESTS = ("immediate", "digest", "both")


def parse_owner(text: str) -> tuple[str, str, str]:
    """``"practice:CLINIC=alice"`` → ``("practice", "clinic", "alice")``; ValueError says what is wrong."""
    rule, eq, owner = text.rpartition("=")
    kind, colon, value = rule.partition(":")
    kind, value, owner = kind.strip().casefold(), value.strip(), owner.strip()
    if not eq or not colon or not value or not owner:
        raise ValueError(f"owner rule {text!r} is not 'KIND:VALUE=OWNER' like 'practice:CLINIC=alice'")
    if kind not in OWNER_KINDS:
        raise ValueError(f"owner rule {text!r}: unknown kind {kind!r} (known: {', '.join(OWNER_KINDS)})")
    return kind, value.casefold(), owner


def parse_escalation(text: str) -> tuple[int, str]:
    """``"3=cardiology-lead"`` → ``(3, "cardiology-lead")``; ValueError says what is wrong."""
    level, eq, owner = text.partition("=")
    if not eq or not level.strip().isdigit() or not owner.strip() or int(level) < 1:
        raise ValueError(f"escalation owner {text!r} is not 'LEVEL=OWNER' like '3=cardiology-lead'")
    return int(level), owner.strip()


def parse_relationship(text: str) -> tuple[str, str, str]:
    """``"CLINIC>HEART=active"`` → ``("clinic", "heart", "active")``."""
    pair, eq, mode = text.rpartition("=")
    source, gt, target = pair.partition(">")
    source, target, mode = source.strip().casefold(), target.strip().casefold(), mode.strip().casefold()
    if not eq or not gt or not source or not target:
        raise ValueError(f"relationship {text!r} is not 'FROM>TO=MODE' like 'CLINIC>HEARTCLINIC=active'")
    if mode not in MODES:
        raise ValueError(f"relationship {text!r}: mode must be one of {', '.join(MODES)}")
    return source, target, mode


def _each(parse: Callable[[str], object]) -> Check:
    def check(v: tuple[str, ...]) -> str | None:
        for text in v:
            try:
                parse(text)
            except ValueError as exc:
                return str(exc)
        return None

    return check


def _one_of(*choices: str) -> Check:
    def check(v: str) -> str | None:
        return None if v in choices else f"must be one of {', '.join(choices)}"

    return check


def _hour(v: int) -> str | None:
    return None if 0 <= v <= 23 else "must be an hour 0-23"


def _port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else "must be a TCP port number 0-65535 (0 = off)"


def _positive(v: float) -> str | None:
    return None if math.isfinite(v) and v > 0 else "must be a finite number greater than 0"


def _attempts(v: int) -> str | None:
    return None if v >= 1 else "must be at least 1"


def _checked(obj: object, section: str) -> None:
    """Run the field checks for direct construction too (the loader runs them first, naming the key)."""
    for f in fields(obj):  # type: ignore[arg-type]
        check = f.metadata.get("check")
        if check is not None and (problem := check(getattr(obj, f.name))):
            raise ValueError(f"{section}.{f.name}: {problem}")


@dataclass(frozen=True)
class WorklistSettings:
    """Who owns which alerts, and whether notifications are really sent (staged rollout)."""

    owners: tuple[str, ...] = setting(
        (), "Alert owners as 'KIND:VALUE=OWNER' with KIND practice, specialty or referred_to "
        "(e.g. 'practice:CLINIC=alice'); an owner containing '@' is also their e-mail address.",
        _each(parse_owner),
    )
    default_owner: str = setting("coordinator", "Owner of alerts no owner rule matches.")
    mode: str = setting(
        "observe", "'observe': record notifications as suppressed, never send them; 'active': send them.",
        _one_of(*MODES),
    )
    relationship_modes: tuple[str, ...] = setting(
        (), "Per-relationship rollout as 'FROM>TO=MODE' (referring practice > referred-to provider or "
        "specialty, '*' = any), e.g. 'CLINIC>HEARTCLINIC=active'; beats the global mode.",
        _each(parse_relationship),
    )
    digest: str = setting(
        "immediate", "Owner e-mail: 'immediate' (one per alert), 'digest' (one a day per owner) or 'both'.",
        _one_of(*DIGESTS),
    )
    digest_hour: int = setting(7, "Local hour (stall.timezone) at which the daily digest goes out.", _hour)
    escalation_owners: tuple[str, ...] = setting(
        (), "Who is told when an alert reaches a level, as 'LEVEL=OWNER' (e.g. '3=cardiology-lead'); "
        "without one the alert's owner is told.", _each(parse_escalation)
    )

    def __post_init__(self) -> None:
        _checked(self, "worklist")


@dataclass(frozen=True)
class NotifySettings:
    """Where notifications go and how hard delivery is retried. An empty target turns its channel off."""

    webhook_url: str = setting("", "URL that receives JSON events (empty: no webhook).")
    webhook_secret: str = setting(
        "", "HMAC-SHA256 key for the X-Refloop-Signature header (and for answer callbacks); prefer the "
        "systemd credential notify_webhook_secret or REFLOOP_NOTIFY_WEBHOOK_SECRET over the file."
    )
    webhook_timeout: float = setting(10.0, "Seconds a webhook delivery may take.", _positive)
    webhook_phi: bool = setting(
        False, "Include PHI-adjacent details (provider names, specialty) in webhook payloads; IDs only if off."
    )
    patient_webhook_url: str = setting(
        "", "URL of the patient-engagement system that sends booking and no-show reminders (empty: off)."
    )
    smtp_host: str = setting("", "SMTP relay for owner and referrer e-mail (empty: no e-mail).")
    smtp_port: int = setting(25, "SMTP port.", _port)
    smtp_starttls: bool = setting(False, "Upgrade the SMTP connection with STARTTLS before sending.")
    smtp_tls: bool = setting(
        False, "Implicit TLS from the first byte (SMTPS, usually port 465) instead of STARTTLS."
    )
    smtp_username: str = setting("", "SMTP AUTH user name (empty: no AUTH); AUTH needs TLS (starttls or tls).")
    smtp_password: str = setting(
        "", "SMTP AUTH password; prefer the systemd credential notify_smtp_password or "
        "REFLOOP_NOTIFY_SMTP_PASSWORD over the file."
    )
    ca_file: str = setting(
        "", "PEM CA bundle that verifies the webhook's HTTPS and the SMTP server's TLS certificate "
        "(empty: the system's trust store)."
    )
    smtp_from: str = setting("refloop@localhost", "Envelope and header sender of refloop's e-mail.")
    smtp_to_default: str = setting(
        "", "Recipient for owners without an address and for loop-closed notices to the referrer."
    )
    mllp_host: str = setting("127.0.0.1", "Referrer's MLLP endpoint for forwarded consult notes (MDM^T02).")
    mllp_port: int = setting(0, "Port of that endpoint (0 = do not forward notes).", _port)
    mllp_timeout: float = setting(30.0, "Seconds to wait for the referrer's ACK.", _positive)
    max_attempts: int = setting(8, "Delivery attempts before a notification is dead-lettered.", _attempts)
    backoff_seconds: float = setting(
        30.0, "First retry delay; doubles with every failed attempt up to backoff_max_seconds, each delay "
        "drawn between half and all of that so retries after an outage spread out.", _positive
    )
    backoff_max_seconds: float = setting(3600.0, "Longest delay between two delivery attempts.", _positive)
    dispatch_seconds: float = setting(10.0, "Seconds between outbox dispatch runs.", _positive)

    def __post_init__(self) -> None:
        _checked(self, "notify")
