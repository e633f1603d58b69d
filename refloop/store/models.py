"""SQLAlchemy 2 models. Alembic migrations in ``migrations/`` are the source of truth for the schema;
these classes must match them (``tests/test_store.py`` runs ``alembic check``).

Writes on the hot path go through Core ``insert()`` on these tables (PERF: the ORM unit of work costs
more than the whole ACK budget); the typed classes serve reads, the API and the CLI.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only makes INTEGER PRIMARY KEY an alias of the rowid (auto-increment); BIGINT elsewhere.
IdType = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Outcome:
    """Journal outcomes: what happened to a frame. Plain strings so SQL reports can group by them."""

    PROCESSED = "processed"  # routed to a handler, effects committed, AA/CA
    IGNORED = "ignored"  # well-formed, no route (e.g. a type refloop does not track), AA/CA
    REJECTED = "rejected"  # protocol reject (version, processing id, batch, unsupported type), AR/CR
    ERROR = "error"  # content error found by a handler, AE/CE
    FAILED = "failed"  # the handler raised: effects rolled back, AE 207, fix and `refloop replay`
    DUPLICATE = "duplicate"  # a resend of a committed message: not re-applied, original ACK code replayed
    UNPARSEABLE = "unparseable"  # no usable MSH: AR with ERR, MSA-2 as recovered
    BROKEN_FRAME = "broken_frame"  # truncated frame (new VT inside, disconnect, deadline): no ACK possible
    OVERSIZE = "oversize"  # frame over the limit: a marker with the head bytes, AR, connection closed
    QUEUED = "queued"  # journaled and acknowledged, waiting for the projector (becomes one of the above)
    REQUEUED = "requeued"  # applied before, marked for re-application (`refloop replay`)

    ALL = (PROCESSED, IGNORED, REJECTED, ERROR, FAILED, DUPLICATE, UNPARSEABLE, BROKEN_FRAME, OVERSIZE, QUEUED,
           REQUEUED)
    UNAPPLIED = (QUEUED, REQUEUED)


class Message(Base):
    """The journal: one row per frame received, written in the same transaction as its effects."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    peer: Mapped[str] = mapped_column(String(64), default="")
    raw: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)  # None once purged
    size: Mapped[int] = mapped_column(Integer, default=0)
    content_hash: Mapped[str] = mapped_column(String(64), default="")
    encoding: Mapped[str] = mapped_column(String(32), default="")
    sending_application: Mapped[str] = mapped_column(String(180), default="")
    sending_facility: Mapped[str] = mapped_column(String(180), default="")
    message_type: Mapped[str] = mapped_column(String(8), default="")
    trigger_event: Mapped[str] = mapped_column(String(8), default="")
    control_id: Mapped[str] = mapped_column(String(199), default="")
    version: Mapped[str] = mapped_column(String(16), default="")
    processing_id: Mapped[str] = mapped_column(String(8), default="")
    profile: Mapped[str] = mapped_column(String(64), default="")
    outcome: Mapped[str] = mapped_column(String(16))
    ack_code: Mapped[str] = mapped_column(String(2), default="")
    err_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    ack: Mapped[str] = mapped_column(Text, default="")
    detail: Mapped[str] = mapped_column(String(255), default="")  # IDs and codes only, never PHI
    flags: Mapped[str] = mapped_column(String(255), default="")
    duplicate_of: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), nullable=True)
    replayed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Set only while a scheduling/document message is unrelated to any referral: a referral for this
    # patient that arrives later adopts it (``SenderProfile.adopt_earlier_days``). SHA-256, never the MRN.
    patient_key: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # When the projector committed this row's effects (migration 0010); NULL while queued or never applied.
    applied_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (
        Index("ix_messages_sender_control", "sending_application", "sending_facility", "control_id"),
        Index("ix_messages_received_at", "received_at"),
        Index("ix_messages_control_id", "control_id"),
        Index("ix_messages_unlinked_patient", "patient_key", "received_at",
              sqlite_where=text("patient_key IS NOT NULL"), postgresql_where=text("patient_key IS NOT NULL")),
        Index("ix_messages_unapplied", "id", sqlite_where=text("outcome IN ('queued', 'requeued')"),
              postgresql_where=text("outcome IN ('queued', 'requeued')")),
    )


class MessageKey(Base):
    """Dedup claims: the first committed message for (sender, MSH-10, content hash).

    A separate table with a unique constraint (not a lookup on the journal) so that two daemons sharing
    one PostgreSQL database race on the constraint, and exactly one of them applies the message.
    AR outcomes never claim a key: AR means "not accepted, try again", so a resend is processed afresh.
    """

    __tablename__ = "message_keys"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    sending_application: Mapped[str] = mapped_column(String(180))
    sending_facility: Mapped[str] = mapped_column(String(180))
    control_id: Mapped[str] = mapped_column(String(199))
    content_hash: Mapped[str] = mapped_column(String(64))
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"))
    ack_code: Mapped[str] = mapped_column(String(2))
    err_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    err_text: Mapped[str] = mapped_column(String(255), default="")
    err_location: Mapped[str] = mapped_column(String(64), default="")

    __table_args__ = (
        UniqueConstraint(
            "sending_application", "sending_facility", "control_id", "content_hash", name="uq_message_keys_key"
        ),
    )


# -- the referral loop ----------------------------------------------------------------------------
# ``referral_events`` is the append-only source of truth; ``referrals`` is a projection that handlers
# recompute with ``refloop.referral.fold`` in the same transaction. Times are stored in UTC because
# SQLite drops offsets; the source offset survives inside event data where it matters (start times).


class Referral(Base):
    """Projection of one referral's events: what worklists, the API and the duplicate guard query."""

    __tablename__ = "referrals"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    placer_id: Mapped[str] = mapped_column(String(199))  # RF1-6.1 or ORC-2.1
    authority: Mapped[str] = mapped_column(String(180), default="")  # RF1-6.2 / ORC-2.2
    status: Mapped[str] = mapped_column(String(16), default="sent")
    priority: Mapped[str] = mapped_column(String(64), default="")
    referred_to: Mapped[str] = mapped_column(String(255), default="")
    referred_to_id: Mapped[str] = mapped_column(String(64), default="")  # PRD-7.1 of the RT provider
    referring_provider: Mapped[str] = mapped_column(String(255), default="")
    specialty: Mapped[str] = mapped_column(String(64), default="")
    patient_key: Mapped[str] = mapped_column(String(64), default="")  # SHA-256 of PID-3.1 + PID-3.4; never logged
    presume_hours: Mapped[float | None] = mapped_column(Float, nullable=True)
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    accepted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    scheduled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    appointment_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    note_received_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    flags: Mapped[str] = mapped_column(String(255), default="")
    updated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The rebooking clock (migration 0007), so the stall scan evaluates no-shows without re-folding them:
    # ``stall.latest_no_show`` of the fold (when the current no-show run began) and ``no_show_count``.
    no_show_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    no_show_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The stage clock kept on write (migration 0012; ``refloop.stall.clocks`` of the fold, see
    # ``refloop.store.referrals.clock_values``): the running stage whose next level comes first, its start,
    # the next instant a level is reached (the scan reads ``next_due_at <= now``), where and when the referral
    # leaks, and the windows' version these were computed under (another version: evaluated on read).
    clock_stage: Mapped[str] = mapped_column(String(16), default="", server_default="")
    stage_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    next_due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    leak_stage: Mapped[str] = mapped_column(String(24), default="", server_default="")
    leak_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    clock_version: Mapped[str] = mapped_column(String(16), default="", server_default="")
    # When the scheduling and visit windows end, counted from sent_at whatever the status: the report's
    # "within window" figures (booked / seen by then) and their maturity (the window is over at now).
    scheduling_due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    visit_due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Milestone durations in whole seconds (None until both milestones are known), for the report.
    sent_to_scheduled_s: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    sent_to_appointment_s: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    appointment_to_note_s: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    sent_to_closed_s: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # When the referral was first on the worklist or reminded: the earliest alert ``raised_at`` or outbox
    # ``created_at`` naming it (migration 0015), kept on write by ``refloop.store.referrals.mark``, so the
    # report's "recovered" figure is two counts in its aggregate pass instead of a join of every alert.
    first_marked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # The report's per-referral facts kept on write (migration 0016): appointments ever reported (distinct
    # ``appt:`` subjects of its events), those of them with a no-show, and ``refloop.report.report_bits``
    # (what it counts that does not depend on now), so the report reads no event and groups the cohort by
    # (status, leak stage, bits) along ``ix_referrals_report``.
    appointment_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    no_show_appointments: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    report_bits: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # 1 on the patient's first CMS50 candidate of its year (``refloop.store.cms50``), kept on write.
    cms50_first: Mapped[int] = mapped_column(Integer, default=0, server_default="0")

    __table_args__ = (
        UniqueConstraint("placer_id", "authority", name="uq_referrals_placer"),
        Index("ix_referrals_status", "status"),
        Index("ix_referrals_patient_status", "patient_key", "status"),
    )


class ReferralEvent(Base):
    """One journaled fact. ``referral_id`` is NULL while parked (``pending_key`` waits for its referral)
    or after a coordinator rejected the link; ``origin`` tells message effects from manual ones, so a
    replay of a message deletes and rewrites only what that message produced."""

    __tablename__ = "referral_events"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    referral_id: Mapped[int | None] = mapped_column(ForeignKey("referrals.id"), nullable=True)
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), nullable=True)
    origin: Mapped[str] = mapped_column(String(8), default="message")  # message | manual
    seq: Mapped[int] = mapped_column(Integer, default=0)
    kind: Mapped[str] = mapped_column(String(40))
    occurred_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    control_id: Mapped[str] = mapped_column(String(199), default="")
    subject: Mapped[str] = mapped_column(String(255), default="")  # appt:/doc: key, for follow-up linking
    pending_key: Mapped[str] = mapped_column(String(199), default="")
    data: Mapped[str] = mapped_column(Text, default="{}")

    __table_args__ = (
        Index("ix_referral_events_referral", "referral_id"),
        Index("ix_referral_events_message", "message_id"),
        Index("ix_referral_events_pending", "pending_key"),
        Index("ix_referral_events_subject_referral", "subject", "referral_id"),  # widened in 0014
    )


class ReferralAlias(Base):
    """Other identifiers of a referral (RF1-11 from the specialist's RRI), matched like the placer ID."""

    __tablename__ = "referral_aliases"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    referral_id: Mapped[int] = mapped_column(ForeignKey("referrals.id"))
    alias_value: Mapped[str] = mapped_column(String(199))
    alias_kind: Mapped[str] = mapped_column(String(32), default="")
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), nullable=True)

    __table_args__ = (
        UniqueConstraint("alias_value", name="uq_referral_aliases_value"),
        Index("ix_referral_aliases_referral", "referral_id"),
    )


class ReferralLink(Base):
    """How each non-referral message was tied to a referral (``matched_by``), or why it was not.

    ``state``: linked, parked (explicit ID of a referral not seen yet), review (ambiguous heuristic
    match, ``candidates`` lists the ids), rejected (a coordinator unlinked it).
    """

    __tablename__ = "referral_links"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"))
    referral_id: Mapped[int | None] = mapped_column(ForeignKey("referrals.id"), nullable=True)
    state: Mapped[str] = mapped_column(String(16))
    matched_by: Mapped[str] = mapped_column(String(255), default="")
    control_id: Mapped[str] = mapped_column(String(199), default="")
    message_type: Mapped[str] = mapped_column(String(16), default="")
    candidates: Mapped[str] = mapped_column(Text, default="[]")

    __table_args__ = (
        UniqueConstraint("message_id", name="uq_referral_links_message_id"),
        Index("ix_referral_links_referral", "referral_id"),
        Index("ix_referral_links_state", "state"),
    )


class ReferralDocument(Base):
    """A consult note or report, keyed by (sender, document id). ``content`` is PHI: never logged."""

    __tablename__ = "referral_documents"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    referral_id: Mapped[int | None] = mapped_column(ForeignKey("referrals.id"), nullable=True)
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), nullable=True)
    sender: Mapped[str] = mapped_column(String(180))
    document_id: Mapped[str] = mapped_column(String(199))
    status: Mapped[str] = mapped_column(String(16), default="")
    final: Mapped[bool] = mapped_column(Boolean, default=False)
    doc_type: Mapped[str] = mapped_column(String(64), default="")
    content: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    content_type: Mapped[str] = mapped_column(String(64), default="")
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("sender", "document_id", name="uq_referral_documents_key"),
        Index("ix_referral_documents_referral", "referral_id"),
    )


class AuditEntry(Base):
    """Who read PHI through the API, who linked/closed/replayed, what was purged: IDs only, never content."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(255), default="")
    detail: Mapped[str] = mapped_column(String(255), default="")

    __table_args__ = (Index("ix_audit_log_at", "at"),)


# -- stall alerts and the notification outbox ------------------------------------------------------
# One row per alert and per notification. Both are written by the scan (or a coordinator action) in the
# same transaction as the state change that caused them, so a crash never leaves an alert without its
# notification or a notification for an alert that was rolled back.


class Alert(Base):
    """A stalled stage of one referral. ``open_key`` is 0 while the alert is unresolved and the alert's own
    id once resolved, so the unique index allows one *unresolved* alert per (referral, stage) on SQLite and
    PostgreSQL alike (no partial indexes needed) while resolved history rows pile up freely."""

    __tablename__ = "alerts"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    referral_id: Mapped[int] = mapped_column(ForeignKey("referrals.id"))
    stage: Mapped[str] = mapped_column(String(16))
    level: Mapped[int] = mapped_column(Integer, default=1)
    status: Mapped[str] = mapped_column(String(16), default="open")  # open|acknowledged|snoozed|resolved
    owner: Mapped[str] = mapped_column(String(128), default="")
    overdue_days: Mapped[float] = mapped_column(Float, default=0.0)  # when raised or escalated; see due_at
    # When the stage's window ended (its level-1 due instant, migration 0012): how overdue it is now is
    # computed on read from this, so a scan never rewrites alerts just because time passed.
    due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    raised_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    escalated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    snoozed_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_action: Mapped[str] = mapped_column(String(32), default="")
    last_action_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    open_key: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (
        UniqueConstraint("referral_id", "stage", "open_key", name="uq_alerts_open"),
        Index("ix_alerts_status", "status"),
    )


class OutboxEntry(Base):
    """One notification to deliver at least once. ``idempotency_key`` makes enqueueing idempotent and is
    sent to receivers so they can drop duplicates; ``last_error`` holds an error class or code, never PHI."""

    __tablename__ = "outbox"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    idempotency_key: Mapped[str] = mapped_column(String(255))
    channel: Mapped[str] = mapped_column(String(16))  # webhook|email|mllp|patient
    target: Mapped[str] = mapped_column(String(255), default="")
    event: Mapped[str] = mapped_column(String(32))
    referral_id: Mapped[int | None] = mapped_column(ForeignKey("referrals.id"), nullable=True)
    alert_id: Mapped[int | None] = mapped_column(ForeignKey("alerts.id"), nullable=True)
    payload: Mapped[str] = mapped_column(Text, default="{}")
    status: Mapped[str] = mapped_column(String(16), default="pending")  # pending|delivered|failed|dead|suppressed
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_error: Mapped[str] = mapped_column(String(255), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (
        UniqueConstraint("idempotency_key", name="uq_outbox_idempotency_key"),
        Index("ix_outbox_due", "status", "next_attempt_at"),
    )


# -- cohort report indexes (migration 0005) --------------------------------------------------------
# The report selects a sent-date range, the CMS50 view ranks each patient's referrals by sent date (that
# index is widened in 0009), and the no-show figures join appointment events by referral and kind; these
# keep a one-year report on a million referrals an index range scan instead of full-table sorts.
Index("ix_referrals_sent_at", Referral.sent_at)
Index("ix_referral_events_referral_kind", ReferralEvent.referral_id, ReferralEvent.kind)

# -- stall scan indexes (migration 0006) -------------------------------------------------------------
# The scan reads the open alerts (open_key = 0), the open referrals whose clock could have passed a window
# (status + sent_at / completed_at ranges), the held referrals (events by kind: that index is widened in
# 0009) and the recently closed ones (status + closed_at), so a steady-state scan on a million referrals
# never scans a whole table.
Index("ix_alerts_open_key", Alert.open_key)
Index("ix_referrals_status_sent", Referral.status, Referral.sent_at)
Index("ix_referrals_status_completed", Referral.status, Referral.completed_at)
Index("ix_referrals_status_closed", Referral.status, Referral.closed_at)
Index("ix_outbox_alert", OutboxEntry.alert_id)  # the worklist's delivery state per alert

# -- report covering indexes (migration 0009) ------------------------------------------------------
# Two indexes of 0005/0006 widened so that the report's queries read no table rows: the CMS50 figure groups
# each patient's candidates in (patient, sent date) order and needs their status and note time; the no-show
# figures read the no-show events with their appointment subject. Their prefixes serve what the narrower
# ones served (the stall scan's held referrals by event kind).
Index("ix_referrals_patient_first", Referral.patient_key, Referral.sent_at, Referral.status,
      Referral.note_received_at)
Index("ix_referral_events_kind_subject", ReferralEvent.kind, ReferralEvent.referral_id, ReferralEvent.subject)

# -- worklist paging indexes (migration 0013) -------------------------------------------------------
# The coordinator's worklist pages by keyset, most overdue first, for everyone or one owner
# (refloop.store.worklist_view): one index range read per page, whatever the page number.
Index("ix_alerts_worklist", Alert.open_key, Alert.due_at, Alert.id)
Index("ix_alerts_worklist_owner", Alert.open_key, Alert.owner, Alert.due_at, Alert.id)

# -- report rank indexes (migration 0014) -----------------------------------------------------------
# The report's exact medians and p90: per duration, ORDER BY the duration with OFFSET the rank, read in index
# order with the cohort's sent date beside each value, so no table row is read and nothing is sorted.
for _column in (Referral.sent_to_scheduled_s, Referral.sent_to_appointment_s, Referral.appointment_to_note_s,
                Referral.sent_to_closed_s):
    Index(f"ix_referrals_rank_{_column.key[:-2]}", _column, Referral.sent_at)

# -- the report's aggregate pass (migration 0016) ----------------------------------------------------
# One covering index in (status, leak stage, bits) order with every column the pass reads: the cohort's
# groups come out in index order (no sort), and no table row is read. ``refloop.store.report_queries._tallies``.
Index("ix_referrals_report", Referral.status, Referral.leak_stage, Referral.report_bits, Referral.sent_at,
      Referral.scheduling_due_at, Referral.visit_due_at, Referral.leak_at, Referral.first_marked_at,
      Referral.completed_at, Referral.appointment_count, Referral.no_show_appointments,
      Referral.sent_to_scheduled_s, Referral.sent_to_appointment_s, Referral.appointment_to_note_s,
      Referral.sent_to_closed_s)

# The CMS50 figure: the marked first candidates of a year are one range of this partial index.
Index("ix_referrals_cms50", Referral.sent_at, Referral.note_received_at,
      sqlite_where=text("cms50_first = 1"), postgresql_where=text("cms50_first = 1"))

# -- patient identity as a set (migration 0011) -----------------------------------------------------
# A patient carries several identifiers (the referrer's MRN, the specialist's MRN, an enterprise ID, a
# v2.3 PID-2...). Each is stored hashed with its assigning authority, one row per identifier, so a message
# matches a referral when *any* identifier is shared. The authority stays in clear: it names an
# organisation, and a link explanation must say which authority matched. The ID itself is never stored.


class ReferralIdentifier(Base):
    """One identifier of a referral's patient: from its REF/OMG messages (``learned_from`` NULL), or learned
    from a message linked to it by its referral ID (that message's id, so a replay or an unlink takes the
    identifier back)."""

    __tablename__ = "referral_identifiers"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    referral_id: Mapped[int] = mapped_column(ForeignKey("referrals.id"))
    id_hash: Mapped[str] = mapped_column(String(64))  # SHA-256 of "AUTHORITY|ID"
    authority: Mapped[str] = mapped_column(String(180), default="")
    id_type: Mapped[str] = mapped_column(String(16), default="")
    learned_from: Mapped[int | None] = mapped_column(ForeignKey("messages.id"), nullable=True)

    __table_args__ = (
        UniqueConstraint("referral_id", "id_hash", name="uq_referral_identifiers_key"),
        Index("ix_referral_identifiers_hash", "id_hash"),
        Index("ix_referral_identifiers_learned", "learned_from"),
    )


class MessageIdentifier(Base):
    """One identifier of the patient a routed message is about: what ``refloop messages --patient`` and the
    adoption of earlier unrelated messages look up. ``received_at`` is copied so both stay index-only."""

    __tablename__ = "message_identifiers"

    id: Mapped[int] = mapped_column(IdType, primary_key=True, autoincrement=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id"))
    id_hash: Mapped[str] = mapped_column(String(64))
    authority: Mapped[str] = mapped_column(String(180), default="")
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_message_identifiers_hash", "id_hash", "received_at"),
        Index("ix_message_identifiers_message", "message_id"),
    )


# -- message search indexes (migration 0011) --------------------------------------------------------
# `refloop messages --type/--outcome` and GET /api/messages list newest first within a type or outcome;
# the sender filter uses ix_messages_sender_control's prefix, the time filters ix_messages_received_at.
Index("ix_messages_type_id", Message.message_type, Message.trigger_event, Message.id)
Index("ix_messages_outcome_id", Message.outcome, Message.id)

# -- the stage clock (migration 0012) ------------------------------------------------------------------
# The scan is an index range over the next due instants; rows computed under other windows are found by
# version (two ranges around the current one) until the background recompute has rewritten them.
Index("ix_referrals_next_due", Referral.next_due_at)
Index("ix_referrals_clock_version", Referral.clock_version)
