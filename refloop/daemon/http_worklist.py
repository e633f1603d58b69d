"""Worklist endpoints: coordinator actions, the outbox, and answers to a referral (the worklist itself,
``GET /api/worklist``, is served with its page in :mod:`refloop.daemon.workspace`).

``POST /api/callbacks/answer`` is for a patient-engagement or practice system answering a reminder: it
may be outside the bearer-token perimeter's trust, so its body must carry a valid ``X-Refloop-Signature``
(HMAC-SHA256 with ``notify.webhook_secret``), the same scheme refloop's own webhooks use. Every database
call runs in a worker thread; error bodies carry codes, never content.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aiohttp import web

from refloop.daemon import identity
from refloop.notify import webhook
from refloop.store import alerts, answers, outbox
from refloop.store import referrals as repo

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from refloop.daemon.app import AppContext


def parse_until(value: Any) -> datetime | None:
    """ISO date or date-time; a bare date means midnight UTC of that day."""
    if value in (None, ""):
        return None
    moment = datetime.fromisoformat(str(value))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def add_routes(app: web.Application, server: AppContext) -> None:
    """Register the worklist API on *app*; handlers read ``server.engine`` when called."""

    def engine() -> Engine:
        assert server.engine is not None
        return server.engine

    def _act(alert_id: int, action: str, body: dict[str, Any], who: str) -> tuple[int, dict[str, Any]]:
        try:
            until = parse_until(body.get("until"))
        except ValueError:
            return 400, {"error": "until must be an ISO 8601 date"}
        try:
            with engine().begin() as conn:
                doc = alerts.act(conn, server.settings, alert_id, action, server.clock.now(),
                                 actor=who or str(body.get("actor") or "api"), note=str(body.get("note") or ""),
                                 until=until, owner=str(body.get("owner") or ""), reason=str(body.get("reason") or ""))
        except alerts.ActionError as exc:
            return exc.status, {"error": str(exc)}
        return 200, doc

    def _outbox(status: str | None) -> list[dict[str, Any]]:
        with engine().connect() as conn:
            return outbox.listing(conn, status=status)

    def _answer(key: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        try:
            with engine().begin() as conn:
                rid = repo.resolve_key(conn, key)
                if rid is None:
                    return 404, {"error": "no such referral"}
                doc = answers.answer(conn, server.settings, rid, str(body.get("answer") or ""), server.clock.now(),
                                    actor=str(body.get("actor") or "api"), note=str(body.get("note") or ""))
        except alerts.ActionError as exc:
            return exc.status, {"error": str(exc)}
        return 200, doc

    async def json_body(req: web.Request) -> dict[str, Any] | None:
        try:
            body = await req.json() if req.can_read_body else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        return body if isinstance(body, dict) else None

    async def action(req: web.Request) -> web.Response:
        body = await json_body(req)
        if body is None or not req.match_info["id"].isdigit():
            return web.json_response({"error": "expected a numeric alert id and a JSON object body"}, status=400)
        status, doc = await asyncio.to_thread(_act, int(req.match_info["id"]), req.match_info["action"], body,
                                              identity.actor(req, ""))
        return web.json_response(doc, status=status)

    async def outbox_list(req: web.Request) -> web.Response:
        return web.json_response(await asyncio.to_thread(_outbox, req.query.get("status") or None))

    async def referral_event(req: web.Request) -> web.Response:
        body = await json_body(req)
        if body is None:
            return web.json_response({"error": "expected a JSON object body"}, status=400)
        status, doc = await asyncio.to_thread(_answer, req.match_info["id"], body)
        return web.json_response(doc, status=status)

    async def callback(req: web.Request) -> web.Response:
        raw = await req.read()
        secret = server.settings.notify.webhook_secret
        if not webhook.verify(secret, raw, req.headers.get(webhook.SIGNATURE_HEADER, "")):
            return web.json_response({"error": "bad or missing signature"}, status=401)
        try:
            body = json.loads(raw)
            key = str(body["placer_id"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            return web.json_response({"error": 'expected {"placer_id": ..., "answer": ...}'}, status=400)
        status, doc = await asyncio.to_thread(_answer, key, body)
        return web.json_response(doc, status=status)

    async def scan(req: web.Request) -> web.Response:
        """Run one stall scan now, or as of ``?as_of=ISO8601`` (like `refloop scan --as-of`)."""
        from refloop.notify.scan import update_gauges
        from refloop.store import scan as stall_scan

        as_of = server.clock.now()
        if req.query.get("as_of"):
            try:
                parsed = parse_until(req.query["as_of"])
            except ValueError:
                parsed = None
            if parsed is None:
                return web.json_response({"error": "as_of must be an ISO 8601 time"}, status=400)
            as_of = parsed
        result = await asyncio.to_thread(stall_scan.run_scan, engine(), server.settings, as_of)
        await asyncio.to_thread(update_gauges, engine(), server.metrics)
        if result is None:
            return web.json_response({"skipped": True, "as_of": as_of.isoformat()})
        return web.json_response({"as_of": as_of.isoformat(), **result.as_json()})

    app.add_routes([
        web.post("/api/scan", scan),
        web.post("/api/alerts/{id}/{action}", action),
        web.get("/api/outbox", outbox_list),
        web.post("/api/referrals/{id}/events", referral_event),
        web.post("/api/callbacks/answer", callback),
    ])
