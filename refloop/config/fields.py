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

#: CX-5 identifier types (HL7 table 0203) that name the patient's record by default: medical record
#: number (MR, and the MRN some feeds and the 360X guide's example send), patient internal (PI) and
#: external (PT) identifiers, the enterprise number an EMPI hands out (PE), and untyped identifiers ("")
#: because v2.3 feeds and PID-2/PID-4 rarely carry a type. Other types (SS, DL, insurance member numbers)
#: are neither stored nor matched unless a profile lists them.
DEFAULT_PATIENT_ID_TYPES = ("MR", "MRN", "PI", "PT", "PE", "")


def setting(default: Any, doc: str, check: Check | None = None) -> Any:
    """A dataclass field that documents itself (the docs test reads ``doc``)."""
    if isinstance(default, (list, dict, set)):  # pragma: no cover - guard against mutable defaults
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata={"doc": doc, "check": check})
