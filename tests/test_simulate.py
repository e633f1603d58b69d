"""The simulator's check mode against a real daemon on SQLite: statuses must equal the ground truth.

Out-of-order feeds, resends (identical and with a new MSH-10), messages linked only by the heuristic,
unrelated scheduling noise and both sender styles, delivered over three MLLP connections.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from refloop import cli_simulate
from refloop import simulate as sim
from refloop.cli import main as cli_main
from refloop.clock import FixedClock
from refloop.config import HttpSettings, SenderProfile
from tests.utils import make_settings, running_daemon

X360 = SenderProfile(name="x360", sending_application=sim.X360_APP, order_mode="referral")


def test_check_mode_agrees_with_ground_truth(sqlite_url: str) -> None:
    settings = dataclasses.replace(make_settings(sqlite_url), profiles=(SenderProfile(), X360))
    run = sim.Simulation(2000, seed=11, styles=("epic", "360x")).build()
    assert {m.feed for m in run.messages} == set(sim.FEEDS)
    # the daemon lives at the simulation's instant: a message whose referral is already overdue gets its alert
    # when it is applied, as of the daemon's clock, so the expected stalls are those at run.now
    with running_daemon(settings, clock=FixedClock(run.now)) as d:
        codes = sim.send(run, "127.0.0.1", d.port)
        assert set(codes) == {"AA"}
        result = sim.check(run, f"127.0.0.1:{d.http_port}")
    assert result["status_agreement"] == 100.0, result["confusion"]
    assert result["report"]["agrees"], result["report"]
    assert result["alerts"]["agrees"], result["alerts"]  # alerts equal the ground-truth stalls
    assert result["alerts"]["expected"] > 0
    assert result["ok"]


def test_files_are_deterministic(tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert cli_main(["simulate", "--referrals", "200", "--seed", "5", "--out", str(tmp_path / name)]) == 0
    for f in ("ref.hl7", "siu.hl7", "notes.hl7", "ground_truth.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    truth = json.loads((tmp_path / "a" / "ground_truth.json").read_text())
    assert truth["referrals"] == 200 and sum(truth["status_counts"].values()) == 200
    assert all(set(t) >= {"status", "stages"} for t in truth["expected"].values())


def test_check_reads_the_daemons_address_and_token_from_its_settings(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No --http: `simulate --check` finds a daemon on non-default (ephemeral) ports with a token through the
    same REFLOOP_* settings the daemon reads; `--styles both` sends both styles, including 360X OSU
    traffic without any sender profile, and every identity shape links."""
    settings = dataclasses.replace(make_settings(sqlite_url),
                                   http=HttpSettings(host="127.0.0.1", port=0, token="sim-token"))
    with running_daemon(settings) as d:
        monkeypatch.setenv("REFLOOP_HTTP_HOST", "0.0.0.0")  # a wildcard listen address is read on loopback
        monkeypatch.setenv("REFLOOP_HTTP_PORT", str(d.http_port))
        monkeypatch.setenv("REFLOOP_HTTP_TOKEN", "sim-token")
        code = cli_main(["simulate", "--referrals", "300", "--seed", "3", "--styles", "both",
                         "--send", f"127.0.0.1:{d.port}", "--check"])
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert code == 0, result
    assert result["ok"] and result["status_agreement"] == 100.0
    assert set(result["linking"]) == set(sim.SHAPES)
    assert all(v["rate"] == 100.0 for v in result["linking"].values()), result["linking"]


def test_styles_and_shapes_are_generated() -> None:
    run = sim.Simulation(400, seed=7, styles=cli_simulate.styles_from("both")).build()
    texts = [m.text for m in run.messages]
    assert any("OSU^O51" in t and "|360X" in t for t in texts)
    assert any(t.startswith("MSH|") and "OMG^O19" in t and t.split("\r")[0].endswith("|360X") for t in texts)
    shapes = set(run.heuristic_messages().values())
    assert shapes == set(sim.SHAPES)
    assert cli_simulate.styles_from("BOTH") == ("epic", "360x") == cli_simulate.styles_from("epic,360x")
    assert cli_simulate.styles_from("fhir") == () == cli_simulate.styles_from("")
