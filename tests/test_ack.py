"""Tests for refloop.daemon.ack: decision-table shapes, versions, and independent parser oracles."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import hl7
import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Message as ApyMessage
from hl7apy.parser import parse_message, parse_segments
from hypothesis import given
from hypothesis import strategies as st

from refloop.daemon.ack import ACK_CODES, TABLE_0357, AckError, build_ack, version_tuple
from refloop.message import Delimiters, Message, recover_control_id
from tests.strategies_hl7 import delimiter_sets

NOW = datetime(2025, 3, 14, 10, 15, 0, tzinfo=timezone(timedelta(hours=-5)))
STAMP = "20250314101500-0500"


def incoming(
    version: str = "2.5.1",
    msg_type: str = "REF^I12^REF_I12",
    control_id: str = "MSG00112",
    processing: str = "P",
    sender: str = "HOSPENGINE^1.2.840.99^ISO",
    facility: str = "HOSP^9.9^ISO",
    d: Delimiters | None = None,
) -> Message:
    """An invented incoming message (written with |^~\\& and re-delimited when *d* is given)."""
    text = (
        f"MSH|^~\\&|{sender}|{facility}|REFLOOP|CLINIC|20250314101455-0500||{msg_type}|"
        f"{control_id}|{processing}|{version}\r"
        "PID|1||MRN55^^^HOSP^MR||SYNTHETIC^PATIENT\r"
    )
    if d is not None:
        text = text.translate(str.maketrans("|^~\\&", d.field + d.encoding_characters[:4]))
    return Message.parse(text)


def ack(msg: Message | None, code: str, **kw: object) -> str:
    """build_ack with the fixed clock and control ID used throughout."""
    return build_ack(msg, code, ack_control_id="RL-000042", now=NOW, **kw)  # type: ignore[arg-type]


def segs(text: str) -> list[str]:
    """ACK segments (the trailing CR produces no empty segment)."""
    assert text.endswith("\r") and "\n" not in text
    return text[:-1].split("\r")


def apy_strict(text: str) -> ApyMessage:
    """hl7apy strict parse + validate: the independent oracle for v2.5.1 ACKs."""
    m = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert m.validate() is True
    return m


def apy_strict_as_ack(text: str, version: str) -> ApyMessage:
    """Strict validation for pre-2.3.1 ACKs, whose MSH-9 carries no structure for hl7apy to find."""
    m = ApyMessage("ACK", version=version, validation_level=VALIDATION_LEVEL.STRICT)
    m.children = parse_segments(text, version=version, validation_level=VALIDATION_LEVEL.STRICT)
    assert m.validate() is True
    return m


# -- shapes ------------------------------------------------------------------------------------


def test_aa_exact_shape() -> None:
    """AA for a v2.5.1 REF: swapped addresses, new control ID, echoed MSH-10, no ERR."""
    assert segs(ack(incoming(), "AA")) == [
        f"MSH|^~\\&|REFLOOP|REFLOOP|HOSPENGINE^1.2.840.99^ISO|HOSP^9.9^ISO|{STAMP}||ACK^I12^ACK|RL-000042|P|2.5.1",
        "MSA|AA|MSG00112",
    ]


def test_ae_with_err_101_and_location() -> None:
    """AE with a content error: MSA-3 text and ERR-2/3/4/8 as in the reference example."""
    err = AckError(101, "Patient identifier missing", "PID^1^3")
    assert segs(ack(incoming(), "AE", error=err))[1:] == [
        "MSA|AE|MSG00112|Patient identifier missing",
        "ERR||PID^1^3|101^Required field missing^HL70357|E||||Patient identifier missing",
    ]


@pytest.mark.parametrize(
    ("code", "location", "text"),
    [
        (200, "MSH^1^9^1^1", "Unsupported message type"),
        (201, "MSH^1^9^1^2", "Unsupported event code"),
        (202, "MSH^1^11", "Unsupported processing ID"),
        (203, "MSH^1^12", "Unsupported version ID"),
        (207, "", "Storage unavailable, retry later"),
    ],
)
def test_ar_protocol_and_internal_errors(code: int, location: str, text: str) -> None:
    """AR for 200/201/202/203/207 carries the table 0357 code and description."""
    out = segs(ack(incoming(), "AR", error=AckError(code, text, location)))
    assert out[1] == f"MSA|AR|MSG00112|{text}"
    err = out[2].split("|")
    assert err[0] == "ERR" and err[1] == ""
    assert err[2] == location
    assert err[3] == f"{code}^{TABLE_0357[code]}^HL70357"
    assert err[4] == "E"
    assert err[8] == text
    apy_strict(ack(incoming(), "AR", error=AckError(code, text, location)))


@pytest.mark.parametrize("code", ["CA", "CE", "CR"])
def test_enhanced_accept_codes(code: str) -> None:
    """CA/CE/CR use the same layout; MSH-15/16 stay empty (the ACK has no MSH-13+)."""
    out = segs(ack(incoming(), code))
    assert out[1] == f"MSA|{code}|MSG00112"
    assert len(out[0].split("|")) == 12


def test_cr_with_version_error() -> None:
    """CR 203 for an unacceptable (here: too new) version; v2.9 has no MSA-3, ERR-8 has the text."""
    out = segs(ack(incoming(version="2.9"), "CR", error=AckError(203, "Unsupported version ID", "MSH^1^12")))
    assert out[1] == "MSA|CR|MSG00112"
    assert out[2] == "ERR||MSH^1^12|203^Unsupported version id^HL70357|E||||Unsupported version ID"


# -- versions ----------------------------------------------------------------------------------


def test_v23_two_component_type_and_eld() -> None:
    """v2.3: MSH-9 is ACK^event and the error goes to ERR-1 as an ELD."""
    msg = incoming(version="2.3", msg_type="REF^I12")
    out = segs(ack(msg, "AE", error=AckError(101, "Patient identifier missing", "PID^1^3")))
    assert out[0].split("|")[8] == "ACK^I12"
    assert out[0].split("|")[11] == "2.3"
    assert out[1] == "MSA|AE|MSG00112|Patient identifier missing"
    assert out[2] == "ERR|PID^1^3^101&Required field missing&HL70357"


@pytest.mark.parametrize("version", ["2.1", "2.2", "2.3", "2.3.1", "2.4"])
def test_pre_25_versions_use_eld(version: str) -> None:
    """Everything before 2.5 reports errors in ERR-1 only; MSH-9.3 appears from 2.3.1."""
    out = segs(ack(incoming(version=version), "AR", error=AckError(200, "Unsupported message type")))
    assert out[2] == "ERR|^^^200&Unsupported message type&HL70357"
    expected_type = "ACK^I12^ACK" if version in ("2.3.1", "2.4") else "ACK^I12"
    assert out[0].split("|")[8] == expected_type


def test_eld_keeps_only_segment_sequence_field() -> None:
    """ELD has no repetition/component parts; a bare segment gets sequence 1."""
    msg = incoming(version="2.4")
    assert segs(ack(msg, "AE", error=AckError(102, "Bad date", "PID^1^7^1^2")))[2].startswith("ERR|PID^1^7^102&")
    assert segs(ack(msg, "AE", error=AckError(100, "Order", "PV1")))[2].startswith("ERR|PV1^1^^100&")


def test_v27_drops_withdrawn_msa3() -> None:
    """From v2.7 MSA-3 is withdrawn (a strict parser rejects it); the text stays in ERR-8."""
    out = segs(ack(incoming(version="2.7"), "AE", error=AckError(101, "Missing", "PID^1^3")))
    assert out[1] == "MSA|AE|MSG00112"
    assert out[2].endswith("|Missing")


@pytest.mark.parametrize(
    ("version", "expected"),
    [
        ("2.3", (2, 3, 0)),
        ("2.3.1", (2, 3, 1)),
        ("2.4", (2, 4, 0)),
        ("2.5", (2, 5, 0)),
        ("2.5.1", (2, 5, 1)),
        ("2.9", (2, 9, 0)),
        (" 2.6", (2, 6, 0)),
        ("junk", None),
        ("", None),
        ("v2.5", None),
    ],
)
def test_version_tuple(version: str, expected: tuple[int, int, int] | None) -> None:
    """Versions compare numerically; junk is None."""
    assert version_tuple(version) == expected


def test_junk_version_uses_251_layout_and_is_echoed() -> None:
    """An unparseable MSH-12 is echoed raw but the ACK uses the v2.5.1 layout."""
    out = segs(ack(incoming(version="FOO"), "AR", error=AckError(203, "Unsupported version ID", "MSH^1^12")))
    msh = out[0].split("|")
    assert msh[8] == "ACK^I12^ACK" and msh[11] == "FOO"
    assert out[2].startswith("ERR||MSH^1^12|203^")


def test_msh11_and_msh12_echoed_raw() -> None:
    """Processing ID and version are copied whole (components included)."""
    msh = segs(ack(incoming(processing="T^A", version="2.5.1^USA"), "AA"))[0].split("|")
    assert msh[10] == "T^A" and msh[11] == "2.5.1^USA"


def test_missing_msh11_12_use_defaults() -> None:
    """Absent MSH-11/12 become P and the version hint."""
    m = Message.parse("MSH|^~\\&|S|F|R|C|2025||ADT^A01|C1\r")
    msh = segs(ack(m, "AA", version_hint="2.4"))[0].split("|")
    assert msh[8] == "ACK^A01^ACK" and msh[10] == "P" and msh[11] == "2.4"


# -- echoing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("control_id", [" A B ", "X&Y", "a\\T\\b", "ID^1^2", "ÄÖ-7", "123~456"])
def test_msa2_is_byte_for_byte(control_id: str) -> None:
    """MSA-2 is the incoming MSH-10 exactly, odd characters and all."""
    out = segs(ack(incoming(control_id=control_id), "AA"))
    assert out[1] == f"MSA|AA|{control_id}"


def test_msh5_msh6_swap_and_own_identity() -> None:
    """MSH-3/4 are refloop's; incoming MSH-3/4 go to MSH-5/6 whole."""
    msh = segs(ack(incoming(), "AA", app="RL^1.2^ISO", facility="CLINIC"))[0].split("|")
    assert msh[2] == "RL\\S\\1.2\\S\\ISO"  # our identity is escaped text, not a raw HD
    assert msh[3] == "CLINIC"
    assert msh[4] == "HOSPENGINE^1.2.840.99^ISO"
    assert msh[5] == "HOSP^9.9^ISO"


def test_reply_uses_the_senders_delimiters() -> None:
    """A sender using # and $ gets an ACK in # and $, with error text escaped for them."""
    d = Delimiters("#", "$", "~", "\\", "&")
    msg = incoming(d=d)
    text = ack(msg, "AE", error=AckError(101, "a#b$c", "PID^1^3"))
    out = segs(text)
    assert out[0].startswith("MSH#$~\\&#REFLOOP#REFLOOP#HOSPENGINE$1.2.840.99$ISO#")
    assert out[1] == "MSA#AE#MSG00112#a\\F\\b\\S\\c"
    assert out[2] == "ERR##PID$1$3#101$Required field missing$HL70357#E####a\\F\\b\\S\\c"
    assert Message.parse(text).get("ERR-8.1") == "a#b$c"


def test_error_text_and_ack_control_id_are_escaped() -> None:
    """Delimiters in caller-supplied text cannot break the structure."""
    text = build_ack(incoming(), "AE", ack_control_id="A|B", now=NOW, error=AckError(101, "x|y^z\rw", "PID^1^3"))
    out = segs(text)
    assert len(out) == 3
    assert out[0].split("|")[9] == "A\\F\\B"
    assert out[1] == "MSA|AE|MSG00112|x\\F\\y\\S\\z\\X0D\\w"


# -- timestamps --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tz", "suffix"),
    [(UTC, "+0000"), (timezone(timedelta(hours=5, minutes=30)), "+0530"), (timezone(timedelta(hours=-8)), "-0800")],
)
def test_msh7_carries_the_offset(tz: timezone, suffix: str) -> None:
    """MSH-7 is the ACK's own time with its UTC offset."""
    now = datetime(2025, 1, 2, 3, 4, 5, tzinfo=tz)
    msh = build_ack(incoming(), "AA", ack_control_id="X", now=now).split("|")
    assert msh[6] == "20250102030405" + suffix


def test_naive_now_is_rejected() -> None:
    """A naive clock would produce an ambiguous MSH-7."""
    with pytest.raises(ValueError):
        build_ack(incoming(), "AA", ack_control_id="X", now=datetime(2025, 1, 1))


# -- unparseable and batch ---------------------------------------------------------------------


def test_unparseable_message_uses_hint() -> None:
    """msg None: MSA-2 is the hint, MSH-5/6 empty, defaults elsewhere."""
    out = segs(ack(None, "AR", error=AckError(100, "Unreadable message"), control_id_hint="REC-1"))
    assert out[0] == f"MSH|^~\\&|REFLOOP|REFLOOP|||{STAMP}||ACK^^ACK|RL-000042|P|2.5.1"
    assert out[1] == "MSA|AR|REC-1|Unreadable message"
    assert out[2] == "ERR|||100^Segment sequence error^HL70357|E||||Unreadable message"
    apy_strict("\r".join(out) + "\r")


def test_unparseable_with_old_version_hint() -> None:
    """With a pre-2.3.1 hint and no trigger MSH-9 is plain ACK."""
    out = segs(ack(None, "AR", version_hint="2.3"))
    assert out[0].split("|")[8] == "ACK" and out[1] == "MSA|AR|"


def test_hint_from_oversize_head_round_trips() -> None:
    """A control ID recovered from raw bytes lands in MSA-2 unchanged."""
    hint = recover_control_id(b"MSH|^~\\&|A|B|C|D|2025||ORU^R01|BIG 1&2|P|2.5.1|")
    assert segs(ack(None, "AR", control_id_hint=hint))[1] == "MSA|AR|BIG 1&2"


def test_batch_frame_gets_ar_200_with_first_control_id() -> None:
    """An FHS/BHS frame is answered AR 200 echoing the first inner MSH-10."""
    msg = Message.parse(
        "FHS|^~\\&|FA|FF\rBHS|^~\\&|FA|FF\rMSH|^~\\&|SA|SF|R|C|2025||ADT^A01|IN-1|P|2.5.1\rBTS|1\rFTS|1\r"
    )
    out = segs(ack(msg, "AR", error=AckError(200, "Batches not accepted")))
    assert out[1] == "MSA|AR|IN-1|Batches not accepted"
    assert out[0].split("|")[4:6] == ["SA", "SF"]
    apy_strict(ack(msg, "AR", error=AckError(200, "Batches not accepted")))


# -- validation of arguments -------------------------------------------------------------------


def test_invalid_ack_code_rejected() -> None:
    """Only table 0008 codes are accepted."""
    with pytest.raises(ValueError):
        ack(incoming(), "OK")


def test_invalid_severity_rejected() -> None:
    """Only table 0516 severities are accepted."""
    with pytest.raises(ValueError):
        AckError(101, "x", severity="X")


def test_table_0357() -> None:
    """The exported table has the v2.5.1 codes and descriptions."""
    assert sorted(TABLE_0357) == [0, 100, 101, 102, 103, 200, 201, 202, 203, 204, 205, 206, 207]
    assert TABLE_0357[207] == "Application internal error"
    assert TABLE_0357[203] == "Unsupported version id"


def test_output_is_ascii_cr_only_without_framing() -> None:
    """Segments are CR-joined with a trailing CR; no VT/FS framing bytes."""
    text = ack(incoming(), "AA")
    assert text.count("\r") == 2 and text.endswith("\r")
    assert "\x0b" not in text and "\x1c" not in text


# -- independent oracles -----------------------------------------------------------------------

_ERRORS = [
    None,
    AckError(101, "Patient identifier missing", "PID^1^3"),
    AckError(207, "Storage unavailable"),
    AckError(0, "Ignored: not tracked", severity="I"),
    AckError(102, "Bad date & time", "PID^1^7^1^1", severity="W"),
]


@pytest.mark.parametrize("code", sorted(ACK_CODES))
@pytest.mark.parametrize("error", _ERRORS)
def test_hl7apy_strict_validates_every_251_ack(code: str, error: AckError | None) -> None:
    """Every v2.5.1 ACK shape parses and validates with hl7apy in strict mode."""
    m = apy_strict(ack(incoming(), code, error=error))
    assert m.msa.msa_1.value == code
    assert m.msa.msa_2.value == "MSG00112"
    assert m.msh.msh_9.msh_9_3.value == "ACK"
    if error is not None:
        assert m.err.err_3.cwe_1.value == str(error.code)
        assert m.err.err_4.value == error.severity


@pytest.mark.parametrize("version", ["2.5", "2.6", "2.7"])
def test_hl7apy_strict_validates_other_enhanced_versions(version: str) -> None:
    """The v2.5+ layout also validates strictly for 2.5, 2.6 and 2.7 (no MSA-3 there)."""
    apy_strict(ack(incoming(version=version), "AE", error=AckError(101, "Missing", "PID^1^3")))


@pytest.mark.parametrize("version", ["2.3", "2.4"])
def test_hl7apy_validates_eld_acks(version: str) -> None:
    """v2.3/2.4 ACKs parse tolerantly and validate strictly as ACK with ERR-1 ELD."""
    text = ack(incoming(version=version), "AE", error=AckError(101, "Missing", "PID^1^3"))
    tolerant = parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=True)
    assert tolerant.msa.msa_1.value == "AE" and tolerant.msa.msa_2.value == "MSG00112"
    m = apy_strict_as_ack(text, version)
    assert m.err.err_1.to_er7() == "PID^1^3^101&Required field missing&HL70357"


def test_hl7apy_strict_with_custom_delimiters() -> None:
    """hl7apy reads an ACK written in the sender's # $ delimiters."""
    d = Delimiters("#", "$", "~", "\\", "&")
    m = apy_strict(ack(incoming(d=d), "AE", error=AckError(101, "Missing", "PID^1^3")))
    assert m.msa.msa_2.value == "MSG00112"
    assert m.err.err_2.erl_1.value == "PID"


@pytest.mark.parametrize("control_id", ["MSG00112", " A B ", "X&Y", "ID^1^2", "a\\T\\b"])
def test_python_hl7_reads_msa_back(control_id: str) -> None:
    """python-hl7 sees the MSA-1 code and the raw MSA-2 we echoed."""
    for code in sorted(ACK_CODES):
        parsed = hl7.parse(ack(incoming(control_id=control_id), code, error=AckError(207, "x")))
        msa = parsed.segment("MSA")
        assert str(msa[1]) == code
        assert str(msa[2]) == control_id


@given(
    # "-" and "_" occur as data in the template (timestamp offset, REF_I12).
    d=delimiter_sets(truncation=False).filter(lambda d: not set("-_") & set(d)),
    text=st.text(max_size=40),
    control_id=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=20),
    version=st.sampled_from(["2.3", "2.4", "2.5.1", "2.7", "junk"]),
)
def test_any_error_text_keeps_the_structure(d: Delimiters, text: str, control_id: str, version: str) -> None:
    """Whatever the error text and delimiters, the ACK re-parses with the same MSA and text."""
    msg = incoming(d=d, control_id=control_id, version=version)
    out = ack(msg, "AE", error=AckError(101, text, "PID^1^3"))
    reparsed = Message.parse(out, terminators="cr")
    assert reparsed.segment_ids() == ["MSH", "MSA", "ERR"]
    assert reparsed.delimiters == d
    assert reparsed.get("MSA-1") == "AE"
    assert reparsed.get("MSA-2") == control_id
    if version in ("2.5.1", "junk"):
        assert reparsed.get_raw("ERR-8") == out.split("\r")[2].split(d.field)[8]
        assert reparsed.get("ERR-8.1") == text.strip() or reparsed.get("ERR-8.1") == text
