"""Delivery order must not matter: the same messages in any order give the same referral.

Runs the real ingest path (the ACK path's journal group, then the projector) on a real SQLite file,
without sockets, so hypothesis can try many orders quickly. Every message carries an explicit referral
ID (the placer ID or the specialist's alias), which is what makes parking deterministic; see linking.py
for why an unkeyed message that arrives before its referral cannot be placed.
"""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, event, func, select

from refloop.clock import FixedClock
from refloop.config import DatabaseSettings, Settings
from refloop.daemon.ingest import FRAME, Ingestor, Job
from refloop.daemon.projector import Core
from refloop.daemon.replay import replay
from refloop.routes.router import Router
from refloop.routes.table import DEFAULT_ROUTES
from refloop.store import migrate
from refloop.store import referrals as repo
from refloop.store.engine import make_engine
from refloop.store.models import Message as Journal
from refloop.store.models import Referral, ReferralEvent
from tests.samples import mdm_msg, oru_msg, ref_msg, rri_msg, siu_msg

NOW = datetime(2026, 3, 1, tzinfo=UTC)

#: One referral's whole loop, each message with its own occurrence time (a realistic feed never repeats one).
LOOP: tuple[str, ...] = (
    ref_msg("P100", at="20260105090000-0500", cid="C-REF"),
    rri_msg("P100", "A", at="20260106090000-0500", aliases=("SPEC-77",), cid="C-RRI"),
    siu_msg("APT1", at="20260107090000-0500", start="20260112090000-0500", placer="P100", cid="C-S12"),
    siu_msg("APT1", trigger="S26", at="20260112120000-0500", start="20260112090000-0500", status="Noshow",
            placer="SPEC-77", cid="C-S26"),
    siu_msg("APT1", trigger="S13", at="20260113090000-0500", start="20260120090000-0500", placer="SPEC-77",
            cid="C-S13"),
    siu_msg("APT1", trigger="S14", at="20260120100000-0500", start="20260120090000-0500", status="Complete",
            placer="P100", cid="C-S14"),
    mdm_msg("DOC1", at="20260121100000-0500", status="IP", placer="P100", cid="C-T02"),
    mdm_msg("DOC1", trigger="T08", at="20260122100000-0500", status="AU", placer="SPEC-77", cid="C-T08"),
    oru_msg("REP1", at="20260123100000-0500", status="P", placer="P100", cid="C-ORU"),
)


class Harness:
    """The daemon's ingest path on a real SQLite file, minus sockets and the writer thread."""

    def __init__(self, url: str, batch_size: int = 200) -> None:
        self.settings = Settings(database=DatabaseSettings(url=url))
        self.engine: Engine = make_engine(self.settings.database)
        self.clock = FixedClock(NOW)
        self.ingestor = Ingestor(self.settings, Router(DEFAULT_ROUTES), self.clock)
        self.core = Core(self.settings, Router(DEFAULT_ROUTES), self.clock, batch_size=batch_size)

    def journal(self, messages: list[str]) -> list[int]:
        """One group commit of the ACK path; every message must be accepted (AA)."""
        jobs = [self.ingestor.prepare(Job(FRAME, m.encode(), "test", self.clock.now())) for m in messages]
        with self.engine.connect().execution_options(sqlite_begin="IMMEDIATE") as conn, conn.begin():
            results = self.ingestor.journal_group(conn, jobs)
        assert all(r.ack_code == "AA" for r in results), [r.outcome for r in results]
        return [r.message_id or 0 for r in results]

    def send(self, message: str) -> str:
        """Journal one message, let the projector catch up, and return the row's final outcome."""
        (mid,) = self.journal([message])
        self.core.drain(self.engine)
        with self.engine.connect() as conn:
            return str(conn.execute(select(Journal.outcome).where(Journal.id == mid)).scalar_one())

    def state(self, key: str = "P100") -> dict[str, Any]:
        with self.engine.connect() as conn:
            rid = repo.resolve_key(conn, key)
            assert rid is not None
            doc = repo.referral_json(conn, rid, NOW)
            assert doc is not None
            doc["links"] = sorted(doc["links"], key=lambda link: link["control_id"])
            doc.pop("id")  # a database id, which depends on which message created the row
            return doc

    def counts(self) -> tuple[int, int]:
        with self.engine.connect() as conn:
            return (conn.execute(select(func.count()).select_from(Referral)).scalar_one(),
                    conn.execute(select(func.count()).select_from(ReferralEvent)).scalar_one())

    def close(self) -> None:
        self.engine.dispose()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file; each example copies it instead of migrating again."""
    path = tmp_path_factory.mktemp("tpl") / "template.db"
    engine = make_engine(DatabaseSettings(url=f"sqlite:///{path}"))
    migrate.upgrade(engine)
    engine.dispose()
    return path


def fresh(template: Path, directory: Path, name: str, batch_size: int = 200) -> Harness:
    target = directory / f"{name}.db"
    shutil.copy(template, target)
    return Harness(f"sqlite:///{target}", batch_size)


@pytest.fixture(scope="module")
def in_order(template: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    h = fresh(template, tmp_path_factory.mktemp("base"), "base")
    for message in LOOP:
        h.send(message)
    state = h.state()
    h.close()
    return state


def test_in_order_state_is_the_expected_loop(in_order: dict[str, Any]) -> None:
    assert in_order["status"] == "closed"
    assert [a["status"] for a in in_order["appointments"]] == ["completed"]
    assert in_order["appointments"][0]["start"] == "2026-01-20T09:00:00-05:00"
    assert {d["id"]: (d["status"], d["final"]) for d in in_order["documents"]} == {
        "DOC1": ("final", True), "REP1": ("preliminary", False)}
    assert in_order["accepted_at"] == "2026-01-06T14:00:00+00:00"
    assert in_order["note_received_at"] == "2026-01-22T15:00:00+00:00"
    assert len(in_order["timeline"]) == len(LOOP)
    assert {link["matched_by"] for link in in_order["links"]} >= {"referral_id", "explicit:SCH-26.1"}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(order=st.permutations(LOOP))
def test_any_delivery_order_gives_the_in_order_state(
    order: list[str], template: Path, tmp_path: Path, in_order: dict[str, Any]
) -> None:
    h = fresh(template, tmp_path, "perm")
    try:
        for message in order:
            h.send(message)
        state = h.state()
        # How a message was matched may honestly differ: a no-show that arrives before the RRI that
        # introduces its alias is matched by its appointment instead of by the alias. Where it went may not.
        for link in state["links"]:
            assert link["matched_by"] in ("appointment", "document") or link in in_order["links"]
        assert [link["control_id"] for link in state["links"]] == [link["control_id"] for link in in_order["links"]]
        assert {k: v for k, v in state.items() if k != "links"} == {k: v for k, v in in_order.items() if k != "links"}
        with h.engine.connect() as conn:
            assert repo.list_unmatched(conn) == []
    finally:
        h.close()
        (tmp_path / "perm.db").unlink()


def test_resends_change_nothing(template: Path, tmp_path: Path, in_order: dict[str, Any]) -> None:
    """Exact resends are deduplicated by ingest; the same events under new MSH-10s fold to the same state."""
    h = fresh(template, tmp_path, "resend")
    for message in LOOP:
        h.send(message)
    counts = h.counts()
    for message in LOOP:
        assert h.send(message) == "duplicate"
    assert h.counts() == counts
    for message in LOOP:  # the same clinical events again, as an engine that renumbers would send them
        h.send(message.replace("|C-", "|D-", 1))
    state = h.state()
    assert {k: v for k, v in state.items() if k not in ("timeline", "links")} == \
        {k: v for k, v in in_order.items() if k not in ("timeline", "links")}
    assert h.counts()[0] == counts[0]
    h.close()


def test_replay_is_idempotent(template: Path, tmp_path: Path, in_order: dict[str, Any]) -> None:
    h = fresh(template, tmp_path, "replay")
    for message in LOOP:
        h.send(message)
    counts = h.counts()
    summary = replay(h.engine, h.settings, Router(DEFAULT_ROUTES), h.clock)
    assert summary["outcomes"] == {"processed": len(LOOP)}
    assert h.counts() == counts
    assert h.state() == in_order
    h.close()


def test_replay_keeps_a_coordinators_manual_link(template: Path, tmp_path: Path) -> None:
    """A replay re-runs the linking rules, but a coordinator's decision outranks them."""
    h = fresh(template, tmp_path, "manual")
    h.send(ref_msg("M1", mrn="MRN500"))
    h.send(ref_msg("M2", mrn="MRN500", at="20260106090000-0500"))
    h.send(siu_msg("AM", mrn="MRN500", cid="SIU-AM"))
    with h.engine.begin() as conn:
        (entry,) = repo.list_unmatched(conn)
        assert entry["state"] == "review" and [c["placer_id"] for c in entry["candidates"]] == ["M1", "M2"]
        repo.manual_link(conn, entry["message_id"], repo.resolve_key(conn, "M2") or 0, NOW, actor="test")
    before = h.state("M2")
    assert before["status"] == "scheduled"
    replay(h.engine, h.settings, Router(DEFAULT_ROUTES), h.clock)
    assert h.state("M2") == before
    assert h.state("M1")["status"] == "sent"
    with h.engine.connect() as conn:
        assert repo.list_unmatched(conn) == []
    h.close()


def test_unrelated_siu_costs_two_indexed_queries(template: Path, tmp_path: Path) -> None:
    """Most appointments are not referrals: their hot path reads two indexes and writes no referral rows."""
    h = fresh(template, tmp_path, "cheap")
    h.send(ref_msg("U1", mrn="MRN600"))
    statements: list[str] = []

    def count(statement: str) -> None:
        if "referral" in statement:
            statements.append(statement.split()[0])

    # SQLite's own trace hook sees every statement, including those the hot path runs on the raw cursor.
    def trace(dbapi_conn: Any, *_args: Any) -> None:
        dbapi_conn.set_trace_callback(count)

    def untrace(dbapi_conn: Any, *_args: Any) -> None:
        dbapi_conn.set_trace_callback(None)

    event.listen(h.engine, "checkout", trace)
    event.listen(h.engine, "checkin", untrace)
    assert h.send(siu_msg("AU", mrn="MRN601")) == "ignored"
    event.remove(h.engine, "checkout", trace)
    event.remove(h.engine, "checkin", untrace)
    assert statements == ["SELECT", "SELECT"]
    assert h.counts()[0] == 1
    h.close()


#: Three feeds, as three MLLP connections would deliver them: each keeps its own order.
FEEDS: tuple[tuple[str, ...], ...] = (
    (LOOP[0], LOOP[1]),  # the referrer's REF, the specialist's RRI
    (LOOP[2], LOOP[3], LOOP[4], LOOP[5]),  # the scheduler
    (LOOP[6], LOOP[7], LOOP[8]),  # the document system
)


@st.composite
def interleavings(draw: st.DrawFn) -> tuple[list[str], list[int], int]:
    """An interleaving of the feeds (each feed's order kept), cut into group commits, and a batch size."""
    queues = [list(f) for f in FEEDS]
    order: list[str] = []
    while any(queues):
        i = draw(st.sampled_from([n for n, q in enumerate(queues) if q]))
        order.append(queues[i].pop(0))
    cuts = draw(st.lists(st.integers(1, 4), min_size=len(order), max_size=len(order)))
    return order, cuts, draw(st.integers(1, 5))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=interleavings())
def test_groups_and_batches_give_the_one_by_one_state(
    case: tuple[list[str], list[int], int], template: Path, tmp_path: Path
) -> None:
    """However the connections' messages interleave into group commits, and however the projector cuts
    its batches, the final referral state is the one of applying them one by one in journal order."""
    order, cuts, batch = case
    grouped = fresh(template, tmp_path, "grouped", batch_size=batch)
    single = fresh(template, tmp_path, "single")
    try:
        i = 0
        for size in cuts:
            if i >= len(order):
                break
            grouped.journal(order[i:i + size])
            i += size
            if size % 2:  # the projector sometimes catches up between groups, sometimes not
                grouped.core.drain(grouped.engine)
        grouped.core.drain(grouped.engine)
        for message in order:  # the reference: journal order, one message applied at a time
            single.send(message)
        assert grouped.state() == single.state()
        assert grouped.counts() == single.counts()
    finally:
        grouped.close()
        single.close()
        (tmp_path / "grouped.db").unlink()
        (tmp_path / "single.db").unlink()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_connections_interleaved_over_real_sockets(seed: int, template: Path, tmp_path: Path,
                                                   in_order: dict[str, Any]) -> None:
    """The three feeds on three MLLP connections at once (journal mode, random pauses): once the apply lag is
    0, the referral is in the state of applying the messages one by one in order."""
    import random
    import threading
    import time

    from tests.utils import MllpClient, make_settings, msa, running_daemon

    target = tmp_path / "sockets.db"
    shutil.copy(template, target)
    rng = random.Random(seed)
    pauses = [[rng.uniform(0, 0.01) for _ in feed] for feed in FEEDS]
    codes: list[str] = []
    with running_daemon(make_settings(f"sqlite:///{target}", ack_after="journal"), clock=FixedClock(NOW)) as d:
        def feed(n: int) -> None:
            with MllpClient(d.port) as c:
                for message, pause in zip(FEEDS[n], pauses[n], strict=True):
                    time.sleep(pause)
                    codes.append(msa(c.send(message))[0])

        threads = [threading.Thread(target=feed, args=(n,)) for n in range(len(FEEDS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        d.settle()
    assert codes == ["AA"] * len(LOOP)
    h = Harness(f"sqlite:///{target}")
    try:
        state = h.state()
    finally:
        h.close()
    for link in state["links"]:
        assert link["matched_by"] in ("appointment", "document") or link in in_order["links"]
    assert {k: v for k, v in state.items() if k != "links"} == {k: v for k, v in in_order.items() if k != "links"}
