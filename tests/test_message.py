"""Tests for refloop.message: delimiters, numbering, paths, escapes, terminators, decoding."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from refloop.message import (
    DEFAULT_DELIMITERS,
    Delimiters,
    Message,
    MessageError,
    UsageError,
    codec_for_charset,
    decode_payload,
    escape,
    parse_head,
    recover_control_id,
    split_segments,
    unescape,
    unescape_text,
)
from tests.strategies_hl7 import (
    delimiter_sets,
    header_like_bytes,
    header_like_text,
    leaf_values,
    messages_with_values,
    paths,
)

# Invented referral for an invented patient; every field is distinct so misnumbering shows.
REF = (
    "MSH|^~\\&|SENDAPP^1.2.840.99^ISO|SENDFAC^9.9^ISO|REFLOOP|CLINIC|20250314101500-0500|SEC|"
    "REF^I12^REF_I12|CTL-0001|P^T|2.5.1^USA|42||AL|NE|USA|UNICODE UTF-8~8859/1\r"
    "PID|1||MRN001^^^HOSP&1.2.3&ISO^MR~SSN999^^^SSA^SS||TESTPATIENT^ALPHA^Q\\S\\R||19700101|F\r"
    "RF1|A^Accepted|R^Routine|SP^Specialist|||REFID-77^HOSP\r"
    "OBX|1|TX|NOTE||first obs\r"
    "OBX|2|TX|NOTE||second obs~more\r"
    "ZCH|1|x|Z1^Z2\r"
)


@pytest.fixture
def ref() -> Message:
    """The parsed invented referral."""
    return Message.parse(REF)


# -- delimiters --------------------------------------------------------------------------------


def test_standard_delimiters_are_read_from_msh(ref: Message) -> None:
    """The usual |^~\\& set is taken from MSH-1/MSH-2."""
    assert (ref.field_sep, ref.component_sep, ref.repetition_sep) == ("|", "^", "~")
    assert (ref.escape_char, ref.subcomponent_sep, ref.truncation_char) == ("\\", "&", "")
    assert ref.delimiters == DEFAULT_DELIMITERS


def test_custom_delimiters_drive_every_split() -> None:
    """A message using # for fields and $ for components is split by those, not by | and ^."""
    m = Message.parse("MSH#$~\\&#APP$X#FAC#RL#CL#2025##ADT$A01$ADT_A01#C|1#P#2.5.1\rPID#1##ID$A|B^C\r")
    assert m.field_sep == "#" and m.component_sep == "$"
    assert m.control_id == "C|1"
    assert m.trigger_event == "A01"
    assert m.sending_application == "APP"
    assert m.get("PID-3.2") == "A|B^C"


def test_v27_truncation_character_is_recognised() -> None:
    """A fifth encoding character is the v2.7 truncation character; \\P\\ unescapes to it."""
    m = Message.parse("MSH|^~\\&#|A|B|C|D|2025||ADT^A01|X|P|2.7\rNTE|1||cut\\P\\here\r")
    assert m.truncation_char == "#"
    assert m.get("MSH-2") == "^~\\&#"
    assert m.get("NTE-3.1") == "cut#here"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \r\n",
        "PID|1||X\r",
        "MSH|^~\\\r",  # 3 encoding characters
        "MSH|^~\\&$!|A\r",  # 6 encoding characters
        "MSH|^^\\&|A\r",  # duplicate delimiter
        "MSHA^~\\&A\r",  # alphanumeric field separator
        "MSH|^ \\&|A\r",  # whitespace delimiter
        "MSH\x00^~\\&\x00A\r",  # unprintable delimiter
        "MSH|",
    ],
)
def test_unparseable_headers_raise_message_error(text: str) -> None:
    """Frames without a usable MSH header raise MessageError, nothing else."""
    with pytest.raises(MessageError):
        Message.parse(text)


def test_message_error_never_quotes_content() -> None:
    """Error reasons go to logs, so they must not contain message text (PHI)."""
    with pytest.raises(MessageError) as info:
        Message.parse("PID|1||SECRETNAME\r")
    assert "SECRETNAME" not in str(info.value)


def test_repr_shows_no_content(ref: Message) -> None:
    """repr() appears in tracebacks, so it shows the type only."""
    assert "TESTPATIENT" not in repr(ref)
    assert "REF^I12" in repr(ref)


# -- numbering ---------------------------------------------------------------------------------


def test_msh_numbering_counts_the_field_separator_as_msh1(ref: Message) -> None:
    """MSH-1 is the separator and MSH-2 the encoding characters, so MSH-n is split index n-1."""
    assert ref.get("MSH-1") == "|"
    assert ref.get("MSH-2") == "^~\\&"
    assert ref.get("MSH-3") == "SENDAPP^1.2.840.99^ISO"
    assert ref.get("MSH-7") == "20250314101500-0500"
    assert ref.get("MSH-8") == "SEC"
    assert ref.get("MSH-9") == "REF^I12^REF_I12"
    assert ref.get("MSH-10") == "CTL-0001"
    assert ref.get("MSH-11.2") == "T"
    assert ref.get("MSH-12.2") == "USA"
    assert ref.get("MSH-13") == "42"
    assert ref.get("MSH-18") == "UNICODE UTF-8"
    assert ref.get("MSH-18(2)") == "8859/1"
    assert ref.get("MSH-19") == ""


def test_msh2_is_atomic(ref: Message) -> None:
    """MSH-2 contains ^ and ~ itself and must never be split into components or repetitions."""
    assert ref.get("MSH-2.1") == "^~\\&"
    assert ref.get("MSH-2.2", "none") == "none"
    assert ref.repetitions("MSH-2") == ["^~\\&"]
    assert ref.segment("MSH").field(1) == "|"  # type: ignore[union-attr]


def test_other_segments_number_from_the_segment_id(ref: Message) -> None:
    """For non-header segments SEG-n is split index n."""
    assert ref.get("PID-1") == "1"
    assert ref.get("PID-7") == "19700101"
    assert ref.get("RF1-6.1") == "REFID-77"
    pid = ref.segment("PID")
    assert pid is not None and pid.field_count() == 8


def test_header_properties(ref: Message) -> None:
    """Every MSH convenience property reads the documented field."""
    assert ref.sending_application == "SENDAPP"
    assert ref.msh3_raw == "SENDAPP^1.2.840.99^ISO"
    assert ref.sending_facility == "SENDFAC"
    assert ref.msh4_raw == "SENDFAC^9.9^ISO"
    assert ref.receiving_application == "REFLOOP"
    assert ref.receiving_facility == "CLINIC"
    assert ref.message_datetime == "20250314101500-0500"
    assert (ref.message_type, ref.trigger_event, ref.message_structure) == ("REF", "I12", "REF_I12")
    assert ref.control_id == "CTL-0001"
    assert ref.processing_id == "P"
    assert ref.version == "2.5.1"
    assert ref.sequence_number == "42"
    assert (ref.accept_ack_type, ref.app_ack_type) == ("AL", "NE")
    assert ref.charset == "UNICODE UTF-8"
    assert ref.header_field(12) == "2.5.1^USA"


def test_short_header_gives_empty_properties() -> None:
    """A header cut after MSH-2 parses; absent fields read as ""."""
    m = Message.parse("MSH|^~\\&")
    assert m.control_id == "" and m.version == "" and m.trigger_event == "" and m.charset == ""
    assert m.segment_ids() == ["MSH"]


def test_control_id_is_raw_whole_field() -> None:
    """MSH-10 keeps spaces, sub-component separators and escapes exactly as sent."""
    m = Message.parse("MSH|^~\\&|A|B|C|D|2025||ADT^A01| ID 1&2\\T\\x^y |P|2.5.1\r")
    assert m.control_id == " ID 1&2\\T\\x^y "


# -- paths -------------------------------------------------------------------------------------


def test_get_components_subcomponents_and_repetitions(ref: Message) -> None:
    """Component, sub-component and 1-based repetition paths address the right leaf."""
    assert ref.get("PID-3.1") == "MRN001"
    assert ref.get("PID-3.4") == "HOSP&1.2.3&ISO"
    assert ref.get("PID-3.4.2") == "1.2.3"
    assert ref.get("PID-3(2).1") == "SSN999"
    assert ref.get("PID-3(2).5") == "SS"
    assert ref.get("PID-3(3).1", "none") == "none"
    assert ref.get("MSH-9.2") == "I12"
    assert ref.get("ZCH-3.1") == "Z1"
    assert ref.get("ZCH-3.2") == "Z2"


def test_get_occurrences(ref: Message) -> None:
    """SEG[n] picks the n-th occurrence; the default is the first."""
    assert ref.get("OBX-5") == "first obs"
    assert ref.get("OBX[1]-5") == "first obs"
    assert ref.get("OBX[2]-5") == "second obs"  # first repetition
    assert ref.get("OBX[2]-5(2)") == "more"
    assert ref.get("OBX[3]-5", "none") == "none"


def test_whole_field_get_is_raw_component_get_is_unescaped(ref: Message) -> None:
    """get("PID-5") returns the raw repetition; get("PID-5.3") unescapes (documented rule)."""
    assert ref.get("PID-5") == "TESTPATIENT^ALPHA^Q\\S\\R"
    assert ref.get("PID-5.3") == "Q^R"
    assert ref.get_raw("PID-5.3") == "Q\\S\\R"
    assert ref.get("PID-3") == "MRN001^^^HOSP&1.2.3&ISO^MR"


def test_missing_and_empty_values_give_the_default(ref: Message) -> None:
    """Absent segments, fields, components and empty values all return *default*."""
    assert ref.get("PV1-2", "d") == "d"
    assert ref.get("PID-2", "d") == "d"
    assert ref.get("PID-99", "d") == "d"
    assert ref.get("PID-3.2", "d") == "d"
    assert ref.get("PID-3.9", "d") == "d"
    assert ref.get("PID-3.1.2", "d") == "d"
    assert ref.get_raw("PID-2", "d") == "d"


@pytest.mark.parametrize("path", ["PID", "PID-0", "PID-3.0", "pid-3", "PID-3.1.1.1", "PID 3", "PID-x", ""])
def test_malformed_paths_raise_usage_error(ref: Message, path: str) -> None:
    """A bad path is a caller bug: UsageError, which is still a MessageError."""
    with pytest.raises(UsageError):
        ref.get(path)
    assert issubclass(UsageError, MessageError)


def test_repetitions(ref: Message) -> None:
    """repetitions() returns raw repetitions, [] for absent or empty fields."""
    assert ref.repetitions("PID-3") == ["MRN001^^^HOSP&1.2.3&ISO^MR", "SSN999^^^SSA^SS"]
    assert ref.repetitions("OBX[2]-5") == ["second obs", "more"]
    assert ref.repetitions("PID-2") == []
    assert ref.repetitions("PV1-3") == []
    with pytest.raises(UsageError):
        ref.repetitions("PID-3.1")


def test_segment_listing(ref: Message) -> None:
    """segment_ids/segments_named/has_segment/segment see the message in order."""
    assert ref.segment_ids() == ["MSH", "PID", "RF1", "OBX", "OBX", "ZCH"]
    obx = ref.segments_named("OBX")
    assert [s.id for s in obx] == ["OBX", "OBX"]
    assert obx[1].field(1) == "2"
    assert ref.has_segment("RF1") and not ref.has_segment("PV1")
    assert ref.segment("OBX", 3) is None
    assert ref.segments_named("PV1") == []


def test_segment_object_api(ref: Message) -> None:
    """Segment.get/get_raw take the path without the segment part."""
    pid = ref.segment("PID")
    assert pid is not None
    assert pid.get("3(2).1") == "SSN999"
    assert pid.get("5.3") == "Q^R"
    assert pid.get_raw("5.3") == "Q\\S\\R"
    assert pid.field(3).startswith("MRN001")
    assert pid.field(0) == "" and pid.field(40) == ""
    assert "TESTPATIENT" not in repr(pid)


def test_get_text_joins_paragraphs(ref: Message) -> None:
    """get_text() reads a TX field with repetitions as paragraphs."""
    assert ref.get_text("OBX[2]-5") == "second obs\nmore"
    assert ref.get_text("OBX[9]-5", "d") == "d"


# -- escapes -----------------------------------------------------------------------------------


def test_delimiter_escapes_use_the_message_delimiters() -> None:
    """\\F\\ \\S\\ \\T\\ \\R\\ \\E\\ map to the message's own delimiters."""
    d = Delimiters("#", "$", "*", "!", "@")
    assert unescape("a!F!b!S!c!T!d!R!e!E!f", d) == "a#b$c@d*e!f"
    assert unescape("a\\F\\b", DEFAULT_DELIMITERS) == "a|b"
    assert unescape("a\\F\\b", "|^~\\&") == "a|b"


def test_hex_escapes_including_multibyte_runs() -> None:
    """\\Xhh..\\ runs decode as UTF-8 when valid, else latin-1; CR LF stay in plain unescape."""
    d = DEFAULT_DELIMITERS
    assert unescape("a\\X0D0A\\b", d) == "a\r\nb"
    assert unescape("caf\\XC3A9\\", d) == "café"
    assert unescape("caf\\XE9\\", d) == "café"
    assert unescape("\\X41424344\\", d) == "ABCD"


def test_formatting_and_highlight_escapes() -> None:
    """\\.br\\ is a newline, \\H\\/\\N\\ vanish, \\.sp n\\ and \\.sk n\\ expand (capped)."""
    d = DEFAULT_DELIMITERS
    assert unescape("one\\.br\\two", d) == "one\ntwo"
    assert unescape("\\H\\bold\\N\\", d) == "bold"
    assert unescape("a\\.sp 2\\b", d) == "a\n\nb"
    assert unescape("a\\.sk 3\\b", d) == "a   b"
    assert unescape("\\.fi\\\\.in +4\\x", d) == "x"
    assert len(unescape("\\.sp 999999\\", d)) == 100


@pytest.mark.parametrize(
    "value",
    [
        "C:\\dir\\file",  # sender forgot to escape a Windows path
        "\\Zlocal\\",  # locally defined
        "\\C2D41\\",  # charset switch we do not honour
        "\\XABC\\",  # odd hex digits
        "\\XZZ\\",  # not hex
        "\\X\\",
        "\\\\",
        "\\.brx\\",
    ],
)
def test_unknown_and_malformed_escapes_are_kept_verbatim(value: str) -> None:
    """Anything not understood survives unchanged, so nothing is silently lost."""
    assert unescape(value, DEFAULT_DELIMITERS) == value


def test_unterminated_escape_is_kept_literally() -> None:
    """An escape character without its closing partner stays as text."""
    assert unescape("a\\F\\b\\Xunterminated", DEFAULT_DELIMITERS) == "a|b\\Xunterminated"


def test_unescape_text_normalises_line_breaks() -> None:
    """TX/FT text: hex CR/LF of any spelling, \\.br\\ and repetitions become \\n."""
    d = DEFAULT_DELIMITERS
    assert unescape_text("a\\X0D0A\\b\\X0D\\c\\X0A\\d", d) == "a\nb\nc\nd"
    assert unescape_text("para one\\.br\\line~para two", d) == "para one\nline\npara two"
    assert unescape_text("keep\\R\\tilde", d) == "keep~tilde"


def test_escape_known_outputs() -> None:
    """escape() protects every delimiter plus CR and LF."""
    d = DEFAULT_DELIMITERS
    assert escape("a|b^c~d\\e&f", d) == "a\\F\\b\\S\\c\\R\\d\\E\\e\\T\\f"
    assert escape("l1\r\nl2", d) == "l1\\X0D\\\\X0A\\l2"
    assert escape("cut#", Delimiters(truncation="#")) == "cut\\P\\"


def test_bad_delimiter_argument_is_usage_error() -> None:
    """unescape() refuses delimiter specs it cannot interpret."""
    with pytest.raises(UsageError):
        unescape("x", "|^")


@given(d=delimiter_sets(), value=st.text())
def test_escape_round_trips(d: Delimiters, value: str) -> None:
    """unescape(escape(s)) == s for any text and any delimiter set."""
    assert unescape(escape(value, d), d) == value


# -- terminators -------------------------------------------------------------------------------


def test_cr_terminated() -> None:
    """Plain CR terminators; trailing CRs and empty segments are dropped."""
    assert split_segments("MSH|a\rPID|1\r\r") == ["MSH|a", "PID|1"]


def test_crlf_terminated() -> None:
    """CRLF: the LF after each CR is stripped."""
    assert split_segments("MSH|a\r\nPID|1\r\n") == ["MSH|a", "PID|1"]


def test_lf_only_terminated() -> None:
    """No CR at all: LF is the terminator."""
    assert split_segments("MSH|a\nPID|1\n\n") == ["MSH|a", "PID|1"]


def test_lf_inside_text_is_data_when_crs_exist() -> None:
    """With CRs present a bare LF (NTE text) is data, not a terminator."""
    text = "MSH|^~\\&|A\rNTE|1||line one\nline two\r\nOBX|1\r"
    assert split_segments(text) == ["MSH|^~\\&|A", "NTE|1||line one\nline two", "OBX|1"]
    m = Message.parse(text)
    assert m.get("NTE-3") == "line one\nline two"


def test_leading_and_whitespace_only_segments_dropped() -> None:
    """Leading blank lines and whitespace-only segments carry nothing and are dropped."""
    assert split_segments("\n\r  \rMSH|a\r \t \rPID|1\r  \r") == ["MSH|a", "PID|1"]


def test_cr_mode_keeps_every_lf() -> None:
    """terminators='cr' never treats LF as anything but data."""
    assert split_segments("MSH|a\r\nPID|1", "cr") == ["MSH|a", "\nPID|1"]


def test_any_mode_splits_on_everything() -> None:
    """terminators='any' is the per-sender override for LF-everywhere feeds."""
    assert split_segments("MSH|a\rPID|1\nNTE|x\r\nOBX|2", "any") == ["MSH|a", "PID|1", "NTE|x", "OBX|2"]


def test_unknown_terminator_mode() -> None:
    """A misspelled mode is a usage error."""
    with pytest.raises(UsageError):
        split_segments("MSH|a", "lf")


# -- decoding ----------------------------------------------------------------------------------


def _msh(charset: str) -> bytes:
    return f"MSH|^~\\&|A|B|C|D|2025||ADT^A01|X|P|2.5.1||||||{charset}\rPID|1||".encode("ascii")


def test_decode_plain_ascii() -> None:
    """Empty MSH-18 and ASCII bytes: ascii, no fallback."""
    raw = _msh("") + b"ROE^ANN\r"
    assert decode_payload(raw) == (raw.decode("ascii"), "ascii", False)


def test_empty_charset_with_cp1252_bytes_falls_back() -> None:
    """cp1252 bytes behind an empty MSH-18 decode via the fallback and say so."""
    raw = _msh("") + "MÜLLER^RENÉ’\r".encode("cp1252")
    text, codec, fell_back = decode_payload(raw)
    assert (codec, fell_back) == ("cp1252", True)
    assert "MÜLLER^RENÉ’" in text


def test_empty_charset_with_utf8_bytes_and_utf8_fallback() -> None:
    """UTF-8 bytes behind an empty MSH-18 decode with a utf-8 sender profile."""
    raw = _msh("") + "ŁUKASZ^ŻÓŁW\r".encode()
    text, codec, fell_back = decode_payload(raw, fallback="utf-8")
    assert (codec, fell_back) == ("utf-8", True)
    assert "ŁUKASZ^ŻÓŁW" in text


def test_declared_utf8_decodes_without_fallback() -> None:
    """MSH-18 UNICODE UTF-8 with UTF-8 bytes is the happy path."""
    raw = _msh("UNICODE UTF-8") + "ΑΛΦΑ\r".encode()
    text, codec, fell_back = decode_payload(raw)
    assert (codec, fell_back) == ("utf-8", False) and "ΑΛΦΑ" in text


def test_declared_8859_15_decodes_euro() -> None:
    """8859/15 maps to iso8859-15 (0xA4 is the euro sign there)."""
    text, codec, fell_back = decode_payload(_msh("8859/15") + b"\xa4\r")
    assert (codec, fell_back) == ("iso8859-15", False) and "€" in text


def test_only_first_charset_repetition_counts() -> None:
    """Later MSH-18 repetitions are alternates for escapes, not the default encoding."""
    _, codec, _ = decode_payload(_msh("8859/1~UNICODE UTF-8") + b"\xe9\r")
    assert codec == "iso8859-1"


def test_declared_codec_failure_falls_back() -> None:
    """Declared UTF-8 but cp1252 bytes: fallback, flagged."""
    text, codec, fell_back = decode_payload(_msh("UNICODE UTF-8") + b"REN\xc9\r")
    assert (codec, fell_back) == ("cp1252", True) and "RENÉ" in text


def test_unknown_charset_uses_fallback() -> None:
    """A charset we cannot map is decoded with the fallback."""
    _, codec, fell_back = decode_payload(_msh("KLINGON") + b"x\r")
    assert (codec, fell_back) == ("cp1252", True)


def test_undecodable_bytes_are_replaced_not_raised() -> None:
    """0x81 is undefined even in cp1252: replacement character, no exception."""
    text, codec, fell_back = decode_payload(_msh("") + b"\x81\r")
    assert (codec, fell_back) == ("cp1252", True) and "\ufffd" in text


def test_unknown_fallback_codec_degrades_to_latin1() -> None:
    """A misconfigured fallback cannot make decoding raise."""
    assert decode_payload(_msh("") + b"\xe9", fallback="no-such-codec")[1:] == ("iso8859-1", True)
    assert decode_payload(_msh("") + b"\xe9", fallback="rot13")[1:] == ("iso8859-1", True)


def test_utf8_bom_means_utf8() -> None:
    """A UTF-8 BOM is stripped and wins over an empty MSH-18."""
    text, codec, fell_back = decode_payload(b"\xef\xbb\xbf" + _msh("") + "É\r".encode())
    assert (codec, fell_back) == ("utf-8", False) and text.startswith("MSH|")


def test_batch_charset_read_from_inner_msh() -> None:
    """In an FHS/BHS frame MSH-18 comes from the first MSH."""
    raw = b"FHS|^~\\&|A\rBHS|^~\\&|A\r" + _msh("8859/1") + b"\xe9\r"
    assert decode_payload(raw)[1:] == ("iso8859-1", False)


def test_lf_terminated_header_is_read() -> None:
    """MSH-18 is found when the header ends with LF instead of CR."""
    raw = _msh("8859/2").replace(b"\r", b"\n") + b"\xb1\n"
    assert decode_payload(raw)[1:] == ("iso8859-2", False)


def test_whitespace_before_header_does_not_hide_charset() -> None:
    """A stray newline before MSH must not turn a declared charset into implied ASCII."""
    assert decode_payload(b"\r\n" + _msh("8859/1") + b"\xe9\r")[1:] == ("iso8859-1", False)


def test_decode_accepts_bytearray_and_memoryview() -> None:
    """Buffers from the framer need not be copied to bytes first."""
    raw = _msh("")
    assert decode_payload(bytearray(raw))[0] == raw.decode()
    assert decode_payload(memoryview(raw))[0] == raw.decode()


@pytest.mark.parametrize(
    ("charset", "codec"),
    [
        ("", "ascii"),
        ("ASCII", "ascii"),
        ("ISO IR6", "ascii"),
        ("8859/1", "iso8859-1"),
        ("8859/2", "iso8859-2"),
        ("8859/9", "iso8859-9"),
        ("8859/15", "iso8859-15"),
        ("UNICODE UTF-8", "utf-8"),
        ("UNICODE", "utf-8"),
        ("utf-8", "utf-8"),
        ("UTF8", "utf-8"),
        ("iso-8859-1", "iso8859-1"),
        (" Unicode  UTF-8 ", "utf-8"),
        ("8859/12", None),
        ("UNICODE UTF-16", None),
        ("unicode_escape", None),
        ("rot13", None),
    ],
)
def test_charset_mapping(charset: str, codec: str | None) -> None:
    """Table 0211 values and common aliases map case-insensitively; transforms never do."""
    assert codec_for_charset(charset) == codec


# -- batches -----------------------------------------------------------------------------------


def test_fhs_batch_is_recognised_with_inner_control_id() -> None:
    """An FHS frame parses (delimiters from FHS) and echoes the first inner MSH-10."""
    text = (
        "FHS#$~\\&#FILEAPP#FILEFAC\rBHS#$~\\&#FILEAPP\r"
        "MSH#$~\\&#APP#FAC#RL#CL#2025##ADT$A01#FIRST#P#2.5.1\rPID#1\r"
        "MSH#$~\\&#APP#FAC#RL#CL#2025##ADT$A01#SECOND#P#2.5.1\rBTS#2\rFTS#1\r"
    )
    m = Message.parse(text)
    assert m.is_batch()
    assert m.field_sep == "#"
    assert m.control_id == "FIRST"
    assert m.trigger_event == "A01"


def test_batch_without_messages_has_empty_control_id() -> None:
    """A BHS frame with no MSH parses, is a batch, and has control ID ""."""
    m = Message.parse("BHS|^~\\&|BAPP|BFAC|RL|CL|2025\rBTS|0\r")
    assert m.is_batch()
    assert m.control_id == ""
    assert m.msh3_raw == "BAPP"  # FHS/BHS-3..8 share the MSH meaning
    assert m.header_field(9) == ""


def test_two_msh_segments_make_a_batch() -> None:
    """Several MSH in one frame is a batch even without FHS/BHS."""
    m = Message.parse("MSH|^~\\&|A|B|C|D|1||ADT^A01|X1|P|2.5\rMSH|^~\\&|A|B|C|D|1||ADT^A01|X2|P|2.5\r")
    assert m.is_batch() and m.control_id == "X1"


def test_single_message_is_not_a_batch(ref: Message) -> None:
    """One MSH, no FHS/BHS: not a batch."""
    assert not ref.is_batch()


# -- oversize frames ---------------------------------------------------------------------------


def test_recover_control_id_from_a_head() -> None:
    """MSH-10 is recovered from the first bytes when it is complete."""
    raw = REF.encode()
    assert recover_control_id(raw[:300]) == "CTL-0001"
    assert recover_control_id(b"\x0b" + raw[:300]) == "CTL-0001"


def test_recover_control_id_needs_a_complete_field() -> None:
    """A head cut inside MSH-10 gives "", cut right after it gives the ID."""
    head = b"MSH|^~\\&|A|B|C|D|2025||ADT^A01|CTL-12345"
    assert recover_control_id(head) == ""
    assert recover_control_id(head + b"|") == "CTL-12345"
    assert recover_control_id(head + b"\r") == "CTL-12345"


def test_recover_control_id_from_batch_and_custom_separator() -> None:
    """Batch heads use the first inner MSH; the field separator comes from the head."""
    assert recover_control_id(b"FHS|^~\\&\rMSH|^~\\&|A|B|C|D|1||T^1|BX 1|P") == "BX 1"
    assert recover_control_id(b"MSH#$~\\&#A#B#C#D#1##T$1#C|2#P") == "C|2"


@pytest.mark.parametrize(
    "head",
    [b"", b"MSH", b"PID|1|2|3|4|5|6|7|8|9|10|11", b"MSH|^~\\&|A\rPID|1|2|3|4|5|6|7|8|9|10", b"\xff" * 50],
)
def test_recover_control_id_gives_up_quietly(head: bytes) -> None:
    """Anything without a complete MSH-10 yields ""."""
    assert recover_control_id(head) == ""


def test_parse_head_uses_complete_segments_only() -> None:
    """parse_head() parses what is complete and returns None when the header is not."""
    m = parse_head(REF.encode()[:250])
    assert m is not None and m.control_id == "CTL-0001" and m.msh3_raw.startswith("SENDAPP")
    assert parse_head(b"MSH|^~\\&|A|B") is None
    assert parse_head(b"junk\r") is None


# -- properties --------------------------------------------------------------------------------


@given(messages_with_values())
def test_leaf_values_read_back_under_any_delimiters(case: tuple[str, Delimiters, list[list[str]]]) -> None:
    """Escaped values written under random delimiters come back unchanged via get()."""
    text, d, rows = case
    m = Message.parse(text)
    assert m.delimiters == d
    for i, row in enumerate(rows, start=1):
        for j, value in enumerate(row, start=1):
            assert m.get(f"ZXX[{i}]-1.{j}") == value


@given(st.binary(max_size=300))
def test_decode_payload_never_raises_on_binary(raw: bytes) -> None:
    """Any bytes decode to text."""
    text, codec, _ = decode_payload(raw)
    assert isinstance(text, str) and codec


@given(header_like_bytes)
def test_header_like_bytes_never_raise(raw: bytes) -> None:
    """Decoding, parsing and control-ID recovery of header-like bytes raise only MessageError."""
    text, _, _ = decode_payload(raw)
    assert isinstance(recover_control_id(raw), str)
    parse_head(raw)
    with contextlib.suppress(MessageError):
        Message.parse(text)


@given(st.one_of(st.text(), header_like_text), paths)
def test_parse_and_get_raise_only_message_error(text: str, path: str) -> None:
    """Whatever the text and path, nothing but MessageError escapes."""
    try:
        m = Message.parse(text)
    except MessageError:
        return
    for call in (m.get, m.get_raw, m.get_text, m.repetitions):
        with contextlib.suppress(MessageError):
            call(path)
    m.is_batch()
    m.segment_ids()
    for prop in ("control_id", "version", "trigger_event", "charset", "msh3_raw", "sending_application"):
        assert isinstance(getattr(m, prop), str)


@given(st.text(), delimiter_sets())
def test_unescape_never_raises(value: str, d: Delimiters) -> None:
    """unescape and unescape_text accept any text."""
    assert isinstance(unescape(value, d), str)
    assert isinstance(unescape_text(value, d), str)


@given(leaf_values)
def test_unescape_of_plain_text_is_identity(value: str) -> None:
    """Text without the escape character is returned unchanged."""
    value = value.replace("\\", "")
    assert unescape(value, DEFAULT_DELIMITERS) == value
