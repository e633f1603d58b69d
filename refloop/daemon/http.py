"""HTTP side on one small aiohttp listener: health, readiness, Prometheus metrics and the read API.

Database reads run in a worker thread (``asyncio.to_thread``) so a slow query never stalls the MLLP
event loop. Error bodies carry codes, never message content.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from refloop.store import queries

if TYPE_CHECKING:
    from refloop.daemon.app import AppContext


class HttpApi:
    def __init__(self, server: AppContext) -> None:
        self.server = server
        self.app = web.Application(middlewares=[self.auth])  # type: ignore[list-item]  # bound method
        self.app.add_routes([
            web.get("/healthz", self.healthz),
            web.get("/readyz", self.readyz),
            web.get("/metrics", self.metrics),
            web.get("/api/messages", self.messages),
        ])
        from refloop.daemon.http_referrals import add_routes; add_routes(self.app, server)  # noqa: E702, I001
        from refloop.daemon.http_worklist import add_routes as add_worklist_routes; add_worklist_routes(self.app, server)  # noqa: E501, E702, I001
        from refloop.daemon.dashboard import add_routes as add_dashboard_routes; add_dashboard_routes(self.app, server)  # noqa: E702, I001
        self.runner: web.AppRunner | None = None

    OPEN = frozenset({"/healthz", "/readyz", "/metrics"})
    #: Reads that show patient-level data: each one is written to the audit log (HIPAA §164.312(b)).
    PHI_PATHS = ("/api/referrals", "/api/unmatched", "/referrals/")

    async def _audit_read(self, req: web.Request) -> None:
        from refloop.store.audit import record_now

        actor = "token" if self.server.settings.http.token else f"http:{req.remote or 'local'}"
        engine = self.server.engine
        assert engine is not None
        await asyncio.to_thread(record_now, engine, now=self.server.clock.now(), actor=actor, action="read",
                                target=req.path[:255])

    @web.middleware
    async def auth(self, req: web.Request, handler: Handler) -> web.StreamResponse:
        """Everything but health and metrics needs the bearer token when one is configured."""
        import hmac

        token = self.server.settings.http.token
        if token and req.path not in self.OPEN:
            # Browsers carry the token as the dashboard's cookie (set by /login, which checks it itself).
            given = req.headers.get("Authorization", "") or f"Bearer {req.cookies.get('refloop_token', '')}"
            if req.path != "/login" and not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
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

    async def messages(self, req: web.Request) -> web.Response:
        try:
            limit = int(req.query.get("limit", "100"))
        except ValueError:
            return web.json_response({"error": "limit must be an integer"}, status=400)
        control_id = req.query.get("control_id")
        engine = self.server.engine
        assert engine is not None
        rows: list[dict[str, Any]] = await asyncio.to_thread(
            queries.list_messages, engine, limit=max(1, min(limit, 10_000)), control_id=control_id
        )
        return web.json_response(rows)
