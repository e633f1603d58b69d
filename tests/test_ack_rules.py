"""The ACK decision table, end to end: real MLLP socket, real database, one row per decision, in both
``ack_after`` modes (the journal rows are read once the apply lag is 0)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select

from refloop.store.models import Message as Journal
from tests import samples
from tests.utils import DaemonThread, MllpClient, ack_segments, err_code, make_settings, msa, running_daemon


@pytest.fixture(params=["journal", "applied"])
def daemon(db_url: str, request: pytest.FixtureRequest) -> Iterator[DaemonThread]:
    with running_daemon(make_settings(db_url, ack_after=request.param)) as d:
        yield d


def routed(cid: str, **kw: str) -> str:
    """A message a handler applies (a new referral), so its outcome is `processed`."""
    return samples.ref(cid, referral=f"RF{cid}", **kw)


def journal(d: DaemonThread, control_id: str) -> list[Journal]:
    assert d.server.engine is not None
    d.settle()
    with d.server.engine.connect() as c:
        return list(c.execute(select(Journal).where(Journal.control_id == control_id).order_by(Journal.id)))


def test_aa_after_commit_and_header_swap(daemon: DaemonThread) -> None:
    """A routed message gets AA; the ACK swaps MSH-3/4 into MSH-5/6 and echoes MSH-10 in MSA-2."""
    cid = samples.control_id()
    with MllpClient(daemon.port) as c:
        ack = c.send(routed(cid))
    segs = ack_segments(ack)
    assert msa(ack) == ("AA", cid)
    assert segs["MSH"][4:6] == ["ENGINE", "CLINIC"]
    assert segs["MSH"][8] == "ACK^I12^ACK"
    assert segs["MSH"][9] != cid and len(segs["MSH"][9]) <= 20
    assert segs["MSH"][11] == "2.5.1"
    rows = journal(daemon, cid)
    assert [(r.outcome, r.ack_code) for r in rows] == [("processed", "AA")]
    assert rows[0].ack == ack  # the exact ACK sent is journaled


def test_v23_ack_shape(daemon: DaemonThread) -> None:
    """v2.3 messages get a two-component MSH-9 and, on error, ERR-1 in ELD form."""
    cid = samples.control_id()
    with MllpClient(daemon.port) as c:
        ok = c.send(samples.ref(cid, version="2.3", structure=""))
        bad = c.send(samples.ref(samples.control_id(), version="2.3", structure="", processing="T"))
    assert ack_segments(ok)["MSH"][8] == "ACK^I12"
    assert msa(bad)[0] == "AR"
    assert ack_segments(bad)["ERR"][1].startswith("MSH^1^11^202&")


@pytest.mark.parametrize(
    ("kwargs", "code", "err"),
    [
        ({"version": "2.1"}, "AR", "203"),
        ({"processing": "T"}, "AR", "202"),
        ({"version": "2.5.1"}, "AA", ""),
    ],
)
def test_protocol_checks(daemon: DaemonThread, kwargs: dict[str, str], code: str, err: str) -> None:
    """Version and processing ID are checked before anything is applied (AR 203/202)."""
    cid = samples.control_id()
    with MllpClient(daemon.port) as c:
        ack = c.send(routed(cid, **kwargs))
    assert msa(ack) == (code, cid)
    assert err_code(ack) == err
    assert journal(daemon, cid)[0].outcome == ("processed" if code == "AA" else "rejected")


def test_unsupported_type_accepted_as_ignored(daemon: DaemonThread) -> None:
    """A well-formed type refloop does not route (ADT) gets AA and is journaled as ignored."""
    cid = samples.control_id()
    adt = samples.msh("ADT", "A08", cid) + "\rPID|1||X1^^^C^MR||Doe^J\r"
    with MllpClient(daemon.port) as c:
        assert msa(c.send(adt)) == ("AA", cid)
    assert journal(daemon, cid)[0].outcome == "ignored"


def test_unsupported_type_rejected_when_configured(sqlite_url: str) -> None:
    """With unsupported='reject', unknown types get AR 200 and unknown triggers AR 201."""
    with running_daemon(make_settings(sqlite_url, unsupported="reject")) as d, MllpClient(d.port) as c:
        a1 = c.send(samples.msh("ADT", "A08", "C1") + "\r")
        a2 = c.send(samples.msh("SIU", "S99", "C2") + "\r")
    assert (msa(a1)[0], err_code(a1)) == ("AR", "200")
    assert (msa(a2)[0], err_code(a2)) == ("AR", "201")


def test_missing_control_id_and_type(daemon: DaemonThread) -> None:
    """MSH-10 or MSH-9 empty: AR 101 with the field's location."""
    with MllpClient(daemon.port) as c:
        a1 = c.send("MSH|^~\\&|E|C|R|H|20260101||SIU^S12^SIU_S12||P|2.5.1\r")
        a2 = c.send("MSH|^~\\&|E|C|R|H|20260101|||C77|P|2.5.1\r")
    assert (msa(a1)[0], err_code(a1)) == ("AR", "101")
    assert ack_segments(a1)["ERR"][2] == "MSH^1^10"
    assert (msa(a2), err_code(a2)) == (("AR", "C77"), "101")


def test_unparseable_and_batch(daemon: DaemonThread) -> None:
    """No MSH: AR 100 with empty MSA-2; a batch: AR 200 with a clear text."""
    with MllpClient(daemon.port) as c:
        a1 = c.send("hello there\r")
        a2 = c.send("FHS|^~\\&|E|C\rBHS|^~\\&|E|C\r" + samples.siu("B1") + "BTS|1\rFTS|1\r")
    assert (msa(a1), err_code(a1)) == (("AR", ""), "100")
    assert msa(a2)[0] == "AR" and err_code(a2) == "200"
    assert "Batch" in ack_segments(a2)["ERR"][8]


@pytest.mark.parametrize(
    ("accept", "kwargs", "expect"),
    [
        ("AL", {}, "CA"),
        ("AL", {"version": "2.1"}, "CR"),
        ("ER", {}, None),
        ("ER", {"version": "2.1"}, "CR"),
        ("SU", {}, "CA"),
        ("NE", {}, None),
    ],
)
def test_enhanced_mode(daemon: DaemonThread, accept: str, kwargs: dict[str, str], expect: str | None) -> None:
    """MSH-15 asks for an accept ACK: CA/CR (or nothing for NE, ER-on-success); the frame is stored either way."""
    cid = samples.control_id()
    probe = samples.control_id()
    with MllpClient(daemon.port) as c:
        c.send_raw(b"\x0b" + samples.siu(cid, accept=accept, app_ack="NE", **kwargs).encode() + b"\x1c\r")
        c.send_raw(b"\x0b" + samples.siu(probe).encode() + b"\x1c\r")
        first = c.read_frame().decode()
        if expect is None:
            assert msa(first) == ("AA", probe)  # nothing was sent for the enhanced message
        else:
            assert msa(first) == (expect, cid)
            assert ack_segments(first)["MSH"][14:16] in ([], ["", ""], [""]) or len(ack_segments(first)["MSH"]) <= 14
            assert msa(c.read_frame().decode()) == ("AA", probe)
    assert len(journal(daemon, cid)) == 1


def test_app_ack_request_counted(daemon: DaemonThread) -> None:
    """MSH-16 asking for an application ACK is answered with the accept ACK and counted as unsupported."""
    with MllpClient(daemon.port) as c:
        assert msa(c.send(samples.siu(accept="AL", app_ack="AL")))[0] == "CA"
    assert daemon.metric("refloop_app_ack_requests_unsupported_total") == 1


def test_resend_answered_with_stored_code(daemon: DaemonThread) -> None:
    """The same message twice on two connections: applied once, identical MSA-1, second is a duplicate."""
    cid = samples.control_id()
    msg = routed(cid)
    with MllpClient(daemon.port) as c1, MllpClient(daemon.port) as c2:
        a1, a2 = c1.send(msg), c2.send(msg)
    assert msa(a1) == msa(a2) == ("AA", cid)
    rows = journal(daemon, cid)
    assert [r.outcome for r in rows] == ["processed", "duplicate"]
    assert rows[1].duplicate_of == rows[0].id
    assert daemon.metric("refloop_duplicates_suppressed_total") == 1


def test_reused_control_id_processed_and_flagged(daemon: DaemonThread) -> None:
    """Same MSH-10 with different content is a new message, flagged control_id_reused."""
    cid = samples.control_id()
    with MllpClient(daemon.port) as c:
        c.send(routed(cid))
        c.send(routed(cid, patient="Other^Person"))
    rows = journal(daemon, cid)
    assert [r.outcome for r in rows] == ["processed", "processed"]
    assert rows[1].flags == "control_id_reused"


def test_crlf_resend_is_same_message(daemon: DaemonThread) -> None:
    """A resend whose engine turned CR into CRLF is recognised as the same message."""
    cid = samples.control_id()
    msg = routed(cid)
    with MllpClient(daemon.port) as c:
        c.send(msg)
        c.send(msg.replace("\r", "\r\n"))
    assert [r.outcome for r in journal(daemon, cid)] == ["processed", "duplicate"]


def test_acks_pass_hl7apy_strict_validation(daemon: DaemonThread) -> None:
    """Every ACK the daemon builds for v2.5.1 passes hl7apy's strict validation (independent oracle)."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    with MllpClient(daemon.port) as c:
        acks = [
            c.send(samples.siu()),
            c.send(samples.siu(processing="T")),
            c.send(samples.siu(accept="AL", app_ack="NE")),
            c.send(samples.siu(version="2.5.1", processing="D")),
            c.send("MSH|^~\\&|E|C|R|H|20260101|||C9|P|2.5.1\r"),
        ]
    # (A message without MSH-10 cannot be validated this way: MSA-2 is required but has nothing to echo.)
    for ack in acks:
        m = parse_message(ack, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
        assert m.validate()


def test_structural_content_error_is_answered_synchronously(sqlite_url: str) -> None:
    """Journal mode: a REF without RF1-6 and a SIU without SCH-1/SCH-2 get AE 101 with the ERR location in
    the same exchange; the rows are journaled `error` by the ACK path itself (no projector involved), and a
    resend gets the same AE from the dedup claim."""
    with running_daemon(make_settings(sqlite_url, ack_after="journal")) as d, MllpClient(d.port) as c:
        d.server.projector.core.batch_size = 0  # nothing is applied: only the ACK path can have answered
        ref_cid, siu_cid = samples.control_id(), samples.control_id()
        ref = samples.ref(ref_cid, referral="")
        a1 = c.send(ref)
        a2 = c.send(samples.siu(siu_cid).replace(f"SCH|APT{siu_cid}^SCHED|APT{siu_cid}^SCHED|", "SCH|||"))
        assert (msa(a1), err_code(a1)) == (("AE", ref_cid), "101")
        assert ack_segments(a1)["ERR"][2] == "RF1^1^6^1"
        assert (msa(a2), err_code(a2)) == (("AE", siu_cid), "101")
        assert ack_segments(a2)["ERR"][2] == "SCH^1^2^1"
        a3 = c.send(ref)
        assert (msa(a3), err_code(a3)) == (("AE", ref_cid), "101")
        assert d.server.engine is not None
        with d.server.engine.connect() as conn:
            rows = list(conn.execute(select(Journal.control_id, Journal.outcome, Journal.applied_at)
                                     .where(Journal.control_id.in_([ref_cid, siu_cid])).order_by(Journal.id)))
        assert [(r[1], r[2]) for r in rows] == [("error", None), ("error", None), ("duplicate", None)]
