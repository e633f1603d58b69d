"""AA only after COMMIT: storage failures answer AR (ERR 207) and store nothing, resends after recovery are
processed once, and dedup holds across connections and across two daemons sharing one database.

Failures are real: another SQLite connection holding the write lock, the database file renamed away, a
PostgreSQL database that refuses connections. Nothing of refloop is mocked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, text
from sqlalchemy.engine import make_url

from refloop.config import DatabaseSettings
from refloop.store.engine import make_engine
from refloop.store.models import Message as Journal
from tests import samples
from tests.conftest import _pg_admin_url
from tests.utils import MllpClient, err_code, frame, make_settings, msa, running_daemon
from tests.utils import journal_rows as journal

#: A message a handler accepted: its effects (or the decision to have none) are committed, AA.
APPLIED = ("processed", "ignored")


def norm(outcome: str) -> str:
    return "applied" if outcome in APPLIED else outcome


def outcomes(url: str, control_id: str | None = None) -> list[str]:
    """Journal outcomes, oldest first, with processed/ignored both shown as 'applied'."""
    return [norm(r.outcome) for r in journal(url, control_id)]


def sqlite_file(url: str) -> str:
    return url.removeprefix("sqlite:///")


@contextlib.contextmanager
def write_lock(path: str) -> Iterator[sqlite3.Connection]:
    """Another process-level writer holding SQLite's write lock until the block ends."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=5)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield conn
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        conn.close()


# -- every AA is already committed ----------------------------------------------------------------
def test_every_aa_is_visible_to_another_connection(db_url: str) -> None:
    """Right after each AA arrives, a separate database connection already sees the processed row."""
    engine = make_engine(DatabaseSettings(url=db_url))
    try:
        with running_daemon(make_settings(db_url)) as d, MllpClient(d.port) as c:
            for _ in range(20):
                cid = samples.control_id("V")
                assert msa(c.send(samples.siu(cid))) == ("AA", cid)
                with engine.connect() as conn:
                    got = conn.execute(
                        select(Journal.outcome).where(Journal.control_id == cid)).scalars().all()
                assert [norm(o) for o in got] == ["applied"]
    finally:
        engine.dispose()


# -- (a) SQLite write lock held elsewhere ---------------------------------------------------------
def test_sqlite_locked_gives_ar_then_resend_processed_once(sqlite_url: str) -> None:
    """Write lock held by another connection: AR with ERR 207 and nothing journaled; released, the SAME message
    resent is AA and stored exactly once."""
    cid = samples.control_id("A")
    msg = samples.siu(cid)
    with running_daemon(make_settings(sqlite_url, busy_timeout_ms=200)) as d, MllpClient(d.port) as c:
        warm = samples.control_id("A")
        assert msa(c.send(samples.siu(warm))) == ("AA", warm)
        with write_lock(sqlite_file(sqlite_url)):
            ack = c.send(msg)
            assert msa(ack) == ("AR", cid)
            assert err_code(ack) == "207"
            assert d.metric("refloop_database_up") == 0
            assert d.metric("refloop_storage_failures_total") == 1
        assert journal(sqlite_url, cid) == []
        assert msa(c.send(msg)) == ("AA", cid)
        assert d.metric("refloop_database_up") == 1
        assert d.metric("refloop_duplicates_suppressed_total") == 0
    rows = journal(sqlite_url, cid)
    assert [(norm(r.outcome), r.ack_code) for r in rows] == [("applied", "AA")]


def test_sqlite_locked_enhanced_mode_gives_ce(sqlite_url: str) -> None:
    """With MSH-15 = AL (enhanced mode) our own storage failure is CE 207 (retryable), never CA."""
    cid = samples.control_id("A")
    msg = samples.siu(cid, accept="AL")
    with running_daemon(make_settings(sqlite_url, busy_timeout_ms=200)) as d, MllpClient(d.port) as c:
        warm = samples.control_id("A")
        assert msa(c.send(samples.siu(warm)))[0] == "AA"
        with write_lock(sqlite_file(sqlite_url)):
            ack = c.send(msg)
            assert msa(ack) == ("CE", cid)
            assert err_code(ack) == "207"
        assert msa(c.send(msg)) == ("CA", cid)
    assert outcomes(sqlite_url, cid) == ["applied"]


# -- (b) SQLite file renamed away -----------------------------------------------------------------
def test_sqlite_file_renamed_away_and_back(sqlite_url: str) -> None:
    """Database file renamed away: AR 207 and nothing written anywhere; renamed back: AA, stored once."""
    path = sqlite_file(sqlite_url)
    away = path + ".away"
    cid = samples.control_id("B")
    msg = samples.ref(cid)
    with running_daemon(make_settings(sqlite_url)) as d, MllpClient(d.port) as c:
        warm = samples.control_id("B")
        assert msa(c.send(samples.siu(warm))) == ("AA", warm)
        os.rename(path, away)
        try:
            ack = c.send(msg)
            assert msa(ack) == ("AR", cid)
            assert err_code(ack) == "207"
            assert not os.path.exists(path)  # no fresh empty database was created in its place
            assert d.metric("refloop_database_up") == 0
        finally:
            os.rename(away, path)
        assert journal(sqlite_url, cid) == []
        assert msa(c.send(msg)) == ("AA", cid)
        other = samples.control_id("B")
        assert msa(c.send(samples.siu(other))) == ("AA", other)
        assert d.metric("refloop_database_up") == 1
    assert outcomes(sqlite_url, cid) == ["applied"]
    assert outcomes(sqlite_url) == ["applied"] * 3


# -- (c) PostgreSQL refuses connections -----------------------------------------------------------
@pytest.mark.postgres
def test_postgres_refusing_connections_then_back(pg_url: str) -> None:
    """PostgreSQL refuses connections and the daemon's sessions are killed: AR 207, refloop_database_up 0;
    allowed again: the next message is AA without a restart and the gauge is back to 1."""
    admin_url = _pg_admin_url()
    assert admin_url is not None
    name = make_url(pg_url).database
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT")

    def allow(flag: bool) -> None:
        with admin.connect() as conn:
            conn.execute(text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"true" if flag else "false"}'))
            if not flag:
                conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                  "WHERE datname = :n AND pid <> pg_backend_pid()"), {"n": name})

    down_cid = samples.control_id("P")
    try:
        with running_daemon(make_settings(pg_url)) as d, MllpClient(d.port) as c:
            warm = samples.control_id("P")
            assert msa(c.send(samples.siu(warm))) == ("AA", warm)
            assert d.metric("refloop_database_up") == 1
            allow(False)
            for _ in range(3):
                ack = c.send(samples.siu(down_cid))
                assert msa(ack) == ("AR", down_cid)
                assert err_code(ack) == "207"
            assert d.metric("refloop_database_up") == 0
            assert d.metric("refloop_acks_total", {"code": "AA"}) == 1
            status, body = d.get("/readyz")
            assert status == 503 and body["database"] is False
            allow(True)
            nxt = samples.control_id("P")
            assert msa(c.send(samples.siu(nxt))) == ("AA", nxt)
            assert d.metric("refloop_database_up") == 1
            assert msa(c.send(samples.siu(down_cid))) == ("AA", down_cid)  # the resend is processed once
    finally:
        allow(True)
        admin.dispose()
    assert outcomes(pg_url, down_cid) == ["applied"]
    assert outcomes(pg_url) == ["applied"] * 3


# -- (d) dedup across connections and daemons -----------------------------------------------------
def test_same_message_on_two_connections(db_url: str) -> None:
    """The same message on two connections: one processed row, one duplicate, the same MSA-1 on both."""
    cid = samples.control_id("D")
    msg = samples.siu(cid)
    with running_daemon(make_settings(db_url)) as d, MllpClient(d.port) as a, MllpClient(d.port) as b:
        ack_a, ack_b = a.send(msg), b.send(msg)
        assert msa(ack_a) == msa(ack_b) == ("AA", cid)
        assert d.metric("refloop_duplicates_suppressed_total") == 1
    rows = journal(db_url, cid)
    assert [norm(r.outcome) for r in rows] == ["applied", "duplicate"]
    assert rows[1].duplicate_of == rows[0].id


def test_same_message_on_two_connections_at_once(db_url: str) -> None:
    """The same message written on 8 connections in the same instant: exactly one applied. On SQLite they
    meet in one group commit; on PostgreSQL the connections are spread over 4 writers, whose transactions
    race on the dedup key (the losers redo the message as a duplicate)."""
    cid = samples.control_id("D")
    msg = samples.siu(cid)
    with running_daemon(make_settings(db_url)) as d:
        assert len(d.server.writers) == (1 if db_url.startswith("sqlite") else 4)
        clients = [MllpClient(d.port) for _ in range(8)]
        try:
            for c in clients:
                c.send_raw(frame(msg))
            acks = [msa(c.read_frame().decode("latin-1")) for c in clients]
        finally:
            for c in clients:
                c.close()
    assert acks == [("AA", cid)] * 8
    assert Counter(outcomes(db_url, cid)) == {"applied": 1, "duplicate": 7}


@pytest.mark.postgres
def test_two_daemons_one_postgres_sequential(pg_url: str) -> None:
    """Daemon A applies a message; the same bytes sent to daemon B get the same code and a duplicate row."""
    one, two, bad = samples.control_id("T"), samples.control_id("T"), samples.control_id("T")
    msg_one = samples.siu(one)
    msg_two = samples.ref(two, referral=f"RF{two}")
    msg_bad = samples.mdm(bad)  # whatever A answers (AA or AE), B must replay the same code
    with (running_daemon(make_settings(pg_url)) as a, running_daemon(make_settings(pg_url)) as b,
          MllpClient(a.port) as ca, MllpClient(b.port) as cb):
        assert msa(ca.send(msg_one)) == ("AA", one)
        assert msa(cb.send(msg_one)) == ("AA", one)
        assert b.metric("refloop_duplicates_suppressed_total") == 1
        assert a.metric("refloop_duplicates_suppressed_total") == 0
        # and the other way round
        assert msa(cb.send(msg_two)) == ("AA", two)
        assert msa(ca.send(msg_two)) == ("AA", two)
        first, again = ca.send(msg_bad), cb.send(msg_bad)
        assert msa(first) == msa(again)
        assert err_code(first) == err_code(again)
    for cid in (one, two, bad):
        rows = journal(pg_url, cid)
        assert [norm(r.outcome) if r.outcome != "error" else "applied" for r in rows] == ["applied", "duplicate"]
        assert rows[1].duplicate_of == rows[0].id


def test_two_daemons_same_messages_concurrently(db_url: str) -> None:
    """Two daemons on one database get the same 50 messages at the same moment from two threads: every send is
    answered AA and exactly one copy of each is applied, the other journaled as duplicate."""
    cids = [samples.control_id("R") for _ in range(50)]
    msgs = [samples.siu(cid, trigger="S12" if i % 2 else "S14") for i, cid in enumerate(cids)]
    barrier = threading.Barrier(2, timeout=20)
    results: dict[str, list[tuple[str, str]]] = {"a": [], "b": []}
    errors: list[BaseException] = []

    def sender(port: int, key: str) -> None:
        try:
            with MllpClient(port) as c:
                for m in msgs:
                    barrier.wait()
                    results[key].append(msa(c.send(m)))
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    with running_daemon(make_settings(db_url)) as a, running_daemon(make_settings(db_url)) as b:
        threads = [threading.Thread(target=sender, args=(a.port, "a")),
                   threading.Thread(target=sender, args=(b.port, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        dups = a.metric("refloop_duplicates_suppressed_total") + b.metric("refloop_duplicates_suppressed_total")
    assert not errors, errors
    assert results["a"] == results["b"] == [("AA", cid) for cid in cids]
    per_cid: dict[str, Counter[str]] = {}
    for r in journal(db_url):
        per_cid.setdefault(r.control_id, Counter())[norm(r.outcome)] += 1
    bad = {cid: dict(c) for cid, c in per_cid.items() if c != Counter({"applied": 1, "duplicate": 1})}
    assert not bad, f"control IDs not applied exactly once: {bad}"
    assert set(per_cid) == set(cids)
    assert dups == len(cids)


@pytest.mark.postgres
def test_two_daemons_first_messages_of_a_new_referral_concurrently(pg_url: str) -> None:
    """Two daemons on one PostgreSQL get, at the same moment, two different REFs for a referral neither has seen
    (I12 on A, I13 on B): both are valid, so both must be AA and both applied to one referral row."""
    barrier = threading.Barrier(2, timeout=20)
    answers: dict[str, list[tuple[str, str]]] = {"a": [], "b": []}
    errors: list[BaseException] = []
    rounds = [(samples.control_id("Q"), samples.control_id("Q"), f"NEW{i:03d}") for i in range(5)]

    def sender(port: int, key: str) -> None:
        try:
            with MllpClient(port) as c:
                for cid_a, cid_b, referral in rounds:
                    msg = (samples.ref(cid_a, referral=referral) if key == "a"
                           else samples.ref(cid_b, referral=referral, trigger="I13"))
                    barrier.wait()
                    answers[key].append(msa(c.send(msg)))
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    with running_daemon(make_settings(pg_url)) as a, running_daemon(make_settings(pg_url)) as b:
        threads = [threading.Thread(target=sender, args=(a.port, "a")),
                   threading.Thread(target=sender, args=(b.port, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        failures = a.metric("refloop_storage_failures_total") + b.metric("refloop_storage_failures_total")
    assert not errors, errors
    assert failures == 0, f"{failures} group commit(s) failed: {answers}"
    assert answers["a"] == [("AA", r[0]) for r in rounds]
    assert answers["b"] == [("AA", r[1]) for r in rounds]
    engine = make_engine(DatabaseSettings(url=pg_url))
    try:
        with engine.connect() as conn:
            n = conn.execute(text("SELECT count(*) FROM referrals WHERE placer_id LIKE 'NEW%'")).scalar_one()
    finally:
        engine.dispose()
    assert n == len(rounds)


# -- (e) control ID reused with other content -----------------------------------------------------
def test_control_id_reused_with_different_content(db_url: str) -> None:
    """Same MSH-10 with different content is processed as new and flagged control_id_reused; an exact resend
    of either version is a duplicate of that version."""
    cid = samples.control_id("E")
    first, second = samples.ref(cid, referral="R1001"), samples.ref(cid, referral="R2002")
    with running_daemon(make_settings(db_url)) as d, MllpClient(d.port) as c:
        assert msa(c.send(first)) == ("AA", cid)
        assert msa(c.send(second)) == ("AA", cid)
        assert msa(c.send(second)) == ("AA", cid)
        assert msa(c.send(first)) == ("AA", cid)
        assert d.metric("refloop_control_id_reused_total") == 1
        assert d.metric("refloop_duplicates_suppressed_total") == 2
    rows = journal(db_url, cid)
    assert [(norm(r.outcome), r.flags) for r in rows] == [
        ("applied", ""), ("applied", "control_id_reused"), ("duplicate", ""), ("duplicate", "")]
    assert rows[2].duplicate_of == rows[1].id
    assert rows[3].duplicate_of == rows[0].id


def test_crlf_resend_is_the_same_message(sqlite_url: str) -> None:
    """A resend whose segments end in CRLF instead of CR (another engine on the path) is a duplicate, not new."""
    cid = samples.control_id("E")
    msg = samples.siu(cid)
    with running_daemon(make_settings(sqlite_url)) as d, MllpClient(d.port) as c:
        assert msa(c.send(msg)) == ("AA", cid)
        assert msa(c.send(msg.replace("\r", "\r\n"))) == ("AA", cid)
    assert outcomes(sqlite_url, cid) == ["applied", "duplicate"]


def test_rejected_message_is_not_a_dedup_key(sqlite_url: str) -> None:
    """An AR for a protocol reject (wrong version) claims no key: the same message later is rejected again,
    not replayed as a duplicate, and a corrected message with the same MSH-10 is processed."""
    cid = samples.control_id("E")
    bad = samples.siu(cid, version="2.1")
    with running_daemon(make_settings(sqlite_url)) as d, MllpClient(d.port) as c:
        ack = c.send(bad)
        assert msa(ack) == ("AR", cid) and err_code(ack) == "203"
        assert msa(c.send(bad)) == ("AR", cid)
        assert msa(c.send(samples.siu(cid))) == ("AA", cid)
        assert d.metric("refloop_duplicates_suppressed_total") == 0
    assert outcomes(sqlite_url, cid) == ["rejected", "rejected", "applied"]


def test_database_lock_during_pipelined_burst(sqlite_url: str, tmp_path: Path) -> None:
    """A burst pipelined while the write lock is held elsewhere: every frame gets AR or AA, never AA without a
    row; after the lock goes, resending the AR'd ones stores each exactly once."""
    cids = [samples.control_id("L") for _ in range(10)]
    msgs = {cid: samples.siu(cid) for cid in cids}
    with running_daemon(make_settings(sqlite_url, busy_timeout_ms=200)) as d, MllpClient(d.port) as c:
        warm = samples.control_id("L")
        assert msa(c.send(samples.siu(warm)))[0] == "AA"
        with write_lock(sqlite_file(sqlite_url)):
            c.send_raw(b"".join(frame(m) for m in msgs.values()))
            acks = [msa(c.read_frame().decode("latin-1")) for _ in cids]
        assert [a[1] for a in acks] == cids
        assert {a[0] for a in acks} == {"AR"}
        assert [r.control_id for r in journal(sqlite_url)] == [warm]
        for cid in cids:
            assert msa(c.send(msgs[cid])) == ("AA", cid)
    assert Counter(outcomes(sqlite_url)) == {"applied": 11}


@pytest.mark.postgres
def test_writers_keep_each_connections_order(pg_url: str) -> None:
    """With several writers, each connection's pipelined frames are still applied and answered in order: a
    referral booked, reported as a no-show and rebooked on one connection ends ``scheduled``, on every one
    of 6 connections sending at once."""
    settings = make_settings(pg_url)
    with running_daemon(dataclasses.replace(settings, database=dataclasses.replace(settings.database, writers=3))) as d:
        assert len(d.server.writers) == 3
        clients = [MllpClient(d.port) for _ in range(6)]
        try:
            sent: list[list[str]] = []
            for n, c in enumerate(clients):
                key, appt = f"ORD{n}", f"APT-ORD{n}"
                cids = [samples.control_id("O") for _ in range(4)]
                msgs = [samples.ref_msg(key, cid=cids[0]),
                        samples.siu_msg(appt, placer=key, at="20260107090000-0500", cid=cids[1]),
                        samples.siu_msg(appt, placer=key, trigger="S26", status="Noshow", at="20260112100000-0500",
                                        cid=cids[2]),
                        samples.siu_msg(appt, placer=key, trigger="S13", at="20260113090000-0500",
                                        start="20260120090000-0500", cid=cids[3])]
                sent.append(cids)
                c.send_raw(b"".join(frame(m) for m in msgs))  # pipelined: all four before any ACK
            acks = [[msa(c.read_frame().decode("latin-1")) for _ in range(4)] for c in clients]
        finally:
            for c in clients:
                c.close()
        assert acks == [[("AA", cid) for cid in cids] for cids in sent]
        for n in range(6):
            assert d.get(f"/api/referrals/ORD{n}")[1]["status"] == "scheduled"


def _writes_then_raises(ctx, msg):  # type: ignore[no-untyped-def]
    """A buggy handler that gets as far as writing (its journal row, a referral event) before it raises."""
    from refloop.routes import ref

    ref.handle_ref(ctx, msg)
    raise RuntimeError("bug after the writes")


def test_failing_handler_is_undone_alone_and_in_a_group(db_url: str) -> None:
    """A handler that raises after writing: its writes are rolled back and the message is journaled once,
    as failed, with AE. Alone on a connection (a group of one runs without a savepoint, so the whole
    transaction is redone) and beside good messages in one group (only its savepoint is rolled back)."""
    from refloop.routes.router import Route
    from refloop.routes.table import DEFAULT_ROUTES
    from refloop.store.models import Referral

    routes = (Route("REF", "I14", _writes_then_raises, "buggy"), *DEFAULT_ROUTES)
    lone = samples.control_id("F")
    group = [samples.control_id("F") for _ in range(6)]
    with running_daemon(make_settings(db_url), routes=routes) as d:
        with MllpClient(d.port) as c:
            assert msa(c.send(samples.ref(lone, referral="BUG1", trigger="I14")))[0] == "AE"
        clients = [MllpClient(d.port) for _ in group]
        try:
            for n, (c, cid) in enumerate(zip(clients, group, strict=True)):
                trigger = "I14" if n % 2 else "I12"
                c.send_raw(frame(samples.ref(cid, referral=f"BUG{cid}", trigger=trigger)))
            codes = [msa(c.read_frame().decode("latin-1"))[0] for c in clients]
        finally:
            for c in clients:
                c.close()
    assert codes == ["AA", "AE"] * 3
    for cid, expect in [(lone, "failed"), *zip(group, ["applied", "failed"] * 3, strict=True)]:
        assert [norm(r.outcome) for r in journal(db_url, cid)] == [expect]
    engine = make_engine(DatabaseSettings(url=db_url))
    try:
        with engine.connect() as conn:
            keys = set(conn.execute(select(Referral.placer_id)).scalars())
    finally:
        engine.dispose()
    assert keys == {f"BUG{cid}" for cid in group[0::2]}  # the failing messages' referrals are gone
