"""The outbox dispatcher: claim due rows, deliver each on its channel, record the outcome.

Runs in a worker thread (all channels are blocking calls with timeouts). Each row's outcome is committed
on its own, so one slow or broken receiver never holds back the others' bookkeeping; a row whose
attempts are used up becomes ``dead`` and, in the same transaction, a dead-letter notice to the owner is
enqueued on the *other* channels. Logs carry the outbox id and idempotency key, never payload contents.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import Engine

from refloop.config import Settings
from refloop.notify import email, mllp, policy, webhook
from refloop.notify.webhook import DeliveryError
from refloop.store import notices, outbox

log = logging.getLogger("refloop.notify")


class Counter(Protocol):
    def labels(self, *values: str) -> Any: ...


def deliver(engine: Engine, settings: Settings, row: dict[str, Any], now: datetime) -> None:
    """One delivery attempt; raises DeliveryError (or anything else) on failure."""
    ns = settings.notify
    channel = row["channel"]
    if channel == policy.WEBHOOK:
        if not ns.webhook_url:
            raise DeliveryError("webhook not configured")
        webhook.post(ns.webhook_url, ns.webhook_secret, row, ns.webhook_timeout, ca_file=ns.ca_file)
    elif channel == policy.PATIENT:
        if not ns.patient_webhook_url:
            raise DeliveryError("patient webhook not configured")
        webhook.post(ns.patient_webhook_url, ns.webhook_secret, row, ns.webhook_timeout, ca_file=ns.ca_file)
    elif channel == policy.EMAIL:
        if not ns.smtp_host:
            raise DeliveryError("smtp not configured")
        email.send(ns, row)
    elif channel == policy.MLLP:
        if not ns.mllp_port:
            raise DeliveryError("mllp not configured")
        with engine.connect() as conn:
            er7 = mllp.build_mdm(conn, row, now, application=settings.mllp.ack_application,
                                 facility=settings.mllp.ack_facility)
        mllp.send(ns.mllp_host, ns.mllp_port, er7, ns.mllp_timeout)
    else:
        raise DeliveryError(f"unknown channel {channel[:16]}")


def dispatch_once(engine: Engine, settings: Settings, now: datetime, *, counter: Counter | None = None,
                  limit: int = 50) -> dict[str, int]:
    """Deliver what is due at *now*; returns how many were delivered, failed (will retry) and dead."""
    tally = {"delivered": 0, "failed": 0, "dead": 0}
    lease = max(60.0, settings.notify.webhook_timeout, settings.notify.mllp_timeout) * 2
    for row in outbox.claim(engine, now, limit=limit, lease_seconds=lease):
        extra = {"key": row["idempotency_key"], "alert_id": row["alert_id"], "referral_id": row["referral_id"]}
        try:
            deliver(engine, settings, row, now)
        except Exception as exc:  # any failure is retried; only its class or code is kept (never the text)
            error = str(exc) if isinstance(exc, DeliveryError) else type(exc).__name__
            with engine.begin() as conn:
                delay = policy.retry_delay(settings.notify, int(row["attempts"]), row["idempotency_key"])
                status = outbox.mark_failed(conn, row, now, error, max_attempts=settings.notify.max_attempts,
                                            retry_in=delay)
                if status == outbox.DEAD:
                    notices.dead_letter_notice(conn, settings, row, now)
            outcome = "dead" if status == outbox.DEAD else "failed"
            log.warning("notification failed", extra={**extra, "outcome": outcome, "error": error})
        else:
            outbox.mark_delivered(engine, row["id"], now)
            outcome = "delivered"
            log.info("notification delivered", extra={**extra, "outcome": outcome})
        tally[outcome] += 1
        if counter is not None:
            counter.labels(row["channel"], outcome).inc()
    return tally
