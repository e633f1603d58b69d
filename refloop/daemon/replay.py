"""`refloop replay`: run stored messages through the current routes and profiles again.

Used after an upgrade that adds or fixes a handler (a ``failed`` row, for instance). Replay does not run
handlers itself: it marks the rows ``requeued`` and the projector applies them through the one dispatch,
exactly as it applies a message that just arrived, except that a re-application first forgets what the
row produced before (every effect is keyed by its journal row), so running a message twice replaces,
never adds. Only messages that were accepted (processed, ignored, error, failed) are replayed: a rejected
(AR) message was never accepted and its sender resends it; duplicates and broken frames have nothing to
apply.

SQLite: this process projects the rows itself (a running daemon may take some of the batches; SQLite's
write lock keeps each batch whole). PostgreSQL: when a daemon holds the projector lock, it applies them
and this command waits for it.
"""

from __future__ import annotations

import time
from datetime import datetime

from sqlalchemy import Engine, func, select, text, update

from refloop.clock import Clock
from refloop.config import Settings
from refloop.daemon.projector import ADVISORY_KEY, Core
from refloop.routes.router import Router
from refloop.store.models import Message as Journal
from refloop.store.models import Outcome

REPLAYABLE = (Outcome.PROCESSED, Outcome.IGNORED, Outcome.ERROR, Outcome.FAILED)
_CHUNK = 500
REPLAY_BATCH = 20


def mark(engine: Engine, *, since: datetime | None = None, message_id: int | None = None,
         outcome: str | None = None) -> list[int]:
    """Mark accepted rows for re-application; returns their ids (short transactions, in chunks).
    ``outcome`` narrows it to rows with that journal outcome (``failed`` after a fix)."""
    stmt = select(Journal.id).where(Journal.outcome.in_(REPLAYABLE), Journal.raw.is_not(None))
    if outcome is not None:
        stmt = stmt.where(Journal.outcome == outcome)
    if since is not None:
        stmt = stmt.where(Journal.received_at >= since)
    if message_id is not None:
        stmt = stmt.where(Journal.id == message_id)
    with engine.connect() as conn:
        ids = [int(r[0]) for r in conn.execute(stmt.order_by(Journal.id))]
    for i in range(0, len(ids), _CHUNK):
        with engine.begin() as conn:
            conn.execute(update(Journal).where(Journal.id.in_(ids[i:i + _CHUNK]),
                                               Journal.outcome.in_(REPLAYABLE)).values(outcome=Outcome.REQUEUED))
    return ids


def replay(engine: Engine, settings: Settings, router: Router, clock: Clock, *,
           since: datetime | None = None, message_id: int | None = None, outcome: str | None = None,
           wait_seconds: float = 600.0) -> dict[str, object]:
    ids = mark(engine, since=since, message_id=message_id, outcome=outcome)
    # Small batches: a daemon on the same SQLite file waits for each one's write lock (no in-process gate).
    core = Core(settings, router, clock, batch_size=REPLAY_BATCH)
    if engine.dialect.name == "sqlite":
        core.drain(engine)
    else:
        with engine.connect() as lock:
            leader = bool(lock.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": ADVISORY_KEY}).scalar())
            lock.commit()
            if leader:
                core.drain(engine)
                lock.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": ADVISORY_KEY})
                lock.commit()
    _wait_applied(engine, ids, wait_seconds)
    return {"replayed": len(ids), "outcomes": _outcomes(engine, ids)}


def _wait_applied(engine: Engine, ids: list[int], seconds: float) -> None:
    """Until the projecting daemon has applied every marked row (PostgreSQL with a daemon running)."""
    end = time.monotonic() + seconds
    while ids and time.monotonic() < end:
        with engine.connect() as conn:
            left = conn.execute(select(func.count()).select_from(Journal).where(
                Journal.id.in_(ids[:_CHUNK]), Journal.outcome == Outcome.REQUEUED)).scalar_one()
        if not left:
            ids = ids[_CHUNK:]
            continue
        time.sleep(0.1)


def _outcomes(engine: Engine, ids: list[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    with engine.connect() as conn:
        for i in range(0, len(ids), _CHUNK):
            for outcome, n in conn.execute(select(Journal.outcome, func.count()).where(
                    Journal.id.in_(ids[i:i + _CHUNK])).group_by(Journal.outcome)):
                out[outcome] = out.get(outcome, 0) + int(n)
    return out
