"""A small, lazy HL7 v2 accessor for the receive hot path.

python-hl7's ``hl7.parse`` builds the whole container tree (~1 ms per message); the listener only
needs the header and a handful of fields before it journals and ACKs, so this module splits
segments eagerly (a plain ``str.split``) and everything else only when a field is first read.

Rules implemented here come from the team's HL7 reference: segment terminators (1.4), delimiters
read from MSH-1/MSH-2 (2.4), MSH-18 decoding (2.5) and escape sequences (2.6).

Nothing in this module raises anything but :class:`MessageError`, whatever bytes arrive, because
the caller must always be able to answer with an ACK. Error reasons never quote message content:
messages carry PHI and exception texts end up in logs.
"""

from __future__ import annotations

import codecs
import re
from functools import lru_cache
from typing import NamedTuple

__all__ = [
    "DEFAULT_DELIMITERS",
    "DELETE_INDICATOR",
    "Delimiters",
    "Message",
    "MessageError",
    "Segment",
    "UsageError",
    "codec_for_charset",
    "decode_payload",
    "escape",
    "parse_head",
    "recover_control_id",
    "split_segments",
    "unescape",
    "unescape_text",
]


class MessageError(ValueError):
    """The input cannot be read as HL7; the argument is a short reason without message content."""


class UsageError(MessageError):
    """A malformed path or option from the *caller* (a bug, not bad input).

    It subclasses MessageError so that the "only MessageError escapes" contract holds for every
    argument, but callers that map MessageError to an AR reply can re-raise this one.
    """


class Delimiters(NamedTuple):
    """The five (v2.7+: six) delimiters a message declares in MSH-1/MSH-2."""

    field: str = "|"
    component: str = "^"
    repetition: str = "~"
    escape: str = "\\"
    subcomponent: str = "&"
    truncation: str = ""  # v2.7+ fifth encoding character; "" when the message has none

    @property
    def encoding_characters(self) -> str:
        """MSH-2 as it must be written back (the ACK replies in the sender's delimiters)."""
        return self.component + self.repetition + self.escape + self.subcomponent + self.truncation


DEFAULT_DELIMITERS = Delimiters()

#: A field whose whole value is two double quotes means "delete the stored value" (HL7 2.6), not
#: the literal text; callers that store values must check for it.
DELETE_INDICATOR = '""'

_HEADER_IDS = frozenset({"MSH", "FHS", "BHS"})
_BATCH_IDS = frozenset({"FHS", "BHS"})
# The MSH segment of any real message is far shorter; bounding the search keeps multi-megabyte
# frames (base64 PDFs) from being scanned twice just to find the header.
_HEAD_SCAN_LIMIT = 65536
_MAX_REPEAT = 100  # cap for \.sp n\ / \.sk n\ so a hostile count cannot blow up memory

# --------------------------------------------------------------------------------------------
# Character sets (MSH-18, HL7 table 0211)
# --------------------------------------------------------------------------------------------

# Explicit allow-list: codecs.lookup() on sender text would accept transforms such as
# "unicode_escape" or "rot13", which must never be applied to a payload.
_CHARSET_CODECS: dict[str, str] = {
    "": "ascii",
    "ASCII": "ascii",
    "US-ASCII": "ascii",
    "ISO IR6": "ascii",
    "ISO-IR6": "ascii",
    "8859/1": "iso8859-1",
    "ISO IR100": "iso8859-1",
    "LATIN1": "iso8859-1",
    "LATIN-1": "iso8859-1",
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",  # ambiguous in table 0211; UTF-16 cannot travel over MLLP anyway
    "UTF-8": "utf-8",
    "UTF8": "utf-8",
    "GB 18030-2000": "gb18030",
    "BIG-5": "big5",
    "KS X 1001": "euc_kr",
    "CP1252": "cp1252",
    "WINDOWS-1252": "cp1252",
}
_ISO8859_RE = re.compile(r"(?:ISO[-_ ]?)?8859[-/_ ]?([0-9]{1,2})", re.ASCII)


@lru_cache(maxsize=256)
def codec_for_charset(charset: str) -> str | None:
    """Map an MSH-18 value to a canonical Python codec name, or None when we do not know it.

    Aliases beyond table 0211 are accepted because senders hand-type this field; the reference
    found no list of what they actually send.
    """
    key = " ".join(charset.split()).upper()
    codec = _CHARSET_CODECS.get(key)
    if codec is not None:
        return codec
    m = _ISO8859_RE.fullmatch(key)
    if m is not None:
        n = int(m.group(1))
        if 1 <= n <= 16 and n != 12:  # there is no ISO 8859-12
            return f"iso8859-{n}"
    return None


@lru_cache(maxsize=32)
def _canonical_codec(name: str) -> str | None:
    try:
        info = codecs.lookup(name)
        b"a".decode(info.name)  # rejects transforms (base64, rot13); b"" would short-circuit
    except UnicodeDecodeError:
        pass  # a real text codec that merely dislikes this probe byte (utf-16)
    except (LookupError, TypeError, ValueError):
        return None
    return info.name


def _line_span(raw: bytes, start: int = 0) -> tuple[int, int, bool]:
    """(start, end, terminated) of the segment at *start*: CR or LF, whichever comes first."""
    end = min(len(raw), start + _HEAD_SCAN_LIMIT)
    cr = raw.find(b"\r", start, end)
    lf = raw.find(b"\n", start, end)
    stops = [p for p in (cr, lf) if p >= 0]
    return (start, min(stops), True) if stops else (start, end, False)


def _msh_span(raw: bytes) -> tuple[int, int, bool] | None:
    """Where the MSH segment is: the first segment, or the first MSH inside an FHS/BHS batch."""
    if raw[:3] == b"MSH":
        return _line_span(raw)
    if raw[:3] in (b"FHS", b"BHS"):
        for sep in (b"\rMSH", b"\nMSH"):
            pos = raw.find(sep, 0, _HEAD_SCAN_LIMIT)
            if pos >= 0:
                return _line_span(raw, pos + 1)
    return None


def _declared_charset(raw: bytes) -> str:
    """MSH-18 first repetition, read from the header decoded as latin-1 (ASCII-compatible)."""
    span = _msh_span(raw)
    if span is None or span[1] - span[0] < 8:
        return ""  # nothing declared: HL7 says the message is then ASCII
    line = raw[span[0] : span[1]].decode("latin-1")
    parts = line.split(line[3])
    if len(parts) <= 17:
        return ""
    enc = parts[1]
    value = parts[17]
    if len(enc) >= 2:
        value = value.split(enc[1], 1)[0]
    return value.strip()


def decode_payload(raw: bytes | bytearray | memoryview, fallback: str = "cp1252") -> tuple[str, str, bool]:
    """Decode a frame by its MSH-18 declaration, falling back to the sender profile's codec.

    Returns ``(text, codec_used, used_fallback)``; codec names are canonical (``ascii``,
    ``iso8859-1``, ``utf-8``, ``cp1252``...) so they can be used as metric labels. Real feeds
    send UTF-8 or cp1252 bytes with an empty MSH-18 (which means ASCII), so a failed strict
    decode is normal traffic: it is reported through ``used_fallback`` rather than raised.
    ``errors="replace"`` is the last resort, because the raw bytes are already journaled and a
    message with one odd byte is still worth processing. An unknown *fallback* name degrades to
    latin-1 (which cannot fail) instead of raising on every message.
    """
    if not isinstance(raw, bytes):
        try:
            raw = bytes(raw)
        except (TypeError, ValueError) as exc:
            raise MessageError("payload is not bytes") from exc
    declared: str | None
    if raw.startswith(codecs.BOM_UTF8):
        # A BOM is stronger evidence than a hand-typed MSH-18.
        raw = raw[len(codecs.BOM_UTF8) :]
        declared = "utf-8"
    else:
        # lstrip() matches Message.parse, which ignores whitespace before the header.
        declared = codec_for_charset(_declared_charset(raw.lstrip()))
    if declared is not None:
        try:
            return raw.decode(declared), declared, False
        except UnicodeDecodeError:
            pass
    fb = _canonical_codec(fallback) or "iso8859-1"
    try:
        return raw.decode(fb), fb, True
    except UnicodeDecodeError:
        return raw.decode(fb, "replace"), fb, True


# --------------------------------------------------------------------------------------------
# Segments
# --------------------------------------------------------------------------------------------

_CRLF_ANY_RE = re.compile(r"\r\n|\r|\n")


def split_segments(text: str, terminators: str = "auto") -> list[str]:
    """Split a decoded message into raw segment strings.

    ``auto``: when the text holds at least one CR, only CR ends a segment and one LF directly
    after a CR is dropped (CRLF senders); a bare LF stays as data because real NTE/OBX text
    carries it. Only when there is no CR at all is LF the terminator. ``cr``: CR only, LF is
    always data. ``any``: CR, LF and CRLF all terminate (a per-sender override). Empty and
    whitespace-only segments are dropped wherever they occur (they can carry no data), and
    leading whitespace before the header is ignored.
    """
    text = text.lstrip()
    if terminators == "auto":
        # replace() drops exactly one LF after each CR, in C, before the split.
        parts = text.replace("\r\n", "\r").split("\r") if "\r" in text else text.split("\n")
    elif terminators == "cr":
        parts = text.split("\r")
    elif terminators == "any":
        parts = _CRLF_ANY_RE.split(text)
    else:
        raise UsageError("terminators must be 'auto', 'cr' or 'any'")
    return [p for p in parts if p and not p.isspace()]


# --------------------------------------------------------------------------------------------
# Paths
# --------------------------------------------------------------------------------------------

_NUM = r"([0-9]{1,9})"
_PATH_RE = re.compile(rf"([A-Z][A-Z0-9]{{2}})(?:\[{_NUM}\])?-{_NUM}(?:\({_NUM}\))?(?:\.{_NUM}(?:\.{_NUM})?)?", re.ASCII)
_SPEC_RE = re.compile(rf"{_NUM}(?:\({_NUM}\))?(?:\.{_NUM}(?:\.{_NUM})?)?", re.ASCII)

# (field, repetition or None, component or None, sub-component or None)
_Spec = tuple[int, int | None, int | None, int | None]


def _num(s: str | None) -> int | None:
    if s is None:
        return None
    n = int(s)
    if n < 1:
        raise UsageError("path indexes are 1-based")
    return n


@lru_cache(maxsize=1024)
def _parse_path(path: str) -> tuple[str, int, _Spec]:
    m = _PATH_RE.fullmatch(path) if isinstance(path, str) else None
    if m is None:
        raise UsageError("malformed path")
    seg, occ, field, rep, comp, sub = m.groups()
    spec = (_num(field), _num(rep), _num(comp), _num(sub))
    return seg, _num(occ) or 1, spec  # type: ignore[return-value]


@lru_cache(maxsize=1024)
def _parse_spec(spec: str) -> _Spec:
    m = _SPEC_RE.fullmatch(spec) if isinstance(spec, str) else None
    if m is None:
        raise UsageError("malformed field spec")
    field, rep, comp, sub = m.groups()
    return (_num(field), _num(rep), _num(comp), _num(sub))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# Segment
# --------------------------------------------------------------------------------------------


class Segment:
    """One segment; its fields are split on first access and kept.

    Field numbering follows HL7: for MSH (and FHS/BHS, which share the layout) field 1 *is* the
    field separator and field 2 the encoding characters, so MSH-n for n >= 2 is split index n-1;
    for every other segment SEG-n is split index n. MSH-1 and MSH-2 are atomic: they contain the
    delimiters themselves and are never split further.
    """

    __slots__ = ("_delims", "_fields", "_header", "id", "raw")

    def __init__(self, raw: str, delimiters: Delimiters) -> None:
        self.raw = raw
        self._delims = delimiters
        self.id = raw.partition(delimiters.field)[0]
        self._header = self.id in _HEADER_IDS
        self._fields: list[str] | None = None

    def __repr__(self) -> str:
        # Only the ID: segment content is PHI.
        return f"<Segment {self.id}>"

    def _split(self) -> list[str]:
        fields = self._fields
        if fields is None:
            fields = self._fields = self.raw.split(self._delims.field)
        return fields

    def field_count(self) -> int:
        """Highest field number present (trailing empty fields count: they were sent)."""
        n = len(self._split()) - 1
        return n + 1 if self._header else n

    def _field(self, n: int) -> str | None:
        fields = self._split()
        if self._header:
            if n == 1:
                return self._delims.field
            idx = n - 1
        else:
            idx = n
        return fields[idx] if 0 < idx < len(fields) else None

    def field(self, n: int) -> str:
        """Whole raw field *n* (all repetitions, escapes intact); "" when absent."""
        value = self._field(n) if n >= 1 else None
        return value if value is not None else ""

    def repetitions(self, n: int) -> list[str]:
        """Raw repetitions of field *n*; [] when the field is absent or empty."""
        value = self._field(n) if n >= 1 else None
        if not value:
            return []
        if self._header and n <= 2:
            return [value]
        return value.split(self._delims.repetition)

    def _value(self, spec: _Spec) -> str | None:
        n, rep, comp, sub = spec
        value = self._field(n)
        if value is None:
            return None
        if self._header and n <= 2:
            return value if (rep or 1) == 1 and (comp or 1) == 1 and (sub or 1) == 1 else None
        d = self._delims
        if rep is not None or d.repetition in value:
            reps = value.split(d.repetition)
            i = (rep or 1) - 1
            if i >= len(reps):
                return None
            value = reps[i]
        if comp is None:
            return value
        comps = value.split(d.component)
        if comp > len(comps):
            return None
        value = comps[comp - 1]
        if sub is None:
            return value
        subs = value.split(d.subcomponent)
        return subs[sub - 1] if sub <= len(subs) else None

    def get(self, spec: str, default: str = "") -> str:
        """Value at ``"3"``, ``"3.1"``, ``"3(2).4.2"``; same unescaping rule as Message.get."""
        parsed = _parse_spec(spec)
        value = self._value(parsed)
        if not value:
            return default
        return value if parsed[2] is None else unescape(value, self._delims)

    def get_raw(self, spec: str, default: str = "") -> str:
        """Like get() but never unescapes."""
        value = self._value(_parse_spec(spec))
        return value if value else default


# --------------------------------------------------------------------------------------------
# Message
# --------------------------------------------------------------------------------------------


def _check_delimiters(chars: str) -> bool:
    """Delimiters must be distinct, printable, non-alphanumeric, or splitting makes no sense."""
    return len(set(chars)) == len(chars) and all(c.isprintable() and not (c.isalnum() or c.isspace()) for c in chars)


@lru_cache(maxsize=64)
def _delimiters_from(chars: str) -> Delimiters | None:
    """MSH-1 + MSH-2 -> Delimiters; cached because every message of a feed repeats them."""
    if len(chars) not in (5, 6) or not _check_delimiters(chars):
        return None
    return Delimiters(chars[0], chars[1], chars[2], chars[3], chars[4], chars[5:])


class Message:
    """Lazy view over one HL7 v2 message (or an FHS/BHS batch frame).

    Construction only splits segments; a segment's fields are split on first access and cached.

    ``get()`` unescaping rule (decided on the *path*, never on the data, so callers can predict
    it): a path that names a component or sub-component (``PID-3.1``, ``PID-3.4.2``) returns the
    unescaped value; a path that names a whole field (``PID-3``, ``PID-3(2)``) returns the raw
    repetition text, because a composite value cannot be unescaped without turning escaped
    delimiters into real ones. For a primitive field such as NTE-3 use ``NTE-3.1`` to get it
    unescaped (or ``get_text`` for TX/FT notes). Empty values count as missing and give
    *default*. Unless a repetition is named, the first one is used.
    """

    __slots__ = (
        "_hdr_cache",
        "_index",
        "_segs",
        "component_sep",
        "delimiters",
        "escape_char",
        "field_sep",
        "repetition_sep",
        "segments",
        "subcomponent_sep",
        "truncation_char",
    )

    def __init__(self, segments: list[str], delimiters: Delimiters) -> None:
        """Prefer :meth:`parse`, which validates the header; this trusts its arguments."""
        self.segments = segments
        self.delimiters = delimiters
        self.field_sep, self.component_sep, self.repetition_sep = delimiters[:3]
        self.escape_char, self.subcomponent_sep, self.truncation_char = delimiters[3:]
        self._segs: list[Segment | None] = [None] * len(segments)
        self._index: dict[str, list[int]] | None = None
        self._hdr_cache: dict[tuple[int, int | None], str] = {}

    @classmethod
    def parse(cls, text: str, terminators: str = "auto") -> Message:
        """Split *text* and read the delimiters from the header (MSH, or FHS/BHS for batches).

        MSH-2 must hold the four standard encoding characters, optionally followed by the v2.7
        truncation character; anything else cannot be split reliably and is rejected.
        """
        if not isinstance(text, str):
            raise MessageError("message is not text")
        segments = split_segments(text, terminators)
        if not segments:
            raise MessageError("empty message")
        first = segments[0]
        if first[:3] not in _HEADER_IDS:
            raise MessageError("message does not start with MSH")
        if len(first) < 8:
            raise MessageError("header too short")
        fs = first[3]
        end = first.find(fs, 4)
        delims = _delimiters_from(first[3:] if end < 0 else first[3:end])
        if delims is None:
            raise MessageError("invalid delimiters in MSH-1/MSH-2")
        return cls(segments, delims)

    def __repr__(self) -> str:
        # Type and size only: anything else may be PHI.
        return f"<Message {self.message_type}^{self.trigger_event} segments={len(self.segments)}>"

    # -- segment access ------------------------------------------------------------------------

    def _segment_at(self, i: int) -> Segment:
        seg = self._segs[i]
        if seg is None:
            seg = self._segs[i] = Segment(self.segments[i], self.delimiters)
        return seg

    def _positions(self, seg_id: str) -> list[int]:
        index = self._index
        if index is None:
            index = {}
            fs = self.field_sep
            for i, raw in enumerate(self.segments):
                index.setdefault(raw.partition(fs)[0], []).append(i)
            self._index = index
        return index.get(seg_id, [])

    def segment_ids(self) -> list[str]:
        """Segment IDs in message order (for structure checks and logging without PHI)."""
        fs = self.field_sep
        return [raw.partition(fs)[0] for raw in self.segments]

    def segments_named(self, seg_id: str) -> list[Segment]:
        """Every occurrence of *seg_id*, in message order."""
        return [self._segment_at(i) for i in self._positions(seg_id)]

    def segment(self, seg_id: str, occurrence: int = 1) -> Segment | None:
        """The *occurrence*-th (1-based) *seg_id* segment, or None."""
        positions = self._positions(seg_id)
        if 1 <= occurrence <= len(positions):
            return self._segment_at(positions[occurrence - 1])
        return None

    def has_segment(self, seg_id: str) -> bool:
        """Whether at least one *seg_id* segment is present."""
        return bool(self._positions(seg_id))

    # -- field access --------------------------------------------------------------------------

    def _lookup(self, path: str) -> tuple[str | None, bool]:
        seg_id, occ, spec = _parse_path(path)
        seg = self.segment(seg_id, occ)
        if seg is None:
            return None, False
        return seg._value(spec), spec[2] is not None

    def get(self, path: str, default: str = "") -> str:
        """Value at *path* (``PID-3.1``, ``OBX[2]-5``, ``PID-3(2).4.2``); see the class doc."""
        value, is_component = self._lookup(path)
        if not value:
            return default
        return unescape(value, self.delimiters) if is_component else value

    def get_raw(self, path: str, default: str = "") -> str:
        """Value at *path* exactly as sent (escape sequences intact)."""
        value, _ = self._lookup(path)
        return value if value else default

    def get_text(self, path: str, default: str = "") -> str:
        """A TX/FT field (all repetitions) as plain text with newlines; see unescape_text."""
        seg_id, occ, spec = _parse_path(path)
        if spec[1:] != (None, None, None):
            raise UsageError("get_text takes a whole-field path")
        seg = self.segment(seg_id, occ)
        value = seg.field(spec[0]) if seg is not None else ""
        return unescape_text(value, self.delimiters) if value else default

    def repetitions(self, path: str) -> list[str]:
        """Raw repetitions of the field at *path* (``PID-3``, ``OBX[2]-5``); [] when absent."""
        seg_id, occ, spec = _parse_path(path)
        if spec[1:] != (None, None, None):
            raise UsageError("repetitions takes a whole-field path")
        seg = self.segment(seg_id, occ)
        return seg.repetitions(spec[0]) if seg is not None else []

    # -- header --------------------------------------------------------------------------------

    def _header(self) -> Segment | None:
        """The MSH to read header fields from: the first MSH, also inside a batch."""
        if self.segments[0][:3] == "MSH":  # the normal case, without building the index
            return self._segment_at(0)
        positions = self._positions("MSH")
        return self._segment_at(positions[0]) if positions else None

    def header_field(self, n: int) -> str:
        """Whole raw MSH-n (all components/repetitions), e.g. to copy into an ACK.

        A batch frame without any MSH falls back to its FHS/BHS for fields 3-8, which have the
        same meaning there (sending/receiving application and facility, time, security).
        """
        seg = self._header()
        if seg is None:
            if not 1 <= n <= 8:
                return ""
            seg = self._segment_at(0)
        return seg.field(n)

    def _hdr(self, n: int, comp: int | None = None) -> str:
        """Header values are read a dozen times per message (dedup key, profile, ACK): compute once."""
        key = (n, comp)
        cached = self._hdr_cache.get(key)
        if cached is None:
            cached = self._hdr_cache[key] = self._hdr_uncached(n, comp)
        return cached

    def _hdr_uncached(self, n: int, comp: int | None = None) -> str:
        seg = self._header()
        if seg is None and 1 <= n <= 8:
            seg = self._segment_at(0)
        if seg is None:
            return ""
        value = seg._value((n, None, comp, None))
        if not value:
            return ""
        return unescape(value, self.delimiters) if comp is not None else value

    @property
    def sending_application(self) -> str:
        """MSH-3.1 (namespace ID), unescaped; the universal ID (MSH-3.2) when no namespace ID is sent."""
        return self._hdr(3, 1) or self._hdr(3, 2)

    @property
    def msh3_raw(self) -> str:
        """MSH-3 whole HD as sent: the ACK copies it to MSH-5 unchanged."""
        return self.header_field(3)

    @property
    def sending_facility(self) -> str:
        """MSH-4.1, unescaped; the universal ID (MSH-4.2, e.g. a 360X sender's OID) when MSH-4.1 is empty,
        because an HD names its organisation by either, and a profile must be able to match such a sender."""
        return self._hdr(4, 1) or self._hdr(4, 2)

    @property
    def msh4_raw(self) -> str:
        """MSH-4 whole HD as sent: the ACK copies it to MSH-6 unchanged."""
        return self.header_field(4)

    @property
    def receiving_application(self) -> str:
        """MSH-5.1, unescaped."""
        return self._hdr(5, 1)

    @property
    def receiving_facility(self) -> str:
        """MSH-6.1, unescaped."""
        return self._hdr(6, 1)

    @property
    def message_datetime(self) -> str:
        """MSH-7 raw (first repetition); parsing the timestamp is the caller's business."""
        return self._hdr(7)

    @property
    def message_type(self) -> str:
        """MSH-9.1, e.g. ``REF``."""
        return self._hdr(9, 1)

    @property
    def trigger_event(self) -> str:
        """MSH-9.2, e.g. ``I12``."""
        return self._hdr(9, 2)

    @property
    def message_structure(self) -> str:
        """MSH-9.3, e.g. ``REF_I12`` ("" before v2.3.1)."""
        return self._hdr(9, 3)

    @property
    def control_id(self) -> str:
        """MSH-10 whole field, byte-for-byte as sent: MSA-2 must echo it exactly.

        For a batch frame this is the first MSH-10 inside the batch ("" if there is none).
        """
        seg = self._header()
        return seg.field(10) if seg is not None else ""

    @property
    def processing_id(self) -> str:
        """MSH-11.1 (``P``/``T``/``D``)."""
        return self._hdr(11, 1)

    @property
    def version(self) -> str:
        """MSH-12.1, e.g. ``2.5.1``."""
        return self._hdr(12, 1)

    @property
    def sequence_number(self) -> str:
        """MSH-13; non-empty means the sender uses the sequence-number protocol."""
        return self._hdr(13)

    @property
    def accept_ack_type(self) -> str:
        """MSH-15 (table 0155); empty together with MSH-16 means original mode."""
        return self._hdr(15)

    @property
    def app_ack_type(self) -> str:
        """MSH-16 (table 0155)."""
        return self._hdr(16)

    @property
    def charset(self) -> str:
        """MSH-18 first repetition (later repetitions are only for escape-switched text)."""
        return self._hdr(18)

    def is_batch(self) -> bool:
        """FHS/BHS frame or several MSH: the listener answers these with AR 200, not AA."""
        if self.segments and self.segments[0][:3] in _BATCH_IDS:
            return True
        return len(self._positions("MSH")) > 1


# --------------------------------------------------------------------------------------------
# Escapes
# --------------------------------------------------------------------------------------------

_HEX_RE = re.compile(r"(?:[0-9A-Fa-f]{2})+", re.ASCII)
_COUNT_RE = re.compile(r"\s*([+-]?[0-9]{1,6})?\s*", re.ASCII)


def _as_delimiters(d: Delimiters | Message | str) -> Delimiters:
    if isinstance(d, Delimiters):
        return d
    if isinstance(d, Message):
        return d.delimiters
    if isinstance(d, str) and len(d) in (5, 6):
        return Delimiters(d[0], d[1], d[2], d[3], d[4], d[5:])
    raise UsageError("delimiters must be a Delimiters, a Message or a string like '|^~\\&'")


def _count(arg: str) -> int | None:
    m = _COUNT_RE.fullmatch(arg)
    if m is None:
        return None
    n = int(m.group(1)) if m.group(1) else 1
    return max(0, min(n, _MAX_REPEAT))


def _translate(code: str, d: Delimiters, text: bool) -> str | None:
    """Replacement for one escape sequence body, or None to keep the sequence verbatim."""
    if len(code) == 1:
        if code == "F":
            return d.field
        if code == "S":
            return d.component
        if code == "T":
            return d.subcomponent
        if code == "R":
            return d.repetition
        if code == "E":
            return d.escape
        if code == "P":
            return d.truncation or None
        if code in "HN":
            return ""  # highlighting has no plain-text meaning
        return None
    head = code[:1]
    if head == "X":
        hexdigits = code[1:]
        if _HEX_RE.fullmatch(hexdigits) is None:
            return None
        data = bytes.fromhex(hexdigits)
        try:
            out = data.decode("utf-8")
        except UnicodeDecodeError:
            out = data.decode("latin-1")
        if text:
            out = out.replace("\r\n", "\n").replace("\r", "\n")
        return out
    if head == ".":
        cmd, arg = code[1:3].lower(), code[3:]
        if cmd == "br" and not arg.strip():
            return "\n"
        if cmd in ("sp", "sk"):
            n = _count(arg)
            if n is None:
                return None
            return ("\n" if cmd == "sp" else " ") * n
        if cmd in ("fi", "nf", "ce") and not arg.strip():
            return ""
        if cmd in ("in", "ti") and _count(arg) is not None:
            return ""  # indentation has no plain-text equivalent worth emulating
    # \Z..\ (local), \C..\ / \M..\ (charset switches we cannot honour) and junk stay verbatim,
    # so nothing is silently lost.
    return None


def _unescape(value: str, d: Delimiters, text: bool) -> str:
    esc = d.escape
    if not esc or esc not in value:
        return value
    out: list[str] = []
    i = 0
    while True:
        j = value.find(esc, i)
        if j < 0:
            out.append(value[i:])
            break
        out.append(value[i:j])
        k = value.find(esc, j + 1)
        if k < 0:  # unterminated: keep the rest literally
            out.append(value[j:])
            break
        replacement = _translate(value[j + 1 : k], d, text)
        out.append(value[j : k + 1] if replacement is None else replacement)
        i = k + 1
    return "".join(out)


def unescape(value: str, msg_delims: Delimiters | Message | str) -> str:
    """Decode HL7 escape sequences in one leaf value, using the message's own delimiters.

    Call it after splitting (per component/sub-component), never on a composite value: ``\\S\\``
    must not turn into a real component separator before the split. Hex runs (``\\X0D0A\\``,
    multi-byte) decode as UTF-8 when valid, else latin-1; ``\\.br\\`` becomes a newline; highlight
    markers are dropped; unknown or unterminated sequences are kept literally. Never raises on
    malformed input, because senders get escaping wrong (e.g. unescaped Windows paths).
    """
    return _unescape(value, _as_delimiters(msg_delims), False)


def unescape_text(value: str, msg_delims: Delimiters | Message | str) -> str:
    """Unescape a TX/FT field for display: line breaks of every spelling become ``\\n``.

    Takes the whole field: each repetition is a paragraph (HL7 TX rule) and hex CR/LF escapes
    (``\\X0D0A\\``, ``\\X0D\\``, ``\\X0A\\``, as Epic sends them) are normalised to ``\\n``.
    """
    d = _as_delimiters(msg_delims)
    if d.repetition in value:
        return "\n".join(_unescape(p, d, True) for p in value.split(d.repetition))
    return _unescape(value, d, True)


@lru_cache(maxsize=64)
def _escape_table(d: Delimiters) -> dict[int, str]:
    esc = d.escape
    table = {
        ord(d.escape): f"{esc}E{esc}",
        ord(d.field): f"{esc}F{esc}",
        ord(d.component): f"{esc}S{esc}",
        ord(d.subcomponent): f"{esc}T{esc}",
        ord(d.repetition): f"{esc}R{esc}",
        # A raw CR would end the segment on the wire; LF is escaped too so the receiver's
        # terminator heuristics never see it.
        ord("\r"): f"{esc}X0D{esc}",
        ord("\n"): f"{esc}X0A{esc}",
    }
    if d.truncation:
        table[ord(d.truncation)] = f"{esc}P{esc}"
    return table


def escape(value: str, msg_delims: Delimiters | Message | str) -> str:
    """Escape free text for an outbound leaf value; ``unescape(escape(s)) == s`` for any s."""
    return value.translate(_escape_table(_as_delimiters(msg_delims)))


# --------------------------------------------------------------------------------------------
# Oversize frames
# --------------------------------------------------------------------------------------------


def recover_control_id(raw_head: bytes | bytearray | memoryview) -> str:
    """Best-effort MSH-10 from the first bytes of a frame too large to read whole.

    The caller still owes the sender an ACK that it can correlate. Returns "" unless MSH-10 is
    provably complete in *raw_head* (followed by a field separator or a segment end): a
    truncated control ID in MSA-2 would correlate with the wrong message, which is worse than
    none. Latin-1 keeps every byte, so the value round-trips byte-for-byte when the ACK is
    encoded with latin-1. Never raises.
    """
    try:
        head = bytes(raw_head[:_HEAD_SCAN_LIMIT]).lstrip(b"\x0b\x1c \t\r\n")
        span = _msh_span(head)
        if span is None or span[1] - span[0] < 8:
            return ""
        start, end, terminated = span
        line = head[start:end].decode("latin-1")
        fs = line[3]
        if not _check_delimiters(fs):
            return ""
        parts = line.split(fs)
        if len(parts) > 10 or (len(parts) == 10 and terminated):
            return parts[9]
    except Exception:  # best effort by contract: any failure means "not recoverable"
        return ""
    return ""


def parse_head(raw_head: bytes | bytearray | memoryview) -> Message | None:
    """The complete segments at the start of an oversize frame as a Message, or None.

    Lets the caller build a properly addressed ACK (MSH-5/6 swap, trigger, version) even when
    the body was never read. Only segments followed by a terminator are used.
    """
    try:
        text = bytes(raw_head[:_HEAD_SCAN_LIMIT]).decode("latin-1")
        cut = max(text.rfind("\r"), text.rfind("\n"))
        if cut < 0:
            return None
        return Message.parse(text[:cut])
    except Exception:  # best effort by contract
        return None
