"""A patient's identifiers in a message, hashed with their assigning authorities (pure: no I/O).

Why here and not in the handlers: the same rule reads the identifiers when a message arrives, when
migration 0011 re-reads the journal, and when `refloop messages --patient ID^AUTHORITY` hashes what a
person typed, so the hash can only ever be computed one way. The identifier itself is returned only
hashed; the assigning authority stays in clear because it names an organisation, not a person.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from refloop.config.fields import DEFAULT_PATIENT_ID_TYPES
from refloop.message import Message

#: Versions whose PID-2 (external ID) and PID-4 (alternate ID) still carry patient identifiers; from
#: v2.4 on HL7 keeps them only for backward compatibility and PID-3 holds the whole list.
_OLD_PID_VERSIONS = frozenset({"2.1", "2.2", "2.3", "2.3.1"})


@dataclass(frozen=True)
class PatientId:
    """One patient identifier, hashed with its assigning authority. ``authority`` is kept in clear (it
    names an organisation, not a person) so a link can say which authority matched; the ID never is."""

    key: str  # SHA-256 of "AUTHORITY|ID"
    authority: str  # CX-4.1, else CX-4.2 (the OID 360X senders use), upper-cased
    id_type: str  # CX-5, upper-cased ("" when not sent)


def hash_id(ident: str, authority: str) -> str:
    """The stored form of one identifier: the same hash the store has always used for PID-3."""
    return hashlib.sha256(f"{authority.strip().upper()}|{ident.strip()}".encode()).hexdigest()


def parse_id(text: str) -> tuple[str, str]:
    """``ID^AUTHORITY`` as a person types it on the command line: ``(id, authority)``."""
    ident, _, authority = text.partition("^")
    return ident.strip(), authority.strip().upper()


def _cx(value: str, msg: Message) -> tuple[str, str, str]:
    ident = _part(value, msg, 1).strip()
    hd = _part(value, msg, 4).split(msg.subcomponent_sep)
    authority = (hd[0].strip() or (hd[1].strip() if len(hd) > 1 else "")).upper()
    return ident, authority, _part(value, msg, 5).strip().upper()


def patient_ids(msg: Message, types: tuple[str, ...] = DEFAULT_PATIENT_ID_TYPES) -> list[PatientId]:
    """Every identifier of the patient, in message order, without repeats: each PID-3 repetition, and in
    v2.3.x and older PID-2 and PID-4 too. Only identifiers whose CX-5 type is in *types* count."""
    pid = msg.segment("PID")
    if pid is None:
        return []
    reps = list(pid.repetitions(3))
    if msg.version.strip() in _OLD_PID_VERSIONS:
        reps += pid.repetitions(2) + pid.repetitions(4)
    wanted = {t.upper() for t in types}
    out: list[PatientId] = []
    seen: set[str] = set()
    for rep in reps:
        ident, authority, id_type = _cx(rep, msg)
        if not ident or id_type not in wanted:
            continue
        key = hash_id(ident, authority)
        if key not in seen:
            seen.add(key)
            out.append(PatientId(key, authority, id_type))
    return out


def shared_ids(ids: list[PatientId], authorities: tuple[str, ...]) -> list[PatientId]:
    """The identifiers a sender shares with the referrers (``SenderProfile.patient_id_authorities``,
    empty = all): only these may link its messages to referrals."""
    if not authorities:
        return ids
    allowed = {a.strip().upper() for a in authorities}
    return [i for i in ids if i.authority in allowed]



def _part(value: str, msg: Message, n: int) -> str:
    parts = value.split(msg.component_sep)
    return parts[n - 1] if len(parts) >= n else ""
