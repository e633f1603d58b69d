"""Signals on the real daemon process: SIGTERM drains (every complete frame received is committed and ACKed,
then exit 0), SIGHUP reloads the configuration without dropping connections.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests import samples
from tests.utils import (
    VT,
    DaemonProcess,
    MllpClient,
    frame,
    http_get,
    msa,
    start_daemon_process,
    wait_applied,
    wait_for,
)
from tests.utils import journal_rows as journal

APPLIED = ("processed", "ignored")
EXIT_BOUND = 30.0  # generous: the daemon must exit, not exit fast




def metric(d: DaemonProcess, name: str) -> float:
    _, body = http_get(d.http_port, "/metrics")
    for line in str(body).splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


@contextlib.contextmanager
def daemon(tmp_path: Path, url: str, **kw: Any) -> Iterator[DaemonProcess]:
    d = start_daemon_process(tmp_path, url, **kw)
    try:
        yield d
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait(10)


def test_sigterm_acks_every_frame_received_then_exits_0(tmp_path: Path, sqlite_url: str) -> None:
    """SIGTERM while 10 frames are received but not yet committed (the writer waits on a lock): all 10 are
    committed and ACKed in order before the connection closes, a half frame is journaled broken, exit code 0."""
    db_file = sqlite_url.removeprefix("sqlite:///")
    env = {"REFLOOP_DATABASE_BUSY_TIMEOUT_MS": "20000"}
    with daemon(tmp_path, sqlite_url, extra_env=env) as d:
        with MllpClient(d.port) as warm:
            w = samples.control_id("W")
            assert msa(warm.send(samples.siu(w))) == ("AA", w)
        cids = [samples.control_id("W") for _ in range(10)]
        blob = b"".join(frame(samples.siu(cid)) for cid in cids)
        half = VT + samples.ref(samples.control_id("W")).encode()[:60]
        before = metric(d, "refloop_received_bytes_total")
        locker = sqlite3.connect(db_file, isolation_level=None, timeout=5)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            with MllpClient(d.port, timeout=EXIT_BOUND) as c, MllpClient(d.port) as partial:
                c.send_raw(blob)
                partial.send_raw(half)
                assert wait_for(lambda: metric(d, "refloop_received_bytes_total") - before == len(blob) + len(half))
                d.proc.send_signal(signal.SIGTERM)
                assert wait_for(lambda: not listening(d.port))  # SIGTERM handled: the listener is closed
                assert d.proc.poll() is None  # still draining: the frames are not committed yet
                locker.execute("ROLLBACK")
                acks = [msa(c.read_frame().decode("latin-1")) for _ in cids]
                assert c.closed_by_peer(EXIT_BOUND)
            assert d.proc.wait(EXIT_BOUND) == 0
        finally:
            with contextlib.suppress(sqlite3.Error):
                locker.execute("ROLLBACK")
            locker.close()
    assert acks == [("AA", cid) for cid in cids]
    rows = journal(sqlite_url)
    applied = [r.control_id for r in rows if r.outcome in APPLIED]
    assert applied == [w, *cids]
    broken = [r for r in rows if r.outcome == "broken_frame"]
    assert len(broken) == 1 and bytes(broken[0].raw) == half[1:]


def test_sigterm_idle_daemon_exits_0_and_refuses_new_work(tmp_path: Path, sqlite_url: str) -> None:
    """SIGTERM with an idle connection open: the connection is closed, the daemon exits 0, nothing is lost."""
    with daemon(tmp_path, sqlite_url) as d:
        with MllpClient(d.port) as c:
            cid = samples.control_id("W")
            assert msa(c.send(samples.siu(cid))) == ("AA", cid)
            d.proc.send_signal(signal.SIGTERM)
            assert c.closed_by_peer(EXIT_BOUND)
        assert d.proc.wait(EXIT_BOUND) == 0
    assert [r.outcome in APPLIED for r in journal(sqlite_url)] == [True]


CONFIG_BEFORE = """\
[mllp]
idle_timeout = 60
"""

CONFIG_AFTER = """\
[mllp]
idle_timeout = 1.0

[profiles.engine]
sending_application = "ENGINE"
"""


def test_sighup_applies_new_profile_and_keeps_connections(tmp_path: Path, sqlite_url: str) -> None:
    """SIGHUP after the config file changed: the open connection still gets ACKs, the next message is journaled
    under the new profile, and new connections get the new idle_timeout."""
    config = tmp_path / "refloop.toml"
    config.write_text(CONFIG_BEFORE)
    with daemon(tmp_path, sqlite_url, args=("--config", str(config))) as d:
        with MllpClient(d.port) as c:
            before = samples.control_id("H")
            assert msa(c.send(samples.siu(before))) == ("AA", before)
            config.write_text(CONFIG_AFTER)
            d.proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: "configuration reloaded" in d.log_path.read_text())
            after = samples.control_id("H")
            assert msa(c.send(samples.siu(after))) == ("AA", after)  # same socket, after the reload
            assert d.proc.poll() is None
            with MllpClient(d.port) as idle:
                assert idle.closed_by_peer(15)  # idle_timeout = 1.0 now
            assert wait_for(lambda: metric(d, 'refloop_connections_closed_total{reason="idle_timeout"}') >= 1)
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(EXIT_BOUND) == 0
    assert [r.profile for r in journal(sqlite_url, before)] == ["default"]
    assert [r.profile for r in journal(sqlite_url, after)] == ["engine"]


def test_sighup_with_broken_config_keeps_running_configuration(tmp_path: Path, sqlite_url: str) -> None:
    """SIGHUP with an invalid config file: the reload is refused, the daemon keeps serving with the old profile."""
    config = tmp_path / "refloop.toml"
    config.write_text(CONFIG_AFTER)
    with daemon(tmp_path, sqlite_url, args=("--config", str(config))) as d:
        with MllpClient(d.port) as c:
            config.write_text("[mllp]\nidle_timeout = -1\n[profiles.engine\n")
            d.proc.send_signal(signal.SIGHUP)
            assert wait_for(lambda: "reload failed" in d.log_path.read_text())
            cid = samples.control_id("H")
            assert msa(c.send(samples.siu(cid))) == ("AA", cid)
        assert d.proc.poll() is None
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(EXIT_BOUND) == 0
    assert [r.profile for r in journal(sqlite_url, cid)] == ["engine"]


def test_sighup_window_change_recomputes_due_times(tmp_path: Path, sqlite_url: str) -> None:
    """A referral sent 10 days ago is inside a 14-day scheduling window; SIGHUP with a 7-day window: the
    daemon rewrites its due time under the new windows' version and the scan it runs at once raises it."""
    from datetime import UTC, datetime, timedelta

    from refloop.config.windows import WindowSettings, windows_from_settings

    config = tmp_path / "refloop.toml"
    config.write_text("[stall]\nscheduling_days = 14.0\nscan_minutes = 600.0\n")
    sent = datetime.now(UTC) - timedelta(days=10)
    with daemon(tmp_path, sqlite_url, args=("--config", str(config))) as d:
        with MllpClient(d.port) as c:
            assert msa(c.send(samples.ref_msg("WIN1", at=f"{sent:%Y%m%d%H%M%S}+0000")))[0] == "AA"
        assert wait_applied(d.http_port)  # journal mode: the AA means stored; the projection follows
        db = sqlite_url.removeprefix("sqlite:///")

        def row() -> tuple[str, int]:
            with contextlib.closing(sqlite3.connect(db)) as conn:
                version = conn.execute("SELECT clock_version FROM referrals WHERE placer_id = 'WIN1'").fetchone()[0]
                alerts = conn.execute("SELECT count(*) FROM alerts WHERE stage = 'scheduling'").fetchone()[0]
            return version, alerts

        assert row() == (windows_from_settings(WindowSettings(scheduling_days=14.0, scan_minutes=600.0)).version, 0)
        config.write_text("[stall]\nscheduling_days = 7.0\nscan_minutes = 600.0\n")
        d.proc.send_signal(signal.SIGHUP)
        new = windows_from_settings(WindowSettings(scheduling_days=7.0, scan_minutes=600.0)).version
        assert wait_for(lambda: row() == (new, 1), timeout=20)
        assert "stall windows changed" in d.log_path.read_text()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(EXIT_BOUND) == 0
