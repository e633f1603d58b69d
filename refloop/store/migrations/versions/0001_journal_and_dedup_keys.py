"""journal and dedup keys

Revision ID: 0001
Revises:
Create Date: 2026-11-27 09:00:34.419907
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('messages',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('peer', sa.String(length=64), nullable=False),
    sa.Column('raw', sa.LargeBinary(), nullable=True),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('encoding', sa.String(length=32), nullable=False),
    sa.Column('sending_application', sa.String(length=180), nullable=False),
    sa.Column('sending_facility', sa.String(length=180), nullable=False),
    sa.Column('message_type', sa.String(length=8), nullable=False),
    sa.Column('trigger_event', sa.String(length=8), nullable=False),
    sa.Column('control_id', sa.String(length=199), nullable=False),
    sa.Column('version', sa.String(length=16), nullable=False),
    sa.Column('processing_id', sa.String(length=8), nullable=False),
    sa.Column('profile', sa.String(length=64), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('ack_code', sa.String(length=2), nullable=False),
    sa.Column('err_code', sa.Integer(), nullable=True),
    sa.Column('ack', sa.Text(), nullable=False),
    sa.Column('detail', sa.String(length=255), nullable=False),
    sa.Column('flags', sa.String(length=255), nullable=False),
    sa.Column('duplicate_of', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=True),
    sa.Column('replayed_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['duplicate_of'], ['messages.id'], name=op.f('fk_messages_duplicate_of_messages')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_messages'))
    )
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index('ix_messages_control_id', ['control_id'], unique=False)
        batch_op.create_index('ix_messages_received_at', ['received_at'], unique=False)
        batch_op.create_index('ix_messages_sender_control', ['sending_application', 'sending_facility', 'control_id'], unique=False)

    op.create_table('message_keys',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('sending_application', sa.String(length=180), nullable=False),
    sa.Column('sending_facility', sa.String(length=180), nullable=False),
    sa.Column('control_id', sa.String(length=199), nullable=False),
    sa.Column('content_hash', sa.String(length=64), nullable=False),
    sa.Column('message_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('ack_code', sa.String(length=2), nullable=False),
    sa.Column('err_code', sa.Integer(), nullable=True),
    sa.Column('err_text', sa.String(length=255), nullable=False),
    sa.Column('err_location', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['message_id'], ['messages.id'], name=op.f('fk_message_keys_message_id_messages')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_message_keys')),
    sa.UniqueConstraint('sending_application', 'sending_facility', 'control_id', 'content_hash', name='uq_message_keys_key')
    )


def downgrade() -> None:
    op.drop_table('message_keys')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index('ix_messages_sender_control')
        batch_op.drop_index('ix_messages_received_at')
        batch_op.drop_index('ix_messages_control_id')

    op.drop_table('messages')
