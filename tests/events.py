"""Building a referral's events by hand, for the pure domain tests (fold, stall)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from refloop.referral import Event, ReferralState, fold


class EventJournal:
    """Builds a referral's events with fresh message ids, as the journal would assign them."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self._ids: Iterator[int] = itertools.count(1)

    def add(self, kind: str, when: datetime, **data: Any) -> EventJournal:
        msg = next(self._ids)
        self.events.append(Event(kind, when, (msg, 0), f"CTRL{msg}", data))
        return self

    def fold(self, **kwargs: Any) -> ReferralState:
        return fold(self.events, **kwargs)

    def state(self) -> ReferralState:
        return fold(self.events)
