"""Transport security and sender identity over real sockets: TLS, mTLS, allow-lists, HTTP token."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import ssl

import pytest
import trustme

from refloop.config import SenderProfile, Settings
from tests import samples
from tests.utils import DaemonThread, err_code, frame, make_settings, msa, running_daemon

VT, FS = b"\x0b", b"\x1c"


def tls_settings(url: str, certs: dict[str, str], *, mtls: bool = False, **profiles: SenderProfile) -> Settings:
    s = make_settings(url)
    mllp = dataclasses.replace(s.mllp, tls_cert=certs["cert"], tls_key=certs["key"],
                               tls_client_ca=certs["ca"] if mtls else "")
    return dataclasses.replace(s, mllp=mllp, profiles=(*profiles.values(), SenderProfile()))


def tls_client(port: int, ca: trustme.CA, client_cert: trustme.LeafCert | None = None) -> ssl.SSLSocket:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if client_cert is not None:
        client_cert.configure_cert(ctx)
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="127.0.0.1")


def exchange(sock: socket.socket, msg: str) -> str:
    sock.sendall(frame(msg))
    buf = b""
    while FS + b"\r" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        buf += chunk
    return buf[buf.index(VT) + 1:buf.index(FS)].decode()


def test_tls_message_acknowledged(sqlite_url: str, certs: dict[str, str], ca: trustme.CA) -> None:
    """Over TLS a message is stored and ACKed like over plain TCP; the expiry gauge is set."""
    with running_daemon(tls_settings(sqlite_url, certs)) as d, tls_client(d.port, ca) as s:
        cid = samples.control_id()
        assert msa(exchange(s, samples.ref(cid, referral=f"T{cid}"))) == ("AA", cid)
        assert s.version() in ("TLSv1.2", "TLSv1.3")
        assert d.metric("refloop_tls_certificate_expiry_timestamp_seconds") > 1.7e9


def handshake_failure(d: DaemonThread, reason: str) -> bool:
    from tests.utils import wait_for

    return wait_for(lambda: d.metric("refloop_tls_handshake_failures_total", {"reason": reason}) >= 1)


def test_plaintext_to_tls_port_counted(sqlite_url: str, certs: dict[str, str]) -> None:
    """A plaintext MLLP sender on a TLS port fails the handshake: closed, counted as 'plaintext'."""
    with running_daemon(tls_settings(sqlite_url, certs)) as d:
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as s:
            s.sendall(frame(samples.siu()))
            s.settimeout(10)
            try:
                data = s.recv(100)
            except ConnectionResetError:
                data = b""
            assert VT not in data  # no ACK was sent in clear text
        assert handshake_failure(d, "plaintext")


def test_mtls_requires_client_certificate(sqlite_url: str, certs: dict[str, str], ca: trustme.CA) -> None:
    """With a client CA configured, a peer without a certificate is refused and counted."""
    with running_daemon(tls_settings(sqlite_url, certs, mtls=True)) as d:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)), tls_client(d.port, ca) as s:
            exchange(s, samples.siu())
        assert handshake_failure(d, "no_certificate") or handshake_failure(d, "bad_certificate")


def test_mtls_subject_bound_to_sender(sqlite_url: str, certs: dict[str, str], ca: trustme.CA) -> None:
    """A profile bound to a certificate subject: the right CN gets AA, another CN claiming it gets AR 207."""
    engine_cert = ca.issue_cert("engine.clinic.example", common_name="engine.clinic.example")
    other_cert = ca.issue_cert("other.example", common_name="other.example")
    prof = SenderProfile(name="engine", sending_application="ENGINE", allowed_subjects=("engine.clinic.example",))
    with running_daemon(tls_settings(sqlite_url, certs, mtls=True, engine=prof)) as d:
        with tls_client(d.port, ca, engine_cert) as s:
            cid = samples.control_id()
            assert msa(exchange(s, samples.ref(cid, referral=f"T{cid}"))) == ("AA", cid)
        with tls_client(d.port, ca, other_cert) as s:
            cid = samples.control_id()
            ack = exchange(s, samples.ref(cid, referral=f"T{cid}"))
            assert (msa(ack), err_code(ack)) == (("AR", cid), "207")
            assert "ENGINE" not in ack.split("\r")[2]  # the error text names nothing
        assert d.metric("refloop_sender_identity_rejected_total") == 1


def test_profile_bound_to_peer_network(sqlite_url: str) -> None:
    """A message claiming a sender bound to another network gets AR 207 and changes nothing."""
    s = make_settings(sqlite_url)
    prof = SenderProfile(name="epic", sending_application="ENGINE", allowed_peers=("10.20.0.0/16",))
    s = dataclasses.replace(s, profiles=(prof, SenderProfile()))
    from tests.utils import MllpClient

    with running_daemon(s) as d, MllpClient(d.port) as c:
        cid = samples.control_id()
        ack = c.send(samples.ref(cid, referral=f"T{cid}"))
        assert (msa(ack), err_code(ack)) == (("AR", cid), "207")
        other = c.send(samples.ref(samples.control_id(), app="OTHERAPP"))
        assert msa(other)[0] == "AA"
        assert d.metric("refloop_sender_identity_rejected_total") == 1
        rows = d.get(f"/api/messages?control_id={cid}")[1]
        assert [r["outcome"] for r in rows] == ["rejected"]


def test_global_allow_list_closes_strangers(sqlite_url: str) -> None:
    """A peer outside mllp.allow_cidrs is closed at once and counted."""
    s = make_settings(sqlite_url, allow_cidrs=("10.0.0.0/8",))
    with running_daemon(s) as d:
        with socket.create_connection(("127.0.0.1", d.port), timeout=10) as sock:
            sock.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(10) == b""
        assert d.metric("refloop_connections_total", {"result": "rejected_not_allowed"}) == 1


def test_http_token(sqlite_url: str) -> None:
    """With a token the API needs 'Authorization: Bearer'; health and metrics stay open."""
    import json
    import urllib.request

    s = make_settings(sqlite_url)
    s = dataclasses.replace(s, http=dataclasses.replace(s.http, token="s3cret-token"))
    with running_daemon(s) as d:
        assert d.get("/api/messages")[0] == 401
        assert d.get("/healthz")[0] == 200
        assert d.get("/metrics")[0] == 200
        req = urllib.request.Request(f"http://127.0.0.1:{d.http_port}/api/messages",
                                     headers={"Authorization": "Bearer s3cret-token"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200 and isinstance(json.loads(resp.read()), list)


def test_exposed_http_needs_token() -> None:
    """Binding HTTP beyond loopback without a token is a configuration error naming http.token."""
    from refloop.config import ConfigError, load_settings

    with pytest.raises(ConfigError) as info:
        load_settings(None, {"REFLOOP_HTTP_HOST": "0.0.0.0"})
    assert info.value.key == "http.token"
    assert load_settings(None, {"REFLOOP_HTTP_HOST": "0.0.0.0", "REFLOOP_HTTP_TOKEN": "x"}).http.token == "x"
