"""The transactional outbox: notifications are rows first, deliveries afterwards.

Why: a notification must go out if and only if the state change that caused it committed. So callers
:func:`enqueue` on *their* connection, inside the transaction that raises the alert or closes the loop,
and the dispatcher delivers later, at least once. Receivers get the ``idempotency_key`` to drop repeats.

Claiming: on PostgreSQL several daemons may dispatch, so due rows are taken
with ``FOR UPDATE SKIP LOCKED`` and a short lease is written and committed *before* the slow send, so no
row lock is held across SMTP or HTTP. A daemon that dies mid-send leaves an expired lease, and the row is
claimed again (hence at-least-once). SQLite has one daemon, and ``BEGIN IMMEDIATE`` serialises claims.

Rows enqueued while their relationship is in *observe* mode are stored as ``suppressed`` and are never
claimed, so switching to *active* later does not replay them.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, Final

from sqlalchemy import Connection, Engine, Table, func, or_, select, update

from refloop.store import rawsql
from refloop.store.models import OutboxEntry
from refloop.store.referrals import aware, iso, mark, utc
from refloop.store.sqlhot import bind_time

OUTBOX: Table = OutboxEntry.__table__  # type: ignore[assignment]

PENDING: Final = "pending"
DELIVERED: Final = "delivered"
FAILED: Final = "failed"  # an attempt failed; retried at next_attempt_at
DEAD: Final = "dead"  # max_attempts reached: shown on the worklist, never retried automatically
SUPPRESSED: Final = "suppressed"  # observe mode: recorded, never delivered
STATUSES: Final = (PENDING, DELIVERED, FAILED, DEAD, SUPPRESSED)
_DUE: Final = (PENDING, FAILED)


def enqueue(conn: Connection, *, key: str, channel: str, event: str, now: datetime, payload: dict[str, Any],
            target: str = "", referral_id: int | None = None, alert_id: int | None = None,
            suppressed: bool = False) -> bool:
    """Add one notification in the caller's transaction; False if its key was already enqueued."""
    sql = _insert(conn.dialect.name)
    stamp = bind_time(conn, utc(now))  # type: ignore[arg-type]
    added = rawsql.execute(conn, sql, (
        key[:255], channel, target[:255], event[:32], referral_id, alert_id,
        json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str),
        SUPPRESSED if suppressed else PENDING, 0, stamp, "", stamp)).fetchone() is not None
    if added and referral_id is not None:
        mark(conn, [referral_id], now)  # a reminder puts the referral among the report's "recovered" candidates
    return added


_INSERT_COLUMNS: Final = ("idempotency_key", "channel", "target", "event", "referral_id", "alert_id", "payload",
                          "status", "attempts", "next_attempt_at", "last_error", "created_at")


@lru_cache(maxsize=4)
def _insert(dialect_name: str) -> str:
    """The enqueue statement as driver SQL (the :mod:`refloop.store.sqlhot` pattern; times stored as
    SQLAlchemy's DateTime stores them): a scan enqueues one or two per alert it raises or escalates, and the
    apply one per closed loop or no-show, and as a SQLAlchemy construct built per call it cost ~200 us a
    notification, more than the insert."""
    ph = "?" if dialect_name == "sqlite" else "%s"
    return (f"INSERT INTO outbox ({', '.join(_INSERT_COLUMNS)}) VALUES ({', '.join([ph] * len(_INSERT_COLUMNS))}) "
            "ON CONFLICT (idempotency_key) DO NOTHING RETURNING id")


def claim(engine: Engine, now: datetime, *, limit: int = 50, lease_seconds: float = 120.0) -> list[dict[str, Any]]:
    """Take up to *limit* due rows and lease them; the lease is committed before anything is sent."""
    due = or_(OUTBOX.c.lease_until.is_(None), OUTBOX.c.lease_until <= utc(now))
    with engine.connect() as conn:
        conn = conn.execution_options(sqlite_begin="IMMEDIATE")
        with conn.begin():
            ids = list(conn.execute(
                select(OUTBOX.c.id).where(OUTBOX.c.status.in_(_DUE), OUTBOX.c.next_attempt_at <= utc(now), due)
                .order_by(OUTBOX.c.id).limit(limit).with_for_update(skip_locked=True)
            ).scalars())
            if not ids:
                return []
            conn.execute(update(OUTBOX).where(OUTBOX.c.id.in_(ids)).values(
                lease_until=utc(now + timedelta(seconds=lease_seconds)), attempts=OUTBOX.c.attempts + 1))
            rows = conn.execute(select(OUTBOX).where(OUTBOX.c.id.in_(ids)).order_by(OUTBOX.c.id)).all()
    return [_row(r) for r in rows]


def mark_delivered(engine: Engine, outbox_id: int, now: datetime) -> None:
    with engine.begin() as conn:
        conn.execute(update(OUTBOX).where(OUTBOX.c.id == outbox_id).values(
            status=DELIVERED, delivered_at=utc(now), lease_until=None, last_error=""))


def mark_failed(conn: Connection, row: dict[str, Any], now: datetime, error: str, *, max_attempts: int,
                retry_in: float) -> str:
    """Schedule a retry ``retry_in`` seconds from now (the backoff rule is
    :func:`refloop.notify.policy.retry_delay`), or dead-letter the row; returns the new status.

    Runs on the caller's connection so that the dead-letter notice to the owner is enqueued in the same
    transaction as the dead status (see :mod:`refloop.notify.dispatch`).
    """
    attempts = int(row["attempts"])
    if attempts >= max_attempts:
        status, next_at = DEAD, now
    else:
        status, next_at = FAILED, now + timedelta(seconds=retry_in)
    conn.execute(update(OUTBOX).where(OUTBOX.c.id == row["id"]).values(
        status=status, next_attempt_at=utc(next_at), lease_until=None, last_error=error[:255]))
    return status


def retry(conn: Connection, outbox_id: int, now: datetime) -> bool:
    """A coordinator re-queues a dead or failed row: attempts start over. Suppressed rows are not retried,
    because observe mode promised they would never be delivered."""
    return conn.execute(update(OUTBOX).where(OUTBOX.c.id == outbox_id, OUTBOX.c.status.in_((DEAD, FAILED)))
                        .values(status=PENDING, attempts=0, next_attempt_at=utc(now), lease_until=None)
                        ).rowcount == 1


def get(conn: Connection, outbox_id: int) -> dict[str, Any] | None:
    row = conn.execute(select(OUTBOX).where(OUTBOX.c.id == outbox_id)).first()
    return _row(row) if row is not None else None


def listing(conn: Connection, *, status: str | None = None, limit: int = 500) -> list[dict[str, Any]]:
    """The outbox as the CLI and API show it: no payloads (they may carry PHI when webhook_phi is on)."""
    stmt = select(OUTBOX).order_by(OUTBOX.c.id.desc()).limit(limit)
    if status:
        stmt = stmt.where(OUTBOX.c.status == status)
    out = []
    for r in conn.execute(stmt):
        row = _row(r)
        row.pop("payload")
        out.append(row)
    return out


def counts(conn: Connection) -> dict[str, int]:
    """Rows per status, for the backlog and dead-letter gauges."""
    found: dict[str, int] = dict(conn.execute(
        select(OUTBOX.c.status, func.count()).group_by(OUTBOX.c.status)).all())
    return {s: int(found.get(s, 0)) for s in STATUSES}


def _row(r: Any) -> dict[str, Any]:
    return {
        "id": r.id, "idempotency_key": r.idempotency_key, "channel": r.channel, "target": r.target,
        "event": r.event, "referral_id": r.referral_id, "alert_id": r.alert_id, "payload": json.loads(r.payload),
        "status": r.status, "attempts": r.attempts, "next_attempt_at": iso(aware(r.next_attempt_at)),
        "last_error": r.last_error, "created_at": iso(aware(r.created_at)),
        "delivered_at": iso(aware(r.delivered_at)),
    }
