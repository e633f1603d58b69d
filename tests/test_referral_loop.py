"""The referral loop end to end: real MLLP sockets into a real daemon on SQLite and PostgreSQL.

One test per path through the loop. Messages come from ``tests/samples.py`` (invented patients); state
is read back through the daemon's HTTP API, the same JSON other tools consume.
"""

from __future__ import annotations

import dataclasses
import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select

from refloop.cli import main as cli_main
from refloop.config import SenderProfile, Settings
from refloop.store.models import Message as Journal
from refloop.store.models import Referral
from tests.samples import mdm_msg, omg_msg, oru_msg, ref_msg, rri_msg, siu_msg
from tests.utils import DaemonThread, MllpClient, make_settings, msa, running_daemon


@pytest.fixture
def daemon(db_url: str) -> Iterator[DaemonThread]:
    with running_daemon(make_settings(db_url)) as d:
        yield d


def send(d: DaemonThread, *messages: str) -> None:
    with MllpClient(d.port) as client:
        for message in messages:
            code, _ = msa(client.send(message))
            assert code == "AA"


def referral(d: DaemonThread, key: str) -> dict[str, Any]:
    status, body = d.get(f"/api/referrals/{key}")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


def post(d: DaemonThread, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    req = urllib.request.Request(f"http://127.0.0.1:{d.http_port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def journal(d: DaemonThread, control_id: str) -> Any:
    assert d.server.engine is not None
    with d.server.engine.connect() as conn:
        return conn.execute(select(Journal.outcome, Journal.detail).where(Journal.control_id == control_id)).one()


def test_booked_completed_note_closed(daemon: DaemonThread) -> None:
    send(daemon, ref_msg("L1"), siu_msg("A1", placer="L1"))
    assert referral(daemon, "L1")["status"] == "scheduled"
    send(daemon, siu_msg("A1", trigger="S14", at="20260112100000-0500", status="Complete", placer="L1"))
    assert referral(daemon, "L1")["status"] == "completed"
    send(daemon, mdm_msg("N1", placer="L1", at="20260113100000-0500"))
    body = referral(daemon, "L1")
    assert set(body) == {
        "id", "placer_id", "status", "x360_state", "priority", "referred_to", "referring_provider", "sent_at",
        "accepted_at", "scheduled_at", "appointment_at", "completed_at", "note_received_at", "closed_at",
        "appointments", "documents", "timeline", "links", "flags",
    }
    assert body["status"] == "closed"
    assert body["placer_id"] == "L1" and body["priority"] == "R"
    assert body["referred_to"] == "Heartwell, Hana" and body["referring_provider"] == "Goodfellow, Gale"
    assert body["sent_at"] == "2026-01-05T14:00:00+00:00"
    assert body["appointment_at"] == body["completed_at"] == "2026-01-12T09:00:00-05:00"
    assert body["note_received_at"] == body["closed_at"] == "2026-01-13T15:00:00+00:00"
    assert body["appointments"] == [
        {"appointment_id": "A1", "status": "completed", "start": "2026-01-12T09:00:00-05:00"}]
    assert body["documents"] == [{"id": "N1", "type": "CN", "status": "final", "final": True}]
    assert [t["event"] for t in body["timeline"]] == [
        "referral_created", "appointment_booked", "appointment_completed", "note_received"]
    assert [link["matched_by"] for link in body["links"]] == [
        "referral_id", "explicit:SCH-26.1", "explicit:SCH-26.1", "explicit:TXA-14.1"]
    status, rows = daemon.get("/api/referrals?status=closed")
    assert status == 200 and [r["placer_id"] for r in rows] == ["L1"]


def test_no_show_then_rebooked(daemon: DaemonThread) -> None:
    send(daemon, ref_msg("L2"), siu_msg("A2", placer="L2"),
         siu_msg("A2", trigger="S26", at="20260112120000-0500", status="Noshow", placer="L2"))
    assert referral(daemon, "L2")["status"] == "no_show"
    send(daemon, siu_msg("A2", trigger="S13", at="20260113090000-0500", start="20260119090000-0500", placer="L2"))
    body = referral(daemon, "L2")
    assert body["status"] == "scheduled"
    assert body["appointments"] == [{"appointment_id": "A2", "status": "booked", "start": "2026-01-19T09:00:00-05:00"}]


def test_appointment_cancelled(daemon: DaemonThread) -> None:
    send(daemon, ref_msg("L3"), siu_msg("A3", placer="L3"),
         siu_msg("A3", trigger="S15", at="20260108090000-0500", status="Cancelled", placer="L3"))
    body = referral(daemon, "L3")
    assert body["status"] == "sent"
    assert body["scheduled_at"] == "2026-01-07T14:00:00+00:00"  # it *was* scheduled
    assert body["appointments"][0]["status"] == "cancelled"


def test_declined_by_the_specialist(daemon: DaemonThread) -> None:
    send(daemon, ref_msg("L4"), rri_msg("L4", "R", aliases=("SP-4",)))
    body = referral(daemon, "L4")
    assert body["status"] == "declined" and body["accepted_at"] is None
    assert referral(daemon, "SP-4")["id"] == body["id"]  # RF1-11 became an alias


def test_preliminary_then_final_note(daemon: DaemonThread) -> None:
    send(daemon, ref_msg("L5"), mdm_msg("N5", status="IP", placer="L5"))
    body = referral(daemon, "L5")
    assert body["status"] == "sent"
    assert body["documents"] == [{"id": "N5", "type": "CN", "status": "preliminary", "final": False}]
    send(daemon, mdm_msg("N5", trigger="T08", status="AU", placer="L5", at="20260114100000-0500"))
    body = referral(daemon, "L5")
    assert body["status"] == "closed"
    assert body["documents"][0]["final"] is True
    assert body["note_received_at"] == "2026-01-14T15:00:00+00:00"


def test_retracted_note_reopens(daemon: DaemonThread) -> None:
    send(daemon, ref_msg("L6"), siu_msg("A6", placer="L6"),
         siu_msg("A6", trigger="S14", at="20260112100000-0500", status="Complete", placer="L6"),
         oru_msg("N6", placer="L6", pdf=b"%PDF-1.4 invented report"))
    assert referral(daemon, "L6")["status"] == "closed"
    send(daemon, mdm_msg("N6x", trigger="T02", placer="L6", at="20260113110000-0500", status="IP"))
    send(daemon, mdm_msg("N6x", trigger="T11", placer="L6", at="20260113120000-0500"))
    send(daemon, oru_msg("N6", placer="L6", status="X", at="20260114100000-0500"))
    body = referral(daemon, "L6")
    assert body["status"] == "completed" and body["closed_at"] is None
    assert {d["id"]: d["status"] for d in body["documents"]} == {"N6": "retracted", "N6x": "retracted"}


def test_heuristic_link_by_patient_and_provider(daemon: DaemonThread) -> None:
    send(daemon, ref_msg("L7", mrn="MRN700"), siu_msg("A7", mrn="MRN700"))
    body = referral(daemon, "L7")
    assert body["status"] == "scheduled"
    assert body["links"][-1]["matched_by"] == "heuristic:patient@CLINIC+provider_id+provider_name"


def test_booking_before_its_referral_is_adopted(daemon: DaemonThread) -> None:
    """The specialist booked from a faxed referral before the REF crossed the interface: the SIU carries no
    referral ID and is unrelated when it arrives; the REF adopts it by the linking rules (same patient and
    referred-to provider), so the referral is scheduled, not a false stall."""
    send(daemon, siu_msg("A9", mrn="MRN900", cid="SIU-A9"), siu_msg("A9x", mrn="MRN900", provider_id="9999",
                                                                    provider="Otherdoc^Olga", cid="SIU-A9x"))
    assert journal(daemon, "SIU-A9") == ("ignored", "unrelated")
    send(daemon, ref_msg("L9", mrn="MRN900", cid="REF-L9"))
    body = referral(daemon, "L9")
    assert body["status"] == "scheduled"
    assert [(lk["control_id"], lk["matched_by"]) for lk in body["links"]] == [
        ("SIU-A9", "heuristic:patient@CLINIC+provider_id+provider_name"), ("REF-L9", "referral_id")]
    outcome, detail = journal(daemon, "SIU-A9")
    assert outcome == "processed" and detail.startswith("adopted: referral ")
    assert journal(daemon, "SIU-A9x") == ("ignored", "unrelated")  # another provider's appointment: not ours
    assert journal(daemon, "REF-L9")[1].endswith("adopted 1 earlier")
    # In the other order the same messages give the same referral.
    send(daemon, ref_msg("L9b", mrn="MRN901"), siu_msg("A9b", mrn="MRN901"))
    other = referral(daemon, "L9b")
    assert (other["status"], other["appointment_at"]) == (body["status"], body["appointment_at"])


def test_adoption_looks_back_only_as_far_as_the_profile_says(db_url: str) -> None:
    """``adopt_earlier_days``: a booking older than the window, or any booking with the window at 0, stays
    unrelated; a second REF for the same referral does not adopt twice."""
    from datetime import UTC, datetime

    from refloop.clock import FixedClock

    clock = FixedClock(datetime(2026, 1, 1, 9, 0, tzinfo=UTC))
    settings = make_settings(db_url)
    off = SenderProfile(name="ehr", sending_application="EHR", adopt_earlier_days=0)
    with running_daemon(settings, clock=clock) as d:
        send(d, siu_msg("A10", mrn="MRN910", cid="SIU-A10"))
        clock.advance(days=31)
        send(d, siu_msg("A11", mrn="MRN910", cid="SIU-A11", start="20260210090000-0500"))
        send(d, ref_msg("L10", mrn="MRN910"), ref_msg("L10", mrn="MRN910", trigger="I13"))
        assert journal(d, "SIU-A10") == ("ignored", "unrelated")  # 31 days before the REF
        assert journal(d, "SIU-A11")[1].startswith("adopted: ")
        assert [lk["control_id"] for lk in referral(d, "L10")["links"]].count("SIU-A11") == 1
    with running_daemon(dataclasses.replace(settings, profiles=(off, *settings.profiles)), clock=clock) as d:
        send(d, siu_msg("A12", mrn="MRN912", cid="SIU-A12"), ref_msg("L12", mrn="MRN912"))
        assert journal(d, "SIU-A12") == ("ignored", "unrelated")
        assert referral(d, "L12")["status"] == "sent"


def test_ambiguous_link_goes_to_review_then_manual_link(
    daemon: DaemonThread, db_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    send(daemon, ref_msg("L8a", mrn="MRN800"), ref_msg("L8b", mrn="MRN800", at="20260106090000-0500"),
         siu_msg("A8", mrn="MRN800", cid="SIU-A8"))
    assert referral(daemon, "L8b")["flags"] == ["possible_duplicate"]
    assert referral(daemon, "L8a")["flags"] == []
    status, queue = daemon.get("/api/unmatched")
    assert status == 200 and len(queue) == 1
    entry = queue[0]
    assert (entry["control_id"], entry["type"]) == ("SIU-A8", "SIU^S12")
    assert [(c["placer_id"], c["matched"]) for c in entry["candidates"]] == [
        ("L8a", ["patient", "provider_id", "provider_name"]), ("L8b", ["patient", "provider_id", "provider_name"])]
    assert referral(daemon, "L8a")["status"] == referral(daemon, "L8b")["status"] == "sent"

    assert post(daemon, f"/api/unmatched/{entry['message_id']}/link", {"referral": "L8b"})[0] == 200
    assert daemon.get("/api/unmatched")[1] == []
    body = referral(daemon, "L8b")
    assert body["status"] == "scheduled"
    assert {"control_id": "SIU-A8", "matched_by": "manual"} in body["links"]
    assert body["timeline"][-1]["event"] == "link_confirmed"

    # The coordinator changes their mind from the command line: unlink, then link to the other one.
    monkeypatch.setenv("REFLOOP_DATABASE_URL", db_url)
    assert cli_main(["unlink", "SIU-A8"]) == 0
    assert referral(daemon, "L8b")["status"] == "sent"
    assert cli_main(["link", "SIU-A8", "L8a"]) == 0
    assert referral(daemon, "L8a")["status"] == "scheduled"
    capsys.readouterr()
    assert cli_main(["show", "L8a", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["status"] == "scheduled" and shown["placer_id"] == "L8a"
    assert cli_main(["referrals", "--status", "scheduled", "--json"]) == 0
    assert [r["placer_id"] for r in json.loads(capsys.readouterr().out)] == ["L8a"]


def test_unrelated_siu_creates_nothing(daemon: DaemonThread) -> None:
    send(daemon, ref_msg("L9", mrn="MRN900"))
    send(daemon, siu_msg("A9", mrn="MRN999", cid="SIU-A9"))  # another patient, no referral ID
    send(daemon, siu_msg("A9b", mrn="MRN900", provider_id="9999", provider="Otherdoc^Olga", cid="SIU-A9b"))
    assert tuple(journal(daemon, "SIU-A9")) == ("ignored", "unrelated")
    assert tuple(journal(daemon, "SIU-A9b")) == ("ignored", "unrelated")
    assert daemon.server.engine is not None
    with daemon.server.engine.connect() as conn:
        assert conn.execute(select(Referral.placer_id)).scalars().all() == ["L9"]
    assert referral(daemon, "L9")["status"] == "sent"
    assert daemon.get("/api/unmatched")[1] == []


def test_late_ref_attaches_parked_messages(daemon: DaemonThread) -> None:
    send(daemon, siu_msg("A10", placer="L10", cid="SIU-A10"), mdm_msg("N10", placer="L10", cid="MDM-N10"))
    _, queue = daemon.get("/api/unmatched")
    assert [(q["control_id"], q["state"]) for q in queue] == [("SIU-A10", "parked"), ("MDM-N10", "parked")]
    assert daemon.get("/api/referrals")[1] == []
    send(daemon, ref_msg("L10", cid="REF-L10"))
    body = referral(daemon, "L10")
    assert body["status"] == "closed"
    assert [t["control_id"] for t in body["timeline"]] == ["REF-L10", "SIU-A10", "MDM-N10"]
    assert sorted(link["matched_by"] for link in body["links"]) == [
        "explicit:SCH-26.1", "explicit:TXA-14.1", "referral_id"]
    assert daemon.get("/api/unmatched")[1] == []


def test_resent_messages_leave_state_unchanged(daemon: DaemonThread) -> None:
    messages = [ref_msg("L11", cid="R-11"), siu_msg("A11", placer="L11", cid="S-11"),
                mdm_msg("N11", placer="L11", status="IP", cid="M-11")]
    send(daemon, *messages)
    before = referral(daemon, "L11")
    send(daemon, *messages)  # exact resends: deduplicated by the journal
    send(daemon, *(m.replace("-11|", "-11b|", 1) for m in messages))  # same events under new MSH-10s
    after = referral(daemon, "L11")
    for key in ("status", "appointments", "documents", "sent_at", "scheduled_at", "appointment_at"):
        assert after[key] == before[key]
    assert len(after["timeline"]) == 2 * len(before["timeline"])  # each message is still on the record


# -- sender-profile options -----------------------------------------------------------------------
def profiled(db_url: str, **profile: Any) -> Settings:
    return dataclasses.replace(make_settings(db_url), profiles=(SenderProfile(**profile),))


def test_orders_are_referrals_only_when_the_profile_says_so(db_url: str) -> None:
    with running_daemon(make_settings(db_url)) as d:
        send(d, omg_msg("O1", cid="OMG-O1"))
        assert tuple(journal(d, "OMG-O1")) == ("ignored", "order_mode off")
        assert d.get("/api/referrals")[1] == []
    with running_daemon(profiled(db_url, order_mode="referral")) as d:
        send(d, omg_msg("O2"))
        body = referral(d, "O2")
        assert (body["status"], body["priority"], body["referring_provider"]) == ("sent", "R", "Goodfellow, Gale")
        send(d, omg_msg("O2", "CA", at="20260106090000-0500"))
        assert referral(d, "O2")["status"] == "cancelled"


def test_timezone_presumed_attendance_and_preliminary_notes(db_url: str) -> None:
    settings = profiled(db_url, timezone="America/Chicago", presume_attendance_hours=2.0,
                        note_final_rule="include_preliminary")
    with running_daemon(settings) as d:
        send(d, ref_msg("Z1", at="20260105090000"), siu_msg("AZ", placer="Z1", start="20260112090000"))
        body = referral(d, "Z1")
        assert body["sent_at"] == "2026-01-05T15:00:00+00:00"  # 09:00 in Chicago, no offset sent
        assert body["status"] == "completed"  # the visit is long past and nothing said otherwise
        assert body["appointments"][0]["start"] == "2026-01-12T09:00:00-06:00"
        send(d, mdm_msg("NZ", status="IP", placer="Z1"))
        assert referral(d, "Z1")["status"] == "closed"


def test_message_families_limit_what_a_sender_may_change(db_url: str) -> None:
    with running_daemon(profiled(db_url, message_families=("REF",))) as d:
        send(d, ref_msg("F1"), siu_msg("AF", placer="F1", cid="SIU-AF"))
        assert tuple(journal(d, "SIU-AF")) == ("ignored", "message family disabled for this sender")
        assert referral(d, "F1")["status"] == "sent"
