"""The daemon on uvloop, which `refloop serve` uses when it is installed.

uvloop's transports implement the asyncio interfaces without inheriting from them, so anything that
works on the default loop by accident (an isinstance check, a private attribute) breaks there. These run
the same wire behaviour on a uvloop event loop: framing across junk, AA after commit, TLS, idle close.
"""

from __future__ import annotations

import asyncio
import socket

import uvloop

from tests import samples
from tests.test_tls import tls_settings
from tests.utils import DaemonThread, MllpClient, frame, journal_rows, make_settings, msa, wait_for


def uv_daemon(settings: object) -> DaemonThread:
    return DaemonThread(settings, loop_factory=uvloop.new_event_loop).start()  # type: ignore[arg-type]


def test_messages_after_junk_are_acknowledged_on_uvloop(sqlite_url: str) -> None:
    """Junk between frames is skipped, both frames get AA, both are journaled."""
    d = uv_daemon(make_settings(sqlite_url))
    try:
        assert type(d.loop).__module__.startswith("uvloop")
        a, b = samples.control_id(), samples.control_id()
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
            s.sendall(b"\r\n\x00junk" + frame(samples.ref(a, referral=f"U{a}")) + b"\r\n" + frame(samples.siu(b)))
            buf = b""
            while buf.count(b"\x1c\r") < 2:
                chunk = s.recv(65536)
                assert chunk, "connection closed before both ACKs"
                buf += chunk
        acks = [part.split(b"\x1c")[0].decode() for part in buf.split(b"\x0b")[1:]]
        assert [msa(x) for x in acks] == [("AA", a), ("AA", b)]
        assert {r.control_id for r in journal_rows(sqlite_url)} >= {a, b}
    finally:
        d.stop()


def test_plaintext_on_a_tls_port_is_never_framed_on_uvloop(sqlite_url: str, certs: dict[str, str]) -> None:
    """uvloop starts reading right after connection_made, so the pause before start_tls does not hold; the
    protocol still never frames bytes that came straight off the TCP transport of a TLS port."""
    d = uv_daemon(tls_settings(sqlite_url, certs))
    try:
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
            s.sendall(frame(samples.siu()))
            try:
                data = s.recv(100)
            except ConnectionResetError:
                data = b""
            assert b"\x0b" not in data  # no ACK in clear text
        assert wait_for(lambda: d.metric("refloop_tls_handshake_failures_total", {"reason": "plaintext"}) >= 1)
        assert journal_rows(sqlite_url) == []
    finally:
        d.stop()


def test_serve_uses_uvloop_only_without_tls(sqlite_url: str, certs: dict[str, str]) -> None:
    """`refloop serve` picks uvloop when installed, and asyncio's own loop when MLLP TLS is configured."""
    from refloop.cli import _run

    seen: list[str] = []

    async def which() -> None:
        seen.append(type(asyncio.get_running_loop()).__module__.split(".")[0])

    _run(which(), make_settings(sqlite_url))
    _run(which(), tls_settings(sqlite_url, certs))
    assert seen == ["uvloop", "asyncio"]


def test_idle_connection_closed_on_uvloop(sqlite_url: str) -> None:
    """The idle timer works on uvloop's loop too: a silent peer is closed and counted."""
    d = uv_daemon(make_settings(sqlite_url, idle_timeout=0.5))
    try:
        with MllpClient(d.port) as c:
            cid = samples.control_id()
            assert msa(c.send(samples.siu(cid)))[0] == "AA"
            c.sock.settimeout(10)
            assert c.sock.recv(100) == b""  # closed by the daemon, not by us
        assert wait_for(lambda: d.metric("refloop_connections_closed_total", {"reason": "idle_timeout"}) == 1)
    finally:
        d.stop()
