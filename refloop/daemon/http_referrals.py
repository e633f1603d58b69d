"""Referral endpoints on the daemon's HTTP listener: worklist, one referral, review queue, manual link.

Every database call runs in ``asyncio.to_thread`` so the MLLP event loop never waits on a query. The
manual link writes on its own short transaction; under SQLite it may wait for the writer's lock (the
engine's busy timeout), which is why it is a worker thread too. Error bodies carry codes, never content.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from refloop.store import referrals as repo

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from refloop.daemon.app import AppContext


def add_routes(app: web.Application, server: AppContext) -> None:
    """Register the referral API on *app*; handlers read ``server.engine`` when called (set at start-up)."""

    def engine() -> Engine:
        assert server.engine is not None
        return server.engine

    def _list(status: str | None, placer_id: str | None) -> list[dict[str, Any]]:
        with engine().connect() as conn:
            return repo.list_referrals(conn, status=status, placer_id=placer_id)

    def _one(key: str) -> dict[str, Any] | None:
        with engine().connect() as conn:
            rid = repo.resolve_key(conn, key)
            return repo.referral_json(conn, rid, server.clock.now()) if rid is not None else None

    def _unmatched() -> list[dict[str, Any]]:
        with engine().connect() as conn:
            return repo.list_unmatched(conn)

    def _link(message_id: int, key: str) -> tuple[int, dict[str, Any]]:
        with engine().begin() as conn:
            if repo.link_row(conn, message_id) is None:
                return 404, {"error": "no referral-loop message with this id"}
            rid = repo.resolve_key(conn, key)
            if rid is None:
                return 404, {"error": "no such referral"}
            repo.manual_link(conn, message_id, rid, server.clock.now(), actor="api")
        return 200, {"message_id": message_id, "referral": rid, "matched_by": "manual"}

    async def referrals(req: web.Request) -> web.Response:
        rows = await asyncio.to_thread(_list, req.query.get("status") or None, req.query.get("placer_id") or None)
        return web.json_response(rows)

    async def referral(req: web.Request) -> web.Response:
        doc = await asyncio.to_thread(_one, req.match_info["id"])
        return web.json_response(doc) if doc is not None else web.json_response({"error": "not found"}, status=404)

    async def unmatched(_req: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(_unmatched))

    async def link(req: web.Request) -> web.Response:
        try:
            message_id = int(req.match_info["message_id"])
            body = await req.json()
            key = str(body["referral"])
        except (ValueError, KeyError, TypeError, json.JSONDecodeError):
            return web.json_response({"error": 'expected {"referral": KEY} and a numeric message id'}, status=400)
        status, doc = await asyncio.to_thread(_link, message_id, key)
        return web.json_response(doc, status=status)

    app.add_routes([
        web.get("/api/referrals", referrals),
        web.get("/api/referrals/{id}", referral),
        web.get("/api/unmatched", unmatched),
        web.post("/api/unmatched/{message_id}/link", link),
    ])
