"""Who is asking: the person behind a dashboard or API request, for the audit log and the timeline.

refloop has no user accounts. A site that wants names puts an authenticating reverse proxy in front
(nginx ``auth_request``, Apache ``mod_auth_*``, oauth2-proxy...) that sets ``http.user_header`` (for example
``X-Forwarded-User``). That header is trusted only when the TCP peer is one of ``http.trusted_proxies``
(loopback by default): anyone else could type the header themselves, so from elsewhere it is ignored and
the actor falls back to the address, exactly as before. ``X-Forwarded-Proto: https`` from a trusted proxy
is how ``http.cookie_secure = "auto"`` knows the browser is on HTTPS.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from aiohttp import web

from refloop.daemon.access import in_networks, networks

if TYPE_CHECKING:
    from refloop.config.settings import HttpSettings

#: What a person's name may look like in the audit log (no control characters, bounded length).
_NAME: Final = re.compile(r"[^\x00-\x1f\x7f]{1,64}")
#: Where the auth middleware leaves the signed-in person on the request (typed keys: aiohttp >= 3.14).
REQUEST_KEY: Final = web.RequestKey("refloop_person", str)


@dataclass(frozen=True)
class Identity:
    """The HTTP side's view of one request's origin."""

    person: str  # the signed-in person from the proxy header, or "" when unknown
    trusted_proxy: bool  # the TCP peer is a trusted proxy
    https: bool  # the browser reached us over HTTPS (directly or as a trusted proxy says)


class Resolver:
    """Built once from the HTTP settings (the networks are parsed once, not per request)."""

    def __init__(self, http: HttpSettings) -> None:
        self.header = http.user_header.strip()
        self.proxies = networks(http.trusted_proxies)
        self.cookie_secure = http.cookie_secure

    def identify(self, req: web.Request) -> Identity:
        trusted = in_networks(req.remote or "", self.proxies)
        person = ""
        if trusted and self.header:
            given = req.headers.get(self.header, "").strip()
            if _NAME.fullmatch(given):
                person = given
        https = req.secure or (trusted and req.headers.get("X-Forwarded-Proto", "").strip().lower() == "https")
        return Identity(person, trusted, https)

    def secure_cookie(self, who: Identity) -> bool:
        """``on`` always, ``off`` never, ``auto`` when the browser is on HTTPS."""
        return self.cookie_secure == "on" or (self.cookie_secure == "auto" and who.https)


def actor(req: web.Request, fallback: str) -> str:
    """The audit actor: the person the middleware found, else *fallback* (``dashboard@IP``, ``token``...)."""
    person = req.get(REQUEST_KEY, "")
    return str(person) if person else fallback[:64]
