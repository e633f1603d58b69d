"""The audit trail: who read PHI through the API, who linked, closed or replayed, what was purged.

Rows carry an actor, an action and a target made of IDs; never message content.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, insert, select

from refloop.store.models import AuditEntry
from refloop.store.queries import iso


def record(conn: Connection, *, now: datetime, actor: str, action: str, target: str = "", detail: str = "") -> None:
    conn.execute(insert(AuditEntry).values(
        at=now, actor=actor[:128], action=action[:32], target=target[:255], detail=detail[:255]))


def record_now(engine: Engine, **kw: Any) -> None:
    with engine.begin() as conn:
        record(conn, **kw)


def list_entries(engine: Engine, limit: int = 100) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(AuditEntry.__table__).order_by(AuditEntry.id.desc()).limit(limit)).all()
    return [{"id": r.id, "at": iso(r.at), "actor": r.actor, "action": r.action, "target": r.target,
             "detail": r.detail} for r in rows]


@contextlib.contextmanager
def audited_read(engine: Engine) -> Iterator[Connection]:
    """One transaction for a read that is audited in the same breath (a raw message, a patient search).

    It starts as a *write* transaction on SQLite (BEGIN IMMEDIATE): a deferred transaction that reads first
    and writes its audit row after is refused at once ("database is locked", no busy wait) when the daemon
    wrote in between; an immediate one waits its turn behind the daemon's short transactions."""
    with engine.connect() as conn:
        conn = conn.execution_options(sqlite_begin="IMMEDIATE")
        with conn.begin():
            yield conn
