"""The `setting()` field helper, in its own module so every settings section can import it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import field
from typing import Any

Check = Callable[[Any], str | None]

#: HL7 versions accepted by default (MSH-12): 2.3 to 2.9, the versions interface engines send today (docs/hl7.md).
DEFAULT_VERSIONS = (
    "2.3", "2.3.1", "2.4", "2.5", "2.5.1", "2.6", "2.7", "2.7.1", "2.8", "2.8.1", "2.8.2", "2.9",
)


def setting(default: Any, doc: str, check: Check | None = None) -> Any:
    """A dataclass field that documents itself (the docs test reads ``doc``)."""
    if isinstance(default, (list, dict, set)):  # pragma: no cover - guard against mutable defaults
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata={"doc": doc, "check": check})
