"""Every Prometheus collector, defined once on a registry that is passed in (tests use a fresh one).

Labels come only from bounded sets: message types from :data:`MESSAGE_TYPES` (else ``other``), sender
profile names from the configuration (else ``unknown``), ACK codes from table 0008, outcomes from
:class:`refloop.store.models.Outcome`. Never IPs, control IDs, referral IDs or patient data.
"""

from __future__ import annotations

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)

from refloop import __version__

MESSAGE_TYPES = frozenset({"ACK", "ADT", "MDM", "OMG", "ORM", "ORU", "REF", "RRI", "SIU"})
ACK_CODES = frozenset({"AA", "AE", "AR", "CA", "CE", "CR"})

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def type_label(message_type: str) -> str:
    t = message_type.upper()
    return t if t in MESSAGE_TYPES else "other"


#: The standard collectors (process_* CPU, memory, fds, start time; python_info; python_gc_*): dashboards
#: and the unit file's comments rely on them. Added to every refloop registry; the library's module-level
#: instances are reused because they keep no per-registry state.
STANDARD_COLLECTORS = (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR)


class Metrics:
    """All of refloop's series on one registry, plus the standard process and platform collectors.

    ``*_created`` series are switched off (process-wide, in prometheus_client): they double the series
    count of every counter and histogram and no rule or panel reads them.
    """

    def __init__(self, registry: CollectorRegistry | None = None, profiles: tuple[str, ...] = ("default",)):
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry()
        self.profiles = frozenset(profiles)
        r = self.registry
        for collector in STANDARD_COLLECTORS:
            r.register(collector)
        self.connections_open = Gauge("refloop_connections_open", "Open MLLP connections.", registry=r)
        self.connections = Counter(
            "refloop_connections_total", "MLLP connections by result (accepted or rejected and why).",
            ["result"], registry=r,
        )
        self.connections_closed = Counter(
            "refloop_connections_closed_total", "MLLP connections closed, by reason.", ["reason"], registry=r
        )
        self.frames = Counter(
            "refloop_frames_total",
            "Frames by outcome: ok, oversized, bad_framing (truncated by a new VT), disconnect (peer left "
            "mid-frame), deadline, lf_terminated (tolerated FS LF).",
            ["outcome"], registry=r,
        )
        self.junk_bytes = Counter(
            "refloop_junk_bytes_total", "Bytes skipped outside frames (NULs, stray CR/LF, scans).", registry=r
        )
        self.received_bytes = Counter("refloop_received_bytes_total", "Bytes read from MLLP peers.", registry=r)
        self.messages = Counter(
            "refloop_messages_total", "Messages received, by message type and sender profile.",
            ["type", "sender"], registry=r,
        )
        self.outcomes = Counter(
            "refloop_journal_outcomes_total", "Journal outcomes (docs/hl7.md: the journal).", ["outcome"],
            registry=r,
        )
        self.acks = Counter("refloop_acks_total", "ACKs sent, by MSA-1 code.", ["code"], registry=r)
        self.duplicates = Counter(
            "refloop_duplicates_suppressed_total", "Resends recognised and not applied again.", registry=r
        )
        self.control_id_reused = Counter(
            "refloop_control_id_reused_total",
            "Messages whose sender reused a control ID with different content (processed as new).",
            registry=r,
        )
        self.decode_fallback = Counter(
            "refloop_decode_fallback_total",
            "Messages decoded with the sender profile's fallback codec (MSH-18 empty or wrong).",
            ["sender"], registry=r,
        )
        self.app_ack_unsupported = Counter(
            "refloop_app_ack_requests_unsupported_total",
            "Messages asking for an enhanced-mode application ACK (MSH-16), which refloop does not send.",
            registry=r,
        )
        self.commit_seconds = Histogram(
            "refloop_journal_commit_seconds", "Duration of one group commit.", buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "refloop_journal_batch_messages", "Messages per group commit.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r,
        )
        self.ack_seconds = Histogram(
            "refloop_ack_latency_seconds", "Frame complete to ACK written, by message type.", ["type"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.storage_failures = Counter(
            "refloop_storage_failures_total", "Group commits that failed (every message in them got AR).",
            registry=r,
        )
        self.database_up = Gauge(
            "refloop_database_up", "1 when the last database operation succeeded, else 0.", registry=r
        )
        self.last_message = Gauge(
            "refloop_last_message_timestamp_seconds", "Unix time of the last message, per sender profile.",
            ["sender"], registry=r,
        )
        self.tls_failures = Counter(
            "refloop_tls_handshake_failures_total",
            "Failed TLS handshakes by reason (plaintext, no_certificate, bad_certificate, protocol_version, "
            "timeout, disconnect, other).", ["reason"], registry=r,
        )
        self._tls_cert_expiry: Gauge | None = None  # exported only once a certificate is loaded
        self.sender_rejected = Counter(
            "refloop_sender_identity_rejected_total",
            "Messages whose MSH-3/MSH-4 claim a sender the peer may not be (answered AR, nothing applied).",
            registry=r,
        )
        self.scheduler_last_success = Gauge(
            "refloop_scheduler_last_success_timestamp_seconds", "Unix time each scheduled job last succeeded.",
            ["task"], registry=r,  # not "job": that name belongs to Prometheus' target label
        )
        self.business_hours = Gauge(
            "refloop_clinic_open", "1 during the clinic's business hours (08:00-18:00 on local business days "
            "in stall.timezone), else 0; the shipped alert rules use it.", registry=r,
        )
        self.alerts_open = Gauge(
            "refloop_alerts_open", "Unresolved stall alerts by stage and level (1, 2, 3+), as of the last scan.",
            ["stage", "level"], registry=r,
        )
        self.notifications = Counter(
            "refloop_notifications_total", "Notification delivery attempts by channel and outcome "
            "(delivered, failed, dead).", ["channel", "outcome"], registry=r,
        )
        self.outbox_backlog = Gauge(
            "refloop_outbox_backlog", "Notifications waiting for delivery (pending or failed, to retry).", registry=r
        )
        self.outbox_dead_letters = Gauge(
            "refloop_outbox_dead_letters", "Notifications that used up their attempts (see the worklist).", registry=r
        )
        self.applied = Counter(
            "refloop_applied_total", "Journal rows applied by the projector, by outcome (processed, ignored, "
            "error, failed).", ["outcome"], registry=r,
        )
        self.apply_lag_messages = Gauge(
            "refloop_apply_lag_messages", "Messages journaled (and acknowledged) but not yet applied.", registry=r
        )
        self.apply_lag_seconds = Gauge(
            "refloop_apply_lag_seconds", "Age of the oldest journaled message not yet applied (0 when none).",
            registry=r,
        )
        self.apply_cpu = Counter(
            "refloop_apply_cpu_seconds", "CPU time the projector thread spent applying batches (the rest of the "
            "process's CPU is the ACK path, HTTP and background jobs).", registry=r,
        )
        self.backpressure = Gauge(
            "refloop_backpressure", "1 while the listener has stopped reading sockets because the apply lag "
            "reached mllp.max_apply_lag.", registry=r,
        )
        self.referrals = Gauge("refloop_referrals", "Referrals by status, as of the last scan.", ["status"], registry=r)
        self.build = Info("refloop_build", "refloop version.", registry=r)
        self.build.info({"version": __version__})
        self.database_up.set(0)
        for reason in ("ok", "oversized", "bad_framing", "disconnect", "deadline", "lf_terminated"):
            self.frames.labels(reason)
        for code in sorted(ACK_CODES):
            self.acks.labels(code)
        for outcome in ("processed", "ignored", "error", "failed"):
            self.applied.labels(outcome)

    def certificate_expiry(self) -> Gauge:
        if self._tls_cert_expiry is None:
            self._tls_cert_expiry = Gauge(
                "refloop_tls_certificate_expiry_timestamp_seconds", "notAfter of the MLLP TLS certificate.",
                registry=self.registry,
            )
        return self._tls_cert_expiry

    def sender_label(self, profile: str) -> str:
        return profile if profile in self.profiles else "unknown"
