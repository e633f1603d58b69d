"""Read-side queries shared by the CLI and the HTTP API (one function, one shape, two front ends)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, select
from sqlalchemy.sql import operators
from sqlalchemy.sql.elements import ColumnElement, UnaryExpression

from refloop.store.models import Message

MESSAGE_FIELDS = ("id", "received_at", "sender", "type", "control_id", "outcome", "ack_code", "duplicate_of")


def unindexed(column: ColumnElement[Any]) -> ColumnElement[Any]:
    """``+column``: the same value on SQLite and PostgreSQL, but SQLite's planner will not use an index on
    it. For a condition whose index is the wrong one (most rows match it, or another index is narrower):
    a wrong plan costs speed, never a result."""
    return UnaryExpression(column, operator=operators.custom_op("+"), type_=column.type)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; refloop only ever stores UTC, so naive means UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def iso(value: datetime | None) -> str | None:
    v = as_utc(value)
    return v.isoformat() if v else None


def list_messages(engine: Engine, *, limit: int = 100, control_id: str | None = None) -> list[dict[str, Any]]:
    """Journal listing, newest first: metadata only (the raw frame is PHI and stays in the store)."""
    stmt = select(
        Message.id, Message.received_at, Message.sending_application, Message.sending_facility,
        Message.message_type, Message.trigger_event, Message.control_id, Message.outcome,
        Message.ack_code, Message.err_code, Message.duplicate_of, Message.profile, Message.flags,
    ).order_by(Message.id.desc()).limit(limit)
    if control_id is not None:
        stmt = stmt.where(Message.control_id == control_id)
    with engine.connect() as conn:
        rows = conn.execute(stmt).all()
    out = []
    for r in rows:
        out.append({
            "id": r.id,
            "received_at": iso(r.received_at),
            "sender": "^".join(x for x in (r.sending_application, r.sending_facility) if x),
            "type": f"{r.message_type}^{r.trigger_event}" if r.message_type else "",
            "control_id": r.control_id,
            "outcome": r.outcome,
            "ack_code": r.ack_code,
            "err_code": r.err_code,
            "duplicate_of": r.duplicate_of,
            "profile": r.profile,
            "flags": r.flags,
        })
    return out
