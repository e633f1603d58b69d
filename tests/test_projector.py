"""The projector behind the journal: back-pressure, failed rows and their replay, one projector per database.

Real daemons on real sockets and databases; the slow and the crashing routes are test-only routes given to
the server, exactly as the default table's routes are.
"""

from __future__ import annotations

import threading
import time

import pytest
from sqlalchemy import select

from refloop.clock import SystemClock
from refloop.daemon.replay import replay
from refloop.message import Message
from refloop.routes.context import HandlerContext, HandlerResult
from refloop.routes.router import Route, Router
from refloop.routes.table import DEFAULT_ROUTES
from refloop.store.models import Message as Journal
from tests import samples
from tests.utils import MllpClient, frame, make_settings, msa, running_daemon, wait_for

SLOW_SECONDS = 0.02
WINDOW = 4


def slow(ctx: HandlerContext, msg: Message) -> HandlerResult:
    """A deliberately slow route: the projector falls behind the journal."""
    time.sleep(SLOW_SECONDS)
    return HandlerResult(detail="slow")


def crash(ctx: HandlerContext, msg: Message) -> HandlerResult:
    raise RuntimeError("a bug in a handler")


def fixed(ctx: HandlerContext, msg: Message) -> HandlerResult:
    return HandlerResult(detail="fixed")


def zmsg(kind: str, cid: str) -> str:
    return samples.msh(kind, "Z01", cid) + "\rPID|1||X1^^^C^MR||Doe^J\r"


def rows(d: object, cids: list[str] | None = None) -> list[tuple[str, str, object]]:
    engine = d.server.engine  # type: ignore[attr-defined]
    stmt = select(Journal.control_id, Journal.outcome, Journal.applied_at).order_by(Journal.id)
    if cids is not None:
        stmt = stmt.where(Journal.control_id.in_(cids))
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(stmt)]


def test_backpressure_pauses_reading_and_drains(sqlite_url: str) -> None:
    """A slow route fills the apply lag to mllp.max_apply_lag: the listener stops reading (the metric and
    /readyz say so), nothing is answered AR or lost, and once the projector catches up everything is applied."""
    limit, senders, each = 12, 4, 20
    routes = (*DEFAULT_ROUTES, Route("ZSL", "Z01", slow, "slow"))
    settings = make_settings(sqlite_url, ack_after="journal", max_apply_lag=limit, max_pending_frames=4)
    codes: list[str] = []
    paused_seen: list[bool] = []
    max_lag = [0]
    with running_daemon(settings, routes=routes) as d:
        def sender(n: int) -> None:
            with MllpClient(d.port, timeout=30) as c:
                cids = [f"BP{n}-{i:03d}" for i in range(each)]
                for w in range(0, each, WINDOW):  # pipelined windows, like a busy engine
                    c.send_raw(b"".join(frame(zmsg("ZSL", cid)) for cid in cids[w:w + WINDOW]))
                    for cid in cids[w:w + WINDOW]:
                        code, echoed = msa(c.read_frame().decode())
                        assert echoed == cid
                        codes.append(code)

        threads = [threading.Thread(target=sender, args=(n,), daemon=True) for n in range(senders)]
        for t in threads:
            t.start()
        end = time.monotonic() + 30
        while any(t.is_alive() for t in threads) and time.monotonic() < end:
            paused_seen.append(d.server.lag_paused)
            max_lag[0] = max(max_lag[0], d.server.projector.lag.messages)
            time.sleep(0.005)
        for t in threads:
            t.join(5)
        assert codes.count("AA") == senders * each, codes
        assert any(paused_seen), "the listener never paused for lag"
        # Frames already read when reading paused are still journaled: at most a window per connection more.
        assert max_lag[0] <= limit + senders * WINDOW, max_lag[0]
        d.settle(30)
        assert not d.server.lag_paused and d.metric("refloop_backpressure") == 0
        assert d.metric("refloop_acks_total", {"code": "AR"}) == 0
        assert sorted(o for _, o, _ in rows(d)) == ["processed"] * (senders * each)
        assert all(applied is not None for _, _, applied in rows(d))


def test_failed_handler_marks_the_row_and_replay_applies_it(sqlite_url: str) -> None:
    """Journal mode: a crashing handler is AA'd (journaled), then marked `failed` (metric) while the rest of
    its batch is applied; after the fix `replay` applies it. Applied mode: the same crash is answered AE 207."""
    routes = (*DEFAULT_ROUTES, Route("ZCR", "Z01", crash, "crash"))
    bad, good = samples.control_id("Z"), samples.control_id("R")
    with running_daemon(make_settings(sqlite_url, ack_after="journal"), routes=routes) as d, \
            MllpClient(d.port) as c:
        c.send_raw(frame(zmsg("ZCR", bad)) + frame(samples.ref(good, referral=f"RF{good}")))
        assert msa(c.read_frame().decode()) == ("AA", bad)
        assert msa(c.read_frame().decode()) == ("AA", good)
        d.settle()
        assert [o for _, o, _ in rows(d, [bad, good])] == ["failed", "processed"]
        assert d.metric("refloop_applied_total", {"outcome": "failed"}) == 1
        status, page = d.get("/worklist?owner=")  # the coordinator sees it, with what to do about it
        assert status == 200 and "1 message could not be applied" in page and "--outcome failed" in page
        settings = d.server.settings
    with running_daemon(make_settings(sqlite_url, ack_after="applied"), routes=routes) as d, \
            MllpClient(d.port) as c:
        again = samples.control_id("Z")
        ack = c.send(zmsg("ZCR", again))
        assert msa(ack) == ("AE", again) and "|207^" in ack
    # The fix ships: replay re-applies through the projector, with the fixed route.
    from refloop.store.engine import make_engine

    engine = make_engine(settings.database)
    try:
        fixed_router = Router((*DEFAULT_ROUTES, Route("ZCR", "Z01", fixed, "crash")))
        only_failed = replay(engine, settings, fixed_router, SystemClock(), outcome="failed")
        assert only_failed["replayed"] == 2 and only_failed["outcomes"] == {"processed": 2}  # the two crashes
        summary = replay(engine, settings, fixed_router, SystemClock())
        with engine.connect() as conn:
            outcome = conn.execute(select(Journal.outcome).where(Journal.control_id == bad)).scalar_one()
    finally:
        engine.dispose()
    assert outcome == "processed"
    assert summary["replayed"] == 3 and summary["outcomes"] == {"processed": 3}


@pytest.mark.postgres
def test_one_projector_per_postgres_database(pg_url: str) -> None:
    """Two daemons on one PostgreSQL database: exactly one holds the projector lock; the other journals and
    acknowledges, and with ack_after = "applied" releases its ACK when the leader has applied the message."""
    with running_daemon(make_settings(pg_url, ack_after="applied")) as a, \
            running_daemon(make_settings(pg_url, ack_after="applied")) as b:
        assert wait_for(lambda: a.server.projector.leader or b.server.projector.leader, 10)
        leaders = [d for d in (a, b) if d.server.projector.leader]
        assert len(leaders) == 1
        follower = b if leaders[0] is a else a
        cid = samples.control_id("R")
        with MllpClient(follower.port) as c:
            assert msa(c.send(samples.ref(cid, referral=f"RF{cid}"))) == ("AA", cid)
        ((_, outcome, applied),) = rows(follower, [cid])
        assert outcome == "processed" and applied is not None


def test_failed_bind_unwinds_the_writer_and_projector_threads(sqlite_url: str) -> None:
    """Start-up acquires its resources on an AsyncExitStack: when the MLLP port is taken, the writer and
    projector threads already started are stopped again and the engine disposed."""
    import asyncio
    import socket

    from refloop.daemon.server import Server

    def ours() -> set[str]:
        return {t.name for t in threading.enumerate() if t.name.startswith(("refloop-writer", "refloop-projector"))}

    before = ours()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        settings = make_settings(sqlite_url)
        settings = type(settings)(mllp=type(settings.mllp)(host="127.0.0.1", port=taken.getsockname()[1]),
                                  http=settings.http, database=settings.database)
        server = Server(settings, environ={})
        with pytest.raises(OSError):
            asyncio.run(server.startup())
    assert wait_for(lambda: ours() == before, 10), ours() - before


def slow_crash(ctx: HandlerContext, msg: Message) -> HandlerResult:
    time.sleep(0.3)
    raise RuntimeError("a bug, found slowly")


def test_applied_mode_resend_of_a_queued_message_gets_the_originals_answer(sqlite_url: str) -> None:
    """ack_after = "applied": a resend that arrives while the original is still waiting for the projector is
    answered when the original is applied, with the same code (here AE 207 from a crashing handler), not AA."""
    routes = (*DEFAULT_ROUTES, Route("ZSC", "Z01", slow_crash, "slow crash"))
    cid = samples.control_id("Z")
    with running_daemon(make_settings(sqlite_url, ack_after="applied"), routes=routes) as d, \
            MllpClient(d.port) as c1, MllpClient(d.port) as c2:
        c1.send_raw(frame(zmsg("ZSC", cid)))
        assert wait_for(lambda: [o for _, o, _ in rows(d, [cid])] == ["queued"], 5)
        c2.send_raw(frame(zmsg("ZSC", cid)))
        first, second = c1.read_frame().decode(), c2.read_frame().decode()
        assert msa(first) == msa(second) == ("AE", cid)
        assert "|207^" in first and "|207^" in second
        assert [o for _, o, _ in rows(d, [cid])] == ["failed", "duplicate"]


@pytest.mark.postgres
def test_replay_on_postgres_is_applied_by_the_projecting_daemon(pg_url: str) -> None:
    """`refloop replay` while a daemon holds the projector lock: it marks the rows and the daemon applies
    them (the command waits for that), with the same states as before."""
    from refloop.store.engine import make_engine

    cid = samples.control_id("R")
    with running_daemon(make_settings(pg_url, ack_after="journal")) as d:
        with MllpClient(d.port) as c:
            assert msa(c.send(samples.ref(cid, referral=f"RF{cid}")))[0] == "AA"
        d.settle()
        assert wait_for(lambda: d.server.projector.leader, 10)
        engine = make_engine(d.server.settings.database)
        try:
            summary = replay(engine, d.server.settings, Router(DEFAULT_ROUTES), SystemClock(), wait_seconds=30)
        finally:
            engine.dispose()
        assert summary == {"replayed": 1, "outcomes": {"processed": 1}}
        ((_, outcome, applied),) = rows(d, [cid])
        assert outcome == "processed" and applied is not None


@pytest.mark.parametrize("mode", ["journal", "applied"])
def test_projector_commits_sync_only_when_the_ack_waits_for_them(sqlite_url: str, mode: str) -> None:
    """Journal mode: the projector's SQLite connection commits with synchronous=NORMAL (the journal's own FULL
    commits sync the WAL it wrote; a lost tail is re-applied from the journal). Applied mode answers AA on
    that commit, so it must be FULL. The writer's connection is FULL in both."""
    with running_daemon(make_settings(sqlite_url, ack_after=mode)) as d, MllpClient(d.port) as c:
        assert msa(c.send(samples.ref()))[0] == "AA"
        d.settle()
        server = d.server

        def level(conn) -> int:  # type: ignore[no-untyped-def]
            return int(conn.connection.cursor().execute("PRAGMA synchronous").fetchone()[0])

        assert level(server.projector._conn) == (1 if mode == "journal" else 2)  # NORMAL = 1, FULL = 2
        assert all(level(w._conn) == 2 for w in server.writers)
