"""360X both ways, end to end on SQLite and PostgreSQL: the OMG^O19 request (MSH-21 ``360X``) without a
sender profile, the specialist's OSU^O51 status updates (mapped as docs/linking.md's table says), the 360X
SIU, malformed OSU answered AE with an ERR location, and the 360X state name beside refloop's status."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from refloop.cli import main as cli_main
from refloop.config import SenderProfile
from tests.utils import DaemonThread, MllpClient, ack_segments, err_code, make_settings, msa, running_daemon

OID_CLINIC = "1.3.6.1.4.1.21367.2016.10.1.21"


def _msh(mtype: str, trigger: str, cid: str, at: str, *, app: str = "", facility: str = OID_CLINIC,
         profile: str = "360X") -> str:
    fields = ["MSH", "^~\\&", app, f"^{facility}^ISO", "", "^1.3.6.1.4.1.21367.2016.10.1.32^ISO", at, "",
              f"{mtype}^{trigger}^{mtype}_{trigger}", cid, "P", "2.5.1", "", "", "", "", "", "", "", "", profile]
    return "|".join(fields)


def omg(placer: str, control: str = "NW", *, cid: str, at: str = "20260105090000+0000", profile: str = "360X",
        app: str = "") -> str:
    """A 360X referral request shaped like the IG's example (OIDs as authorities), values invented."""
    segs = [
        _msh("OMG", "O19", cid, at, profile=profile, app=app),
        f"PID|1||X1001^^^&{OID_CLINIC}.5&ISO^MRN||Testperson^Alma||19800101|F",
        f"ORC|{control}|{placer}^^{OID_CLINIC}.15^ISO|||||||{at}|||1111^Goodfellow^Gale^^^^^^&{OID_CLINIC}.10&ISO^L^^DN",
        "TQ1||||||||20260301235959+0000",
        f"OBR||{placer}^^{OID_CLINIC}.15^ISO||57133-1^^LN|||||||||||||||||||||||||||||^Rule out headache^",
        "PRD|RT|Heartwell^Hana^^^^Dr|||||1234^NPI",
    ]
    return "\r".join(segs) + "\r"


def osu(placer: str, control: str, status: str = "", *, cid: str, at: str = "20260106090000+0000",
        filler: str = "SPEC-77", profile: str = "360X") -> str:
    """OSU^O51 from the specialist: ORC-1 order control, ORC-5 order status, ORC-3 their own number."""
    orc = f"ORC|{control}|{placer}^^{OID_CLINIC}.15^ISO|{filler}^SPEC||{status}||||{at}" if placer else \
        f"ORC|{control}||{filler}^SPEC||{status}||||{at}"
    segs = [_msh("OSU", "O51", cid, at, app="SPEC360", facility="1.3.6.1.4.1.21367.2016.10.1.32", profile=profile),
            f"PID|1||X1001^^^&{OID_CLINIC}.5&ISO^MRN||Testperson^Alma||19800101|F", orc]
    return "\r".join(segs) + "\r"


def siu360(placer: str, appt: str, *, cid: str, trigger: str = "S12", at: str = "20260107090000+0000") -> str:
    segs = [_msh("SIU", trigger, cid, at, app="SPEC360", facility="1.3.6.1.4.1.21367.2016.10.1.32"),
            f"SCH|{appt}^SPEC|{appt}^SPEC|||||||30|MIN|^^30^20260115090000+0000||||||||||||||"
            f"{'Noshow' if trigger == 'S26' else 'Booked'}|{placer}^^{OID_CLINIC}.15^ISO",
            f"PID|1||X1001^^^&{OID_CLINIC}.5&ISO^MRN||Testperson^Alma||19800101|F",
            "RGS|1", "AIP|1||1234^Heartwell^Hana|CARD"]
    return "\r".join(segs) + "\r"


def send(d: DaemonThread, *messages: str) -> list[str]:
    acks = []
    with MllpClient(d.port) as client:
        for message in messages:
            acks.append(client.send(message))
    return acks


def accepted(d: DaemonThread, *messages: str) -> None:
    for ack in send(d, *messages):
        assert msa(ack)[0] == "AA", ack


def referral(d: DaemonThread, key: str) -> dict[str, Any]:
    status, body = d.get(f"/api/referrals/{key}")
    assert status == 200, body
    return body  # type: ignore[no-any-return]


@pytest.fixture
def daemon(db_url: str) -> Iterator[DaemonThread]:
    with running_daemon(make_settings(db_url)) as d:  # no sender profile at all
        yield d


def test_msh21_360x_creates_the_referral_without_a_profile(daemon: DaemonThread) -> None:
    accepted(daemon, omg("X1", cid="G-X1"))
    body = referral(daemon, "X1")
    assert (body["status"], body["x360_state"], body["referring_provider"]) == ("sent", "Initiated", "Goodfellow, Gale")
    accepted(daemon, omg("X1b", cid="G-X1b", profile=""))  # no 360X declaration: an ordinary order feed
    assert daemon.get("/api/referrals/X1b")[0] == 404


def test_a_profile_can_turn_360x_off(db_url: str) -> None:
    """The IG's example sends MSH-3 empty and MSH-4 as ``^<oid>^ISO``: the OID is the sender a profile names."""
    off = SenderProfile(name="ehr360", sending_facility=OID_CLINIC, order_mode="off")
    settings = dataclasses.replace(make_settings(db_url), profiles=(off, SenderProfile()))
    with running_daemon(settings) as d:
        accepted(d, omg("X2", cid="G-X2"))
        assert d.get("/api/referrals/X2")[0] == 404
        status, rows = d.get(f"/api/messages?sender=^{OID_CLINIC}")
        assert status == 200 and [(r["control_id"], r["profile"], r["detail"]) for r in rows] == [
            ("G-X2", "ehr360", "order_mode off")]


def test_osu_accept_interim_finalize(daemon: DaemonThread) -> None:
    accepted(daemon, omg("X3", cid="G-X3"), osu("X3", "OK", "IP", cid="U-X3a"))
    body = referral(daemon, "X3")
    assert (body["status"], body["x360_state"]) == ("sent", "Accepted")
    assert body["accepted_at"] == "2026-01-06T09:00:00+00:00"
    assert referral(daemon, "SPEC-77")["id"] == body["id"]  # ORC-3 became an alias on the accept
    accepted(daemon, osu("X3", "SC", "IP", cid="U-X3b", at="20260110090000+0000"))
    body = referral(daemon, "X3")
    assert (body["status"], body["x360_state"]) == ("sent", "InterimCommunicated")
    accepted(daemon, siu360("X3", "AP3", cid="S-X3"))
    assert referral(daemon, "X3")["status"] == "scheduled"
    accepted(daemon, osu("X3", "SC", "CM", cid="U-X3c", at="20260120090000+0000"))
    body = referral(daemon, "X3")
    assert (body["status"], body["x360_state"]) == ("closed", "Finalized")
    assert body["closed_at"] == "2026-01-20T09:00:00+00:00"
    assert [(t["event"], t["control_id"]) for t in body["timeline"]] == [
        ("referral_created", "G-X3"), ("referral_answered", "U-X3a"), ("appointment_booked", "S-X3"),
        ("referral_status_reported", "U-X3b"), ("note_received", "U-X3c")]  # in event-time order
    assert body["timeline"][3]["detail"] == "status reported: InterimCommunicated"
    assert [lk["matched_by"] for lk in body["links"]] == ["referral_id", "explicit:ORC-2.1", "explicit:ORC-2.1",
                                                           "explicit:SCH-26.1", "explicit:ORC-2.1"]


def test_osu_decline_and_cancel_confirmed(daemon: DaemonThread) -> None:
    accepted(daemon, omg("X4", cid="G-X4"), osu("X4", "UA", cid="U-X4"))
    body = referral(daemon, "X4")
    assert (body["status"], body["x360_state"]) == ("declined", "Declined")
    assert body["timeline"][-1]["detail"] == "referral declined"
    accepted(daemon, omg("X5", cid="G-X5"), omg("X5", "CA", cid="G-X5c", at="20260107090000+0000"))
    assert referral(daemon, "X5")["x360_state"] == "Canceled"
    accepted(daemon, osu("X5", "CR", cid="U-X5", at="20260108090000+0000"))
    body = referral(daemon, "X5")
    assert (body["status"], body["x360_state"]) == ("cancelled", "CancelConfirmed")


def test_osu_before_its_request_is_parked(daemon: DaemonThread) -> None:
    accepted(daemon, osu("X6", "OK", cid="U-X6"))
    status, queue = daemon.get("/api/unmatched")
    assert status == 200
    assert [(e["control_id"], e["state"]) for e in queue] == [("U-X6", "parked")]
    accepted(daemon, omg("X6", cid="G-X6"))
    assert referral(daemon, "X6")["x360_state"] == "Accepted"


@pytest.mark.parametrize(("message", "code", "location"), [
    (lambda: osu("", "OK", cid="U-BAD1"), "101", "ORC^1^2^1"),
    (lambda: osu("X7", "ZZ", cid="U-BAD2"), "103", "ORC^1^1"),
    (lambda: osu("X7", "SC", "QQ", cid="U-BAD3"), "103", "ORC^1^5"),
    (lambda: osu("X7", "OK", cid="U-BAD4").replace("\rORC|", "\rZZZ|"), "100", "ORC^1"),
])
def test_malformed_osu_is_answered_ae_with_its_location(daemon: DaemonThread, message: Any, code: str,
                                                        location: str) -> None:
    ack = send(daemon, message())[0]
    assert msa(ack)[0] == "AE"
    err = ack_segments(ack)["ERR"]
    assert (err[2], err_code(ack)) == (location, code)


def test_show_prints_the_360x_state_beside_the_status(daemon: DaemonThread, db_url: str,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    accepted(daemon, omg("X8", cid="G-X8"), osu("X8", "OK", cid="U-X8"))
    monkeypatch.setenv("REFLOOP_DATABASE_URL", db_url)
    assert cli_main(["show", "X8"]) == 0
    out = capsys.readouterr().out
    assert "status               sent (360X: Accepted)" in out
    assert cli_main(["show", "X8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["x360_state"] == "Accepted"



def test_a_sender_can_map_its_own_osu_codes(db_url: str) -> None:
    """A specialist system that reports "seen, report to follow" as ORC-5 ``ZR`` and its refusal as
    ``SC``/``RJ``: its profile's ``osu_states`` maps them, looked up before the built-in table."""
    spec = SenderProfile(name="spec360", sending_application="SPEC360",
                         osu_states=("SC/ZR=InterimCommunicated", "SC/RJ=Declined"))
    settings = dataclasses.replace(make_settings(db_url), profiles=(spec, SenderProfile()))
    with running_daemon(settings) as d:
        accepted(d, omg("X9", cid="G-X9"), osu("X9", "SC", "ZR", cid="U-X9a"))
        assert referral(d, "X9")["x360_state"] == "InterimCommunicated"
        accepted(d, osu("X9", "SC", "RJ", cid="U-X9b", at="20260107090000+0000"))
        assert referral(d, "X9")["status"] == "declined"


def test_bad_osu_states_are_a_config_error(tmp_path: Path) -> None:
    from refloop.config import ConfigError, load_settings

    cfg = tmp_path / "refloop.toml"
    cfg.write_text('[profiles.spec]\nsending_application = "S"\nosu_states = ["SC/ZR=Maybe"]\n')
    with pytest.raises(ConfigError, match="osu_states"):
        load_settings(str(cfg), {})
