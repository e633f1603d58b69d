"""E-mail delivery over SMTP (plain, STARTTLS or implicit TLS; optional AUTH), blocking, in a worker thread.

Subjects and bodies carry referral IDs, stages and levels only: mail crosses systems refloop does not
control, so no names, MRNs or note text ever go into it. The note itself travels by MLLP.
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from typing import Any

from refloop.config.notify import NotifySettings
from refloop.notify.webhook import DeliveryError


def compose(ns: NotifySettings, row: dict[str, Any]) -> EmailMessage:
    p = row["payload"]
    event = row["event"]
    if event in ("alert_raised", "alert_escalated"):
        verb = "stalled" if event == "alert_raised" else "escalated"
        subject = f"[refloop] referral {p['referral_id']} {verb}: {p['stage']} level {p['level']}"
        lines = [f"Referral {p['referral_id']} (placer ID {p['placer_id']}) is overdue at stage {p['stage']}.",
                 f"Level {p['level']}, {p['overdue_days']} day(s) past the window. Alert {p['alert_id']}, "
                 f"owner {p['owner']}."]
    elif event == "loop_closed":
        subject = f"[refloop] referral {p['referral_id']} closed: consult note received"
        lines = [f"The consult note for referral {p['referral_id']} (placer ID {p['placer_id']}) was received "
                 f"at {p.get('closed_at')}.", "The note is forwarded to your EHR over HL7; it is not in this mail."]
    elif event == "digest":
        subject = f"[refloop] {len(p['alerts'])} open referral alert(s) for {p['date']}"
        lines = [f"{'NEW ' if a['new'] else ''}alert {a['alert_id']}: placer ID {a['placer_id']}, {a['stage']} "
                 f"level {a['level']}, {a['overdue_days']} day(s) overdue" for a in p["alerts"]]
    elif event == "dead_letter":
        subject = f"[refloop] notification {p['outbox_id']} could not be delivered"
        lines = [f"Notification {p['outbox_id']} ({p['failed_event']} via {p['channel']}) was dead-lettered.",
                 "See `refloop outbox --status dead`; retry with `refloop outbox retry ID`."]
    else:
        subject = f"[refloop] {event}"
        lines = [f"Event {event} for referral {p.get('referral_id')}."]
    msg = EmailMessage()
    msg["Subject"] = subject
    msg["From"] = ns.smtp_from
    msg["To"] = row["target"]
    msg["X-Refloop-Idempotency-Key"] = row["idempotency_key"]
    msg.set_content("\n".join(lines) + "\n")
    return msg


def tls_context(ns: NotifySettings) -> ssl.SSLContext:
    """Verifies the server's certificate and name against ``notify.ca_file`` (else the system store)."""
    return ssl.create_default_context(cafile=ns.ca_file or None)


def connect(ns: NotifySettings, timeout: float = 30.0) -> smtplib.SMTP:
    """An SMTP session ready for MAIL FROM: implicit TLS (465) or STARTTLS when configured, then AUTH."""
    smtp: smtplib.SMTP
    if ns.smtp_tls:
        smtp = smtplib.SMTP_SSL(ns.smtp_host, ns.smtp_port, timeout=timeout, context=tls_context(ns))
    else:
        smtp = smtplib.SMTP(ns.smtp_host, ns.smtp_port, timeout=timeout)
    try:
        if ns.smtp_starttls:
            smtp.starttls(context=tls_context(ns))
        if ns.smtp_username:
            smtp.login(ns.smtp_username, ns.smtp_password)
    except BaseException:
        smtp.close()
        raise
    return smtp


def send(ns: NotifySettings, row: dict[str, Any]) -> None:
    msg = compose(ns, row)
    try:
        with connect(ns) as smtp:
            smtp.send_message(msg)
    except smtplib.SMTPAuthenticationError as exc:
        raise DeliveryError(f"smtp auth {exc.smtp_code}") from None
    except smtplib.SMTPResponseException as exc:
        raise DeliveryError(f"smtp {exc.smtp_code}") from None
    except (smtplib.SMTPException, OSError) as exc:
        raise DeliveryError(f"smtp {type(exc).__name__}") from None
