"""patient identity as a set; message search indexes

Revision ID: 0011
Revises: 0009
Create Date: 2026-12-05 08:30:00

Hand-written. ``referral_identifiers`` and ``message_identifiers`` hold every patient identifier (PID-3
repetitions, PID-2/PID-4 in v2.3.x) hashed with its assigning authority, one row each, so a message matches
a referral when any identifier is shared (``refloop.store.identity``). Two indexes serve the message search
(``refloop messages --type/--outcome``).

Backfill, from the journal's raw messages (the default identifier types; a profile's own
``patient_id_types`` applies to messages arriving after the upgrade):

* every routed message (REF, RRI, OMG, ORM, OSU, SIU, MDM, ORU) whose raw text is still kept gets its
  identifier rows, so `refloop messages --patient` finds it and a later referral can adopt it;
* every referral gets the identifiers of the REF/OMG messages that created or updated it;
* a referral whose messages were purged by retention keeps its stored ``patient_key`` as its only identifier
  (authority unknown, so a link through it says ``patient`` without an authority): it still matches a later
  message whose first MR identifier is the same, exactly as before this version, but not one that shares
  only another identifier. Purged messages get no rows and cannot be found by patient;
* referrals that now share an identifier are given one person key (the oldest referral's), so the CMS50
  figure counts such a patient once.

The backfill parses each kept message once (roughly 50-100 µs each), in batches of 2,000 rows.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

from refloop.message import Message, MessageError, decode_payload
from refloop.patient import patient_ids

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

_ROUTED = ("REF", "RRI", "OMG", "ORM", "OSU", "SIU", "MDM", "ORU")
_BATCH = 2000


def upgrade() -> None:
    op.create_table(
        'referral_identifiers',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
        sa.Column('referral_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('id_hash', sa.String(length=64), nullable=False),
        sa.Column('authority', sa.String(length=180), nullable=False),
        sa.Column('id_type', sa.String(length=16), nullable=False),
        sa.Column('learned_from', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
        sa.ForeignKeyConstraint(['referral_id'], ['referrals.id'],
                                name=op.f('fk_referral_identifiers_referral_id_referrals')),
        sa.ForeignKeyConstraint(['learned_from'], ['messages.id'],
                                name=op.f('fk_referral_identifiers_learned_from_messages')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_referral_identifiers')),
        sa.UniqueConstraint('referral_id', 'id_hash', name='uq_referral_identifiers_key'),
    )
    op.create_index('ix_referral_identifiers_hash', 'referral_identifiers', ['id_hash'], unique=False)
    op.create_index('ix_referral_identifiers_learned', 'referral_identifiers', ['learned_from'], unique=False)
    op.create_table(
        'message_identifiers',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
        sa.Column('message_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('id_hash', sa.String(length=64), nullable=False),
        sa.Column('authority', sa.String(length=180), nullable=False),
        sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['message_id'], ['messages.id'],
                                name=op.f('fk_message_identifiers_message_id_messages')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_message_identifiers')),
    )
    op.create_index('ix_message_identifiers_hash', 'message_identifiers', ['id_hash', 'received_at'], unique=False)
    op.create_index('ix_message_identifiers_message', 'message_identifiers', ['message_id'], unique=False)
    op.create_index('ix_messages_type_id', 'messages', ['message_type', 'trigger_event', 'id'], unique=False)
    op.create_index('ix_messages_outcome_id', 'messages', ['outcome', 'id'], unique=False)
    backfill(op.get_bind())


def downgrade() -> None:
    op.drop_index('ix_messages_outcome_id', table_name='messages')
    op.drop_index('ix_messages_type_id', table_name='messages')
    op.drop_index('ix_message_identifiers_message', table_name='message_identifiers')
    op.drop_index('ix_message_identifiers_hash', table_name='message_identifiers')
    op.drop_table('message_identifiers')
    op.drop_index('ix_referral_identifiers_learned', table_name='referral_identifiers')
    op.drop_index('ix_referral_identifiers_hash', table_name='referral_identifiers')
    op.drop_table('referral_identifiers')


def backfill(conn: sa.Connection) -> None:
    """Identifier rows from the kept raw messages, then one person key per group of referrals."""
    meta = sa.MetaData()
    messages = sa.Table('messages', meta, autoload_with=conn)
    links = sa.Table('referral_links', meta, autoload_with=conn)
    referrals = sa.Table('referrals', meta, autoload_with=conn)
    rids = sa.Table('referral_identifiers', meta, autoload_with=conn)
    mids = sa.Table('message_identifiers', meta, autoload_with=conn)

    # Which referral each REF/OMG message created or updated (set_link with matched_by "referral_id").
    owner = {int(m): int(r) for m, r in conn.execute(
        sa.select(links.c.message_id, links.c.referral_id)
        .where(links.c.matched_by == "referral_id", links.c.referral_id.is_not(None)))}
    seen_referral: set[tuple[int, str]] = set()
    last = 0
    while True:
        batch = conn.execute(
            sa.select(messages.c.id, messages.c.raw, messages.c.encoding, messages.c.received_at)
            .where(messages.c.id > last, messages.c.raw.is_not(None), messages.c.message_type.in_(_ROUTED))
            .order_by(messages.c.id).limit(_BATCH)).all()
        if not batch:
            break
        last = int(batch[-1].id)
        message_rows: list[dict[str, Any]] = []
        referral_rows: list[dict[str, Any]] = []
        for row in batch:
            try:
                msg = Message.parse(decode_payload(row.raw, row.encoding or "cp1252")[0])
            except MessageError:
                continue
            ids = patient_ids(msg)
            message_rows += [{"message_id": row.id, "id_hash": i.key, "authority": i.authority[:180],
                              "received_at": row.received_at} for i in ids]
            rid = owner.get(int(row.id))
            if rid is None:
                continue
            for i in ids:
                if (rid, i.key) not in seen_referral:
                    seen_referral.add((rid, i.key))
                    referral_rows.append({"referral_id": rid, "id_hash": i.key, "authority": i.authority[:180],
                                          "id_type": i.id_type[:16]})
        if message_rows:
            conn.execute(mids.insert(), message_rows)
        if referral_rows:
            conn.execute(rids.insert(), referral_rows)

    # Referrals whose messages were purged: their stored key is their only identifier.
    covered = {r for r, _ in seen_referral}
    purged = [{"referral_id": int(r.id), "id_hash": r.patient_key, "authority": "", "id_type": ""}
              for r in conn.execute(sa.select(referrals.c.id, referrals.c.patient_key)
                                    .where(referrals.c.patient_key != ""))
              if int(r.id) not in covered]
    for start in range(0, len(purged), _BATCH):
        conn.execute(rids.insert(), purged[start:start + _BATCH])

    _merge_people(conn, referrals, rids)


def _merge_people(conn: sa.Connection, referrals: sa.Table, rids: sa.Table) -> None:
    """Union-find over shared identifiers: each group of referrals takes its oldest referral's key."""
    parent: dict[int, int] = {}

    def find(x: int) -> int:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    first_by_hash: dict[str, int] = {}
    for rid, id_hash in conn.execute(sa.select(rids.c.referral_id, rids.c.id_hash).order_by(rids.c.referral_id)):
        other = first_by_hash.setdefault(id_hash, int(rid))
        a, b = find(int(rid)), find(other)
        if a != b:
            parent[max(a, b)] = min(a, b)
    keys = {int(r.id): r.patient_key for r in conn.execute(sa.select(referrals.c.id, referrals.c.patient_key))}
    updates = [{"b_id": rid, "b_key": keys[find(rid)]} for rid in parent
               if find(rid) != rid and keys.get(rid) != keys.get(find(rid)) and keys.get(find(rid))]
    if updates:
        conn.execute(referrals.update().where(referrals.c.id == sa.bindparam("b_id"))
                     .values(patient_key=sa.bindparam("b_key")), updates)
