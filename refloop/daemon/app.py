"""What the HTTP handlers, the dashboard and the scheduled jobs may use of the running daemon.

A structural type (``Server`` satisfies it without naming it), so those modules depend on this small
contract instead of importing the server module: imports run one way (server -> http, scheduler), and no
module in ``daemon/`` needs the server to type its arguments.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sized
from contextlib import AbstractContextManager
from typing import Any, Protocol

from sqlalchemy import Engine

from refloop.clock import Clock
from refloop.config import Settings
from refloop.daemon.metrics import Metrics
from refloop.daemon.systemd import Notifier


class AppContext(Protocol):
    settings: Settings
    clock: Clock
    metrics: Metrics
    engine: Engine | None
    notifier: Notifier
    loop: asyncio.AbstractEventLoop

    @property
    def listening(self) -> bool: ...

    @property
    def lag_paused(self) -> bool: ...

    @property
    def connections(self) -> Sized: ...

    def database_ping(self) -> bool: ...

    def ingest_idle(self) -> bool: ...

    def background_turn(self) -> AbstractContextManager[None]:
        """Held around a background write transaction (the scan's chunks): the journal writer goes first."""
        ...

    def apply_lag(self) -> tuple[int, float] | None: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]: ...
