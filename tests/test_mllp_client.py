"""refloop.hl7.mllp: the one small MLLP client, against a real socket that answers in awkward ways."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from refloop.hl7 import mllp
from refloop.hl7.mllp import MllpClient, MllpError, encode_frame, msa


@contextmanager
def peer(replies: list[bytes], chunk: int = 3) -> Iterator[tuple[int, list[bytes]]]:
    """Accepts one connection; for each frame received sends the next reply in ``chunk``-byte pieces."""
    server = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []

    def run() -> None:
        conn, _ = server.accept()
        with conn:
            buf = b""
            for reply in replies:
                while b"\x1c\r" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                frame, _, buf = buf.partition(b"\x1c\r")
                got.append(frame)
                for i in range(0, len(reply), chunk):
                    conn.sendall(reply[i:i + chunk])

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], got
    finally:
        thread.join(5)
        server.close()


ACK = b"MSH|^~\\&|R|R|||20260101||ACK|A1|P|2.5.1\rMSA|AA|C1\r"


def test_encode_frame() -> None:
    assert encode_frame(b"MSH|x\r") == b"\x0bMSH|x\r\x1c\r"


def test_ack_in_pieces_after_junk_and_two_in_a_row() -> None:
    replies = [b"\r\n\x00" + encode_frame(ACK), encode_frame(ACK.replace(b"C1", b"C2"))]
    with peer(replies) as (port, got), MllpClient("127.0.0.1", port, timeout=5) as c:
        assert msa(c.send(b"MSH|first\r")) == ("AA", "C1")
        assert msa(c.send(b"MSH|second\r")) == ("AA", "C2")
    assert got == [b"\x0bMSH|first\r", b"\x0bMSH|second\r"]


def test_fs_lf_is_accepted() -> None:
    with peer([b"\x0b" + ACK + b"\x1c\n"]) as (port, _), MllpClient("127.0.0.1", port, timeout=5) as c:
        assert msa(c.send(b"MSH|x\r"))[0] == "AA"


def test_closed_before_ack_and_malformed_trailer() -> None:
    with peer([b"\x0b" + ACK]) as (port, _), MllpClient("127.0.0.1", port, timeout=5) as c, \
            pytest.raises(MllpError, match="closed"):
        c.send(b"MSH|x\r")
    with peer([b"\x0b" + ACK + b"\x1cX"]) as (port, _), MllpClient("127.0.0.1", port, timeout=5) as c, \
            pytest.raises(MllpError, match="FS not followed"):
        c.send(b"MSH|x\r")


def test_endless_frame_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mllp, "MAX_ACK_BYTES", 64)
    with peer([b"\x0b" + b"A" * 200], chunk=50) as (port, _), \
            MllpClient("127.0.0.1", port, timeout=5) as c, pytest.raises(MllpError, match="no complete frame"):
        c.send(b"MSH|x\r")


def test_timeout_raises() -> None:
    """A listener that never answers (the kernel completes the handshake; nobody accepts)."""
    silent = socket.create_server(("127.0.0.1", 0))
    with silent, MllpClient("127.0.0.1", silent.getsockname()[1], timeout=0.2) as c, pytest.raises(TimeoutError):
        c.send(b"MSH|x\r")


def test_msa_reads_custom_separators_and_missing_msa() -> None:
    assert msa(b"MSH#^~\\&#A\rMSA#AE#C9\r") == ("AE", "C9")
    assert msa(b"MSH|^~\\&|A\r") == ("", "")
