"""Answers from patients and practices (the signed callback and ``POST /api/referrals/{id}/answer``).

Why its own module: an answer is about the referral, not about one alert, and its effect is a timeline event
(close, a hold for some days, or a note) that the clock then reads; only a close resolves the open alerts.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import Connection, update

from refloop import referral as rf
from refloop.config import Settings
from refloop.config.windows import windows_from_settings
from refloop.store import audit
from refloop.store import referrals as repo
from refloop.store.alerts import ALERTS, RESOLVED, ActionError, add_manual_event

ANSWERS: Final = {
    "booked_elsewhere": "close",  # the patient was seen elsewhere: the loop is closed, stop chasing
    "declined": "close",  # the patient does not want the referral
    "will_book": "hold",  # give the patient time before alerting again
}


def answer(conn: Connection, settings: Settings, rid: int, answer_code: str, now: datetime, *, actor: str,
           note: str = "", hold_days: float = 7.0) -> dict[str, Any]:
    """A patient's or practice's answer as timeline events: close, hold for *hold_days*, or just a note."""
    code = answer_code.strip().lower()[:32]
    if not code:
        raise ActionError(400, "answer is required")
    actor = (actor or "unknown")[:64]
    effect = ANSWERS.get(code, "note")
    data: dict[str, Any] = {"actor": actor, "answer": code}
    if note:
        data["note"] = note
    if effect == "close":
        add_manual_event(conn, rid, rf.MANUAL_CLOSED, now, {**data, "reason": code})
    elif effect == "hold":
        resume = now + timedelta(days=hold_days)
        add_manual_event(conn, rid, rf.HOLD_STARTED, now, {**data, "reason": code, "resume_at": resume.isoformat()})
    else:
        add_manual_event(conn, rid, rf.COORDINATOR_NOTE, now, data)
    state = repo.refresh(conn, rid, now, windows=windows_from_settings(settings.stall))
    if effect == "close":
        conn.execute(update(ALERTS).where(ALERTS.c.referral_id == rid, ALERTS.c.open_key == 0).values(
            status=RESOLVED, resolved_at=repo.utc(now), open_key=ALERTS.c.id, last_action=f"answer_{code}",
            last_action_at=repo.utc(now)))
    audit.record(conn, now=now, actor=actor, action="referral_answer", target=f"referral:{rid}", detail=code)
    return {"referral": rid, "answer": code, "effect": effect, "status": state.status.value,
            "on_hold": state.on_hold}
