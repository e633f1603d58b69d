"""Test helpers: a real daemon on 127.0.0.1 ephemeral ports, and a small MLLP client.

The daemon runs in a thread with its own event loop (the tests stay synchronous and drive it with
real sockets), or in a subprocess where signals and crashes matter.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from refloop.clock import Clock
from refloop.config import DatabaseSettings, HttpSettings, MllpSettings, Settings
from refloop.daemon.server import Server

VT, FS, CR = b"\x0b", b"\x1c", b"\r"


def journal_rows(url: str, control_id: str | None = None) -> list[Any]:
    """Journal rows (oldest first), read with a fresh engine straight from the database."""
    from sqlalchemy import select

    from refloop.store.engine import make_engine
    from refloop.store.models import Message as Journal

    engine = make_engine(DatabaseSettings(url=url))
    try:
        stmt = select(Journal.__table__).order_by(Journal.id)
        if control_id is not None:
            stmt = stmt.where(Journal.control_id == control_id)
        with engine.connect() as conn:
            return list(conn.execute(stmt).all())
    finally:
        engine.dispose()


def require_tool(name: str, debian_package: str) -> str:
    """Return the path of ``name``; skip when it is missing, but fail when ``$CI`` is set.

    A developer laptop without systemd should still run the rest of the suite, while a CI image
    without the tool would otherwise turn the unit-file checks into silent skips.
    """
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} not found on PATH: install the Debian package '{debian_package}'"
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{message} (CI is set, so a missing tool is a failure, not a skip)")
    pytest.skip(message)


def make_settings(db_url: str, **mllp: Any) -> Settings:
    """Settings for a test daemon: ephemeral ports on loopback, the given database.

    Most socket tests read the referral state right after the ACK, which is what ``ack_after = "applied"``
    promises, so that is their default here; journal-mode tests pass ``ack_after="journal"`` and wait for
    the lag to reach 0 (:meth:`DaemonThread.settle`) before reading state."""
    busy = mllp.pop("busy_timeout_ms", 2000)
    mllp.setdefault("ack_after", "applied")
    return Settings(
        mllp=MllpSettings(host="127.0.0.1", port=0, **mllp),
        http=HttpSettings(host="127.0.0.1", port=0),
        database=DatabaseSettings(url=db_url, busy_timeout_ms=busy, auto_migrate=True),
    )


class DaemonThread:
    def __init__(self, settings: Settings, clock: Clock | None = None,
                 loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop, **kw: Any) -> None:
        self.registry = CollectorRegistry()
        self.server = Server(settings, clock=clock, registry=self.registry, environ={}, **kw)
        self.loop = loop_factory()
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def main() -> None:
            task = asyncio.ensure_future(self.server.serve())
            while not self.server.listening and not task.done():  # noqa: ASYNC110 - polling a flag set elsewhere
                await asyncio.sleep(0.01)
            self._ready.set()
            await task

        try:
            self.loop.run_until_complete(main())
        except BaseException as exc:  # surfaced by start()/stop()
            self.error = exc
        finally:
            self._ready.set()
            self.loop.close()

    def start(self) -> DaemonThread:
        self.thread.start()
        self._ready.wait(30)
        if self.error is not None:
            raise self.error
        return self

    def stop(self, timeout: float = 30) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.server.request_stop)
            self.thread.join(timeout)
        if self.error is not None:
            raise self.error

    @property
    def port(self) -> int:
        return self.server.mllp_port

    @property
    def http_port(self) -> int:
        return self.server.http_port

    def settle(self, timeout: float = 20.0) -> None:
        """Wait until every journaled message is applied (``apply_lag_messages`` 0 on /readyz)."""
        assert wait_applied(self.http_port, timeout), "apply lag did not reach 0"

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def get(self, path: str) -> tuple[int, Any]:
        return http_get(self.http_port, path)


def http_get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            body = resp.read()
            status = resp.status
            ctype = resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        body, status, ctype = err.read(), err.code, err.headers.get("Content-Type", "")
    return status, json.loads(body) if "json" in ctype else body.decode()


def wait_applied(http_port: int, timeout: float = 20.0) -> bool:
    """Poll /readyz until the daemon reports no journaled message waiting for the projector."""
    def done() -> bool:
        try:
            _status, body = http_get(http_port, "/readyz")
        except OSError:
            return False
        return isinstance(body, dict) and body.get("apply_lag_messages") == 0

    return wait_for(done, timeout=timeout, interval=0.02)


@contextlib.contextmanager
def running_daemon(settings: Settings, **kw: Any) -> Iterator[DaemonThread]:
    d = DaemonThread(settings, **kw).start()
    try:
        yield d
    finally:
        d.stop()


def frame(msg: str | bytes) -> bytes:
    data = msg.encode("latin-1") if isinstance(msg, str) else msg
    return VT + data + FS + CR


class MllpClient:
    """A lock-step MLLP sender, like an interface engine: send, wait for the ACK, send the next."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 15.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_frame(self) -> bytes:
        while True:
            start = self.buf.find(VT)
            end = self.buf.find(FS + CR, start + 1) if start >= 0 else -1
            if start >= 0 and end >= 0:
                payload = self.buf[start + 1:end]
                self.buf = self.buf[end + 2:]
                return payload
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed by peer")
            self.buf += chunk

    def send(self, msg: str | bytes) -> str:
        self.send_raw(frame(msg))
        return self.read_frame().decode("latin-1")

    def closed_by_peer(self, timeout: float = 5.0) -> bool:
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> MllpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ack_segments(ack: str) -> dict[str, list[str]]:
    """Segments of an ACK by ID (first occurrence), split on '|'."""
    out: dict[str, list[str]] = {}
    for seg in ack.strip("\r").split("\r"):
        out.setdefault(seg[:3], seg.split("|"))
    return out


def msa(ack: str) -> tuple[str, str]:
    f = ack_segments(ack)["MSA"]
    return f[1], f[2]


def err_code(ack: str) -> str:
    segs = ack_segments(ack)
    if "ERR" not in segs:
        return ""
    f = segs["ERR"]
    if len(f) > 3 and f[3]:
        return f[3].split("^")[0]
    return f[1].split("^")[3].split("&")[0] if len(f) > 1 and f[1].count("^") >= 3 else ""


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


# -- subprocess daemon ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclasses.dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    port: int
    http_port: int
    log_path: Path

    def wait_ready(self, timeout: float = 30.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            time.sleep(0.05)
        raise TimeoutError("daemon not ready")


def start_daemon_process(tmp: Path, db_url: str, extra_env: dict[str, str] | None = None,
                         args: tuple[str, ...] = ()) -> DaemonProcess:
    port, http_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFLOOP_")}
    env.update({
        "REFLOOP_MLLP_PORT": str(port), "REFLOOP_HTTP_PORT": str(http_port),
        "REFLOOP_DATABASE_URL": db_url, "REFLOOP_DATABASE_AUTO_MIGRATE": "true",
        **(extra_env or {}),
    })
    log_path = tmp / f"daemon-{port}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "refloop", "serve", *args], env=env, cwd=tmp,
        stdout=log_path.open("ab"), stderr=subprocess.STDOUT,
    )
    d = DaemonProcess(proc, port, http_port, log_path)
    d.wait_ready()
    return d


def work(conn: Any, settings: Any, now: Any, owner: str = "") -> list[dict[str, Any]]:
    """The whole active worklist (everyone's, or one owner's), most overdue first: the worklist's one query
    (:func:`refloop.store.worklist_view.page`), as the page, the API and ``refloop worklist`` read it."""
    from refloop.store import worklist_view

    return list(worklist_view.iterate(conn, settings, now, worklist_view.Filters(owner=owner)))
