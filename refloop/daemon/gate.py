"""Who may write to SQLite next: the journal writer goes first, the projector fills the gaps.

SQLite allows one writer at a time. Left to its busy handler, a writer that finds the lock taken sleeps
in growing steps (up to 100 ms) and an ACK waits for the whole projector batch. So the two threads that
write in this process take turns on this gate instead. A waiting writer always gets the next turn; the
projector, once it waits, gets the turn after the writer's current group (else a busy listener would
starve it until back-pressure), and gives the gate back after ``SLICE`` seconds of applying whenever a
writer is waiting (``projector.Core``). So an ACK waits at most one slice, one message and one COMMIT.
PostgreSQL needs no gate (row locks; the two never touch the same rows).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

#: Seconds of applying the projector may finish while a writer waits (a few messages per COMMIT).
SLICE = 0.001


class WriteGate:
    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._cv = threading.Condition()
        self._busy = False
        self._writers_waiting = 0
        self._projector_waiting = False
        self._projector_turn = False  # a writer released while the projector waited: its turn next

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
            while self._busy or self._projector_turn:
                self._cv.wait()
            self._writers_waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            with self._cv:
                self._busy = False
                self._projector_turn = self._projector_waiting
                self._cv.notify_all()

    @contextlib.contextmanager
    def projector(self) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        with self._cv:
            self._projector_waiting = True
            while self._busy or (self._writers_waiting and not self._projector_turn):
                self._cv.wait()
            self._projector_waiting = self._projector_turn = False
            self._busy = True
        try:
            yield
        finally:
            with self._cv:
                self._busy = False
                self._cv.notify_all()
