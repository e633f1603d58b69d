"""python-hl7 (PyPI ``hl7``) as a real third-party MLLP client against a running daemon.

The client side is python-hl7's own asyncio transport (``hl7.mllp.open_hl7_connection``), run with
``asyncio.run`` inside the test; its ACKs are read back and parsed with ``hl7.parse``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import hl7
import hl7.mllp
from sqlalchemy import select

from refloop.config import DatabaseSettings
from refloop.store.engine import make_engine
from refloop.store.models import Message as Journal
from tests import samples
from tests.utils import make_settings, running_daemon

TIMEOUT = 15.0


def journal(url: str) -> list[Any]:
    """Journal rows, oldest first, read straight from the database."""
    engine = make_engine(DatabaseSettings(url=url))
    try:
        with engine.connect() as conn:
            return list(conn.execute(select(Journal.__table__).order_by(Journal.id)).all())
    finally:
        engine.dispose()


def field(msg: hl7.Message, segment: str, n: int) -> str:
    return str(msg.segment(segment)[n])


async def lockstep(port: int, messages: list[str], encoding: str | None = None) -> list[hl7.Message]:
    """Send each message and wait for its ACK before the next, as an interface engine does."""
    reader, writer = await asyncio.wait_for(
        hl7.mllp.open_hl7_connection("127.0.0.1", port, encoding=encoding), TIMEOUT)
    acks = []
    try:
        for text in messages:
            writer.writemessage(hl7.parse(text))
            await asyncio.wait_for(writer.drain(), TIMEOUT)
            block = await asyncio.wait_for(reader.readblock(), TIMEOUT)
            acks.append(hl7.parse(block.decode(encoding or "ascii")))
    finally:
        writer.close()
        await writer.wait_closed()
    return acks


async def pipelined(port: int, messages: list[str]) -> list[hl7.Message]:
    """Write every message first, then read one ACK per message with python-hl7's readmessage()."""
    reader, writer = await asyncio.wait_for(hl7.mllp.open_hl7_connection("127.0.0.1", port), TIMEOUT)
    try:
        for text in messages:
            writer.writemessage(text)
        await asyncio.wait_for(writer.drain(), TIMEOUT)
        return [await asyncio.wait_for(reader.readmessage(), TIMEOUT) for _ in messages]
    finally:
        writer.close()
        await writer.wait_closed()


def test_python_hl7_lockstep_referral_messages(db_url: str) -> None:
    """python-hl7 sends REF, SIU and MDM lock-step; each ACK parses with hl7.parse: AA, MSA-2 = sent MSH-10."""
    msgs = [samples.ref(referral="PEER1"), samples.siu(), samples.siu(trigger="S14"), samples.ref(referral="PEER2")]
    with running_daemon(make_settings(db_url)) as d:
        acks = asyncio.run(lockstep(d.port, msgs))
    sent_ids = [field(hl7.parse(m), "MSH", 10) for m in msgs]
    assert [(field(a, "MSA", 1), field(a, "MSA", 2)) for a in acks] == [("AA", cid) for cid in sent_ids]
    for ack, text in zip(acks, msgs, strict=True):
        sent = hl7.parse(text)
        assert str(ack.segment("MSH")[9][0][0]) == "ACK"
        # the ACK is addressed back to the sender: MSH-5/6 of the ACK are the sender's MSH-3/4
        assert field(ack, "MSH", 5) == field(sent, "MSH", 3)
        assert field(ack, "MSH", 6) == field(sent, "MSH", 4)
    rows = journal(db_url)
    assert [(r.control_id, r.outcome in ("processed", "ignored")) for r in rows] == [(cid, True) for cid in sent_ids]


def test_python_hl7_pipelined_acks_in_order(sqlite_url: str) -> None:
    """python-hl7 writes ten messages back to back and reads ten ACKs with readmessage(), in the order sent."""
    cids = [samples.control_id("Y") for _ in range(10)]
    with running_daemon(make_settings(sqlite_url)) as d:
        acks = asyncio.run(pipelined(d.port, [samples.siu(cid) for cid in cids]))
    assert [(field(a, "MSA", 1), field(a, "MSA", 2)) for a in acks] == [("AA", cid) for cid in cids]


def test_python_hl7_utf8_message(sqlite_url: str) -> None:
    """python-hl7 with encoding='utf-8' sends a non-ASCII name (MSH-18 empty): AA, stored byte for byte."""
    cid = samples.control_id("Y")
    text = samples.siu(cid, patient="Øster^Zoë")
    with running_daemon(make_settings(sqlite_url)) as d:
        acks = asyncio.run(lockstep(d.port, [text], encoding="utf-8"))
    assert (field(acks[0], "MSA", 1), field(acks[0], "MSA", 2)) == ("AA", cid)
    assert bytes(journal(sqlite_url)[0].raw) == text.encode("utf-8")


def test_python_hl7_resend_is_duplicate(sqlite_url: str) -> None:
    """A message resent by python-hl7 on a new connection gets the same AA and is journaled as a duplicate."""
    cid = samples.control_id("Y")
    text = samples.ref(cid)
    with running_daemon(make_settings(sqlite_url)) as d:
        first = asyncio.run(lockstep(d.port, [text]))
        second = asyncio.run(lockstep(d.port, [text]))
        assert d.metric("refloop_duplicates_suppressed_total") == 1
    assert field(first[0], "MSA", 1) == field(second[0], "MSA", 1) == "AA"
    assert field(second[0], "MSA", 2) == cid
    rows = journal(sqlite_url)
    assert [r.outcome for r in rows][1:] == ["duplicate"]
    assert rows[0].outcome in ("processed", "ignored")
    assert rows[1].duplicate_of == rows[0].id
