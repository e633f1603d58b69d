"""Field extraction for the referral handlers: HL7 paths in, plain values out.

Kept apart from the handlers so that each rule about *where* a value lives (which field, which
fallback) is written once and can be read next to docs/hl7.md. Nothing here touches the
database or logs; the patient identifier is only ever returned hashed.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

from refloop.message import Message, Segment, unescape_text
from refloop.patient import PatientId, hash_id, patient_ids, shared_ids
from refloop.x360 import PROFILE_ID

__all__ = ["PatientId", "hash_id", "patient_ids", "shared_ids"]

_TS = re.compile(r"(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.\d+)?\s*(?:([+-])(\d{2})(\d{2}))?")


def parse_ts(value: str, zone: str = "UTC") -> datetime | None:
    """An HL7 DTM/TS as an aware datetime. A value without an offset is read in the sender's zone
    (``SenderProfile.timezone``), because comparing naive local times from different feeds is wrong."""
    m = _TS.fullmatch(value.strip().split("^")[0]) if value else None
    if m is None:
        return None
    year, month, day, hour, minute, second, sign, oh, om = m.groups()
    try:
        naive = datetime(int(year), int(month or 1), int(day or 1), int(hour or 0), int(minute or 0),
                         int(second or 0))
    except ValueError:
        return None
    if sign:
        delta = timedelta(hours=int(oh), minutes=int(om))
        return naive.replace(tzinfo=timezone(delta if sign == "+" else -delta))
    return naive.replace(tzinfo=ZoneInfo(zone) if zone != "UTC" else UTC)


def first_time(msg: Message, paths: tuple[str, ...], zone: str) -> datetime | None:
    """The first parseable timestamp among *paths*."""
    for path in paths:
        t = parse_ts(msg.get_raw(path), zone)
        if t is not None:
            return t
    return None


def occurred_at(msg: Message, zone: str, *paths: str) -> datetime:
    """When the event happened: the given paths (EVN-2, TXA-4, ...), then MSH-7, then the epoch.

    The epoch fallback only hits a message without MSH-7; it keeps the fold total rather than guessing
    with the receive time, which would differ between a delivery and its replay.
    """
    t = first_time(msg, (*paths, "MSH-7"), zone)
    return t if t is not None else datetime(1970, 1, 1, tzinfo=UTC)


def patient_key(msg: Message) -> str:
    """One identifier as the patient's key: the first MR repetition of PID-3, else the first identifier.

    Kept for stores and callers that want a single value; matching uses :func:`patient_ids`.
    """
    ids = patient_ids(msg)
    if not ids:
        return ""
    return next((i.key for i in ids if i.id_type == "MR"), ids[0].key)


def declares_360x(msg: Message) -> bool:
    """MSH-21 (message profile identifier, repeating EI) names the 360X closed-loop profile."""
    return any(_component(rep, msg, 1).strip().upper() == PROFILE_ID for rep in msg.repetitions("MSH-21"))


def orders_are_referrals(profile_mode: str, msg: Message) -> bool:
    """``SenderProfile.order_mode``: 'referral' always, 'off' never, 'auto' when MSH-21 says 360X."""
    return profile_mode == "referral" or (profile_mode == "auto" and declares_360x(msg))


def _component(value: str, msg: Message, n: int) -> str:
    parts = value.split(msg.component_sep)
    return parts[n - 1] if len(parts) >= n else ""


@dataclass(frozen=True)
class Provider:
    """A provider reference: an id (XCN-1 / PRD-7.1) and a display name."""

    ident: str = ""
    name: str = ""

    @property
    def family(self) -> str:
        return self.name.split(",")[0].strip().casefold()


def _xpn(family: str, given: str) -> str:
    return ", ".join(p for p in (family.strip(), given.strip()) if p)


def xcn(seg: Segment | None, field_no: int) -> Provider:
    """An XCN field (id^family^given...) as a Provider."""
    if seg is None:
        return Provider()
    return Provider(seg.get(f"{field_no}.1"), _xpn(seg.get(f"{field_no}.2"), seg.get(f"{field_no}.3")))


def prd(msg: Message, role: str) -> Provider:
    """The PRD with PRD-1 = *role* (RT referred-to, RP referring): PRD-7.1 id, PRD-2 name."""
    for seg in msg.segments_named("PRD"):
        if seg.get("1.1").upper() == role:
            return Provider(seg.get("7.1"), _xpn(seg.get("2.1"), seg.get("2.2")))
    return Provider()


def values_at(msg: Message, paths: tuple[str, ...]) -> list[tuple[str, str]]:
    """``(path, value)`` for every non-empty path, in the given order, without repeats."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for path in paths:
        value = msg.get(path).strip()
        if value and value not in seen:
            seen.add(value)
            out.append((path, value))
    return out


def appointment_start(msg: Message, zone: str) -> datetime | None:
    """TQ1-7, else SCH-11.4 (v2.3-2.5 timing), else the first resource's start (AIS-4/AIG-8/AIL-6/AIP-6)."""
    return first_time(msg, ("TQ1-7", "SCH-11.4", "AIS-4", "AIG-8", "AIL-6", "AIP-6"), zone)


def appointment_id(msg: Message) -> str:
    """The filler appointment id (SCH-2.1), else the placer's (SCH-1.1)."""
    return msg.get("SCH-2.1") or msg.get("SCH-1.1")


#: HL7 table 0191 "type of referenced data" codes, as MIME top-level types (senders use either form).
_ED_TYPES = {"AP": "application", "IM": "image", "AU": "audio", "TEXT": "text", "TX": "text"}


def ed_media_type(type_of_data: str, subtype: str, data: bytes) -> str:
    """The MIME type an ED component declares (OBX-5.2 / 5.3, e.g. ``image^jpeg``), so a forwarded note
    keeps it; a sniffed PDF or ``application/octet-stream`` when the sender declared nothing usable."""
    major = _ED_TYPES.get(type_of_data.strip().upper(), type_of_data.strip().lower())
    minor = subtype.strip().lower()
    token = re.compile(r"[a-z0-9][a-z0-9.+-]{0,30}")
    if token.fullmatch(major) and token.fullmatch(minor):
        return f"{major}/{minor}"
    return "application/pdf" if data.startswith(b"%PDF") else "application/octet-stream"


@dataclass(frozen=True)
class NoteBody:
    """The note content as stored: bytes plus a content type."""

    content: bytes | None
    content_type: str


def note_body(msg: Message) -> NoteBody:
    """OBX-5 text lines (TX/FT/ST) joined by newlines, or the first ED payload (OBX-5.5, base64).

    The content is PHI: it goes to the document table and nowhere else.
    """
    lines: list[str] = []
    for obx in msg.segments_named("OBX"):
        vtype = obx.get("2").upper()
        if vtype == "ED":
            payload = obx.get_raw("5.5")
            try:
                data = base64.b64decode(payload, validate=False)
            except (binascii.Error, ValueError):
                continue
            return NoteBody(data, ed_media_type(obx.get_raw("5.2"), obx.get_raw("5.3"), data))
        if vtype in ("TX", "FT", "ST", "") and obx.field(5):
            lines.append(unescape_text(obx.field(5), msg))
    if not lines:
        return NoteBody(None, "")
    return NoteBody("\n".join(lines).encode("utf-8"), "text/plain")
