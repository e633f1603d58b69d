"""Route table: (message type, trigger event) -> handler, given as an explicit list of values."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from refloop.routes.context import Handler
from refloop.routes.validate import Validator


@dataclass(frozen=True)
class Route:
    message_type: str  # MSH-9.1, e.g. "SIU"
    trigger: str  # MSH-9.2, e.g. "S12"; "*" matches any trigger of the type
    handler: Handler
    name: str = ""
    #: Structural check run on the ACK path (AE with ERR location before journaling); None: nothing to check.
    validate: Validator | None = None

    def __repr__(self) -> str:
        return f"Route({self.message_type}^{self.trigger} -> {self.name or self.handler!r})"


class Router:
    """Resolves a message to its route. Unknown types and unknown triggers stay distinguishable
    because HL7 answers them with different codes (200 unsupported type, 201 unsupported event)."""

    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = tuple(routes)
        self._exact: dict[tuple[str, str], Route] = {}
        self._any: dict[str, Route] = {}
        for r in self.routes:
            if r.trigger == "*":
                self._any.setdefault(r.message_type, r)
            else:
                self._exact.setdefault((r.message_type, r.trigger), r)
        self.types = {r.message_type for r in self.routes}

    def resolve(self, message_type: str, trigger: str) -> Route | None:
        t = message_type.upper()
        return self._exact.get((t, trigger.upper())) or self._any.get(t)

    def knows_type(self, message_type: str) -> bool:
        return message_type.upper() in self.types
