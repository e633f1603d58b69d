"""report indexes

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 09:50:00

Hand-written: indexes for the cohort report (sent-date range, CMS50 per-patient ranking, no-show join).
"""

from __future__ import annotations

from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('referrals', schema=None) as batch_op:
        batch_op.create_index('ix_referrals_sent_at', ['sent_at'], unique=False)
        batch_op.create_index('ix_referrals_patient_sent', ['patient_key', 'sent_at'], unique=False)
    with op.batch_alter_table('referral_events', schema=None) as batch_op:
        batch_op.create_index('ix_referral_events_referral_kind', ['referral_id', 'kind'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('referral_events', schema=None) as batch_op:
        batch_op.drop_index('ix_referral_events_referral_kind')
    with op.batch_alter_table('referrals', schema=None) as batch_op:
        batch_op.drop_index('ix_referrals_patient_sent')
        batch_op.drop_index('ix_referrals_sent_at')
