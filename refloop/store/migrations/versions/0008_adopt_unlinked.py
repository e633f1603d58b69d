"""unlinked messages by patient

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03 09:00:00

``messages.patient_key``: set while a scheduling or document message is unrelated to any referral, so a
referral for that patient that arrives later can adopt it (``SenderProfile.adopt_earlier_days``). A
partial index keeps it off the rows that never need it (every other message). Existing rows stay NULL:
messages journaled before this version are not adopted (``refloop replay`` re-routes them if wanted).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

_WHERE = sa.text("patient_key IS NOT NULL")


def upgrade() -> None:
    op.add_column('messages', sa.Column('patient_key', sa.String(length=64), nullable=True))
    op.create_index('ix_messages_unlinked_patient', 'messages', ['patient_key', 'received_at'], unique=False,
                    sqlite_where=_WHERE, postgresql_where=_WHERE)


def downgrade() -> None:
    op.drop_index('ix_messages_unlinked_patient', table_name='messages')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('patient_key')
