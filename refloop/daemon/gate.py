"""Who may write to SQLite next: the journal writer goes first, the projector and the scan fill the gaps.

SQLite allows one writer at a time. Left to its busy handler, a writer that finds the lock taken sleeps
in growing steps (up to 100 ms) and an ACK waits for the whole projector batch. So the two threads that
write in this process take turns on this gate instead. A waiting writer always gets the next turn; the
projector, once it waits, gets the turn after the writer's current group (else a busy listener would
starve it until back-pressure), and gives the gate back after ``SLICE`` seconds of applying whenever a
writer is waiting (``projector.Core``). So an ACK waits at most one slice, one message and one COMMIT.
The stall scan's short write transactions take the same background turn (``background``): left to
SQLite's busy handler, a journal COMMIT that met a scan chunk slept in steps of up to 100 ms (ACK p50
55 ms during the first scan of a 100k store), where the gate wakes it the moment the chunk commits.
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
        self._background_waiting = 0  # projector and scan threads waiting for a turn
        self._background_turn = False  # a writer released while background work waited: its turn next

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
            while self._busy or self._background_turn:
                self._cv.wait()
            self._writers_waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            with self._cv:
                self._busy = False
                self._background_turn = self._background_waiting > 0
                self._cv.notify_all()

    @contextlib.contextmanager
    def background(self) -> Iterator[None]:
        """A turn for the projector or a scan chunk: after the writer's current group, never before it."""
        if not self.enabled:
            yield
            return
        with self._cv:
            self._background_waiting += 1
            while self._busy or (self._writers_waiting and not self._background_turn):
                self._cv.wait()
            self._background_waiting -= 1
            self._background_turn = False
            self._busy = True
        try:
            yield
        finally:
            with self._cv:
                self._busy = False
                self._cv.notify_all()
