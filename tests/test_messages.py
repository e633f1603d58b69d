"""Finding any message: every filter of `refloop messages` and ``GET /api/messages`` on both databases, the
raw view and its audit row (CLI, API, dashboard), `refloop find`, and the CLI's answer on a database that
is missing or behind the migrations (one line, exit 2, nothing created)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from sqlalchemy import select

from refloop.cli import main as cli_main
from refloop.clock import FixedClock
from refloop.config import HttpSettings
from refloop.store.models import AuditEntry
from tests.samples import adt, ref_msg, siu_msg
from tests.utils import DaemonThread, MllpClient, http_get, make_settings, running_daemon

PATIENT = "CL4242"


def with_pid(message: str, pid3: str) -> str:
    return "\r".join(f"PID|1||{pid3}||Testperson^Alma||19800101|F" if s.startswith("PID|") else s
                     for s in message.split("\r"))


@dataclasses.dataclass
class Traffic:
    daemon: DaemonThread
    db_url: str
    ids: dict[str, int]


@pytest.fixture
def traffic(db_url: str) -> Iterator[Traffic]:
    """Five messages a day apart: a REF and its booking (one patient), another patient's booking, an ADT
    nobody routes, and a SIU without an appointment ID (AE)."""
    clock = FixedClock(datetime(2026, 3, 1, 12, 0, tzinfo=UTC))
    with running_daemon(make_settings(db_url), clock=clock) as d:
        plan = [
            ("REF-1", with_pid(ref_msg("MS1", cid="REF-1"), f"{PATIENT}^^^CLINIC^MR")),
            ("SIU-1", with_pid(siu_msg("AP1", placer="MS1", cid="SIU-1"), f"SP1^^^HEART^MR~{PATIENT}^^^CLINIC^MR")),
            ("SIU-2", with_pid(siu_msg("AP2", cid="SIU-2", facility="LUNGS"), "OTHER77^^^CLINIC^MR")),
            ("ADT-1", adt("ADT-1")),
            ("SIU-3", siu_msg("", cid="SIU-3").replace("SCH|^SCHED|^SCHED|", "SCH|||")),
        ]
        with MllpClient(d.port) as client:
            for _cid, message in plan:
                client.send(message)
                clock.advance(days=1)
        assert d.server.engine is not None
        with d.server.engine.connect() as conn:
            from refloop.store.models import Message

            ids = {r.control_id: r.id for r in conn.execute(select(Message.control_id, Message.id))}
        yield Traffic(d, db_url, ids)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any]:
    code = cli_main(list(args))
    out = capsys.readouterr()
    try:
        return code, json.loads(out.out)
    except json.JSONDecodeError:
        return code, out.out + out.err


CASES: list[tuple[dict[str, str], list[str]]] = [
    ({}, ["SIU-3", "ADT-1", "SIU-2", "SIU-1", "REF-1"]),
    ({"sender": "SCHED"}, ["SIU-3", "SIU-2", "SIU-1"]),
    ({"sender": "SCHED^LUNGS"}, ["SIU-2"]),
    ({"type": "SIU"}, ["SIU-3", "SIU-2", "SIU-1"]),
    ({"type": "REF^I12"}, ["REF-1"]),
    ({"type": "SIU^S15"}, []),
    ({"outcome": "ignored"}, ["ADT-1", "SIU-2"]),
    ({"outcome": "error"}, ["SIU-3"]),
    ({"since": "2026-03-02T12:00:00Z"}, ["SIU-3", "ADT-1", "SIU-2", "SIU-1"]),
    ({"until": "2026-03-02T12:00:00Z"}, ["REF-1"]),
    ({"since": "2026-03-02T00:00:00", "until": "2026-03-04T00:00:00+00:00"}, ["SIU-2", "SIU-1"]),
    ({"patient": f"{PATIENT}^CLINIC"}, ["SIU-1", "REF-1"]),
    ({"patient": f"{PATIENT}^clinic"}, ["SIU-1", "REF-1"]),
    ({"patient": f"{PATIENT}^OTHER"}, []),
    ({"patient": "SP1^HEART", "type": "SIU"}, ["SIU-1"]),
    ({"referral": "MS1"}, ["SIU-1", "REF-1"]),
    ({"referral": "NOPE"}, []),
    ({"control_id": "ADT-1"}, ["ADT-1"]),
    ({"limit": "2"}, ["SIU-3", "ADT-1"]),
]


@pytest.mark.parametrize(("filters", "expected"), CASES)
def test_every_filter_on_the_cli_and_the_api(traffic: Traffic, filters: dict[str, str], expected: list[str],
                                             monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("REFLOOP_DATABASE_URL", traffic.db_url)
    args = [a for k, v in filters.items() for a in (f"--{k.replace('_', '-')}", v)]
    code, rows = cli(capsys, "messages", "--json", *args)
    assert code == 0, rows
    assert [r["control_id"] for r in rows] == expected
    status, body = traffic.daemon.get("/api/messages?" + urlencode(filters))
    assert status == 200
    assert body == rows  # one query behind both front ends: the same JSON


def test_bad_filters_are_usage_errors(traffic: Traffic, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("REFLOOP_DATABASE_URL", traffic.db_url)
    code, out = cli(capsys, "messages", "--since", "yesterday")
    assert code == 2 and out.strip() == "refloop messages: --since: not an ISO 8601 time"
    code, out = cli(capsys, "messages", "--outcome", "great")
    assert code == 2 and "--outcome: one of processed" in out
    assert traffic.daemon.get("/api/messages?patient=^CLINIC") == (
        400, {"error": "patient: give ID^AUTHORITY (the authority as PID-3.4 sends it)"})


def audit_rows(traffic: Traffic) -> list[tuple[str, str, str]]:
    assert traffic.daemon.server.engine is not None
    with traffic.daemon.server.engine.connect() as conn:
        return [(r.actor, r.action, r.target) for r in conn.execute(
            select(AuditEntry.actor, AuditEntry.action, AuditEntry.target).order_by(AuditEntry.id))]


def test_raw_view_is_decoded_and_audited(traffic: Traffic, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("REFLOOP_DATABASE_URL", traffic.db_url)
    mid = traffic.ids["SIU-1"]
    code, out = cli(capsys, "messages", "--raw", str(mid))
    assert code == 0
    assert out.splitlines()[0].startswith("MSH|^~\\&|SCHED|HEART|") and "\nSCH|AP1^SCHED|" in out
    assert audit_rows(traffic)[-1][1:] == ("raw", f"message:{mid}")
    code, out = cli(capsys, "messages", "--raw", "999999")
    assert code == 1 and "no stored message 999999" in out

    status, body = traffic.daemon.get(f"/api/messages/{mid}/raw")
    assert status == 200 and body["raw"].startswith("MSH|^~\\&|SCHED|HEART|")
    assert audit_rows(traffic)[-1][1:] == ("raw", f"message:{mid}")
    status, meta = traffic.daemon.get(f"/api/messages/{mid}")
    assert status == 200 and meta["link"]["matched_by"] == "explicit:SCH-26.1" and meta["raw_kept"] is True

    before = len(audit_rows(traffic))
    status, page = traffic.daemon.get(f"/messages/{mid}")
    assert status == 200 and "Show raw message" in page and "SCH|AP1" not in page
    assert len(audit_rows(traffic)) == before  # the page without the raw view reads no PHI
    status, page = traffic.daemon.get(f"/messages/{mid}?raw=1")
    assert status == 200 and "SCH|AP1^SCHED|" in page
    assert audit_rows(traffic)[-1][1:] == ("raw", f"message:{mid}") and len(audit_rows(traffic)) == before + 1


def test_patient_search_is_audited_without_the_identifier(traffic: Traffic, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("REFLOOP_DATABASE_URL", traffic.db_url)
    cli(capsys, "messages", "--patient", f"{PATIENT}^CLINIC")
    cli(capsys, "find", f"{PATIENT}^CLINIC")
    assert traffic.daemon.get("/api/messages?" + urlencode({"patient": f"{PATIENT}^CLINIC"}))[0] == 200
    status, page = traffic.daemon.get("/messages?" + urlencode({"patient": f"{PATIENT}^CLINIC"}))
    assert status == 200 and "REF-1" in page and PATIENT not in page
    rows = audit_rows(traffic)
    assert [r[1:] for r in rows[-4:]] == [("search", "messages:patient"), ("search", "referrals:patient"),
                                          ("search", "messages:patient"), ("search", "messages:patient")]
    assert not any(PATIENT in " ".join(r) for r in rows)
    assert PATIENT not in caplog.text and not any(PATIENT in repr(vars(r)) for r in caplog.records)


def test_find_lists_the_patients_referrals(traffic: Traffic, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("REFLOOP_DATABASE_URL", traffic.db_url)
    code, rows = cli(capsys, "find", f"{PATIENT}^CLINIC", "--json")
    assert code == 0 and [(r["placer_id"], r["status"]) for r in rows] == [("MS1", "scheduled")]
    code, rows = cli(capsys, "find", "SP1^HEART", "--json")  # learned from the booking that named MS1
    assert code == 0 and [r["placer_id"] for r in rows] == ["MS1"]
    code, out = cli(capsys, "find", "OTHER77^CLINIC")  # a patient with bookings but no referral
    assert code == 0 and out.strip() == "no referral for this patient identifier"


def test_api_messages_needs_the_token(db_url: str) -> None:
    settings = make_settings(db_url)
    settings = dataclasses.replace(settings, http=HttpSettings(host="127.0.0.1", port=0, token="s3cret"))
    with running_daemon(settings) as d:
        assert http_get(d.http_port, "/api/messages")[0] == 401
        assert http_get(d.http_port, "/messages")[0] == 401
        req = urllib.request.Request(f"http://127.0.0.1:{d.http_port}/api/messages?type=SIU",
                                     headers={"Authorization": "Bearer s3cret"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200 and json.loads(resp.read()) == []


# -- a database that is not there, or not migrated ---------------------------------------------------
def run(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("REFLOOP_")}
    return subprocess.run([sys.executable, "-m", "refloop", *args], env={**clean, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [["referrals"], ["messages"], ["show", "X"], ["audit"], ["worklist"],
                                     ["report"], ["find", "A^B"], ["db", "current"]])
def test_missing_database_is_one_line_and_creates_nothing(tmp_path: Path, command: list[str]) -> None:
    r = run(*command, env={}, cwd=tmp_path)  # no URL at all: the default var/refloop.db
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "no database at" in lines[0] and "refloop db upgrade" in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []


def test_database_behind_the_migrations(tmp_path: Path) -> None:
    from refloop.store import migrate
    from refloop.store.engine import make_engine

    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(make_settings(url).database)
    migrate.upgrade(engine, "0009")
    engine.dispose()
    r = run("referrals", env={"REFLOOP_DATABASE_URL": url}, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == (f"refloop: database {url} is at revision 0009, this refloop needs "
                                f"{migrate.head_revision()}: run `refloop db upgrade`")
    assert run("db", "upgrade", env={"REFLOOP_DATABASE_URL": url}, cwd=tmp_path).returncode == 0
    assert run("referrals", env={"REFLOOP_DATABASE_URL": url}, cwd=tmp_path).returncode == 0


def test_purged_body_is_said_so(traffic: Traffic, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str]) -> None:
    from datetime import timedelta

    from refloop.store.retention import purge

    assert traffic.daemon.server.engine is not None
    purge(traffic.daemon.server.engine, now=datetime(2026, 3, 1, 12, tzinfo=UTC) + timedelta(days=400),
          older_than_days=30, actor="test")
    mid = traffic.ids["SIU-1"]
    monkeypatch.setenv("REFLOOP_DATABASE_URL", traffic.db_url)
    code, out = cli(capsys, "messages", "--raw", str(mid))
    assert code == 1 and "its body was purged by retention" in out
    assert traffic.daemon.get(f"/api/messages/{mid}/raw")[0] == 410
    # metadata and the identifier hashes stay: the message is still found by patient, not adopted again
    code, rows = cli(capsys, "messages", "--json", "--patient", f"{PATIENT}^CLINIC")
    assert [r["control_id"] for r in rows] == ["SIU-1", "REF-1"]
    assert not any(a[1] == "raw" for a in audit_rows(traffic))  # nothing was read, nothing audited as read
