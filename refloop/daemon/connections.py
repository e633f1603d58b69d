"""What an MLLP connection may know about the daemon: a small context, not the whole server.

``Live`` holds what SIGHUP may change (settings, TLS context, allowed networks). ``Hub`` is the set of
open connections with admission, per-IP counts, the tasks the daemon keeps alive, back-pressure and an
orderly shutdown that asks each connection to shut itself down. ``ConnContext`` is what a protocol is
built with; it holds no link back to the server (after uvicorn's ``(config, server_state)`` and
aiosmtpd's session objects).
"""

from __future__ import annotations

import asyncio
import ssl
from collections import Counter as Tally
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Protocol

from refloop.clock import Clock
from refloop.config import Settings
from refloop.daemon.access import Network, in_networks
from refloop.daemon.ingest import Job, Result
from refloop.daemon.metrics import Metrics
from refloop.daemon.projector import ApplyResult
from refloop.daemon.writer import Writer


@dataclass
class Live:
    """The parts of the configuration a reload replaces; connections read them on every use."""

    settings: Settings
    tls_context: ssl.SSLContext | None = None
    allowed_networks: tuple[Network, ...] = ()


class Connection(Protocol):
    """What the hub needs from a connection (``protocol.MllpProtocol``)."""

    peer: str

    def pause_for_lag(self, pause: bool) -> None: ...

    async def shutdown(self, deadline: float) -> int: ...


class Hub:
    def __init__(self, loop: asyncio.AbstractEventLoop, live: Live) -> None:
        self.loop = loop
        self.live = live
        self.connections: set[Connection] = set()
        self.per_ip: Tally[str] = Tally()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.accepting = False
        self.lag_paused = False

    def admit(self, conn: Connection) -> str | None:
        limits = self.live.settings.mllp
        if not self.accepting:
            return "shutting_down"
        if len(self.connections) >= limits.max_connections:
            return "max_connections"
        if self.per_ip[conn.peer] >= limits.max_connections_per_ip:
            return "max_per_ip"
        if self.live.allowed_networks and not in_networks(conn.peer, self.live.allowed_networks):
            return "not_allowed"
        self.connections.add(conn)
        self.per_ip[conn.peer] += 1
        return None

    def release(self, conn: Connection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            self.per_ip[conn.peer] -= 1
            if self.per_ip[conn.peer] <= 0:
                del self.per_ip[conn.peer]

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Tasks are held strongly until done (the loop only keeps weak references)."""
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def set_lag_paused(self, paused: bool) -> None:
        self.lag_paused = paused
        for conn in list(self.connections):
            conn.pause_for_lag(paused)

    async def shutdown(self, grace: float) -> int:
        """Stop admitting; ask every connection to finish the frames it has and close. Returns how many
        frames were cut (received but not started before the grace ran out)."""
        self.accepting = False
        deadline = self.loop.time() + grace
        cuts = await asyncio.gather(*(c.shutdown(deadline) for c in list(self.connections)))
        return sum(cuts)

    def cancel_tasks(self) -> None:
        for task in list(self.tasks):
            task.cancel()


@dataclass(frozen=True)
class ConnContext:
    """Everything one MLLP connection uses."""

    live: Live
    hub: Hub
    metrics: Metrics
    clock: Clock
    loop: asyncio.AbstractEventLoop
    writer_for_connection: Callable[[], Writer]
    wait_applied: Callable[[int], Coroutine[Any, Any, ApplyResult]]
    observe: Callable[[Job, Result], None]
