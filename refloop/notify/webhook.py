"""Webhook delivery: JSON POST signed with HMAC-SHA256 over the exact body bytes.

Receivers verify ``X-Refloop-Signature: sha256=<hex>`` with the shared ``webhook_secret`` and drop repeats
by ``X-Refloop-Idempotency-Key`` (delivery is at least once). The payload was built at enqueue time with
IDs and statuses only, unless ``webhook_phi`` was on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import ssl
import urllib.error
import urllib.request
from typing import Any

SIGNATURE_HEADER = "X-Refloop-Signature"
KEY_HEADER = "X-Refloop-Idempotency-Key"


class DeliveryError(Exception):
    """A delivery attempt failed; ``str()`` is a short code safe to store and log (no PHI, no URL)."""


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    """Constant-time check of a signature header; False without a secret, so unsigned is never trusted."""
    return bool(secret) and hmac.compare_digest(sign(secret, body), header or "")


def body_of(row: dict[str, Any]) -> bytes:
    return json.dumps({**row["payload"], "idempotency_key": row["idempotency_key"]}, sort_keys=True,
                      separators=(",", ":")).encode()


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuse every redirect: urllib would follow a 302/303 by turning the signed POST into a body-less GET
    and report success, so the event would be lost while the outbox row said ``delivered``."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str, headers: Any,
                         newurl: str) -> None:
        return None


def opener(ca_file: str = "") -> urllib.request.OpenerDirector:
    """An opener that never follows redirects and verifies HTTPS with ``ca_file`` (else the system store)."""
    context = ssl.create_default_context(cafile=ca_file or None)
    return urllib.request.build_opener(_NoRedirect(), urllib.request.HTTPSHandler(context=context))


def post(url: str, secret: str, row: dict[str, Any], timeout: float, *, ca_file: str = "") -> None:
    """Blocking POST (run in a worker thread); any non-2xx answer, a redirect included, is a failure to retry."""
    if not url.lower().startswith(("http://", "https://")):
        raise DeliveryError("webhook url is not http(s)")
    body = body_of(row)
    headers = {"Content-Type": "application/json", KEY_HEADER: row["idempotency_key"],
               "X-Refloop-Event": row["event"]}
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, body)
    req = urllib.request.Request(url, data=body, headers=headers, method="POST")  # noqa: S310 - scheme checked above
    try:
        with opener(ca_file).open(req, timeout=timeout) as resp:
            if not 200 <= resp.status < 300:
                raise DeliveryError(f"http {resp.status}")
    except urllib.error.HTTPError as exc:
        if 300 <= exc.code < 400:
            raise DeliveryError(f"http {exc.code} redirect not followed") from None
        raise DeliveryError(f"http {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise DeliveryError(f"webhook {type(getattr(exc, 'reason', exc)).__name__}") from None
