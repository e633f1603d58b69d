"""refloop.daemon.systemd against real sockets, and the shipped units against systemd's offline tools.

No mocks: notifications go to a real AF_UNIX datagram socket, socket activation is reproduced in a
child process whose inherited descriptors and ``LISTEN_PID`` are set up exactly as systemd does
(fds from 3, the PID of the process that runs the code), and the unit files are checked with the
same ``systemd-analyze`` commands CI and docs/operations.md use.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from refloop.daemon.systemd import Notifier, listen_fds, watchdog_interval, watchdog_loop
from tests.utils import require_tool

REPO = Path(__file__).resolve().parents[1]
UNITS = REPO / "refloop" / "units"  # package data: `refloop config units DIR` writes them
SERVICE = UNITS / "refloop.service"
SOCKET = UNITS / "refloop.socket"

#: systemd-analyze prints exposure on a 0-10 scale but takes --threshold on 0-100 (systemd-analyze(1)).
MAX_EXPOSURE = 1.2
THRESHOLD = "--threshold=12"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Key -> values of a unit file, ignoring comments and section headers (enough for asserts)."""
    settings: dict[str, list[str]] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;[" or "=" not in line:
            continue
        key, _, value = line.partition("=")
        settings.setdefault(key.strip(), []).append(value.strip())
    return settings


# --- Notifier -------------------------------------------------------------------------------------


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket bound in tmp_path, standing in for systemd's notify socket."""
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield sock, path


@pytest.fixture
def abstract_listener() -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket in the abstract namespace, addressed as ``@name`` like systemd does."""
    name = f"refloop-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        yield sock, "@" + name


def receive(sock: socket.socket) -> list[str]:
    return sock.recv(65536).decode("utf-8").split("\n")


def drain(sock: socket.socket) -> list[bytes]:
    """Every datagram already queued, without waiting for more."""
    datagrams = []
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        while True:
            datagrams.append(sock.recv(65536))
    except BlockingIOError:
        return datagrams
    finally:
        sock.settimeout(timeout)


@pytest.mark.parametrize("listener_name", ["path_listener", "abstract_listener"])
def test_notifier_datagrams_arrive_as_sent(listener_name: str, request: pytest.FixtureRequest) -> None:
    """READY/STATUS/WATCHDOG/STOPPING datagrams reach path and abstract sockets unchanged."""
    sock, address = request.getfixturevalue(listener_name)
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": address})
    assert notifier.enabled

    assert notifier.ready("listening on 127.0.0.1:2575")
    assert receive(sock) == ["READY=1", "STATUS=listening on 127.0.0.1:2575"]
    assert notifier.status("42 messages, 0 errors")
    assert receive(sock) == ["STATUS=42 messages, 0 errors"]
    assert notifier.watchdog()
    assert receive(sock) == ["WATCHDOG=1"]
    assert notifier.stopping()
    assert receive(sock) == ["STOPPING=1"]
    assert notifier.notify("EXTEND_TIMEOUT_USEC=5000000", "STATUS=migrating")
    assert receive(sock) == ["EXTEND_TIMEOUT_USEC=5000000", "STATUS=migrating"]
    assert notifier.failures == 0


def test_notifier_reloading_carries_monotonic_usec(path_listener: tuple[socket.socket, str]) -> None:
    """RELOADING=1 comes with MONOTONIC_USEC read from CLOCK_MONOTONIC, as systemd >= 253 requires."""
    sock, address = path_listener
    notifier = Notifier(address)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    first, second = receive(sock)
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_notifier_newlines_cannot_forge_assignments(path_listener: tuple[socket.socket, str]) -> None:
    """A newline inside STATUS text stays in that one line instead of becoming a READY=1."""
    sock, address = path_listener
    assert Notifier(address).status("evil\nREADY=1")
    assert receive(sock) == ["STATUS=evil READY=1"]


def test_notifier_is_noop_without_notify_socket() -> None:
    """Without NOTIFY_SOCKET nothing is sent, nothing raises, and nothing counts as a failure."""
    notifier = Notifier.from_environ({})
    assert not notifier.enabled
    assert notifier.ready("x") is False
    assert notifier.watchdog() is False
    assert notifier.failures == 0


def test_notifier_send_failure_returns_false(tmp_path: Path) -> None:
    """A notify socket that has gone away yields False and a counted failure, never an exception."""
    path = tmp_path / "gone.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
    path.unlink()
    notifier = Notifier.from_environ({"NOTIFY_SOCKET": str(path)})

    assert notifier.ready() is False
    assert notifier.watchdog() is False
    assert notifier.failures == 2


@pytest.mark.parametrize("address", ["vsock:2:1234", "relative/path.sock", "@"])
def test_notifier_unsupported_address_counts_as_failure(address: str) -> None:
    """An address we cannot reach is a counted failure, since systemd is waiting for READY=1."""
    notifier = Notifier(address)
    assert notifier.enabled
    assert notifier.ready() is False
    assert notifier.failures == 1


# --- watchdog -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "garbage"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_PID": str(os.getpid())}, None),
        ({}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    """Half of WATCHDOG_USEC in seconds, only when WATCHDOG_PID is unset or is this process."""
    assert watchdog_interval(environ) == expected


def test_watchdog_loop_pings_every_interval(path_listener: tuple[socket.socket, str]) -> None:
    """The loop sends repeated WATCHDOG=1 datagrams at its interval until cancelled."""
    sock, address = path_listener

    async def run_for_a_while() -> None:
        task = asyncio.create_task(watchdog_loop(Notifier(address), 0.05))
        await asyncio.sleep(0.4)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(run_for_a_while())
    pings = drain(sock)
    assert len(pings) >= 2
    assert set(pings) == {b"WATCHDOG=1"}


def test_watchdog_loop_stops_pinging_while_event_loop_is_blocked(
    path_listener: tuple[socket.socket, str],
) -> None:
    """A blocked event loop sends no pings, which is what lets systemd's watchdog catch it."""
    sock, address = path_listener

    async def block_the_loop() -> int:
        task = asyncio.create_task(watchdog_loop(Notifier(address), 0.01))
        await asyncio.sleep(0)  # let the first ping go out
        time.sleep(0.2)  # noqa: ASYNC251 - the point: a synchronous call stalls the loop for 20 intervals
        during_block = len(drain(sock))
        task.cancel()
        return during_block

    assert asyncio.run(block_the_loop()) == 1


def test_watchdog_loop_rejects_non_positive_interval() -> None:
    """A zero interval would spin the event loop, so it is refused up front."""
    with pytest.raises(ValueError, match="positive"):
        asyncio.run(watchdog_loop(Notifier(None), 0))


# --- socket activation ----------------------------------------------------------------------------

#: Runs in the activated child: reports what listen_fds() found and proves fd 3 is the real listener.
CHILD = r"""
import json, os, socket
from refloop.daemon.systemd import listen_fds

found = listen_fds(os.environ)
report = {
    "sockets": {
        name: [
            {
                "fd": s.fileno(),
                "family": s.family.name,
                "addr": list(s.getsockname()),
                "listening": s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN),
                "inheritable": s.get_inheritable(),
            }
            for s in socks
        ]
        for name, socks in found.items()
    },
    "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}
if os.environ.get("TEST_CLIENT_WAITING"):
    conn, _ = found["mllp"][0].accept()
    conn.sendall(b"accepted via inherited fd")
    conn.close()
print(json.dumps(report))
"""


#: Plays systemd's part between fork and exec: move the fds to 3, 4, ... and set LISTEN_PID to the
#: PID that will run CHILD (execv keeps the PID), then exec CHILD.
BOOTSTRAP = r"""
import os, sys
sources = [int(fd) for fd in sys.argv[1].split(",")]
for target, source in enumerate(sources, start=3):
    os.dup2(source, target)
for source in sources:
    os.close(source)
if sys.argv[2] == "self":
    os.environ["LISTEN_PID"] = str(os.getpid())
else:
    os.environ["LISTEN_PID"] = sys.argv[2]
os.execv(sys.executable, [sys.executable, "-c", sys.argv[3]])
"""


def run_activated(
    fds: list[int], names: str | None, listen_pid: str = "self", client_waiting: bool = False
) -> dict[str, object]:
    """Start CHILD the way systemd would: ``fds`` at 3, 4, ... and LISTEN_PID = the child's PID.

    With ``client_waiting`` the child also accepts one connection on the first "mllp" socket.
    """
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 20) for fd in fds]  # out of the way of the 3.. targets
    try:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(REPO)}
        env["LISTEN_FDS"] = str(len(fds))
        if names is not None:
            env["LISTEN_FDNAMES"] = names
        if client_waiting:
            env["TEST_CLIENT_WAITING"] = "1"
        proc = subprocess.run(
            [sys.executable, "-c", BOOTSTRAP, ",".join(map(str, high)), listen_pid, CHILD],
            pass_fds=high,
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        for fd in high:
            os.close(fd)
    assert proc.returncode == 0, proc.stderr
    result: dict[str, object] = json.loads(proc.stdout)
    return result


@pytest.fixture
def tcp_listeners() -> Iterator[list[socket.socket]]:
    """Two listening loopback TCP sockets, like ListenStream= creates them."""
    socks = []
    for _ in range(2):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        socks.append(s)
    yield socks
    for s in socks:
        s.close()


def test_listen_fds_named_sockets(tcp_listeners: list[socket.socket]) -> None:
    """LISTEN_FDNAMES maps fd 3 and 4 to their names; the listener is live and CLOEXEC; env is unset."""
    mllp, metrics = tcp_listeners
    with socket.create_connection(mllp.getsockname(), timeout=10) as client:
        report = run_activated([mllp.fileno(), metrics.fileno()], "mllp:metrics", client_waiting=True)
        assert client.recv(100) == b"accepted via inherited fd"

    assert report["env_left"] == []
    assert report["sockets"] == {
        "mllp": [
            {
                "fd": 3,
                "family": "AF_INET",
                "addr": list(mllp.getsockname()),
                "listening": 1,
                "inheritable": False,
            }
        ],
        "metrics": [
            {
                "fd": 4,
                "family": "AF_INET",
                "addr": list(metrics.getsockname()),
                "listening": 1,
                "inheritable": False,
            }
        ],
    }


def test_listen_fds_default_name_is_unknown(tcp_listeners: list[socket.socket]) -> None:
    """Without LISTEN_FDNAMES every socket is named "unknown", as sd_listen_fds_with_names does."""
    report = run_activated([tcp_listeners[0].fileno()], None)
    sockets = report["sockets"]
    assert isinstance(sockets, dict)
    assert list(sockets) == ["unknown"]
    assert [s["fd"] for s in sockets["unknown"]] == [3]


def test_listen_fds_groups_sockets_sharing_a_name(tcp_listeners: list[socket.socket]) -> None:
    """Two ListenStream= lines in one socket unit share a name and come back as one list, in fd order."""
    a, b = tcp_listeners
    report = run_activated([a.fileno(), b.fileno()], "mllp:mllp")
    sockets = report["sockets"]
    assert isinstance(sockets, dict)
    assert [(s["fd"], s["addr"]) for s in sockets["mllp"]] == [
        (3, list(a.getsockname())),
        (4, list(b.getsockname())),
    ]


def test_listen_fds_skips_descriptors_that_are_not_sockets(tcp_listeners: list[socket.socket]) -> None:
    """A FIFO among the inherited fds is skipped; the socket after it is still found."""
    read_end, write_end = os.pipe()
    try:
        report = run_activated([read_end, tcp_listeners[0].fileno()], "fifo:mllp")
    finally:
        os.close(read_end)
        os.close(write_end)
    sockets = report["sockets"]
    assert isinstance(sockets, dict)
    assert list(sockets) == ["mllp"]
    assert sockets["mllp"][0]["fd"] == 4


def test_listen_fds_wrong_pid_in_child_returns_nothing(tcp_listeners: list[socket.socket]) -> None:
    """Descriptors announced for another PID are not adopted, and the variables are still unset."""
    report = run_activated([tcp_listeners[0].fileno()], "mllp", listen_pid="1")
    assert report == {"sockets": {}, "env_left": []}


@pytest.mark.parametrize("unset", [True, False])
def test_listen_fds_wrong_pid_returns_empty(unset: bool) -> None:
    """A LISTEN_PID other than ours gives {}; the variables are removed only when asked."""
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "1", "LISTEN_FDNAMES": "mllp", "OTHER": "x"}
    assert listen_fds(environ, unset_environment=unset) == {}
    expected_keys = {"OTHER"} if unset else {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "OTHER"}
    assert set(environ) == expected_keys


@pytest.mark.parametrize("count", [None, "", "0", "-1", "two"])
def test_listen_fds_without_usable_count_returns_empty(count: str | None) -> None:
    """Missing, zero or malformed LISTEN_FDS means "not socket-activated", not an error."""
    environ = {"LISTEN_PID": str(os.getpid())}
    if count is not None:
        environ["LISTEN_FDS"] = count
    assert listen_fds(environ) == {}
    assert environ == {}


# --- unit files -----------------------------------------------------------------------------------


def test_units_agree_with_the_code() -> None:
    """The socket is named "mllp", the service pairs with it, and there is no ProcSubset=."""
    service, sock = unit_settings(SERVICE), unit_settings(SOCKET)
    assert sock["FileDescriptorName"] == ["mllp"]
    assert sock["Service"] == ["refloop.service"]
    assert service["Sockets"] == ["refloop.socket"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert "ProcSubset" not in service  # it silently removes prometheus-client's process_* metrics
    # refloop exits 2 on a configuration error (tests/test_systemd_daemon.py): restarting cannot fix that
    assert service["RestartPreventExitStatus"] == ["2"]
    from refloop.cli_common import EXIT_CONFIG

    assert EXIT_CONFIG == 2


def test_timeout_stop_covers_the_drain_grace() -> None:
    """systemd must not SIGKILL refloop while it is still draining frames within shutdown_grace."""
    from refloop.config.settings import MllpSettings

    (stop,) = unit_settings(SERVICE)["TimeoutStopSec"]
    assert stop.endswith("s")
    assert float(stop.removesuffix("s")) > MllpSettings().shutdown_grace


def test_service_security_exposure() -> None:
    """`systemd-analyze security --offline` passes --threshold=12 and reports exposure <= 1.2."""
    tool = require_tool("systemd-analyze", "systemd")
    proc = subprocess.run(
        [tool, "security", "--offline=yes", THRESHOLD, str(SERVICE)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "SYSTEMD_COLORS": "0"},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert match is not None, proc.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE


def render_units(tmp_path: Path) -> tuple[Path, Path]:
    """Copy both units into tmp_path with ExecStart= pointing at this venv's python running refloop.

    verify fails when ExecStart='s binary is missing, and /opt/refloop does not exist on CI hosts.
    """
    exec_start = f"ExecStart={sys.executable} -m refloop serve --config {tmp_path / 'refloop.toml'}"
    text, replaced = re.subn(r"(?m)^ExecStart=.*$", exec_start, SERVICE.read_text())
    assert replaced == 1
    service, sock = tmp_path / SERVICE.name, tmp_path / SOCKET.name
    service.write_text(text)
    shutil.copy(SOCKET, sock)
    return service, sock


def run_verify(tool: str, *units: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool, "verify", "--man=no", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=units[0].parent,
        env={**os.environ, "SYSTEMD_COLORS": "0"},
    )


def test_units_verify_cleanly(tmp_path: Path) -> None:
    """`systemd-analyze verify` on rendered copies of both units exits 0 and prints nothing."""
    tool = require_tool("systemd-analyze", "systemd")
    proc = run_verify(tool, *render_units(tmp_path))
    assert proc.returncode == 0
    assert proc.stderr == ""
    assert proc.stdout == ""


def test_verify_check_catches_a_typo(tmp_path: Path) -> None:
    """verify exits 0 on an unknown key, so only the empty-stderr assertion above catches it."""
    tool = require_tool("systemd-analyze", "systemd")
    service, sock = render_units(tmp_path)
    service.write_text(re.sub(r"(?m)^ProtectSystem=", "ProtectSytem=", service.read_text()))
    proc = run_verify(tool, service, sock)
    assert "ProtectSytem" in proc.stderr
