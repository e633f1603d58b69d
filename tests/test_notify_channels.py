"""The notification channels' sharp edges, against real receivers on 127.0.0.1: a webhook that redirects,
HTTPS verified with ``notify.ca_file``, SMTP with AUTH over STARTTLS and over implicit TLS (aiosmtpd with a
trustme certificate), and a non-PDF ED consult note forwarded over MLLP to a receiver that parses it."""

from __future__ import annotations

import base64
import contextlib
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from refloop.clock import FixedClock
from refloop.config.notify import WorklistSettings
from refloop.notify.dispatch import dispatch_once
from refloop.store import outbox
from tests.samples import mdm_msg, ref_msg, siu_msg
from tests.test_notify import SECRET, SmtpSink, fast, http_receiver, mllp_receiver
from tests.test_scan import T0, engine_for, new_referral, scan, settings_for
from tests.utils import MllpClient, free_port, make_settings, msa, running_daemon, wait_for

NOW = T0 + timedelta(days=15)


def only_row(engine: Any) -> dict[str, Any]:
    with engine.connect() as conn:
        [row] = outbox.listing(conn)
    return row


# -- webhook ---------------------------------------------------------------------------------------
@dataclass
class Recorder:
    port: int = 0
    requests: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, body length)


@contextlib.contextmanager
def redirecting_receiver(tls: ssl.SSLContext | None = None, status: int = 302) -> Iterator[Recorder]:
    """POST /hook answers ``status`` to /elsewhere; anything arriving at /elsewhere is recorded too."""
    box = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> int:
            length = int(self.headers.get("Content-Length", "0"))
            self.rfile.read(length)
            box.requests.append((self.command, self.path, length))
            return length

        def do_POST(self) -> None:
            self._record()
            if self.path == "/hook" and status != 200:
                self.send_response(status)
                self.send_header("Location", f"/elsewhere?from={status}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_GET(self) -> None:
            self._record()
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    box.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_webhook_redirect_is_a_failed_attempt_never_followed(sqlite_url: str, status: int) -> None:
    """urllib would turn the signed POST into a body-less GET on 302/303 and call it delivered."""
    engine = engine_for(sqlite_url)
    with redirecting_receiver(status=status) as hook:
        settings = settings_for(sqlite_url, webhook_url=f"http://127.0.0.1:{hook.port}/hook", webhook_secret=SECRET)
        new_referral(engine)
        scan(engine, settings, NOW)
        assert dispatch_once(engine, settings, NOW) == {"delivered": 0, "failed": 1, "dead": 0}
    assert [(m, p) for m, p, _ in hook.requests] == [("POST", "/hook")]
    row = only_row(engine)
    assert (row["status"], row["attempts"]) == ("failed", 1)
    assert row["last_error"] == f"http {status} redirect not followed"
    engine.dispose()


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    return ctx


def test_webhook_https_verified_with_ca_file(sqlite_url: str, ca: trustme.CA, tmp_path: Path) -> None:
    """A private CA: without notify.ca_file the certificate fails verification (a failed attempt, reason
    recorded); with it the same receiver gets the POST."""
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    engine = engine_for(sqlite_url)
    with redirecting_receiver(tls=server_context(ca), status=200) as hook:
        url = f"https://127.0.0.1:{hook.port}/hook"
        new_referral(engine)
        untrusted = settings_for(sqlite_url, webhook_url=url, webhook_secret=SECRET)
        scan(engine, untrusted, NOW)
        assert dispatch_once(engine, untrusted, NOW)["failed"] == 1
        assert "SSLCertVerificationError" in only_row(engine)["last_error"]
        assert hook.requests == []
        trusted = settings_for(sqlite_url, webhook_url=url, webhook_secret=SECRET, ca_file=str(ca_file))
        assert dispatch_once(engine, trusted, NOW + timedelta(hours=1))["delivered"] == 1
    assert [(m, p) for m, p, n in hook.requests if n > 0] == [("POST", "/hook")]
    engine.dispose()


# -- SMTP ------------------------------------------------------------------------------------------
USER, PASSWORD = "refloop", "correct horse"


class Authenticator:
    def __init__(self) -> None:
        self.attempts: list[str] = []

    def __call__(self, _server: Any, _session: Any, _envelope: Any, mechanism: str, data: Any) -> AuthResult:
        assert isinstance(data, LoginPassword)
        self.attempts.append(mechanism)
        ok = (data.login.decode(), data.password.decode()) == (USER, PASSWORD)
        return AuthResult(success=ok, handled=False)


@contextlib.contextmanager
def tls_smtp(ca: trustme.CA, mode: str) -> Iterator[tuple[SmtpSink, Authenticator, int]]:
    """aiosmtpd requiring AUTH, which it only offers over TLS: implicit TLS ("tls") or STARTTLS."""
    sink, auth, port = SmtpSink(), Authenticator(), free_port()
    kw: dict[str, Any] = {"authenticator": auth, "auth_required": True, "auth_require_tls": True}
    if mode == "tls":
        # aiosmtpd only counts STARTTLS as TLS for auth_require_tls; the whole session is TLS here anyway.
        kw.update(ssl_context=server_context(ca), auth_require_tls=False)
    else:
        kw.update(tls_context=server_context(ca), require_starttls=True)
    controller = Controller(sink, hostname="127.0.0.1", port=port, **kw)
    controller.start()
    try:
        yield sink, auth, port
    finally:
        controller.stop()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
@pytest.mark.parametrize("mode", ["tls", "starttls"])
def test_smtp_auth_over_tls(sqlite_url: str, ca: trustme.CA, tmp_path: Path, mode: str) -> None:
    """AUTH with the right password delivers; a wrong password is a failed attempt with the SMTP code."""
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    engine = engine_for(sqlite_url)
    with tls_smtp(ca, mode) as (sink, auth, port):
        common: dict[str, Any] = {
            "smtp_host": "127.0.0.1", "smtp_port": port, "smtp_from": "refloop@test.invalid", "ca_file": str(ca_file),
            "smtp_username": USER, "smtp_tls": mode == "tls", "smtp_starttls": mode == "starttls",
            "worklist": WorklistSettings(mode="active", owners=("specialty:CARD=alice@test.invalid",)),
        }
        wrong = settings_for(sqlite_url, smtp_password="wrong", **common)
        new_referral(engine)
        scan(engine, wrong, NOW)
        assert dispatch_once(engine, wrong, NOW)["failed"] == 1
        assert only_row(engine)["last_error"] == "smtp auth 535"
        right = settings_for(sqlite_url, smtp_password=PASSWORD, **common)
        assert dispatch_once(engine, right, NOW + timedelta(hours=1))["delivered"] == 1
    assert len(auth.attempts) >= 2  # smtplib tries each offered mechanism before giving up
    [(rcpts, msg)] = sink.messages
    assert rcpts == ["alice@test.invalid"]
    assert "stalled" in msg["Subject"]
    engine.dispose()


@pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")
def test_smtp_tls_without_ca_file_fails_verification(sqlite_url: str, ca: trustme.CA) -> None:
    engine = engine_for(sqlite_url)
    with tls_smtp(ca, "tls") as (sink, _auth, port):
        settings = settings_for(sqlite_url, smtp_host="127.0.0.1", smtp_port=port, smtp_tls=True,
                                smtp_username=USER, smtp_password=PASSWORD,
                                worklist=WorklistSettings(mode="active", owners=("specialty:CARD=a@test.invalid",)))
        new_referral(engine)
        scan(engine, settings, NOW)
        assert dispatch_once(engine, settings, NOW)["failed"] == 1
    assert only_row(engine)["last_error"] == "smtp SSLCertVerificationError"
    assert sink.messages == []
    engine.dispose()


# -- MLLP forward ----------------------------------------------------------------------------------
JPEG = bytes.fromhex("ffd8ffe000104a46494600010100000100010000ffd9")  # a tiny JPEG: SOI, JFIF APP0, EOI


def test_non_pdf_ed_note_keeps_its_mime_type_and_msh18(db_url: str) -> None:
    """An MDM whose OBX-5 is ED ``^image^jpeg^Base64^...`` is forwarded with the same type and bytes; the
    receiver parses the message (hl7apy, strict) and MSH-18 says UNICODE UTF-8."""
    clock = FixedClock(datetime(2026, 1, 20, 9, 0, tzinfo=UTC))
    data = base64.b64encode(JPEG).decode()
    note = mdm_msg("DOC7000", placer="R7000").replace(
        "OBX|1|TX|11488-4^Consult note^LN||", f"OBX|1|ED|11488-4^Consult note^LN||^image^jpeg^Base64^{data}|")
    note = note.replace(f"{data}|Seen in clinic.\\.br\\Plan: review in 3 months.", data)
    assert "|ED|" in note and "^image^jpeg^Base64^" in note
    with mllp_receiver("AA") as referrer, http_receiver() as hook:
        settings = fast(make_settings(db_url), mllp_port=referrer.port, webhook_url=hook.url)
        with running_daemon(settings, clock=clock) as d, MllpClient(d.port) as c:
            assert msa(c.send(ref_msg("R7000")))[0] == "AA"
            assert msa(c.send(siu_msg("APT7000", placer="R7000")))[0] == "AA"
            assert msa(c.send(note))[0] == "AA"
            assert wait_for(lambda: referrer.messages, timeout=20)
    [forwarded] = referrer.messages
    msg = parse_message(forwarded.strip("\r"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
    assert msg.validate()
    assert msg.msh.msh_18.to_er7() == "UNICODE UTF-8"
    [obx] = [s for s in forwarded.split("\r") if s.startswith("OBX|")]
    fields = obx.split("|")
    assert fields[2] == "ED"
    _, kind, subtype, encoding, payload = fields[5].split("^")
    assert (kind, subtype, encoding) == ("image", "jpeg", "Base64")
    assert base64.b64decode(payload) == JPEG


@pytest.mark.parametrize(("type_of_data", "subtype", "data", "expected"), [
    ("application", "pdf", b"", "application/pdf"),
    ("AP", "PDF", b"", "application/pdf"),  # HL7 table 0191 codes
    ("IM", "JPEG", b"", "image/jpeg"),
    ("TEXT", "rtf", b"", "text/rtf"),
    ("", "", b"%PDF-1.7", "application/pdf"),  # nothing declared: sniffed
    ("", "", b"\x00\x01", "application/octet-stream"),
    ("image", "jpeg;x=1", b"", "application/octet-stream"),  # not a media type token: not trusted
])
def test_ed_media_type(type_of_data: str, subtype: str, data: bytes, expected: str) -> None:
    from refloop.routes.extract import ed_media_type

    assert ed_media_type(type_of_data, subtype, data) == expected
