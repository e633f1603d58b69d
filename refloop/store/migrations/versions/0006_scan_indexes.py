"""scan indexes

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 10:00:00

Indexes for the stall scan's candidate queries (open alerts, open referrals by status and clock start,
held referrals by event kind, recently closed referrals) and the worklist's outbox lookup by alert.
"""

from __future__ import annotations

from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.create_index('ix_alerts_open_key', ['open_key'], unique=False)
    with op.batch_alter_table('referrals', schema=None) as batch_op:
        batch_op.create_index('ix_referrals_status_sent', ['status', 'sent_at'], unique=False)
        batch_op.create_index('ix_referrals_status_completed', ['status', 'completed_at'], unique=False)
        batch_op.create_index('ix_referrals_status_closed', ['status', 'closed_at'], unique=False)
    with op.batch_alter_table('referral_events', schema=None) as batch_op:
        batch_op.create_index('ix_referral_events_kind_referral', ['kind', 'referral_id'], unique=False)
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_alert', ['alert_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_alert')
    with op.batch_alter_table('referral_events', schema=None) as batch_op:
        batch_op.drop_index('ix_referral_events_kind_referral')
    with op.batch_alter_table('referrals', schema=None) as batch_op:
        batch_op.drop_index('ix_referrals_status_closed')
        batch_op.drop_index('ix_referrals_status_completed')
        batch_op.drop_index('ix_referrals_status_sent')
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.drop_index('ix_alerts_open_key')
