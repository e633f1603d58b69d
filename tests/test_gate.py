"""The SQLite write gate between the journal writer and background writers (projector, scan chunks), with
real threads: the writer goes first, and background work still gets the turn after each writer group."""

from __future__ import annotations

import threading
from collections.abc import Callable

from refloop.daemon.gate import WriteGate
from tests.utils import wait_for


class Holder(threading.Thread):
    """Takes one side of the gate, records when it got in, and holds it until released."""

    def __init__(self, gate: WriteGate, side: str, order: list[str]) -> None:
        super().__init__(daemon=True)
        self.gate, self.side, self.order = gate, side, order
        self.inside = threading.Event()
        self.release = threading.Event()

    def run(self) -> None:
        enter: Callable[[], object] = self.gate.writer if self.side.startswith("w") else self.gate.background
        with enter():  # type: ignore[attr-defined]
            self.order.append(self.side)
            self.inside.set()
            self.release.wait(10)


def start(gate: WriteGate, side: str, order: list[str]) -> Holder:
    h = Holder(gate, side, order)
    h.start()
    return h


def test_a_waiting_writer_goes_before_waiting_background_work() -> None:
    gate, order = WriteGate(), []  # type: ignore[var-annotated]
    scan = start(gate, "bg-scan", order)
    assert scan.inside.wait(5)
    writer = start(gate, "w1", order)
    assert wait_for(lambda: gate._writers_waiting == 1, 5)
    projector = start(gate, "bg-projector", order)
    assert wait_for(lambda: gate._background_waiting == 1, 5)
    scan.release.set()
    assert writer.inside.wait(5)
    assert not projector.inside.is_set()
    writer.release.set()
    assert projector.inside.wait(5)
    projector.release.set()
    for h in (scan, writer, projector):
        h.join(5)
    assert order == ["bg-scan", "w1", "bg-projector"]


def test_background_work_gets_the_turn_after_each_writer_group() -> None:
    """Writers arriving back to back cannot starve a scan chunk or the projector: after the current writer
    group, a waiting background writer goes next, then the next writer."""
    gate, order = WriteGate(), []  # type: ignore[var-annotated]
    w1 = start(gate, "w1", order)
    assert w1.inside.wait(5)
    scan = start(gate, "bg-scan", order)
    assert wait_for(lambda: gate._background_waiting == 1, 5)
    w2 = start(gate, "w2", order)
    assert wait_for(lambda: gate._writers_waiting == 1, 5)
    w1.release.set()
    assert scan.inside.wait(5)
    assert not w2.inside.is_set()
    scan.release.set()
    assert w2.inside.wait(5)
    w2.release.set()
    for h in (w1, scan, w2):
        h.join(5)
    assert order == ["w1", "bg-scan", "w2"]


def test_a_disabled_gate_never_waits() -> None:
    """PostgreSQL: no gate (row locks); both sides enter at once."""
    gate = WriteGate(enabled=False)
    with gate.writer(), gate.background(), gate.background():
        pass
