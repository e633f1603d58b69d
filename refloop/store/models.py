"""SQLAlchemy 2 models. Alembic migrations in ``migrations/`` are the source of truth for the schema;
these classes must match them (``tests/test_store.py`` runs ``alembic check``).

Writes on the hot path go through Core ``insert()`` on these tables (PERF: the ORM unit of work costs
more than the whole ACK budget); the typed classes serve reads, the API and the CLI.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
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

    ALL = (PROCESSED, IGNORED, REJECTED, ERROR, FAILED, DUPLICATE, UNPARSEABLE, BROKEN_FRAME, OVERSIZE)


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

    __table_args__ = (
        Index("ix_messages_sender_control", "sending_application", "sending_facility", "control_id"),
        Index("ix_messages_received_at", "received_at"),
        Index("ix_messages_control_id", "control_id"),
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
