"""The daily digest: one e-mail per owner listing their new and still-open alerts.

Why its own module: it owns one rule, "once per owner per local day, at the digest hour", and that day is the
clinic's (``stall.timezone``), like business days and quiet hours, so an owner in New York gets the
digest at 07:00 New York time. The daemon runs it as an APScheduler cron trigger in that zone; this
function is idempotent per owner and local date, so a late or repeated run enqueues nothing twice.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, select

from refloop.config import Settings
from refloop.config.windows import level_name, windows_from_settings
from refloop.notify import policy
from refloop.store import alerts, outbox
from refloop.store import referrals as repo


def digest(conn: Connection, settings: Settings, now: datetime) -> int:
    """One e-mail per owner per local day listing new (last 24 h) and still-open alerts; idempotent per day."""
    ws = settings.worklist
    local = now.astimezone(windows_from_settings(settings.stall).tz)
    if ws.digest == "immediate" or local.hour < ws.digest_hour:
        return 0
    a, r = alerts.ALERTS, repo.REFERRALS
    rows = conn.execute(select(a, r.c.placer_id, r.c.authority, r.c.referred_to, r.c.referred_to_id, r.c.specialty)
                        .join(r, r.c.id == a.c.referral_id)
                        .where(a.c.status.in_((alerts.OPEN, alerts.ACKNOWLEDGED))).order_by(a.c.id))
    by_owner: dict[str, list[Any]] = defaultdict(list)
    for row in rows:
        by_owner[row.owner].append(row)
    day = local.date().isoformat()
    since = now - timedelta(days=1)
    n = 0
    for owner, found in sorted(by_owner.items()):
        email = policy.owner_email(settings.notify, owner)
        if not settings.notify.smtp_host or not email:
            continue
        active = [x for x in found if policy.mode_for(ws, policy.Parties(
            x.authority, x.referred_to, x.referred_to_id, x.specialty)) == policy.ACTIVE]
        listed = active or found
        payload = {"event": "digest", "owner": owner, "date": day, "alerts": [
            {"alert_id": x.id, "placer_id": x.placer_id, "stage": x.stage, "level": x.level,
             "level_name": level_name(settings.stall, int(x.level)),
             "overdue_days": round(alerts.overdue_days(settings, x.due_at, x.overdue_days, now), 2),
             "new": repo.aware(x.raised_at) >= since}  # type: ignore[operator]
            for x in listed]}
        n += outbox.enqueue(conn, key=f"digest:{owner}:{day}", channel=policy.EMAIL, target=email, event="digest",
                            now=now, payload=payload, suppressed=not active)
    return n
