"""Who may write to SQLite next: the journal writer goes first, the projector fills the gaps.

SQLite allows one writer at a time. Left to its busy handler, a writer that finds the lock taken sleeps
in growing steps (up to 100 ms) and an ACK waits for the whole projector batch. So the two threads that
write in this process take turns on this gate instead: the projector asks for it only when the writer does
not wait, and gives it back after the message it is applying whenever the writer starts waiting (see
``Projector._batch``). The writer therefore waits at most one message's application and one COMMIT.
PostgreSQL needs no gate (row locks; the two never touch the same rows).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class WriteGate:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._cv = threading.Condition()
        self._busy = False
        self._writers_waiting = 0

    @property
    def writer_waiting(self) -> bool:
        """Read by the projector between messages (a plain int read; the GIL keeps it whole)."""
        return self._writers_waiting > 0

    @contextlib.contextmanager
    def writer(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        with self._cv:
            self._writers_waiting += 1
            while self._busy:
                self._cv.wait()
            self._writers_waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    @contextlib.contextmanager
    def projector(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        with self._cv:
            while self._busy or self._writers_waiting:
                self._cv.wait()
            self._busy = True
        try:
            yield
        finally:
            with self._cv:
                self._busy = False
                self._cv.notify_all()
