"""Delivery through real receivers started here on 127.0.0.1: an HTTP server that checks the HMAC, an
aiosmtpd SMTP server, and MLLP endpoints that ACK or NAK; plus the daemon's own scan and dispatcher end
to end over MLLP (REF/SIU/MDM in, MDM^T02 out)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from aiosmtpd.controller import Controller
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message
from prometheus_client import CollectorRegistry
from sqlalchemy import select

from refloop.clock import FixedClock
from refloop.config import Settings
from refloop.config.notify import NotifySettings, WorklistSettings
from refloop.config.windows import WindowSettings
from refloop.daemon.metrics import Metrics
from refloop.notify.dispatch import dispatch_once
from refloop.notify.policy import retry_delay
from refloop.store import digest, outbox, worklist_view
from tests.samples import CANARY_NAME, mdm_msg, ref_msg, siu_msg
from tests.test_scan import T0, engine_for, new_referral, scan, settings_for
from tests.utils import FS, VT, MllpClient, free_port, make_settings, msa, running_daemon, wait_for, work

SECRET = "s3cret-for-tests"


# -- receivers ------------------------------------------------------------------------------------
@dataclass
class HttpReceiver:
    port: int
    received: list[dict[str, Any]] = field(default_factory=list)
    bad_signatures: int = 0
    status: int = 200

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


@contextlib.contextmanager
def http_receiver(secret: str = SECRET, status: int = 200) -> Iterator[HttpReceiver]:
    """Accepts a POST only with a valid X-Refloop-Signature over the raw body."""
    box = HttpReceiver(0, status=status)

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            want = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(want, self.headers.get("X-Refloop-Signature", "")):
                box.bad_signatures += 1
                self.send_response(401)
            else:
                box.received.append({"body": json.loads(body), "key": self.headers["X-Refloop-Idempotency-Key"]})
                self.send_response(box.status)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    box.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class MllpReceiver:
    port: int
    code: str
    messages: list[str] = field(default_factory=list)


@contextlib.contextmanager
def mllp_receiver(code: str = "AA") -> Iterator[MllpReceiver]:
    """Reads one frame per connection and answers an ACK with MSA-1 = *code*."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.settimeout(0.2)
    box = MllpReceiver(sock.getsockname()[1], code)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                buf = b""
                while FS not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                msg = buf[buf.find(VT) + 1:buf.find(FS)].decode("utf-8")
                box.messages.append(msg)
                control = msg.split("\r")[0].split("|")[9]
                ack = f"MSH|^~\\&|EHR|CLINIC|REFLOOP|REFLOOP|20260120000000||ACK^T02^ACK|A{control}|P|2.5.1\r" \
                      f"MSA|{box.code}|{control}\r"
                conn.sendall(VT + ack.encode() + FS + b"\r")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield box
    finally:
        stop.set()
        thread.join(5)
        sock.close()


class SmtpSink:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    async def handle_DATA(self, _server: Any, _session: Any, envelope: Any) -> str:
        from email import message_from_bytes

        self.messages.append((envelope.rcpt_tos, message_from_bytes(envelope.content)))
        return "250 OK"


@contextlib.contextmanager
def smtp_receiver() -> Iterator[tuple[SmtpSink, int]]:
    sink, port = SmtpSink(), free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield sink, port
    finally:
        controller.stop()


def statuses(engine: Any) -> list[tuple[str, str, str, int]]:
    with engine.connect() as conn:
        return [(r.event, r.channel, r.status, r.attempts) for r in conn.execute(
            select(outbox.OUTBOX).order_by(outbox.OUTBOX.c.id))]


# -- channels --------------------------------------------------------------------------------------
def test_webhook_is_signed_and_carries_ids_only(db_url: str) -> None:
    """The receiver verifies the HMAC; the payload has IDs and statuses, no provider names (webhook_phi off)."""
    engine = engine_for(db_url)
    metrics = Metrics(CollectorRegistry())
    with http_receiver() as hook:
        settings = settings_for(db_url, webhook_url=hook.url, webhook_secret=SECRET)
        rid = new_referral(engine)
        scan(engine, settings, T0 + timedelta(days=15))
        now = T0 + timedelta(days=15)
        assert dispatch_once(engine, settings, now, counter=metrics.notifications) == {
            "delivered": 1, "failed": 0, "dead": 0}
        assert dispatch_once(engine, settings, now) == {"delivered": 0, "failed": 0, "dead": 0}
    assert hook.bad_signatures == 0
    [got] = hook.received
    body = got["body"]
    assert (body["event"], body["referral_id"], body["stage"], body["level"]) == ("alert_raised", rid, "scheduling", 1)
    assert got["key"] == body["idempotency_key"] == "alert:1:1:webhook"
    assert "referred_to" not in body and "Heartwell" not in json.dumps(body)
    assert statuses(engine) == [("alert_raised", "webhook", "delivered", 1)]
    assert metrics.registry.get_sample_value(
        "refloop_notifications_total", {"channel": "webhook", "outcome": "delivered"}) == 1.0
    engine.dispose()


def test_wrong_secret_is_retried_with_backoff(db_url: str) -> None:
    """A receiver refusing the signature (401) is a failure: retried after a jittered, doubling backoff."""
    engine = engine_for(db_url)
    with http_receiver(secret="other") as hook:
        settings = settings_for(db_url, webhook_url=hook.url, webhook_secret=SECRET, backoff_seconds=30)
        new_referral(engine)
        now = T0 + timedelta(days=15)
        scan(engine, settings, now)
        key = "alert:1:1:webhook"
        first, second = (retry_delay(settings.notify, n, key) for n in (1, 2))
        assert 15 <= first <= 30 and 30 <= second <= 60
        assert dispatch_once(engine, settings, now)["failed"] == 1
        due = now + timedelta(seconds=first)
        assert dispatch_once(engine, settings, due - timedelta(seconds=1))["failed"] == 0  # not due yet
        assert dispatch_once(engine, settings, due)["failed"] == 1
        due += timedelta(seconds=second)
        assert dispatch_once(engine, settings, due - timedelta(seconds=1))["failed"] == 0
        assert dispatch_once(engine, settings, due)["failed"] == 1
    assert hook.bad_signatures == 3
    with engine.connect() as conn:
        [row] = outbox.listing(conn)
    assert (row["status"], row["attempts"], row["last_error"]) == ("failed", 3, "http 401")
    engine.dispose()


def test_backoff_is_capped_jittered_and_reproducible() -> None:
    """Equal jitter under an exponential ceiling with a cap: attempt 8 waits at most backoff_max_seconds,
    rows failing together spread out, and one row's schedule is the same every time it is computed."""
    ns = NotifySettings(backoff_seconds=30, backoff_max_seconds=600)
    for attempts in range(1, 20):
        ceiling = min(600, 30 * 2 ** (attempts - 1))
        for key in ("a", "b", "alert:7:2:email"):
            assert ceiling / 2 <= retry_delay(ns, attempts, key) <= ceiling
    assert retry_delay(ns, 8, "k") <= 600  # uncapped it would be 30 * 2**7 s, over an hour
    spread = {round(retry_delay(ns, 3, f"alert:{i}:1:webhook"), 3) for i in range(50)}
    assert len(spread) > 40
    assert retry_delay(ns, 3, "x") == retry_delay(ns, 3, "x")


def test_email_to_the_owner_has_no_phi_in_the_subject(db_url: str) -> None:
    """An owner named like an address gets the mail from aiosmtpd; subject: IDs, stage, level."""
    engine = engine_for(db_url)
    with smtp_receiver() as (sink, port):
        settings = settings_for(db_url, smtp_host="127.0.0.1", smtp_port=port, smtp_from="refloop@test.invalid",
                                worklist=WorklistSettings(mode="active", owners=("specialty:CARD=alice@test.invalid",)))
        rid = new_referral(engine)
        scan(engine, settings, T0 + timedelta(days=15))
        assert dispatch_once(engine, settings, T0 + timedelta(days=15))["delivered"] == 1
    [(rcpts, msg)] = sink.messages
    assert rcpts == ["alice@test.invalid"]
    assert msg["Subject"] == f"[refloop] referral {rid} stalled: scheduling level 1"
    assert "Heartwell" not in msg.as_string()
    engine.dispose()


def closed_loop(db_url: str, placer: str = "R5000", doc: str = "DOC5000") -> None:
    """REF, booking and a final consult note for *placer*, through a daemon over MLLP."""
    with running_daemon(make_settings(db_url)) as d, MllpClient(d.port) as c:
        assert msa(c.send(ref_msg(placer)))[0] == "AA"
        assert msa(c.send(siu_msg(f"APT{placer}", placer=placer)))[0] == "AA"
        assert msa(c.send(mdm_msg(doc, placer=placer, note="Seen | stable.\\.br\\Plan: echo in 3 months.")))[0] == "AA"


def test_mllp_nak_retries_then_dead_letters_on_the_worklist(db_url: str) -> None:
    """AE from the referrer: retried with backoff, dead after max_attempts; the owner hears by webhook and
    the dead row shows on the worklist; `outbox retry` re-queues it and an AA delivers it."""
    closed_loop(db_url)
    engine = engine_for(db_url)
    now = datetime(2026, 1, 20, 9, 0, tzinfo=UTC)
    with mllp_receiver("AE") as nak, http_receiver() as hook:
        settings = settings_for(db_url, mllp_port=nak.port, max_attempts=3, backoff_seconds=10,
                                webhook_url=hook.url, webhook_secret=SECRET)
        scan(engine, settings, now)
        with engine.connect() as conn:
            rows = outbox.listing(conn)
        assert sorted((r["event"], r["channel"]) for r in rows) == [("loop_closed", "mllp"), ("loop_closed", "webhook")]
        tallies = [dispatch_once(engine, settings, now + timedelta(seconds=s)) for s in (0, 10, 30)]
        assert [t["dead"] for t in tallies] == [0, 0, 1]
        assert len(nak.messages) == 3
        dispatch_once(engine, settings, now + timedelta(seconds=31))  # delivers the dead-letter notice
        assert [r["body"]["event"] for r in hook.received] == ["loop_closed", "dead_letter"]
        with engine.connect() as conn:
            [dead] = worklist_view.dead_letters(conn, settings)
        assert (dead["placer_id"], dead["event"], dead["last_action"]) == ("R5000", "loop_closed", "ack AE")
    with mllp_receiver("AA") as ack:
        settings = replace(settings, notify=replace(settings.notify, mllp_port=ack.port))
        with engine.begin() as conn:
            assert outbox.retry(conn, dead["outbox_id"], now)
        assert dispatch_once(engine, settings, now + timedelta(seconds=40))["delivered"] == 1
        assert len(ack.messages) == 1
    engine.dispose()


def test_observe_mode_suppresses_and_active_does_not_replay(db_url: str) -> None:
    """Observe: rows are recorded as suppressed and never sent; after switching to active only new
    notifications (the escalation) go out."""
    engine = engine_for(db_url)
    with http_receiver() as hook:
        observe = settings_for(db_url, webhook_url=hook.url, webhook_secret=SECRET,
                               worklist=WorklistSettings(mode="observe"))
        new_referral(engine)
        scan(engine, observe, T0 + timedelta(days=15))
        assert statuses(engine) == [("alert_raised", "webhook", "suppressed", 0)]
        assert dispatch_once(engine, observe, T0 + timedelta(days=15))["delivered"] == 0
        active = replace(observe, worklist=WorklistSettings(mode="observe", relationship_modes=("CLINIC>CARD=active",)))
        with engine.connect() as conn:
            assert [w["mode"] for w in work(conn, active, T0)] == ["active"]
        assert dispatch_once(engine, active, T0 + timedelta(days=16))["delivered"] == 0  # nothing replayed
        scan(engine, active, T0 + timedelta(days=29))
        assert dispatch_once(engine, active, T0 + timedelta(days=29))["delivered"] == 1
    assert [r["body"]["event"] for r in hook.received] == ["alert_escalated"]
    assert statuses(engine) == [("alert_raised", "webhook", "suppressed", 0),
                                ("alert_escalated", "webhook", "delivered", 1)]
    engine.dispose()


# -- end to end through the daemon ---------------------------------------------------------------------
def fast(settings: Settings, **notify: Any) -> Settings:
    """The daemon's own scan and dispatcher, every few tenths of a second."""
    return replace(settings, stall=WindowSettings(scan_minutes=0.005),
                   notify=NotifySettings(dispatch_seconds=0.2, webhook_secret=SECRET, **notify),
                   worklist=WorklistSettings(mode="active"))


def test_loop_closed_forwards_the_note_as_mdm_t02(db_url: str) -> None:
    """REF, SIU and MDM in over MLLP; the daemon's scan and dispatcher send an MDM^T02 to the referrer:
    valid v2.5.1, TXA-12 the specialist's document number, TXA-14 the placer ID, note text in OBX-5."""
    clock = FixedClock(datetime(2026, 1, 20, 9, 0, tzinfo=UTC))
    with mllp_receiver("AA") as referrer, http_receiver() as hook:
        settings = fast(make_settings(db_url), mllp_port=referrer.port, webhook_url=hook.url)
        with running_daemon(settings, clock=clock) as d, MllpClient(d.port) as c:
            assert msa(c.send(ref_msg("R6000", patient=CANARY_NAME)))[0] == "AA"
            assert msa(c.send(siu_msg("APT6000", placer="R6000")))[0] == "AA"
            note = "Seen \\F\\ stable.\\.br\\Plan: echo."
            assert msa(c.send(mdm_msg("DOC6000", placer="R6000", note=note)))[0] == "AA"
            assert wait_for(lambda: referrer.messages and hook.received, timeout=20)
            assert wait_for(lambda: d.metric("refloop_notifications_total",
                                             {"channel": "mllp", "outcome": "delivered"}) == 1.0)
    [forwarded] = referrer.messages
    msg = parse_message(forwarded.replace("\r\r", "\r").strip("\r"), validation_level=VALIDATION_LEVEL.STRICT,
                        find_groups=True)
    assert msg.validate()
    assert msg.msh.msh_9.to_er7() == "MDM^T02^MDM_T02"
    assert msg.txa.txa_12.to_er7() == "DOC6000"
    assert msg.txa.txa_14.to_er7().split("^")[0] == "R6000"
    obx = [s for s in forwarded.split("\r") if s.startswith("OBX|")]
    assert [o.split("|")[5] for o in obx] == ["Seen \\F\\ stable.", "Plan: echo."]
    # sent 5 Jan and received on the 20th: already past its 14-day window, so the apply raised its alert at once
    assert [r["body"]["event"] for r in hook.received] == ["alert_raised", "loop_closed"]
    event = hook.received[1]["body"]
    assert (event["event"], event["placer_id"]) == ("loop_closed", "R6000")
    assert CANARY_NAME.split("^")[0] not in json.dumps(event)


def test_no_show_reminds_the_patient_and_a_second_no_show_escalates(db_url: str) -> None:
    """No-show: patient reminder; rebooked: nothing stalls; second no-show: rebooking alert at level 2 at
    once (owner webhook) and a second reminder."""
    clock = FixedClock(datetime(2026, 1, 16, 16, 0, tzinfo=UTC))  # after the messages, before 14 days
    with http_receiver() as patient, http_receiver() as owner:
        settings = fast(make_settings(db_url), patient_webhook_url=patient.url, webhook_url=owner.url)
        with running_daemon(settings, clock=clock) as d, MllpClient(d.port) as c:
            assert msa(c.send(ref_msg("R7000")))[0] == "AA"
            assert msa(c.send(siu_msg("APT7000", placer="R7000", at="20260107090000-0500")))[0] == "AA"
            assert msa(c.send(siu_msg("APT7000", placer="R7000", trigger="S26", at="20260112100000-0500")))[0] == "AA"
            assert wait_for(lambda: [r["body"]["event"] for r in patient.received] == ["no_show_reminder"], 20)
            assert msa(c.send(siu_msg("APT7000", placer="R7000", trigger="S13", at="20260113090000-0500",
                                      start="20260116090000-0500")))[0] == "AA"
            status, referrals = d.get("/api/referrals?placer_id=R7000")
            assert referrals[0]["status"] == "scheduled"
            assert msa(c.send(siu_msg("APT7000", placer="R7000", trigger="S26", at="20260116100000-0500")))[0] == "AA"
            assert wait_for(lambda: len(patient.received) == 2 and owner.received, 20)
            # The receiver records the request before it answers; the outbox row turns "delivered" only
            # after the dispatcher has the 2xx and commits, so wait for that commit, not for the request.
            assert wait_for(lambda: [w["delivery"] for w in d.get("/api/worklist")[1]] == ["delivered"], 20)
            status, work = d.get("/api/worklist")
    assert status == 200
    assert [r["body"]["event"] for r in patient.received] == ["no_show_reminder", "no_show_reminder"]
    [alert] = [r["body"] for r in owner.received]
    assert (alert["event"], alert["stage"], alert["level"], alert["placer_id"]) == ("alert_raised", "rebooking", 2,
                                                                                    "R7000")
    assert [(w["placer_id"], w["stage"], w["level"], w["delivery"]) for w in work] == [
        ("R7000", "rebooking", 2, "delivered")]


def test_daily_digest_one_mail_per_owner_per_day(db_url: str) -> None:
    """digest mode: no per-alert mail; after digest_hour one mail per owner listing new and open alerts."""
    engine = engine_for(db_url)
    with smtp_receiver() as (sink, port):
        settings = settings_for(db_url, smtp_host="127.0.0.1", smtp_port=port,
                                worklist=WorklistSettings(mode="active", digest="digest", digest_hour=7,
                                                          owners=("practice:CLINIC=alice@test.invalid",)))
        new_referral(engine, "R1")
        new_referral(engine, "R2", sent=T0 - timedelta(days=3))
        day = T0 + timedelta(days=15)
        scan(engine, settings, day.replace(hour=6))
        assert statuses(engine) == []  # no immediate mail in digest mode
        with engine.begin() as conn:
            assert digest.digest(conn, settings, day.replace(hour=6)) == 0  # before the hour
            assert digest.digest(conn, settings, day.replace(hour=8)) == 1
            assert digest.digest(conn, settings, day.replace(hour=9)) == 0  # once a day
        assert dispatch_once(engine, settings, day.replace(hour=8))["delivered"] == 1
    [(rcpts, msg)] = sink.messages
    assert rcpts == ["alice@test.invalid"]
    assert msg["Subject"] == f"[refloop] 2 open referral alert(s) for {day.date().isoformat()}"
    assert msg.get_payload().count("NEW alert") == 2
    engine.dispose()


def test_notices_are_enqueued_with_the_state_change_not_by_the_scan(db_url: str) -> None:
    """The loop-closed notice and the no-show reminder are outbox rows committed with the message that caused
    them: they exist the moment its AA arrives, although the scan and the dispatcher are an hour away."""
    slow = replace(make_settings(db_url), stall=WindowSettings(scan_minutes=60),
                   notify=NotifySettings(dispatch_seconds=3600, webhook_secret=SECRET,
                                         webhook_url="http://127.0.0.1:9/hook",
                                         patient_webhook_url="http://127.0.0.1:9/patient"),
                   worklist=WorklistSettings(mode="active"))
    clock = FixedClock(datetime(2026, 1, 14, 9, 0, tzinfo=UTC))  # inside the 14-day window: no stall alert
    engine = engine_for(db_url)
    with running_daemon(slow, clock=clock) as d, MllpClient(d.port) as c:
        assert wait_for(lambda: d.metric("refloop_scheduler_last_success_timestamp_seconds",
                                         {"task": "stall_scan"}) > 0)  # the start-up scan is behind us
        assert msa(c.send(ref_msg("R8000")))[0] == "AA"
        assert msa(c.send(siu_msg("APT8000", placer="R8000", at="20260107090000-0500")))[0] == "AA"
        assert statuses(engine) == []
        assert msa(c.send(siu_msg("APT8000", placer="R8000", trigger="S26", at="20260112100000-0500")))[0] == "AA"
        assert statuses(engine) == [("no_show_reminder", "patient", "pending", 0)]
        assert msa(c.send(siu_msg("APT8000", placer="R8000", trigger="S26", at="20260112100000-0500")))[0] == "AA"
        assert len(statuses(engine)) == 1  # the same no-show again (a resend under a new control ID): no new row
        assert msa(c.send(siu_msg("APT8001", placer="R8000", at="20260113090000-0500")))[0] == "AA"
        assert msa(c.send(mdm_msg("DOC8000", placer="R8000")))[0] == "AA"
        assert statuses(engine) == [("no_show_reminder", "patient", "pending", 0),
                                    ("loop_closed", "webhook", "pending", 0)]
    with engine.connect() as conn:
        payload = json.loads(conn.execute(select(outbox.OUTBOX.c.payload).where(
            outbox.OUTBOX.c.event == "loop_closed")).scalar_one())
    assert (payload["placer_id"], payload["status"], payload["document_id"]) == ("R8000", "closed", "DOC8000")
    engine.dispose()
