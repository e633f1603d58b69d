"""stage clock kept on write

Revision ID: 0012
Revises: 0009
Create Date: 2026-12-05 08:20:00

The stage clock on the ``referrals`` projection (see ``refloop.store.models.Referral``): running stage, its
start, ``next_due_at``, leak stage and instant, milestone durations in seconds and the windows' version; and
on ``alerts`` the instant the stage's window ended, from which how overdue it is is computed on read.

No data migration: every existing row gets ``clock_version = ''``, which no windows ever hash to, so it is
stale. Stale rows are evaluated by the clock on read (the scan folds them) and rewritten in short chunks
by the daemon's background recompute (``refloop.store.clock_keeper``), which also runs on a window change.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('referrals', schema=None) as batch_op:
        batch_op.add_column(sa.Column('clock_stage', sa.String(length=16), server_default='', nullable=False))
        batch_op.add_column(sa.Column('stage_started_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('next_due_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('leak_stage', sa.String(length=24), server_default='', nullable=False))
        batch_op.add_column(sa.Column('leak_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('clock_version', sa.String(length=16), server_default='', nullable=False))
        batch_op.add_column(sa.Column('scheduling_due_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('visit_due_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('sent_to_scheduled_s', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('sent_to_appointment_s', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('appointment_to_note_s', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('sent_to_closed_s', sa.BigInteger(), nullable=True))
        batch_op.create_index('ix_referrals_next_due', ['next_due_at'], unique=False)
        batch_op.create_index('ix_referrals_clock_version', ['clock_version'], unique=False)
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('due_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # recreate='never': see 0007 (foreign keys refuse the batch copy-and-drop)
    with op.batch_alter_table('alerts', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('due_at')
    with op.batch_alter_table('referrals', schema=None, recreate='never') as batch_op:
        batch_op.drop_index('ix_referrals_clock_version')
        batch_op.drop_index('ix_referrals_next_due')
        for name in ('sent_to_closed_s', 'appointment_to_note_s', 'sent_to_appointment_s', 'sent_to_scheduled_s',
                     'visit_due_at', 'scheduling_due_at', 'clock_version', 'leak_at', 'leak_stage', 'next_due_at', 'stage_started_at', 'clock_stage'):
            batch_op.drop_column(name)
