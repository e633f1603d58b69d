"""report rank indexes

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 13:00:00

Hand-written: the one-year report's exact medians and p90 are read by ``ORDER BY <duration> LIMIT 2 OFFSET k``
per metric (``refloop.store.report_queries.rank_values``). With one index per duration that also carries
``sent_at`` (the cohort condition), SQLite walks the index in value order and reads no table rows: about a
millisecond per rank at 100k referrals, where fetching every cohort row's four durations and sorting them in
Python took 200 ms. The columns are written once per milestone, so the write path pays an index entry per
milestone, not per message.

``ix_referral_events_subject`` (subject) becomes ``ix_referral_events_subject_referral`` (subject,
referral_id): the same lookups by subject (linking), and the report's appointment count reads appointment
events in subject order without a lookup of each event's row (twice as fast); still one index on the hot
insert path.
"""

from __future__ import annotations

from alembic import op

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None

_DURATIONS = ('sent_to_scheduled_s', 'sent_to_appointment_s', 'appointment_to_note_s', 'sent_to_closed_s')


def upgrade() -> None:
    with op.batch_alter_table('referrals', schema=None) as batch_op:
        for column in _DURATIONS:
            batch_op.create_index(f'ix_referrals_rank_{column[:-2]}', [column, 'sent_at'], unique=False)
    with op.batch_alter_table('referral_events', schema=None) as batch_op:
        batch_op.create_index('ix_referral_events_subject_referral', ['subject', 'referral_id'], unique=False)
        batch_op.drop_index('ix_referral_events_subject')


def downgrade() -> None:
    with op.batch_alter_table('referral_events', schema=None) as batch_op:
        batch_op.create_index('ix_referral_events_subject', ['subject'], unique=False)
        batch_op.drop_index('ix_referral_events_subject_referral')
    with op.batch_alter_table('referrals', schema=None) as batch_op:
        for column in reversed(_DURATIONS):
            batch_op.drop_index(f'ix_referrals_rank_{column[:-2]}')
