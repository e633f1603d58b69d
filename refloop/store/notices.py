"""Notifications about referrals and alerts: who is told what, on which channels, under which key.

Why its own module: the alert writes (:mod:`refloop.store.alerts`), the scan (:mod:`refloop.store.scan`)
and the dispatcher all cause notifications, and each is enqueued in the caller's transaction (transactional
outbox, :mod:`refloop.store.outbox`) under an idempotency key, so whichever path runs first enqueues it
and the others find the key taken. Payloads carry IDs and codes; provider names and specialty only with
``notify.webhook_phi``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Final

from sqlalchemy import ColumnElement, Connection, String, and_, cast, exists, literal, or_, select

from refloop import referral as rf
from refloop.config import Settings
from refloop.config.notify import parse_escalation
from refloop.config.windows import level_name
from refloop.notify import policy
from refloop.store import outbox
from refloop.store import referrals as repo
from refloop.store.models import Alert

REFERRALS, DOCUMENTS = repo.REFERRALS, repo.DOCUMENTS
#: Loop-closed notices are only sent for loops closed this recently, so enabling notifications on an old
#: database does not mail every referrer about years of history.
LOOP_CLOSED_LOOKBACK: Final = timedelta(days=14)


def escalation_owner(settings: Settings, level: int, owner: str) -> str:
    """Who is told that an alert reached *level*: ``worklist.escalation_owners``, else its owner."""
    for text in settings.worklist.escalation_owners:
        at, who = parse_escalation(text)
        if at == level:
            return who
    return owner


def _base_payload(settings: Settings, ref: Any, event: str, now: datetime) -> dict[str, Any]:
    """IDs and statuses only; provider names and specialty only with ``webhook_phi``."""
    payload: dict[str, Any] = {"event": event, "referral_id": ref.id, "placer_id": ref.placer_id,
                               "status": ref.status, "at": now.isoformat()}
    if settings.notify.webhook_phi:
        payload.update(referred_to=ref.referred_to, referring_provider=ref.referring_provider,
                       specialty=ref.specialty)
    return payload


def _fan_out(conn: Connection, settings: Settings, ref: Any, channels: list[tuple[str, str]], event: str,
             key: str, payload: dict[str, Any], now: datetime, alert_id: int | None = None) -> int:
    suppressed = policy.mode_for(settings.worklist, policy.Parties.of(ref)) != policy.ACTIVE
    n = 0
    for channel, target in channels:
        n += outbox.enqueue(conn, key=f"{key}:{channel}", channel=channel, target=target, event=event, now=now,
                            payload=payload, referral_id=ref.id, alert_id=alert_id, suppressed=suppressed)
    return n


def notify_owner(conn: Connection, settings: Settings, ref: Any, row: dict[str, Any], event: str, key: str,
                  now: datetime) -> int:
    """Tell the alert's owner (or who ``escalation_owners`` names for its level); the payload is only built
    when a channel is configured (a scan calls this for every alert it raises or escalates)."""
    level = int(row["level"])
    target = escalation_owner(settings, level, row["owner"])
    channels = policy.owner_channels(settings.notify, settings.worklist, target)
    if not channels:
        return 0
    payload = {**_base_payload(settings, ref, event, now), "alert_id": row["id"], "stage": row["stage"],
               "level": level, "level_name": level_name(settings.stall, level),
               "overdue_days": round(float(row["overdue_days"]), 2), "owner": row["owner"]}
    if target != row["owner"]:
        payload["escalated_to"] = target
    return _fan_out(conn, settings, ref, channels, event, key, payload, now, alert_id=row["id"])


def notify_patient(conn: Connection, settings: Settings, ref: Any, event: str, key: str, now: datetime,
                    alert_id: int | None = None) -> int:
    """The patient-engagement system resolves the patient from the placer ID; refloop holds no contact data."""
    channels = policy.patient_channels(settings.notify)
    if not channels:
        return 0
    payload = {"event": event, "referral_id": ref.id, "placer_id": ref.placer_id, "at": now.isoformat()}
    return _fan_out(conn, settings, ref, channels, event, key, payload, now, alert_id=alert_id)


def no_show_reminder(conn: Connection, settings: Settings, ref: Any, no_show_count: int, now: datetime) -> int:
    """One re-engagement reminder per no-show (keyed by the count, so a resent no-show is not re-sent;
    the scan's catch-up looks for the same key)."""
    return notify_patient(conn, settings, ref, "no_show_reminder", f"patient:no_show:{ref.id}:{no_show_count}", now)


def loop_closed_catch_up(conn: Connection, settings: Settings, now: datetime) -> int:
    """Catch-up for :func:`refloop.store.effects.on_projection_change`: referrals closed by a consult note
    (not by hand) since the lookback and not yet announced
    (e.g. a status reached through a replay or an older version)."""
    if not policy.referrer_channels(settings.notify):
        return 0  # nothing to enqueue (and nothing marks them announced): skip the per-referral lookups
    key = literal("loop_closed:") + cast(REFERRALS.c.id, String)  # announce_loop_closed's key, in SQL
    rows = list(conn.execute(select(REFERRALS).where(
        REFERRALS.c.status == rf.Status.CLOSED.value, REFERRALS.c.note_received_at.is_not(None),
        REFERRALS.c.closed_at <= repo.utc(now), REFERRALS.c.closed_at >= repo.utc(now - LOOP_CLOSED_LOOKBACK),
        and_(*(~_taken(key, channel) for channel in policy.CHANNELS))).order_by(REFERRALS.c.closed_at, REFERRALS.c.id)))
    return sum(announce_loop_closed(conn, settings, ref, now) for ref in rows)


def _taken(key: ColumnElement[str], channel: str) -> ColumnElement[bool]:
    """Whether the notification keyed *key* (built in SQL exactly as the f-strings here build it) was
    enqueued on *channel*: one probe of ``uq_outbox_idempotency_key`` per candidate, so a catch-up is one
    statement over its candidates. (Looking for "any loop_closed row of the referral" read the whole
    outbox on every scan, and the no-show catch-up ran one query per no-show referral of the store:
    0.4 s a scan at 100k referrals with a patient channel.)"""
    return exists().where(outbox.OUTBOX.c.idempotency_key == key + f":{channel}")


def announce_loop_closed(conn: Connection, settings: Settings, ref: Any, now: datetime) -> int:
    """Tell the referrer (webhook, e-mail, and the note forwarded over MLLP); keyed per referral, once."""
    payload = _base_payload(settings, ref, "loop_closed", now)
    payload["closed_at"] = repo.iso(repo.aware(ref.closed_at))
    doc = conn.execute(select(DOCUMENTS.c.id, DOCUMENTS.c.document_id).where(
        DOCUMENTS.c.referral_id == ref.id, DOCUMENTS.c.final.is_(True), DOCUMENTS.c.status != "retracted")
        .order_by(DOCUMENTS.c.id.desc()).limit(1)).first()
    if doc is not None:
        payload.update(document_row=doc.id, document_id=doc.document_id)
    return _fan_out(conn, settings, ref, policy.referrer_channels(settings.notify), "loop_closed",
                    f"loop_closed:{ref.id}", payload, now)


def dead_letter_notice(conn: Connection, settings: Settings, dead: dict[str, Any], now: datetime) -> int:
    """Tell the owner a notification was dead-lettered, on the other channels (the failed one may be down)."""
    if dead["event"] == "dead_letter":
        return 0
    owner = settings.worklist.default_owner
    if dead["alert_id"] is not None:
        found = conn.execute(select(Alert.__table__.c.owner).where(Alert.__table__.c.id == dead["alert_id"])).scalar()
        owner = found or owner
    channels = [c for c in policy.owner_channels(settings.notify, settings.worklist, owner, digest_email=True)
                if c[0] != dead["channel"]]
    payload = {"event": "dead_letter", "outbox_id": dead["id"], "failed_event": dead["event"],
               "channel": dead["channel"], "referral_id": dead["referral_id"], "alert_id": dead["alert_id"],
               "at": now.isoformat()}
    n = 0
    for channel, target in channels:
        n += outbox.enqueue(conn, key=f"dead:{dead['id']}:{channel}", channel=channel, target=target,
                            event="dead_letter", now=now, payload=payload, referral_id=dead["referral_id"])
    return n


def no_show_catch_up(conn: Connection, settings: Settings, now: datetime) -> int:
    """Catch-up for the apply's no-show reminder (e.g. a patient channel configured later): one per no-show,
    keyed by the count, so a resent no-show is never re-sent."""
    channels = policy.patient_channels(settings.notify)
    if not channels:
        return 0
    # no_show_reminder's key, in SQL
    key = (literal("patient:no_show:") + cast(REFERRALS.c.id, String) + ":"
           + cast(REFERRALS.c.no_show_count, String))
    rows = list(conn.execute(select(REFERRALS).where(
        REFERRALS.c.status == rf.Status.NO_SHOW.value, or_(*(~_taken(key, channel) for channel, _ in channels)))
        .order_by(REFERRALS.c.id)))
    return sum(no_show_reminder(conn, settings, ref, int(ref.no_show_count), now) for ref in rows)
