"""Talk to systemd without libsystemd: readiness notification, watchdog, socket activation.

systemd documents the notify protocol and the ``LISTEN_FDS`` hand-over as the stable interface
(sd_notify(3) ships standalone reimplementations; the interface-stability chart lists
``$NOTIFY_SOCKET`` as reimplementable), so a few dozen lines of stdlib beat a C extension
(``systemd-python`` needs ``libsystemd-dev`` and a compiler) or an unmaintained wrapper that
swallows errors (``sdnotify``).

Everything here takes the environment as an argument instead of reading ``os.environ`` at import
time, so tests can inject it and importing the module has no side effects.

Outside systemd (``make run``, tests) every function degrades to a no-op: no ``NOTIFY_SOCKET``
means nothing is sent, no ``LISTEN_FDS`` means the caller binds its own listener.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from typing import NoReturn

__all__ = [
    "LISTEN_FDS_START",
    "Notifier",
    "listen_fds",
    "watchdog_interval",
    "watchdog_loop",
]

logger = logging.getLogger(__name__)

#: First inherited descriptor (``SD_LISTEN_FDS_START``): 0-2 stay stdin/stdout/stderr.
LISTEN_FDS_START = 3

#: Name systemd's own sd_listen_fds_with_names() reports when ``LISTEN_FDNAMES`` is absent.
DEFAULT_FD_NAME = "unknown"

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class Notifier:
    """Sends sd_notify(3) datagrams to the socket named by ``$NOTIFY_SOCKET``.

    A fresh datagram socket is opened per message, like libsystemd does: messages are rare
    (start, reload, stop, a watchdog ping every few seconds), and holding no socket means a
    restarted or re-executed service manager never leaves us writing into a stale connection.

    Send failures never raise: a lost ``READY=1`` already surfaces as a start timeout and a lost
    ``WATCHDOG=1`` as a watchdog restart, while raising would turn a notification hiccup into a
    crash mid-ACK. Instead :meth:`notify` returns ``False``, logs the errno, and bumps
    :attr:`failures` for the metrics layer to export.
    """

    __slots__ = ("_address", "failures", "send_timeout", "socket_name")

    def __init__(self, socket_name: str | None, *, send_timeout: float = 1.0) -> None:
        """Wrap a ``$NOTIFY_SOCKET`` value; ``None`` or empty gives a silent no-op notifier.

        ``send_timeout`` bounds a blocking send when systemd's receive queue is full: the
        watchdog pings from the event loop, and an unbounded block there would stall every
        MLLP connection rather than just miss one ping.
        """
        self.socket_name = socket_name or None
        self.send_timeout = send_timeout
        self.failures = 0
        self._address = _notify_address(self.socket_name)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """Build from an environment mapping (normally ``os.environ``) injected by the caller."""
        return cls(environ.get("NOTIFY_SOCKET"))

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that asked for notifications."""
        return self.socket_name is not None

    def __repr__(self) -> str:
        return f"Notifier(socket_name={self.socket_name!r}, failures={self.failures})"

    def notify(self, *lines: str) -> bool:
        """Send ``lines`` as one datagram; True only if it was handed to the kernel.

        False means "not delivered": either notifications are disabled (check :attr:`enabled`,
        this is not counted as a failure) or the send failed (counted in :attr:`failures`).
        Newlines inside a line are replaced by spaces, because the protocol is newline-separated
        ``KEY=value`` pairs and free text (``STATUS=``) must not be able to forge ``READY=1``.
        """
        if self.socket_name is None:
            return False
        payload = "\n".join(_one_line(line) for line in lines).encode("utf-8")
        if self._address is None:
            return self._failed(f"unsupported NOTIFY_SOCKET address {self.socket_name!r}")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(self.send_timeout)
                sock.sendto(payload, self._address)
        except OSError as exc:
            return self._failed(_describe(exc))
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell systemd the listener is accepting and the store is open (ends ``activating``)."""
        return self.notify("READY=1", *_status_lines(status))

    def reloading(self, status: str | None = None) -> bool:
        """Announce a SIGHUP reload; follow it with :meth:`ready` once the new config is live.

        ``MONOTONIC_USEC`` is required by systemd >= 253 to pair the reload with its job
        (``Type=notify-reload``) and ignored by older versions such as Debian 12's 252.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", *_status_lines(status))

    def stopping(self, status: str | None = None) -> bool:
        """Announce graceful shutdown so systemd reports ``deactivating`` while we drain."""
        return self.notify("STOPPING=1", *_status_lines(status))

    def status(self, text: str) -> bool:
        """Set the free-text line ``systemctl status`` shows (counts only, never PHI)."""
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        """Send one keep-alive; :func:`watchdog_loop` calls this on a timer."""
        return self.notify("WATCHDOG=1")

    def _failed(self, reason: str) -> bool:
        self.failures += 1
        logger.warning("sd_notify failed (%s); failures so far: %d", reason, self.failures)
        return False


def _notify_address(socket_name: str | None) -> bytes | None:
    """Map ``$NOTIFY_SOCKET`` to a sendto() address; None for forms we cannot reach.

    ``/path`` is a filesystem socket and ``@name`` the Linux abstract namespace (leading NUL).
    Newer systemd also allows ``vsock:`` addresses (for VMs); those are reported as failures
    rather than silently ignored, because the manager is waiting for our ``READY=1``.
    """
    if not socket_name:
        return None
    if socket_name.startswith("/"):
        return os.fsencode(socket_name)
    if socket_name.startswith("@") and len(socket_name) > 1:
        return b"\0" + os.fsencode(socket_name[1:])
    return None


def _one_line(line: str) -> str:
    return line.replace("\r", " ").replace("\n", " ")


def _status_lines(status: str | None) -> tuple[str, ...]:
    return () if status is None else (f"STATUS={status}",)


def watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when the watchdog is off or not ours.

    Half of ``WatchdogSec`` (as sd_watchdog_enabled(3) advises) leaves a full interval of slack
    for a slow tick. ``WATCHDOG_PID`` names the process systemd expects pings from; when it is
    set to another PID (we were started by a wrapper, or inherited the variable from a parent)
    pinging would be pointless, so we report "off".
    """
    usec = _positive_int(environ.get("WATCHDOG_USEC"))
    if usec is None:
        return None
    pid_text = environ.get("WATCHDOG_PID")
    if pid_text is not None and _positive_int(pid_text) != os.getpid():
        return None
    return usec / 2_000_000


async def watchdog_loop(notifier: Notifier, interval: float) -> NoReturn:
    """Ping ``WATCHDOG=1`` every ``interval`` seconds until cancelled.

    This runs as a task on the daemon's own event loop on purpose, not in a thread: if
    synchronous work ever blocks the loop, the pings stop, systemd's watchdog fires and the
    service is restarted, which is the failure the watchdog exists to catch. Do not tie it to
    database health either: a DB outage should produce AR answers and a gauge, not a restart loop.
    """
    if interval <= 0:
        raise ValueError(f"watchdog interval must be positive, got {interval!r}")
    while True:
        notifier.watchdog()
        await asyncio.sleep(interval)


def listen_fds(environ: MutableMapping[str, str], unset_environment: bool = True) -> dict[str, list[socket.socket]]:
    """Sockets passed in by systemd socket activation, grouped by ``FileDescriptorName=``.

    Follows sd_listen_fds_with_names(3): the variables only count when ``LISTEN_PID`` is our
    PID (otherwise they were meant for a parent and are not ours to touch), the descriptors
    start at 3, and ``LISTEN_FDNAMES`` is colon-separated with ``"unknown"`` as the default.
    Missing or empty names fall back to ``"unknown"`` rather than failing the start, since the
    caller picks its listener by name and reports what it did not find.

    Every inherited descriptor gets ``FD_CLOEXEC`` so helper processes never hold the listener
    open across a restart. With ``unset_environment`` the three variables are removed from
    ``environ`` whatever the outcome, as libsystemd does, so children do not mistake them for
    their own. Descriptors that are not sockets (``ListenFIFO=``) are skipped with a warning.
    An empty dict means "not socket-activated": bind the configured address instead.
    """
    try:
        if _positive_int(environ.get("LISTEN_PID")) != os.getpid():
            return {}
        count = _positive_int(environ.get("LISTEN_FDS"))
        if count is None:
            return {}
        names = _fd_names(environ.get("LISTEN_FDNAMES"), count)
    finally:
        if unset_environment:
            for key in _LISTEN_VARS:
                environ.pop(key, None)

    found: dict[str, list[socket.socket]] = {}
    for offset, name in enumerate(names):
        fd = LISTEN_FDS_START + offset
        sock = _adopt_socket(fd)
        if sock is not None:
            found.setdefault(name, []).append(sock)
    return found


def _fd_names(raw: str | None, count: int) -> list[str]:
    given = raw.split(":") if raw else []
    names = [name or DEFAULT_FD_NAME for name in given[:count]]
    return names + [DEFAULT_FD_NAME] * (count - len(names))


def _adopt_socket(fd: int) -> socket.socket | None:
    try:
        os.set_inheritable(fd, False)
        # fileno= makes CPython query family/type/protocol from the kernel (SO_DOMAIN etc.).
        return socket.socket(fileno=fd)
    except OSError as exc:
        logger.warning("inherited fd %d is not a usable socket (%s); skipping it", fd, _describe(exc))
        return None


def _describe(exc: OSError) -> str:
    """Errno name and text only: never str(exc), which can carry paths and payload fragments."""
    if exc.errno is None:
        return type(exc).__name__
    return f"{errno.errorcode.get(exc.errno, exc.errno)}: {os.strerror(exc.errno)}"


def _positive_int(text: str | None) -> int | None:
    # isascii(): str.isdigit() also accepts digits such as "²" that int() rejects.
    if text is None or not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value > 0 else None
