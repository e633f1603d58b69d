"""report covering indexes

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 10:00:00

Hand-written: two report indexes widened so that their queries read no table rows.

* ``ix_referrals_patient_sent`` (patient_key, sent_at) becomes ``ix_referrals_patient_first`` (patient_key,
  sent_at, status, note_received_at): the CMS50 figure groups the candidates per patient in this index's order
  and needs the status and the note time of each (``refloop.store.report_queries.cms50``). The cost: a
  status or note change now also rewrites this index entry.
* ``ix_referral_events_kind_referral`` (kind, referral_id) becomes ``ix_referral_events_kind_subject`` (kind,
  referral_id, subject): the no-show figures read the no-show events with their appointment subject. Its
  prefix still serves the stall scan's lookups by kind; ``subject`` is written once, with the event.
"""

from __future__ import annotations

from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('referrals', schema=None) as batch_op:
        batch_op.create_index('ix_referrals_patient_first', ['patient_key', 'sent_at', 'status', 'note_received_at'],
                              unique=False)
        batch_op.drop_index('ix_referrals_patient_sent')
    with op.batch_alter_table('referral_events', schema=None) as batch_op:
        batch_op.create_index('ix_referral_events_kind_subject', ['kind', 'referral_id', 'subject'], unique=False)
        batch_op.drop_index('ix_referral_events_kind_referral')


def downgrade() -> None:
    with op.batch_alter_table('referral_events', schema=None) as batch_op:
        batch_op.create_index('ix_referral_events_kind_referral', ['kind', 'referral_id'], unique=False)
        batch_op.drop_index('ix_referral_events_kind_subject')
    with op.batch_alter_table('referrals', schema=None) as batch_op:
        batch_op.create_index('ix_referrals_patient_sent', ['patient_key', 'sent_at'], unique=False)
        batch_op.drop_index('ix_referrals_patient_first')
