"""The CLI against a real daemon and database: send, messages, replay."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests import samples
from tests.utils import make_settings, running_daemon


def run(*args: str, db_url: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("REFLOOP_")}, "REFLOOP_DATABASE_URL": db_url}
    return subprocess.run([sys.executable, "-m", "refloop", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def test_send_messages_and_replay(sqlite_url: str, tmp_path: Path) -> None:
    """`send` prints ACKs (LF files accepted), `messages --json` lists them, `replay` is idempotent."""
    ok1, ok2 = samples.control_id(), samples.control_id()
    bad = samples.control_id()
    good_file = tmp_path / "good.hl7"
    good_file.write_text((samples.ref(ok1, referral="CLI1") + samples.ref(ok2, referral="CLI2")).replace("\r", "\n"))
    bad_file = tmp_path / "bad.hl7"
    bad_file.write_text(samples.ref(bad, version="2.1").replace("\r", "\r\n"))
    with running_daemon(make_settings(sqlite_url)) as d:
        r = run("send", "--port", str(d.port), str(good_file), db_url=sqlite_url, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert r.stdout.count("MSA|AA|") == 2
        r = run("send", "--port", str(d.port), str(bad_file), db_url=sqlite_url, cwd=tmp_path)
        assert r.returncode == 1 and "MSA|AR|" in r.stdout
    r = run("messages", "--json", db_url=sqlite_url, cwd=tmp_path)
    rows = json.loads(r.stdout)
    assert [x["control_id"] for x in rows] == [bad, ok2, ok1]
    assert set(rows[0]) >= {"id", "received_at", "sender", "type", "control_id", "outcome", "ack_code",
                            "duplicate_of"}
    assert rows[0]["received_at"].endswith("+00:00")
    r = run("messages", "--control-id", ok1, db_url=sqlite_url, cwd=tmp_path)
    assert ok1 in r.stdout and ok2 not in r.stdout
    before = run("show", "CLI1", "--json", db_url=sqlite_url, cwd=tmp_path)
    r1 = run("replay", "--json", db_url=sqlite_url, cwd=tmp_path)
    r2 = run("replay", "--json", db_url=sqlite_url, cwd=tmp_path)
    assert json.loads(r1.stdout)["replayed"] == 2 == json.loads(r2.stdout)["replayed"]
    after = run("show", "CLI1", "--json", db_url=sqlite_url, cwd=tmp_path)
    assert json.loads(after.stdout)["timeline"] == json.loads(before.stdout)["timeline"]


def test_phi_reads_replays_and_purges_are_audited(sqlite_url: str, tmp_path: Path) -> None:
    """Reading a referral through the API, a replay and a purge each leave an audit row with an actor."""
    with running_daemon(make_settings(sqlite_url)) as d:
        from tests.utils import MllpClient

        with MllpClient(d.port) as c:
            c.send(samples.ref(referral="AUD1"))
        status, body = d.get("/api/referrals?placer_id=AUD1")
        assert status == 200
        rid = body[0]["id"] if isinstance(body, list) else body["referrals"][0]["id"]
        assert d.get(f"/api/referrals/{rid}")[0] == 200
        assert d.get("/api/messages")[0] == 200  # metadata only: not a PHI read
    run("replay", db_url=sqlite_url, cwd=tmp_path)
    r = run("purge", "--older-than", "30", db_url=sqlite_url, cwd=tmp_path)
    assert r.returncode == 0 and "purged 0" in r.stdout
    rows = json.loads(run("audit", "--json", db_url=sqlite_url, cwd=tmp_path).stdout)
    actions = [(x["action"], x["target"]) for x in rows]
    assert ("read", f"/api/referrals/{rid}") in actions
    assert any(a == "replay" for a, _ in actions)
    assert not any(t.startswith("/api/messages") for _, t in actions)
    assert all(x["actor"] for x in rows)
