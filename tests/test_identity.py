"""Patient identity as a set: real daemon, real MLLP, SQLite and PostgreSQL, messages written here.

A specialist's systems send their own MRN first and the referrer's identifier as a later repetition, or
typed PI, or (v2.3) in PID-2. Each case must link by the heuristic (same patient by *any* shared
identifier, same referred-to provider), the link must name the authority that matched, a sender limited
to other authorities must not link, and two candidates must go to the review queue.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
from sqlalchemy import select, text

from refloop.config import SenderProfile, Settings
from refloop.patient import hash_id
from refloop.store.models import Message as Journal
from refloop.store.models import MessageIdentifier, Referral, ReferralIdentifier
from tests.samples import mdm_msg, ref_msg, siu_msg
from tests.test_referral_loop import referral, send
from tests.utils import DaemonThread, make_settings, running_daemon


def with_pid(message: str, pid3: str, *, pid2: str = "", version: str = "") -> str:
    """Replace the PID (and MSH-12 when *version* is given) of a sample message."""
    segs = message.split("\r")
    out = []
    for seg in segs:
        if seg.startswith("PID|"):
            seg = f"PID|1|{pid2}|{pid3}||Testperson^Alma||19800101|F"
        elif seg.startswith("MSH|") and version:
            parts = seg.split("|")
            parts[11] = version
            seg = "|".join(parts)
        out.append(seg)
    return "\r".join(out)



def journal(d: DaemonThread, control_id: str) -> tuple[str, str]:
    assert d.server.engine is not None
    with d.server.engine.connect() as conn:
        row = conn.execute(select(Journal.outcome, Journal.detail).where(Journal.control_id == control_id)).one()
    return row.outcome, row.detail


SPEC = SenderProfile(name="spec", sending_application="SCHED")


def settings_with(db_url: str, *profiles: SenderProfile) -> Settings:
    return dataclasses.replace(make_settings(db_url), profiles=(*profiles, SenderProfile()))


@pytest.fixture
def daemon(db_url: str) -> Iterator[DaemonThread]:
    with running_daemon(settings_with(db_url, SPEC)) as d:
        yield d


def test_shared_id_in_a_later_repetition_links(daemon: DaemonThread) -> None:
    send(daemon, with_pid(ref_msg("ID1"), "CL100^^^CLINIC^MR"),
         with_pid(siu_msg("B1", cid="SIU-B1"), "SP900^^^SPEC^MR~CL100^^^CLINIC^MR"))
    body = referral(daemon, "ID1")
    assert body["status"] == "scheduled"
    assert body["links"][-1] == {"control_id": "SIU-B1",
                                 "matched_by": "heuristic:patient@CLINIC+provider_id+provider_name"}


def test_shared_id_typed_pi_links(daemon: DaemonThread) -> None:
    send(daemon, with_pid(ref_msg("ID2"), "CL200^^^CLINIC^MR"),
         with_pid(siu_msg("B2", cid="SIU-B2"), "SP902^^^SPEC^MR~CL200^^^CLINIC^PI"))
    assert referral(daemon, "ID2")["status"] == "scheduled"


def test_v23_pid2_links_and_other_types_do_not(daemon: DaemonThread) -> None:
    send(daemon, with_pid(ref_msg("ID3"), "CL300^^^CLINIC^MR"),
         with_pid(siu_msg("B3x", cid="SIU-B3x"), "SP903^^^SPEC^MR~CL300^^^CLINIC^SS"),  # SS: not an MRN type
         with_pid(siu_msg("B3", cid="SIU-B3"), "SP903^^^SPEC^MR", pid2="CL300^^^CLINIC", version="2.3"))
    assert journal(daemon, "SIU-B3x") == ("ignored", "unrelated")
    body = referral(daemon, "ID3")
    assert body["status"] == "scheduled"
    assert "SIU-B3" in [lk["control_id"] for lk in body["links"]]


def test_pid2_is_not_read_in_v251(daemon: DaemonThread) -> None:
    send(daemon, with_pid(ref_msg("ID4"), "CL400^^^CLINIC^MR"),
         with_pid(siu_msg("B4", cid="SIU-B4"), "SP904^^^SPEC^MR", pid2="CL400^^^CLINIC"))
    assert journal(daemon, "SIU-B4") == ("ignored", "unrelated")
    assert referral(daemon, "ID4")["status"] == "sent"


def test_two_candidates_by_different_identifiers_go_to_review(daemon: DaemonThread) -> None:
    """One referral knows the patient by the clinic MRN, the other by the enterprise ID: a booking carrying
    both identifiers matches both, so a coordinator decides."""
    send(daemon, with_pid(ref_msg("ID5a"), "CL500^^^CLINIC^MR"),
         with_pid(ref_msg("ID5b", facility="OTHERPRAC"), "OT500^^^OTHER^MR~E500^^^EMPI^PE"),
         with_pid(siu_msg("B5", cid="SIU-B5"), "SP905^^^SPEC^MR~E500^^^EMPI^PE~CL500^^^CLINIC^MR"))
    status, queue = daemon.get("/api/unmatched")
    assert status == 200 and [e["control_id"] for e in queue] == ["SIU-B5"]
    assert [(c["placer_id"], c["matched"], c["authority"]) for c in queue[0]["candidates"]] == [
        ("ID5a", ["patient", "provider_id", "provider_name"], "CLINIC"),
        ("ID5b", ["patient", "provider_id", "provider_name"], "EMPI")]
    assert referral(daemon, "ID5a")["status"] == referral(daemon, "ID5b")["status"] == "sent"


def test_authority_outside_the_profile_does_not_link(db_url: str) -> None:
    only_empi = dataclasses.replace(SPEC, patient_id_authorities=("EMPI",))
    with running_daemon(settings_with(db_url, only_empi)) as d:
        send(d, with_pid(ref_msg("ID6"), "CL600^^^CLINIC^MR~E600^^^EMPI^PE"),
             with_pid(siu_msg("B6", cid="SIU-B6"), "SP906^^^SPEC^MR~CL600^^^CLINIC^MR"))
        assert journal(d, "SIU-B6") == ("ignored", "unrelated")
        assert referral(d, "ID6")["status"] == "sent"
        send(d, with_pid(siu_msg("B6b", cid="SIU-B6b"), "SP906^^^SPEC^MR~E600^^^empi^PE"))
        assert referral(d, "ID6")["links"][-1]["matched_by"] == "heuristic:patient@EMPI+provider_id+provider_name"


def test_earlier_booking_is_adopted_through_a_later_repetition(daemon: DaemonThread) -> None:
    send(daemon, with_pid(siu_msg("B7", cid="SIU-B7"), "SP907^^^SPEC^MR~CL700^^^CLINIC^MR"))
    assert journal(daemon, "SIU-B7") == ("ignored", "unrelated")
    send(daemon, with_pid(ref_msg("ID7"), "CL700^^^CLINIC^MR"))
    assert referral(daemon, "ID7")["status"] == "scheduled"
    assert journal(daemon, "SIU-B7")[1].startswith("adopted: referral ")


def test_one_person_key_across_identifiers(daemon: DaemonThread) -> None:
    """Three referrals: by clinic MRN, by enterprise ID, then one carrying both. All three end with one
    person key (the first referral's), so the CMS50 figure counts one patient; identifiers are rows."""
    send(daemon, with_pid(ref_msg("ID8a", specialty="DERM"), "CL800^^^CLINIC^MR"),
         with_pid(ref_msg("ID8b", specialty="ORTH"), "E800^^^EMPI^PE"))
    engine = daemon.server.engine
    assert engine is not None
    with engine.connect() as conn:
        keys = dict(conn.execute(select(Referral.placer_id, Referral.patient_key)).all())
    assert keys["ID8a"] != keys["ID8b"]
    send(daemon, with_pid(ref_msg("ID8c", specialty="NEUR"), "E800^^^EMPI^PE~CL800^^^CLINIC^MR"))
    with engine.connect() as conn:
        keys = dict(conn.execute(select(Referral.placer_id, Referral.patient_key)).all())
        idents = conn.execute(select(ReferralIdentifier.id_hash, ReferralIdentifier.authority)
                              .join(Referral, Referral.id == ReferralIdentifier.referral_id)
                              .where(Referral.placer_id == "ID8c")).all()
    assert keys["ID8a"] == keys["ID8b"] == keys["ID8c"] == hash_id("CL800", "CLINIC")
    assert sorted(idents) == sorted([(hash_id("E800", "EMPI"), "EMPI"), (hash_id("CL800", "CLINIC"), "CLINIC")])
    status, report = daemon.get("/api/report?from=2026-01-01&to=2026-12-31&year=2026&now=2026-06-01T00:00:00Z")
    assert status == 200
    assert report["cms50"]["denominator"] == 1


def test_migration_backfills_identifiers_from_the_journal(db_url: str) -> None:
    """A store at 0009 with one referral whose REF is kept and one whose REF was purged: 0011 re-hashes the
    kept REF (every identifier) and keeps the purged referral's stored key as its only identifier."""
    from refloop.store import migrate
    from refloop.store.engine import make_engine

    engine = make_engine(make_settings(db_url).database)
    try:
        if migrate.current_revision(engine) is None:
            migrate.upgrade(engine, "0009")
        else:  # the PostgreSQL test databases are copies of a migrated template: step back first
            from alembic import command

            cfg = migrate.alembic_config()
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.downgrade(cfg, "0009")
        raw = with_pid(ref_msg("MG1"), "CL900^^^CLINIC^MR~E900^^^EMPI^PE").encode()
        old_key = hash_id("CL901", "CLINIC")
        with engine.begin() as conn:
            at = "2026-01-05 14:00:00.000000" if conn.dialect.name == "sqlite" else "2026-01-05T14:00:00+00:00"
            for mid, body in ((1, raw), (2, None)):
                conn.execute(text(
                    "INSERT INTO messages (id, received_at, peer, raw, size, content_hash, encoding, "
                    "sending_application, sending_facility, message_type, trigger_event, control_id, version, "
                    "processing_id, profile, outcome, ack_code, ack, detail, flags) VALUES (:id, :at, '', :raw, 0, "
                    "'', 'ascii', 'EHR', 'CLINIC', 'REF', 'I12', :cid, '2.5.1', 'P', 'default', 'processed', 'AA', "
                    "'', '', '')"), {"id": mid, "at": at, "raw": body, "cid": f"MG-{mid}"})
            for rid, key in ((1, hash_id("CL900", "CLINIC")), (2, old_key)):
                conn.execute(text("INSERT INTO referrals (id, placer_id, authority, status, priority, referred_to, "
                                  "referred_to_id, referring_provider, specialty, patient_key, flags, no_show_count) "
                                  "VALUES (:id, :p, 'CLINIC', 'sent', '', '', '', '', '', :k, '', 0)"),
                             {"id": rid, "p": f"MG{rid}", "k": key})
                conn.execute(text("INSERT INTO referral_links (message_id, referral_id, state, matched_by, "
                                  "control_id, message_type, candidates) VALUES (:m, :r, 'linked', 'referral_id', "
                                  "'', 'REF^I12', '[]')"), {"m": rid, "r": rid})
        migrate.upgrade(engine)
        with engine.connect() as conn:
            rows = conn.execute(select(ReferralIdentifier.referral_id, ReferralIdentifier.id_hash,
                                       ReferralIdentifier.authority).order_by(ReferralIdentifier.id)).all()
            msg_rows = conn.execute(select(MessageIdentifier.message_id, MessageIdentifier.authority)).all()
        assert sorted(rows) == sorted([(1, hash_id("CL900", "CLINIC"), "CLINIC"), (1, hash_id("E900", "EMPI"), "EMPI"),
                                       (2, old_key, "")])
        assert sorted(msg_rows) == [(1, "CLINIC"), (1, "EMPI")]
    finally:
        engine.dispose()



def test_replay_rewrites_identifier_rows_without_doubling(daemon: DaemonThread, db_url: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """`refloop replay` routes every message again: identifier rows are replaced, never doubled, and the
    links come out the same."""
    from sqlalchemy import func

    from refloop.cli import main as cli_main

    send(daemon, with_pid(ref_msg("ID9"), "CL990^^^CLINIC^MR~E990^^^EMPI^PE"),
         with_pid(siu_msg("B9", cid="SIU-B9"), "SP990^^^SPEC^MR~CL990^^^CLINIC^MR"))
    engine = daemon.server.engine
    assert engine is not None

    def counts() -> tuple[int, int]:
        with engine.connect() as conn:
            return (conn.execute(select(func.count()).select_from(MessageIdentifier)).scalar_one(),
                    conn.execute(select(func.count()).select_from(ReferralIdentifier)).scalar_one())

    before, links = counts(), referral(daemon, "ID9")["links"]
    assert before == (4, 2)
    monkeypatch.setenv("REFLOOP_DATABASE_URL", db_url)
    assert cli_main(["replay"]) == 0
    assert counts() == before
    # (the SIU's explanation reads "appointment" after a replay, because its own earlier events name the
    # appointment: that predates identity sets; the link itself is the same)
    assert [lk["control_id"] for lk in referral(daemon, "ID9")["links"]] == [lk["control_id"] for lk in links]


def test_identifiers_learned_from_an_explicit_link(daemon: DaemonThread) -> None:
    """The specialist's booking names the referral (SCH-26) but carries only their own MRN: the referral
    learns that MRN, so their note without a referral ID links by it. Unlinking the booking takes it back."""
    send(daemon, with_pid(ref_msg("ID10"), "CL1000^^^CLINIC^MR"),
         with_pid(siu_msg("B10", placer="ID10", cid="SIU-B10"), "SP1000^^^HEART^MR"),
         with_pid(mdm_msg("D10", cid="MDM-D10", status="IP"), "SP1000^^^HEART^MR"))
    body = referral(daemon, "ID10")
    assert body["links"][-1] == {"control_id": "MDM-D10",
                                 "matched_by": "heuristic:patient@HEART+provider_id+provider_name"}
    from refloop.store import referrals as repo

    engine = daemon.server.engine
    assert engine is not None
    with engine.begin() as conn:
        mid = conn.execute(select(Journal.id).where(Journal.control_id == "SIU-B10")).scalar_one()
        repo.manual_unlink(conn, mid, daemon.server.clock.now(), actor="test")
    send(daemon, with_pid(mdm_msg("D10b", cid="MDM-D10b", status="IP"), "SP1000^^^HEART^MR"))
    assert journal(daemon, "MDM-D10b") == ("ignored", "unrelated")


def test_nothing_is_learned_outside_the_senders_authorities(db_url: str) -> None:
    only_clinic = dataclasses.replace(SPEC, patient_id_authorities=("CLINIC",))
    docs = SenderProfile(name="docs", sending_application="DOCS", patient_id_authorities=("CLINIC",))
    with running_daemon(settings_with(db_url, only_clinic, docs)) as d:
        send(d, with_pid(ref_msg("ID11"), "CL1100^^^CLINIC^MR"),
             with_pid(siu_msg("B11", placer="ID11", cid="SIU-B11"), "SP1100^^^HEART^MR"),
             with_pid(mdm_msg("D11", cid="MDM-D11", status="IP"), "SP1100^^^HEART^MR"))
        assert referral(d, "ID11")["status"] == "scheduled"
        assert journal(d, "MDM-D11") == ("ignored", "unrelated")
