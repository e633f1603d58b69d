"""HTTP side on one small aiohttp listener: health, readiness, Prometheus metrics and the read API.

Database reads run in a worker thread (``asyncio.to_thread``) so a slow query never stalls the MLLP
event loop. Error bodies carry codes, never message content.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from refloop.daemon.dashboard import add_routes as add_dashboard_routes
from refloop.daemon.http_messages import add_routes as add_message_routes
from refloop.daemon.http_referrals import add_routes
from refloop.daemon.identity import REQUEST_KEY, Resolver, actor
from refloop.daemon.workspace import add_routes as add_workspace_routes

if TYPE_CHECKING:
    from refloop.daemon.app import AppContext


class HttpApi:
    def __init__(self, server: AppContext) -> None:
        self.server = server
        self.identity = Resolver(server.settings.http)
        self.app = web.Application(middlewares=[self.auth])  # type: ignore[list-item]  # bound method
        self.app.add_routes([
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/metrics", self.metrics),
        ])
        add_message_routes(self.app, server)
        add_routes(self.app, server)
        from refloop.daemon.http_worklist import add_routes as add_worklist_routes; add_worklist_routes(self.app, server)  # noqa: E501, E702, I001
        add_dashboard_routes(self.app, server)
        add_workspace_routes(self.app, server)
        self.runner: web.AppRunner | None = None

    OPEN = frozenset({"/healthz", "/readyz", "/metrics", "/login", "/static/dashboard.css", "/static/dashboard.js"})
    #: Reads that show patient-level data: each one is written to the audit log (HIPAA §164.312(b)).
    PHI_PATHS = ("/api/referrals", "/api/unmatched", "/referrals/")

    async def _audit_read(self, req: web.Request) -> None:
        from refloop.store.audit import record_now

        who = actor(req, "token" if self.server.settings.http.token else f"http:{req.remote or 'local'}")
        engine = self.server.engine
        assert engine is not None
        await asyncio.to_thread(record_now, engine, now=self.server.clock.now(), actor=who, action="read",
                                target=req.path[:255])

    @web.middleware
    async def auth(self, req: web.Request, handler: Handler) -> web.StreamResponse:
        """Everything but health, metrics and the login form needs the bearer token when one is configured.

        The person named by ``http.user_header`` (trusted proxies only: :mod:`refloop.daemon.identity`) is
        put on the request for the audit log; it identifies, it does not authenticate.
        """
        import hmac

        req[REQUEST_KEY] = self.identity.identify(req).person
        if req.method == "POST" and not self._same_origin(req):
            return web.json_response({"error": "cross-site form post refused"}, status=403)
        token = self.server.settings.http.token
        if token and req.path not in self.OPEN:
            # Browsers carry the token as the dashboard's cookie (set by POST /login, which checks it itself).
            given = req.headers.get("Authorization", "") or f"Bearer {req.cookies.get('refloop_token', '')}"
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                if req.method == "GET" and "text/html" in req.headers.get("Accept", ""):
                    return web.Response(status=303, headers={"Location": "/login"})
                return web.json_response({"error": "unauthorized"}, status=401,
                                         headers={"WWW-Authenticate": "Bearer"})
        try:
            resp = await handler(req)
            if req.method == "GET" and resp.status == 200 and req.path.startswith(self.PHI_PATHS):
                await self._audit_read(req)
            return resp
        except web.HTTPException as exc:
            return web.json_response({"error": exc.reason}, status=exc.status)
        except Exception as exc:  # never echo exception text: it can quote message content
            import logging

            logging.getLogger("refloop.http").error("request failed", extra={"error_type": type(exc).__name__})
            return web.json_response({"error": "internal error"}, status=500)

    @staticmethod
    def _same_origin(req: web.Request) -> bool:
        """A browser's form post from another site carries its ``Origin``: refuse it. Behind a proxy that
        authenticates with HTTP Basic or SSO, the browser would otherwise lend a person's credentials to any
        page that posts a form here (CSRF). Clients that send no Origin (curl, the CLI, webhooks) pass."""
        from urllib.parse import urlsplit

        origin = req.headers.get("Origin", "")
        if not origin:
            return True
        return origin != "null" and urlsplit(origin).netloc.lower() == req.host.lower()

    async def start(self, host: str, port: int) -> int:
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port, reuse_address=True)
        await site.start()
        server = site._server
        assert server is not None
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def healthz(self, _req: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, _req: web.Request) -> web.Response:
        db = await asyncio.to_thread(self.server.database_ping)
        listening = self.server.listening
        ok = db and listening
        self.server.metrics.database_up.set(1 if db else 0)
        lag = await asyncio.to_thread(self.server.apply_lag) if db else None
        return web.json_response(
            {"status": "ready" if ok else "not ready", "database": db, "listener": listening,
             "apply_lag_messages": lag[0] if lag else None,
             "apply_lag_seconds": round(lag[1], 3) if lag else None,
             "backpressure": self.server.lag_paused},
            status=200 if ok else 503,
        )

    async def metrics(self, _req: web.Request) -> web.Response:
        body = generate_latest(self.server.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
