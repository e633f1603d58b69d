"""What an applied message causes beyond its projection, in the message's own transaction.

Why its own module: the apply (``refloop.routes``) calls this once per state change, and what it does
belongs to three owners: the referrer's "loop closed" notice and the patient's no-show reminder
(:mod:`refloop.store.notices`), and, for a late message, the referral's alerts brought in line at once
(:func:`refloop.store.alerts.sync_referral`), so the worklist never waits for the next scan.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, update

from refloop import referral as rf
from refloop import stall
from refloop.config import Settings
from refloop.config.windows import windows_from_settings
from refloop.notify import policy
from refloop.store import notices
from refloop.store import referrals as repo
from refloop.store.alerts import ScanResult, sync_referral

REFERRALS = repo.REFERRALS


class _Projected:
    """The referral row as just written: the old row's columns with the recomputed values over them."""

    def __init__(self, before: Any, values: dict[str, Any]) -> None:
        names = before._mapping.keys() if hasattr(before, "_mapping") else REFERRALS.columns.keys()
        self.__dict__.update({n: getattr(before, n) for n in names})
        self.__dict__.update(values)


def on_projection_change(conn: Connection, settings: Settings, now: datetime, before: Any, values: dict[str, Any],
                         state: rf.ReferralState, pauses: list[stall.Pause]) -> None:
    """What a message's state change causes, in the message's own transaction: the loop closed by a consult
    note (referrer notice), a new no-show (patient re-engagement reminder), and, when the referral's stored
    due time has already passed (a late message, a stage that stopped), its alerts brought in line at once
    (:func:`sync_referral`), so the worklist agrees with the report without waiting for the next scan.
    Same idempotency keys as the scan's catch-up, so whichever runs first enqueues and the other finds the
    key taken."""
    due = values.get("next_due_at")
    windows = windows_from_settings(settings.stall)
    if due is not None and due <= now and values.get("clock_version") == windows.version:
        inp = stall.ClockInput.of_state(state, pauses)
        cursor = sync_referral(conn, settings, _Projected(before, values), inp, windows, now, ScanResult(settings, now))
        conn.execute(update(REFERRALS).where(REFERRALS.c.id == before.id).values(next_due_at=repo.utc(cursor)))
    closed_now = state.status is rf.Status.CLOSED and before.status != rf.Status.CLOSED.value
    if closed_now and state.note_received_at is not None and policy.referrer_channels(settings.notify):
        notices.announce_loop_closed(conn, settings, _Projected(before, values), now)
    if state.status is rf.Status.NO_SHOW and state.no_show_count > int(before.no_show_count or 0):
        notices.no_show_reminder(conn, settings, _Projected(before, values), state.no_show_count, now)
