"""Finding any message over HTTP: ``GET /api/messages`` (the same filters as `refloop messages`), one
message's metadata, its raw text (audited), and the dashboard's message pages (``/messages``,
``/messages/{id}``, the raw view behind the same audit).

Listing returns metadata only. The raw message is PHI: every read of it writes an audit row
(``action=raw``, ``target=message:ID``) in the same transaction that reads it, so there is no read without
its row. A search by patient is audited too (``action=search``), without the identifier. Database work runs
in worker threads so the MLLP event loop never waits on a query.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from aiohttp import web
from jinja2 import Environment, FileSystemLoader, select_autoescape

from refloop.daemon.identity import actor
from refloop.store import audit
from refloop.store import message_search as ms

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from refloop.daemon.app import AppContext

_TEMPLATES = Path(__file__).parent / "templates"


def add_routes(app: web.Application, server: AppContext) -> None:
    env = Environment(loader=FileSystemLoader(_TEMPLATES), autoescape=select_autoescape(["html"]),
                      trim_blocks=True, lstrip_blocks=True)

    def engine() -> Engine:
        assert server.engine is not None
        return server.engine

    def api_actor(req: web.Request) -> str:
        return actor(req, "token" if server.settings.http.token else f"http:{req.remote or 'local'}")

    def page_actor(req: web.Request) -> str:
        return actor(req, f"dashboard@{req.remote or 'unknown'}")

    def _search(f: ms.MessageFilter, who: str) -> list[dict[str, Any]]:
        with audit.audited_read(engine()) as conn:
            rows = ms.search(conn, f)
            if f.patient_hash:
                audit.record(conn, now=server.clock.now(), actor=who, action="search", target="messages:patient",
                             detail=f"{len(rows)} message(s)")
            return rows

    def _one(message_id: int, who: str, raw: bool, via: str = "api") -> tuple[dict[str, Any] | None, str | None]:
        with audit.audited_read(engine()) as conn:
            meta = ms.message_meta(conn, message_id)
            if meta is None or not raw:
                return meta, None
            text = ms.raw_message(conn, message_id)
            if text is not None:
                audit.record(conn, now=server.clock.now(), actor=who, action="raw", target=f"message:{message_id}",
                             detail=via)
            return meta, text

    def _filter(query: Any) -> ms.MessageFilter:
        return ms.parse_filter({k: query.get(k) for k in ms.FILTERS}, query.get("limit"))

    async def api_list(req: web.Request) -> web.Response:
        try:
            f = _filter(req.query)
        except ms.FilterError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response(await asyncio.to_thread(_search, f, api_actor(req)))

    def _id(req: web.Request) -> int | None:
        value = req.match_info["id"]
        return int(value) if value.isdigit() else None

    async def api_one(req: web.Request) -> web.Response:
        mid = _id(req)
        meta = (await asyncio.to_thread(_one, mid, api_actor(req), False))[0] if mid is not None else None
        return web.json_response(meta) if meta is not None else web.json_response({"error": "not found"}, status=404)

    async def api_raw(req: web.Request) -> web.Response:
        mid = _id(req)
        if mid is None:
            return web.json_response({"error": "not found"}, status=404)
        meta, text = await asyncio.to_thread(_one, mid, api_actor(req), True)
        if meta is None:
            return web.json_response({"error": "not found"}, status=404)
        if text is None:
            return web.json_response({"error": "message body purged by retention"}, status=410)
        return web.json_response({"id": mid, "raw": text.replace("\r\n", "\r").replace("\r", "\n")})

    async def page_list(req: web.Request) -> web.Response:
        # The search form posts, so a patient identifier never lands in a URL (history, proxies, referrers);
        # GET with query parameters serves links and bookmarks for every other filter.
        source: Any = await req.post() if req.method == "POST" else req.query
        query = {k: str(source.get(k, "")) for k in (*ms.FILTERS, "limit")}
        error, rows = "", []
        try:
            f = _filter(query)
            rows = await asyncio.to_thread(_search, f, page_actor(req))
        except ms.FilterError as exc:
            error = str(exc)
        # The patient identifier never goes back into the page (it would sit in history and screenshots).
        keep = {k: v for k, v in query.items() if v and k != "patient"}
        html = env.get_template("messages.html").render(rows=rows, query=query, error=error,
                                                        searched_patient=bool(query["patient"]),
                                                        self_query=urlencode(keep))
        return web.Response(text=html, content_type="text/html")

    async def page_one(req: web.Request) -> web.Response:
        mid = _id(req)
        raw = req.query.get("raw") == "1"
        meta, text = (None, None)
        if mid is not None:
            meta, text = await asyncio.to_thread(_one, mid, page_actor(req), raw, "dashboard")
        if meta is None:
            return web.Response(text="no such message", status=404)
        lines = text.replace("\r\n", "\r").replace("\r", "\n").rstrip("\n").split("\n") if text else []
        html = env.get_template("message.html").render(m=meta, raw=raw, lines=lines)
        return web.Response(text=html, content_type="text/html")

    app.add_routes([
        web.get("/api/messages", api_list),
        web.get("/api/messages/{id}", api_one),
        web.get("/api/messages/{id}/raw", api_raw),
        web.get("/messages", page_list),
        web.post("/messages", page_list),
        web.get("/messages/{id}", page_one),
    ])
