"""ACK construction (HL7 reference 2.2/2.3).

The ACK is built by plain string joining: it is on the critical path between "stored" and the
sender being released, and pulling hl7apy or python-hl7 in at runtime would cost milliseconds
per message. Correctness is instead pinned by tests that parse every shape with both libraries.

The ACK replies in the sender's own delimiters and echoes its MSH-10 byte-for-byte in MSA-2:
MSA-2 is the only correlation key the sender has, so it is never unescaped or re-escaped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

from refloop.message import DEFAULT_DELIMITERS, Delimiters, Message, escape

__all__ = ["ACK_CODES", "SEVERITIES", "TABLE_0357", "AckError", "build_ack", "version_tuple"]

#: HL7 table 0357 (message error condition codes) as of v2.5.1.
TABLE_0357: dict[int, str] = {
    0: "Message accepted",
    100: "Segment sequence error",
    101: "Required field missing",
    102: "Data type error",
    103: "Table value not found",
    200: "Unsupported message type",
    201: "Unsupported event code",
    202: "Unsupported processing id",
    203: "Unsupported version id",
    204: "Unknown key identifier",
    205: "Duplicate key identifier",
    206: "Application record locked",
    207: "Application internal error",
}

#: HL7 table 0008: original-mode (A*) and enhanced accept (C*) codes.
ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})
#: HL7 table 0516 (error severity).
SEVERITIES = frozenset({"E", "W", "I", "F"})

_DEFAULT_VERSION = (2, 5, 1)
_VERSION_RE = re.compile(r"\s*([0-9]{1,3})\.([0-9]{1,3})(?:\.([0-9]{1,3}))?", re.ASCII)


@dataclass(frozen=True, slots=True)
class AckError:
    """One error to report in ERR (and MSA-3).

    ``text`` goes to the sender's logs and screens, so it must never contain PHI: callers pass
    fixed phrases such as "Unsupported version ID", not field values. ``location`` is an ERL
    written with ``^`` whatever the message's delimiters (``"PID^1^3"``, segment^sequence^
    field[^repetition^component^sub-component]); build_ack re-joins it with the real ones.
    """

    code: int
    text: str
    location: str = ""
    severity: str = "E"

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError("severity must be one of E, W, I, F (HL7 table 0516)")
        if self.code < 0:
            raise ValueError("error code must be a table 0357 number")


def version_tuple(version: str) -> tuple[int, int, int] | None:
    """``"2.3.1"`` -> (2, 3, 1), ``"2.5"`` -> (2, 5, 0); None for anything unparseable."""
    m = _VERSION_RE.match(version)
    if m is None:
        return None
    major, minor, patch = m.groups()
    return int(major), int(minor), int(patch or 0)


def _hl7_timestamp(now: datetime) -> str:
    """YYYYMMDDHHMMSS+ZZZZ: the offset makes the ACK time unambiguous (python-hl7 omits it)."""
    offset = now.utcoffset()
    if offset is None:
        raise ValueError("now must be timezone-aware")
    minutes = round(offset.total_seconds() / 60)
    sign = "-" if minutes < 0 else "+"
    hours, mins = divmod(abs(minutes), 60)
    return f"{now:%Y%m%d%H%M%S}{sign}{hours:02d}{mins:02d}"


def _location_parts(location: str, d: Delimiters) -> list[str]:
    """ERL parts escaped for the message; a segment without a sequence means occurrence 1."""
    parts = [escape(p, d) for p in location.split("^")] if location else []
    if parts and parts[0] and (len(parts) == 1 or not parts[1]):
        # ERL-2 (segment sequence) is required whenever ERL-1 is valued.
        parts[1:2] = ["1"]
    while parts and not parts[-1]:
        parts.pop()
    return parts


def _err_segment(error: AckError, d: Delimiters, enhanced: bool) -> str:
    fs, cs, ss = d.field, d.component, d.subcomponent
    description = escape(TABLE_0357.get(error.code, ""), d)
    loc = _location_parts(error.location, d)
    if enhanced:
        # v2.5+: ERR-2 ERL, ERR-3 CWE (0357), ERR-4 severity, ERR-8 user message.
        erl = cs.join(loc)
        cwe = f"{error.code}{cs}{description}{cs}HL70357"
        return fs.join(("ERR", "", erl, cwe, error.severity, "", "", "", escape(error.text, d)))
    # v2.1-2.4: ERR-1 ELD only = segment^sequence^field^code(CE, as sub-components).
    seg_seq_field = [*loc, "", "", ""][:3]
    ce = ss.join((str(error.code), description, "HL70357"))
    return fs.join(("ERR", cs.join([*seg_seq_field, ce])))


def build_ack(
    msg: Message | None,
    code: str,
    *,
    ack_control_id: str,
    now: datetime,
    app: str = "REFLOOP",
    facility: str = "REFLOOP",
    error: AckError | None = None,
    control_id_hint: str = "",
    version_hint: str = "2.5.1",
) -> str:
    """The ACK for *msg* as CR-joined segments with a trailing CR (no MLLP framing).

    *msg* is None when the frame could not be parsed: MSA-2 is then *control_id_hint* (e.g.
    from ``recover_control_id``) and the header uses defaults. The layout follows the version
    being acknowledged (MSH-12.1, else *version_hint*; junk counts as 2.5.1):

    * MSH-9 is ``ACK^<trigger>^ACK`` from v2.3.1 and ``ACK^<trigger>`` before. With no trigger
      it is ``ACK^^ACK`` (v2.3.1+) so MSH-9.3 still names the structure, ``ACK`` before.
    * ERR: v2.5+ uses ERR-2/3/4/8; older versions only have ERR-1 (ELD).
    * MSA-3 carries the error text up to v2.6 for older engines; it is withdrawn in v2.7, where
      a strict parser rejects it, so there the text is only in ERR-8.

    *app*, *facility*, *ack_control_id* and the error text are escaped as plain values;
    everything copied from the incoming message (MSH-3/4, MSH-9.2, MSH-11, MSH-12, MSH-10)
    is copied raw, since it is already in the sender's encoding.
    """
    if code not in ACK_CODES:
        raise ValueError("ACK code must be one of AA, AE, AR, CA, CE, CR")
    stamp = _hl7_timestamp(now)
    if msg is not None:
        d = msg.delimiters
        receiving_app, receiving_facility = msg.msh3_raw, msg.msh4_raw
        trigger = msg.get_raw("MSH-9.2")
        processing = msg.header_field(11) or "P"
        version_raw = msg.header_field(12) or escape(version_hint, d)
        version_id = msg.version or version_hint
        acked_control_id = msg.control_id
    else:
        d = DEFAULT_DELIMITERS
        receiving_app = receiving_facility = trigger = ""
        processing = "P"
        version_raw = escape(version_hint, d)
        version_id = version_hint
        acked_control_id = control_id_hint
    fs, cs = d.field, d.component
    version = version_tuple(version_id) or _DEFAULT_VERSION

    if version >= (2, 3, 1):
        message_type = cs.join(("ACK", trigger, "ACK"))
    else:
        message_type = cs.join(("ACK", trigger)) if trigger else "ACK"

    msh = fs.join(
        (
            "MSH" + fs + d.encoding_characters,
            escape(app, d),
            escape(facility, d),
            receiving_app,
            receiving_facility,
            stamp,
            "",
            message_type,
            escape(ack_control_id, d),
            processing,
            version_raw,
        )
    )
    # A raw CR would split MSA in two; a parsed MSH-10 cannot hold one, a caller's hint might.
    acked_control_id = acked_control_id.replace("\r", f"{d.escape}X0D{d.escape}")
    msa_fields = ["MSA", code, acked_control_id]
    if error is not None and version < (2, 7, 0):
        msa_fields.append(escape(error.text, d))
    segments = [msh, fs.join(msa_fields)]
    if error is not None:
        segments.append(_err_segment(error, d, enhanced=version >= (2, 5, 0)))
    return "\r".join(segments) + "\r"
