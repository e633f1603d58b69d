"""The real `refloop serve` process started the way systemd starts refloop.service with refloop.socket.

The test plays systemd's part: it binds the MLLP listener and hands it over as fd 3 with ``LISTEN_FDS``,
``LISTEN_FDNAMES=mllp`` and ``LISTEN_PID`` (set between fork and exec, like PID 1 does), binds a datagram
socket and passes it as ``NOTIFY_SOCKET``, asks for a watchdog with ``WATCHDOG_USEC``, and points
``JOURNAL_STREAM`` at the daemon's stderr file. Then it reads what a service manager would read.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.samples import siu
from tests.utils import MllpClient, free_port, http_get, msa

REPO = Path(__file__).resolve().parents[1]

#: Between fork and exec: move the listener to fd 3 and set LISTEN_PID to the PID exec keeps.
BOOTSTRAP = r"""
import os, sys
os.dup2(int(sys.argv[1]), 3)
os.close(int(sys.argv[1]))
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "refloop", "serve"])
"""


@dataclass
class Activated:
    proc: subprocess.Popen[bytes]
    notify: socket.socket
    listener_port: int
    configured_port: int
    http_port: int
    stderr_path: Path

    def datagrams(self, until: str, timeout: float = 30.0) -> list[str]:
        """Every notify line received until one equals ``until``."""
        lines: list[str] = []
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                data = self.notify.recv(65536)
            except TimeoutError:
                assert self.proc.poll() is None, self.stderr_path.read_text()[-3000:]
                continue
            lines += data.decode().split("\n")
            if until in lines:
                return lines
        raise AssertionError(f"no {until} within {timeout}s; got {lines}")


@pytest.fixture
def activated(tmp_path: Path) -> Iterator[Activated]:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(1.0)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    high = fcntl.fcntl(listener.fileno(), fcntl.F_DUPFD, 20)
    configured_port, http_port = free_port(), free_port()
    stderr_path = tmp_path / "stderr.log"
    err = stderr_path.open("wb")
    st = os.fstat(err.fileno())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REFLOOP_", "LISTEN_", "NOTIFY_", "WATCHDOG_"))}
    env.update({
        "PYTHONPATH": str(REPO),
        "REFLOOP_DATABASE_URL": f"sqlite:///{tmp_path / 'refloop.db'}",
        "REFLOOP_DATABASE_AUTO_MIGRATE": "true",
        "REFLOOP_MLLP_PORT": str(configured_port),  # must NOT be bound: the inherited socket is used
        "REFLOOP_HTTP_PORT": str(http_port),
        "REFLOOP_LOG_LEVEL": "INFO",
        "LISTEN_FDS": "1", "LISTEN_FDNAMES": "mllp",
        "NOTIFY_SOCKET": str(tmp_path / "notify.sock"),
        "WATCHDOG_USEC": "400000",  # pings every 0.2 s
        "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}",
    })
    proc = subprocess.Popen([sys.executable, "-c", BOOTSTRAP, str(high)], pass_fds=[high], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=err)
    os.close(high)
    err.close()
    box = Activated(proc, notify, listener.getsockname()[1], configured_port, http_port, stderr_path)
    listener.close()  # the daemon holds its own copy now, as the socket unit's would be
    try:
        yield box
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        notify.close()


def test_socket_activation_notify_watchdog_and_journal_priorities(activated: Activated) -> None:
    """READY=1 with a STATUS line once serving on the inherited fd (the configured port stays unbound),
    WATCHDOG=1 pings at half of WATCHDOG_USEC, STOPPING=1 on SIGTERM, exit 0, and every stderr line
    carries a journald priority prefix."""
    lines = activated.datagrams(until="READY=1")
    status = [ln for ln in lines if ln.startswith("STATUS=")]
    assert status and f"MLLP port {activated.listener_port}" in status[-1], lines

    with MllpClient(activated.listener_port) as c:
        assert msa(c.send(siu()))[0] == "AA"
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", activated.configured_port), timeout=2):
        pass
    assert http_get(activated.http_port, "/readyz")[0] == 200

    pings = activated.datagrams(until="WATCHDOG=1")
    assert "WATCHDOG=1" in pings
    assert "WATCHDOG=1" in activated.datagrams(until="WATCHDOG=1")  # and again: it is a loop

    activated.proc.send_signal(signal.SIGTERM)
    assert "STOPPING=1" in activated.datagrams(until="STOPPING=1")
    assert activated.proc.wait(30) == 0

    log_lines = activated.stderr_path.read_text().splitlines()
    assert log_lines, "the daemon logged nothing"
    for line in log_lines:
        assert line[:3] in ("<2>", "<3>", "<4>", "<6>", "<7>"), line
    ready = [json.loads(ln[3:]) for ln in log_lines if '"refloop ready"' in ln]
    assert ready and ready[0]["socket_activated"] is True
    assert all(ln.startswith("<6>") for ln in log_lines if '"level": "info"' in ln)


def test_no_prefix_when_stderr_is_not_the_journal(tmp_path: Path) -> None:
    """JOURNAL_STREAM inherited by a process whose stderr went elsewhere: plain lines, no <N>."""
    from refloop.logs import stderr_is_journal

    path = tmp_path / "x"
    with path.open("wb") as f:
        st = os.fstat(f.fileno())
        value = f"{st.st_dev}:{st.st_ino}"
        assert stderr_is_journal({"JOURNAL_STREAM": value}, fd=f.fileno())
    with path.with_suffix(".other").open("wb") as other:
        assert not stderr_is_journal({"JOURNAL_STREAM": value}, fd=other.fileno())
    assert not stderr_is_journal({}, fd=2)
    assert not stderr_is_journal({"JOURNAL_STREAM": "garbage"}, fd=2)


def test_configuration_error_exits_2_so_systemd_does_not_restart(tmp_path: Path) -> None:
    """The unit's RestartPreventExitStatus=2 relies on this: a bad setting is exit 2 and one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFLOOP_")}
    env.update({"PYTHONPATH": str(REPO), "REFLOOP_MLLP_PORT": "not-a-port"})
    proc = subprocess.run([sys.executable, "-m", "refloop", "serve"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "REFLOOP_MLLP_PORT" in proc.stderr, proc.stderr
