"""The MLLP listener against misbehaving peers: split and coalesced frames, junk, oversize frames,
odd encodings, idle and trickling connections, broken frames, connection floods and non-HL7 traffic.

Every case runs against a real daemon (a thread with its own event loop) on 127.0.0.1 with a real
SQLite file (a few also on PostgreSQL); journal rows are read back from the database itself. All
waits are bounded; assertions are on counts and states, never on elapsed time.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import ssl
import threading
import time
from pathlib import Path

import pytest

from tests import samples
from tests.utils import CR, FS, VT, MllpClient, err_code, frame, make_settings, msa, running_daemon, wait_for
from tests.utils import journal_rows as journal

# -- helpers --------------------------------------------------------------------------------------


#: A message a handler accepted: its effects (or the decision to have none) are committed, AA.
APPLIED = ("processed", "ignored")


def norm(outcome: str) -> str:
    return "applied" if outcome in APPLIED else outcome


def outcomes(url: str) -> list[str]:
    """Journal outcomes, oldest first, with processed/ignored both shown as 'applied'."""
    return [norm(r.outcome) for r in journal(url)]


def nodelay(c: MllpClient) -> MllpClient:
    c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def payload(msg: str) -> bytes:
    return msg.encode("latin-1")


# -- split reads ----------------------------------------------------------------------------------
def test_frame_in_one_byte_writes(db_url: str) -> None:
    """A frame sent one byte per write is reassembled and answered AA with its MSH-10."""
    cid = samples.control_id("B")
    data = frame(samples.siu(cid))
    with running_daemon(make_settings(db_url)) as d, nodelay(MllpClient(d.port)) as c:
        for i in range(len(data)):
            c.send_raw(data[i:i + 1])
        ack = c.read_frame().decode("latin-1")
        assert msa(ack) == ("AA", cid)
    rows = journal(db_url, cid)
    assert [norm(r.outcome) for r in rows] == ["applied"]
    assert rows[0].raw == payload(samples.siu(cid))


def test_fs_and_cr_in_separate_sends(sqlite_url: str) -> None:
    """FS at the end of one write and CR in the next still end the frame (no data byte lost or added)."""
    cid = samples.control_id("F")
    body = payload(samples.ref(cid))
    with running_daemon(make_settings(sqlite_url)) as d, nodelay(MllpClient(d.port)) as c:
        c.send_raw(VT + body + FS)
        time.sleep(0.05)
        c.send_raw(CR)
        assert msa(c.read_frame().decode("latin-1")) == ("AA", cid)
        # and the VT alone, then the body, then FS, then CR
        cid2 = samples.control_id("F")
        body2 = payload(samples.ref(cid2))
        for part in (VT, body2[:7], body2[7:], FS, CR):
            c.send_raw(part)
            time.sleep(0.02)
        assert msa(c.read_frame().decode("latin-1")) == ("AA", cid2)
    assert [r.raw for r in journal(sqlite_url)] == [body, body2]


def test_frame_split_at_every_kind_of_boundary(sqlite_url: str) -> None:
    """One frame cut into many writes at varied points (inside MSH, at segment ends) is one message."""
    with running_daemon(make_settings(sqlite_url)) as d, nodelay(MllpClient(d.port)) as c:
        sent = []
        for step in (1, 2, 3, 7, 13, 64, 500):
            cid = samples.control_id("P")
            data = frame(samples.ref(cid))
            for i in range(0, len(data), step):
                c.send_raw(data[i:i + step])
                if i % (step * 16) == 0:
                    time.sleep(0.001)
            assert msa(c.read_frame().decode("latin-1")) == ("AA", cid)
            sent.append(cid)
    assert [r.control_id for r in journal(sqlite_url)] == sent
    assert set(outcomes(sqlite_url)) == {"applied"}


def test_frame_plus_head_of_next_then_tail(sqlite_url: str) -> None:
    """Frame 1 plus the head of frame 2 in one write, the tail later: two ACKs, in order."""
    c1, c2 = samples.control_id("H"), samples.control_id("H")
    data = frame(samples.siu(c1)) + frame(samples.siu(c2))
    cut = len(frame(samples.siu(c1))) + 20
    with running_daemon(make_settings(sqlite_url)) as d, nodelay(MllpClient(d.port)) as c:
        c.send_raw(data[:cut])
        assert msa(c.read_frame().decode("latin-1")) == ("AA", c1)
        c.send_raw(data[cut:])
        assert msa(c.read_frame().decode("latin-1")) == ("AA", c2)


def test_coalesced_frames_all_acked_in_order(db_url: str) -> None:
    """Twenty frames in one write get twenty ACKs, in the order sent."""
    cids = [samples.control_id("C") for _ in range(20)]
    blob = b"".join(frame(samples.siu(cid)) for cid in cids)
    with running_daemon(make_settings(db_url)) as d, MllpClient(d.port) as c:
        c.send_raw(blob)
        acks = [msa(c.read_frame().decode("latin-1")) for _ in cids]
    assert acks == [("AA", cid) for cid in cids]
    assert [r.control_id for r in journal(db_url)] == cids


def test_pipelined_past_max_pending_frames(sqlite_url: str) -> None:
    """More pipelined frames than max_pending_frames: reading pauses and resumes, every frame ACKed in order."""
    cids = [samples.control_id("Q") for _ in range(60)]
    blob = b"".join(frame(samples.siu(cid)) for cid in cids)
    with running_daemon(make_settings(sqlite_url, max_pending_frames=4)) as d, MllpClient(d.port) as c:
        c.send_raw(blob)
        acks = [msa(c.read_frame().decode("latin-1")) for _ in cids]
    assert acks == [("AA", cid) for cid in cids]


# -- junk -----------------------------------------------------------------------------------------
def test_junk_before_and_between_frames(db_url: str) -> None:
    """Junk, NULs and stray CRLF before VT and between frames are skipped and counted; no message is lost."""
    c1, c2, c3 = (samples.control_id("J") for _ in range(3))
    lead, mid, mid2 = b"junk\r\n", b"\r\n", b"\x00" * 7 + b"\r\n\n "
    stream = lead + frame(samples.siu(c1)) + mid + frame(samples.siu(c2)) + mid2 + frame(samples.siu(c3))
    with running_daemon(make_settings(db_url)) as d, MllpClient(d.port) as c:
        c.send_raw(stream)
        acks = [msa(c.read_frame().decode("latin-1")) for _ in range(3)]
        assert acks == [("AA", c1), ("AA", c2), ("AA", c3)]
        assert d.metric("refloop_junk_bytes_total") == len(lead) + len(mid) + len(mid2)
        # junk split across writes, right before the next VT
        c4 = samples.control_id("J")
        c.send_raw(b"\x00\x00")
        time.sleep(0.02)
        c.send_raw(b"\r\n" + frame(samples.siu(c4)))
        assert msa(c.read_frame().decode("latin-1")) == ("AA", c4)
        assert d.metric("refloop_junk_bytes_total") == len(lead) + len(mid) + len(mid2) + 4
    assert outcomes(db_url) == ["applied"] * 4


def test_trailing_junk_counted_at_close(sqlite_url: str) -> None:
    """Junk after the last frame is counted when the peer closes, and produces no journal row."""
    with running_daemon(make_settings(sqlite_url)) as d:
        with MllpClient(d.port) as c:
            cid = samples.control_id("J")
            assert msa(c.send(samples.siu(cid))) == ("AA", cid)
            c.send_raw(b"\r\n\x00\x00\x00")
        assert wait_for(lambda: d.metric("refloop_junk_bytes_total") == 5)
        assert wait_for(lambda: d.metric("refloop_connections_open") == 0)
    assert outcomes(sqlite_url) == ["applied"]


def test_fs_lf_terminated_frame_tolerated(sqlite_url: str) -> None:
    """A frame ended by FS LF (Unix engines) is accepted and counted as lf_terminated."""
    cid = samples.control_id("L")
    with running_daemon(make_settings(sqlite_url)) as d, MllpClient(d.port) as c:
        c.send_raw(VT + payload(samples.siu(cid)) + FS + b"\n")
        assert msa(c.read_frame().decode("latin-1")) == ("AA", cid)
        assert d.metric("refloop_frames_total", {"outcome": "lf_terminated"}) == 1


# -- oversize -------------------------------------------------------------------------------------
def test_oversize_frame_ar_207_closed_and_journaled(db_url: str) -> None:
    """A frame over max_frame_bytes: AR with MSA-2 = MSH-10 and ERR 207, connection closed, journaled oversize."""
    cid = samples.control_id("O")
    big = samples.mdm(cid, note="x" * 6000)
    with running_daemon(make_settings(db_url, max_frame_bytes=4096)) as d:
        with MllpClient(d.port) as other:
            with MllpClient(d.port) as c:
                c.send_raw(frame(big))
                ack = c.read_frame().decode("latin-1")
                assert msa(ack) == ("AR", cid)
                assert err_code(ack) == "207"
                assert c.closed_by_peer(10)
            # another connection is unaffected
            ok = samples.control_id("O")
            assert msa(other.send(samples.siu(ok))) == ("AA", ok)
        assert d.metric("refloop_frames_total", {"outcome": "oversized"}) == 1
        assert d.metric("refloop_connections_closed_total", {"reason": "oversize"}) == 1
        assert d.metric("refloop_acks_total", {"code": "AR"}) == 1
    rows = journal(db_url, cid)
    assert [(r.outcome, r.ack_code, r.err_code) for r in rows] == [("oversize", "AR", 207)]
    assert rows[0].size >= 4096
    assert len(rows[0].raw) <= 65536


def test_oversize_streamed_in_pieces(sqlite_url: str) -> None:
    """An oversize frame arriving in many small writes: the AR still carries MSH-10 and the connection closes."""
    cid = samples.control_id("O")
    data = frame(samples.mdm(cid, note="y" * 20000))
    with running_daemon(make_settings(sqlite_url, max_frame_bytes=4096)) as d, nodelay(MllpClient(d.port)) as c:
        with contextlib.suppress(OSError):
            for i in range(0, 6000, 500):
                c.send_raw(data[i:i + 500])
        ack = c.read_frame().decode("latin-1")
        assert msa(ack) == ("AR", cid)
        assert err_code(ack) == "207"
        assert c.closed_by_peer(10)
    assert [r.outcome for r in journal(sqlite_url, cid)] == ["oversize"]


def test_oversize_ar_reaches_a_sender_still_streaming(sqlite_url: str) -> None:
    """A sender that wrote a 256 KiB frame in one go (limit 4 KiB) still receives the AR before the close."""
    cid = samples.control_id("O")
    data = frame(samples.mdm(cid, note="z" * 256 * 1024))
    with running_daemon(make_settings(sqlite_url, max_frame_bytes=4096)) as d, MllpClient(d.port) as c:
        errors: list[BaseException] = []

        def push() -> None:
            try:
                c.sock.sendall(data)
            except OSError as exc:
                errors.append(exc)

        sender = threading.Thread(target=push, daemon=True)
        sender.start()
        ack = c.read_frame().decode("latin-1")
        sender.join(15)
        assert msa(ack) == ("AR", cid)
        assert err_code(ack) == "207"
    assert [r.outcome for r in journal(sqlite_url, cid)] == ["oversize"]


def test_oversize_with_unrecoverable_control_id(sqlite_url: str) -> None:
    """An oversize frame whose MSH is cut before MSH-10 is answered AR 207 with an empty MSA-2, not a guess."""
    data = frame(b"MSH|^~\\&|ENGINE|CLINIC|" + b"A" * 8000)
    with running_daemon(make_settings(sqlite_url, max_frame_bytes=4096)) as d, MllpClient(d.port) as c:
        c.send_raw(data)
        ack = c.read_frame().decode("latin-1")
        assert msa(ack) == ("AR", "")
        assert err_code(ack) == "207"
        assert c.closed_by_peer(10)
    assert outcomes(sqlite_url) == ["oversize"]


# -- encodings ------------------------------------------------------------------------------------
def test_cp1252_bytes_with_empty_msh18(db_url: str) -> None:
    """cp1252 bytes (not valid UTF-8 or ASCII) with MSH-18 empty: AA, and the journal keeps the exact bytes."""
    cid = samples.control_id("E")
    body = samples.siu(cid, patient="M\xfcller^J\xfcrgen").encode("cp1252") + b"NTE|1||caf\xe9 \x80 \x93quoted\x94\r"
    with pytest.raises(UnicodeDecodeError):
        body.decode("utf-8")
    with running_daemon(make_settings(db_url)) as d, MllpClient(d.port) as c:
        assert msa(c.send(body)) == ("AA", cid)
        assert d.metric("refloop_decode_fallback_total", {"sender": "default"}) == 1
    rows = journal(db_url, cid)
    assert [norm(r.outcome) for r in rows] == ["applied"]
    assert bytes(rows[0].raw) == body


def test_utf8_bytes_with_empty_msh18(sqlite_url: str) -> None:
    """UTF-8 bytes with MSH-18 empty (python-hl7 loses these) are accepted and stored byte for byte."""
    cid = samples.control_id("U")
    body = samples.siu(cid, patient="Müller^Zoë").encode("utf-8")
    with running_daemon(make_settings(sqlite_url)) as d, MllpClient(d.port) as c:
        assert msa(c.send(body)) == ("AA", cid)
    assert bytes(journal(sqlite_url, cid)[0].raw) == body


# -- timeouts -------------------------------------------------------------------------------------
def test_idle_connection_closed(sqlite_url: str) -> None:
    """A connection that sends nothing is closed after idle_timeout and counted as idle_timeout."""
    with running_daemon(make_settings(sqlite_url, idle_timeout=0.5)) as d, MllpClient(d.port) as c:
        assert c.closed_by_peer(10)
        assert wait_for(lambda: d.metric("refloop_connections_closed_total", {"reason": "idle_timeout"}) == 1)
        assert wait_for(lambda: d.metric("refloop_connections_open") == 0)
    assert outcomes(sqlite_url) == []


def test_connection_closed_after_idle_following_an_ack(sqlite_url: str) -> None:
    """A sender that goes quiet after an ACK is closed after idle_timeout; its message stays processed."""
    cid = samples.control_id("I")
    with running_daemon(make_settings(sqlite_url, idle_timeout=0.5)) as d, MllpClient(d.port) as c:
        assert msa(c.send(samples.siu(cid))) == ("AA", cid)
        assert c.closed_by_peer(10)
        assert wait_for(lambda: d.metric("refloop_connections_closed_total", {"reason": "idle_timeout"}) == 1)
    assert outcomes(sqlite_url) == ["applied"]


def test_half_frame_then_silence_hits_frame_deadline(db_url: str) -> None:
    """Half a frame then silence: closed after frame_deadline, the partial journaled as broken_frame."""
    cid = samples.control_id("D")
    data = payload(samples.siu(cid))
    part = data[: len(data) // 2]
    with running_daemon(make_settings(db_url, idle_timeout=60, frame_deadline=0.5)) as d:
        with MllpClient(d.port) as c:
            c.send_raw(VT + part)
            assert c.closed_by_peer(10)
        assert wait_for(lambda: outcomes(db_url) == ["broken_frame"])
        assert d.metric("refloop_frames_total", {"outcome": "deadline"}) == 1
        assert d.metric("refloop_connections_closed_total", {"reason": "deadline"}) == 1
        with MllpClient(d.port) as c2:
            ok = samples.control_id("D")
            assert msa(c2.send(samples.siu(ok))) == ("AA", ok)
    row = journal(db_url)[0]
    assert bytes(row.raw) == part
    assert row.control_id == cid  # MSH-10 recovered from the partial frame
    assert "deadline" in row.detail


def test_one_byte_trickle_cut_by_frame_deadline(sqlite_url: str) -> None:
    """A slowloris sending one byte every 50 ms (so never idle) is cut by frame_deadline, not served forever."""
    data = frame(samples.siu(samples.control_id("W")))
    with running_daemon(make_settings(sqlite_url, idle_timeout=60, frame_deadline=0.5)) as d:
        with nodelay(MllpClient(d.port)) as c:
            closed = False
            for i in range(200):  # 10 s at most; the deadline should end it long before the frame is whole
                try:
                    c.send_raw(data[i:i + 1])
                except OSError:
                    closed = True
                    break
                time.sleep(0.05)
                if i > 2 and d.metric("refloop_connections_closed_total", {"reason": "deadline"}) == 1:
                    closed = True
                    break
            assert closed
            assert c.closed_by_peer(10)
        assert wait_for(lambda: outcomes(sqlite_url) == ["broken_frame"])


def test_pipelined_stream_not_cut_by_frame_deadline(sqlite_url: str) -> None:
    """A healthy pipelining sender whose writes always end mid-frame keeps its connection: every frame completes
    within a fraction of frame_deadline, so none is cut and all are ACKed."""
    cids = [samples.control_id("K") for _ in range(16)]
    stream = b"".join(frame(samples.siu(cid)) for cid in cids)
    # Cut points in the middle of frames 2..16: each write completes the previous frame and starts the next.
    sizes = [len(frame(samples.siu(cid))) for cid in cids]
    cuts, pos = [], 0
    for s in sizes[:-1]:
        pos += s
        cuts.append(pos + 30)
    pieces, prev = [], 0
    for cut in [*cuts, len(stream)]:
        pieces.append(stream[prev:cut])
        prev = cut
    settings = make_settings(sqlite_url, idle_timeout=60, frame_deadline=0.6)
    acks: list[tuple[str, str]] = []
    with running_daemon(settings) as d, nodelay(MllpClient(d.port)) as c:
        try:
            for piece in pieces:
                c.send_raw(piece)  # completes one frame and starts the next
                acks.append(msa(c.read_frame().decode("latin-1")))
                time.sleep(0.1)  # each frame is complete ~0.1 s after it started; 16 writes span ~1.6 s
        except (ConnectionError, OSError):
            pass
        cut_by_deadline = d.metric("refloop_connections_closed_total", {"reason": "deadline"})
    assert cut_by_deadline == 0, f"connection cut by frame_deadline after {len(acks)} of {len(cids)} ACKs"
    assert acks == [("AA", cid) for cid in cids]
    assert "broken_frame" not in outcomes(sqlite_url)


def test_frame_deadline_not_charged_while_reading_is_paused(sqlite_url: str, tmp_path: Path) -> None:
    """While reading is paused by the daemon's own backpressure (writer blocked on a lock), the frame deadline of a
    frame the sender already completed must not cut the connection: every frame is ACKed once the lock goes."""
    cids = [samples.control_id("G") for _ in range(4)]
    frames = [frame(samples.siu(cid)) for cid in cids]
    settings = make_settings(sqlite_url, idle_timeout=60, frame_deadline=0.5, max_pending_frames=1,
                             busy_timeout_ms=10000)
    db_file = sqlite_url.removeprefix("sqlite:///")
    with running_daemon(settings) as d:
        with MllpClient(d.port) as warm:  # creates the schema before the lock is taken
            w = samples.control_id("G")
            assert msa(warm.send(samples.siu(w))) == ("AA", w)
        locker = sqlite3.connect(db_file, isolation_level=None, timeout=5)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            with nodelay(MllpClient(d.port)) as c:
                # frames 1-3 complete and the head of frame 4: reading pauses after frame 1 is queued
                head = b"".join(frames[:3]) + frames[3][:40]
                c.send_raw(head)
                time.sleep(0.1)
                c.send_raw(frames[3][40:])  # the sender completes frame 4 promptly
                time.sleep(1.5)  # the writer is still blocked by the lock: longer than frame_deadline
                locker.execute("COMMIT")
                acks = []
                try:
                    for _ in cids:
                        acks.append(msa(c.read_frame().decode("latin-1")))
                except (ConnectionError, OSError):
                    pass
            cut = d.metric("refloop_connections_closed_total", {"reason": "deadline"})
        finally:
            with contextlib.suppress(sqlite3.Error):
                locker.execute("ROLLBACK")
            locker.close()
    assert cut == 0, f"connection cut by frame_deadline while paused; {len(acks)} of 4 ACKs received"
    assert acks == [("AA", cid) for cid in cids]


# -- broken frames --------------------------------------------------------------------------------
def test_mid_frame_disconnect_journaled_broken(db_url: str) -> None:
    """A peer that disconnects mid-frame: the partial is journaled as broken_frame, the daemon keeps serving."""
    cid = samples.control_id("X")
    part = payload(samples.ref(cid))[:120]
    with running_daemon(make_settings(db_url)) as d:
        with MllpClient(d.port) as c:
            c.send_raw(VT + part)
            time.sleep(0.05)
        assert wait_for(lambda: outcomes(db_url) == ["broken_frame"])
        assert d.metric("refloop_frames_total", {"outcome": "disconnect"}) == 1
        with MllpClient(d.port) as c2:
            ok = samples.control_id("X")
            assert msa(c2.send(samples.siu(ok))) == ("AA", ok)
    rows = journal(db_url)
    assert bytes(rows[0].raw) == part
    assert [norm(r.outcome) for r in rows] == ["broken_frame", "applied"]


def test_disconnect_between_fs_and_cr_journals_the_fs(sqlite_url: str) -> None:
    """A peer that leaves right after FS (CR never sent): journaled broken, with the FS byte kept."""
    cid = samples.control_id("X")
    body = payload(samples.siu(cid))
    with running_daemon(make_settings(sqlite_url)) as d:
        with MllpClient(d.port) as c:
            c.send_raw(VT + body + FS)
            time.sleep(0.05)
        assert wait_for(lambda: outcomes(sqlite_url) == ["broken_frame"])
        assert d.metric("refloop_acks_total", {"code": "AA"}) == 0
    assert bytes(journal(sqlite_url)[0].raw) == body + FS


def test_vt_inside_unfinished_frame(sqlite_url: str) -> None:
    """A VT inside an unfinished frame: the first is journaled broken (vt_in_frame), the second is ACKed."""
    c1, c2 = samples.control_id("V"), samples.control_id("V")
    first = payload(samples.siu(c1))[:150]
    with running_daemon(make_settings(sqlite_url)) as d, MllpClient(d.port) as c:
        c.send_raw(VT + first + frame(samples.siu(c2)))
        assert msa(c.read_frame().decode("latin-1")) == ("AA", c2)
        assert d.metric("refloop_frames_total", {"outcome": "bad_framing"}) == 1
    rows = journal(sqlite_url)
    assert [(norm(r.outcome), r.control_id) for r in rows] == [("broken_frame", c1), ("applied", c2)]
    assert bytes(rows[0].raw) == first
    assert "vt_in_frame" in rows[0].detail


# -- connection counts ----------------------------------------------------------------------------
def test_300_idle_connections_then_all_served(sqlite_url: str) -> None:
    """300 connections open at once are all accepted; then each sends one message and each gets its own AA."""
    n = 300
    settings = make_settings(sqlite_url, max_connections=1000, max_connections_per_ip=1000, idle_timeout=120)
    with running_daemon(settings) as d:
        clients: list[MllpClient] = []
        try:
            for _ in range(n):
                clients.append(MllpClient(d.port, timeout=30))
            assert wait_for(lambda: d.metric("refloop_connections_open") == n, timeout=20)
            assert d.metric("refloop_connections_total", {"result": "accepted"}) == n
            cids = [samples.control_id("N") for _ in range(n)]
            for c, cid in zip(clients, cids, strict=True):
                c.send_raw(frame(samples.siu(cid)))
            acks = [msa(c.read_frame().decode("latin-1")) for c in clients]
        finally:
            for c in clients:
                c.close()
        assert acks == [("AA", cid) for cid in cids]
        assert wait_for(lambda: d.metric("refloop_connections_open") == 0, timeout=20)
    assert outcomes(sqlite_url) == ["applied"] * n


def test_max_connections_exceeded(sqlite_url: str) -> None:
    """Past max_connections the extra connection is closed at once and counted; the others keep working."""
    settings = make_settings(sqlite_url, max_connections=3, max_connections_per_ip=100)
    with running_daemon(settings) as d:
        held = [MllpClient(d.port) for _ in range(3)]
        try:
            assert wait_for(lambda: d.metric("refloop_connections_open") == 3)
            with MllpClient(d.port) as extra:
                assert extra.closed_by_peer(10)
            assert wait_for(
                lambda: d.metric("refloop_connections_total", {"result": "rejected_max_connections"}) == 1)
            for c in held:
                cid = samples.control_id("M")
                assert msa(c.send(samples.siu(cid))) == ("AA", cid)
            held.pop().close()
            assert wait_for(lambda: d.metric("refloop_connections_open") == 2)
            with MllpClient(d.port) as again:  # a slot freed: admitted again
                cid = samples.control_id("M")
                assert msa(again.send(samples.siu(cid))) == ("AA", cid)
        finally:
            for c in held:
                c.close()
        assert d.metric("refloop_connections_total", {"result": "rejected_max_connections"}) == 1
    assert outcomes(sqlite_url) == ["applied"] * 4


def test_max_connections_per_ip_exceeded(sqlite_url: str) -> None:
    """Past max_connections_per_ip the extra connection from that address is closed at once and counted."""
    settings = make_settings(sqlite_url, max_connections=100, max_connections_per_ip=2)
    with running_daemon(settings) as d:
        a, b = MllpClient(d.port), MllpClient(d.port)
        try:
            assert wait_for(lambda: d.metric("refloop_connections_open") == 2)
            for _ in range(3):
                with MllpClient(d.port) as extra:
                    assert extra.closed_by_peer(10)
            assert wait_for(lambda: d.metric("refloop_connections_total", {"result": "rejected_max_per_ip"}) == 3)
            assert d.metric("refloop_connections_open") == 2
            for c in (a, b):
                cid = samples.control_id("M")
                assert msa(c.send(samples.siu(cid))) == ("AA", cid)
        finally:
            a.close()
            b.close()
        assert wait_for(lambda: d.metric("refloop_connections_open") == 0)
        with MllpClient(d.port) as c:
            cid = samples.control_id("M")
            assert msa(c.send(samples.siu(cid))) == ("AA", cid)


# -- not HL7 at all -------------------------------------------------------------------------------
def test_http_request_on_mllp_port(sqlite_url: str) -> None:
    """An HTTP request on the MLLP port is junk: counted, nothing journaled, and a frame after it is still ACKed."""
    get = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: probe\r\n\r\n"
    with running_daemon(make_settings(sqlite_url)) as d:
        with MllpClient(d.port) as c:
            c.send_raw(get)
            cid = samples.control_id("Z")
            assert msa(c.send(samples.siu(cid))) == ("AA", cid)
            assert d.metric("refloop_junk_bytes_total") == len(get)
        with MllpClient(d.port) as c:
            c.send_raw(get)
        assert wait_for(lambda: d.metric("refloop_junk_bytes_total") == 2 * len(get))
    assert outcomes(sqlite_url) == ["applied"]


def _client_hello() -> bytes:
    ctx = ssl.create_default_context()
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="refloop.invalid")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def test_tls_client_hello_on_plaintext_port(sqlite_url: str) -> None:
    """A TLS ClientHello on the plaintext port: no ACK, no crash, bytes before the first VT counted as junk,
    whatever looked like a frame journaled broken; the daemon keeps serving."""
    hello = _client_hello()
    first_vt = hello.find(VT)
    with running_daemon(make_settings(sqlite_url, frame_deadline=1.0)) as d:
        for _ in range(3):
            with MllpClient(d.port) as c:
                c.send_raw(hello)
                c.sock.settimeout(0.3)
                with contextlib.suppress(TimeoutError):
                    assert c.sock.recv(100) == b""  # nothing that looks like an ACK comes back
        assert wait_for(lambda: d.metric("refloop_connections_open") == 0)
        junk = d.metric("refloop_junk_bytes_total")
        assert junk >= 3 * (first_vt if first_vt >= 0 else len(hello))
        assert d.metric("refloop_acks_total", {"code": "AA"}) == 0
        with MllpClient(d.port) as c:
            cid = samples.control_id("Z")
            assert msa(c.send(samples.siu(cid))) == ("AA", cid)
    assert set(outcomes(sqlite_url)) <= {"broken_frame", "unparseable", "applied"}
    assert outcomes(sqlite_url).count("applied") == 1


# -- frames that are not one HL7 message ----------------------------------------------------------
def test_unparseable_frame(db_url: str) -> None:
    """A frame with no MSH: AR with ERR 100, journaled unparseable with the bytes received."""
    body = b"PID|1||12345^^^CLINIC^MR||Doe^Jane\rPV1|1|O\r"
    with running_daemon(make_settings(db_url)) as d, MllpClient(d.port) as c:
        ack = c.send(body)
        assert msa(ack)[0] == "AR"
        assert err_code(ack) == "100"
        cid = samples.control_id("Y")
        assert msa(c.send(samples.siu(cid))) == ("AA", cid)
    rows = journal(db_url)
    assert [(norm(r.outcome), r.ack_code, r.err_code) for r in rows] == [
        ("unparseable", "AR", 100), ("applied", "AA", None)]
    assert bytes(rows[0].raw) == body


def test_empty_frame(sqlite_url: str) -> None:
    """An empty frame (VT FS CR) is answered AR 100 and journaled, and the connection keeps working."""
    with running_daemon(make_settings(sqlite_url)) as d, MllpClient(d.port) as c:
        ack = c.send(b"")
        assert msa(ack) == ("AR", "")
        assert err_code(ack) == "100"
        cid = samples.control_id("Y")
        assert msa(c.send(samples.siu(cid))) == ("AA", cid)
    assert outcomes(sqlite_url) == ["unparseable", "applied"]


def test_batch_rejected_200(sqlite_url: str) -> None:
    """A batch (FHS/BHS wrapping messages) is answered AR with ERR 200 and journaled rejected."""
    cid = samples.control_id("A")
    batch = ("FHS|^~\\&|ENGINE|CLINIC|REFLOOP|HOSP|20260105090000\rBHS|^~\\&|ENGINE|CLINIC|REFLOOP|HOSP\r"
             + samples.siu(cid) + samples.siu() + "BTS|2\rFTS|1\r")
    with running_daemon(make_settings(sqlite_url)) as d, MllpClient(d.port) as c:
        ack = c.send(batch)
        assert msa(ack)[0] == "AR"
        assert err_code(ack) == "200"
    rows = journal(sqlite_url)
    assert [(r.outcome, r.ack_code, r.err_code) for r in rows] == [("rejected", "AR", 200)]
