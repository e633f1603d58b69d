"""TLS for the MLLP listener: context building, certificate expiry, and naming handshake failures.

Connections are accepted as plain TCP and upgraded with ``loop.start_tls`` (rather than handing an
SSLContext to ``create_server``) so that every failed handshake is seen by refloop and becomes a metric
and a log line with its reason, instead of vanishing inside asyncio.
"""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from typing import Any

from refloop.config import MllpSettings


class TlsConfigError(Exception):
    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"{key}: {reason}")
        self.key = key


def server_context(m: MllpSettings) -> ssl.SSLContext | None:
    if not m.tls_cert:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(m.tls_cert, m.tls_key or None)
    except (OSError, ssl.SSLError) as exc:
        raise TlsConfigError("mllp.tls_cert", f"cannot load certificate/key ({type(exc).__name__})") from None
    if m.tls_client_ca:
        try:
            ctx.load_verify_locations(cafile=m.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise TlsConfigError("mllp.tls_client_ca", f"cannot load CA bundle ({type(exc).__name__})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if m.tls_require_client_cert else ssl.CERT_OPTIONAL
    return ctx


def certificate_expiry(path: str) -> float | None:
    """notAfter of the first certificate in a PEM file, as a Unix timestamp (for the expiry metric)."""
    try:
        info = ssl._ssl._test_decode_cert(path)  # type: ignore[attr-defined]  # stdlib (private): no dependency
        return datetime.strptime(info["notAfter"], "%b %d %H:%M:%S %Y %Z").replace(tzinfo=UTC).timestamp()
    except Exception:
        return None


def failure_reason(exc: BaseException) -> str:
    """A bounded label for a failed handshake (the metric label set must stay small)."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ssl.SSLError):
        r = (exc.reason or "").upper()
        if r in ("WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE"):
            return "plaintext"
        if "PEER_DID_NOT_RETURN_A_CERTIFICATE" in r or "NO_CERTIFICATE" in r:
            return "no_certificate"
        if "CERTIFICATE" in r or "UNKNOWN_CA" in r or "BAD_CERT" in r:
            return "bad_certificate"
        if "VERSION" in r or "PROTOCOL" in r or "CIPHER" in r:
            return "protocol_version"
        return "other"
    if isinstance(exc, (ConnectionError, EOFError)):
        return "disconnect"
    return "other"


def peer_subject_cn(peercert: dict[str, Any] | None) -> str:
    if not peercert:
        return ""
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return ""
