"""referrals: the report's facts kept on write

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05 18:30:00

Hand-written: the one-year report at 1M referrals was 10x one bare pass over ``referrals``: an aggregate
pass evaluating two dozen conditions on every row (3.9x), and two joins of the referrals with their events
for the appointment and no-show figures (2.8x). Three columns, kept on write by the fold
(``refloop.store.referrals.projection_values``), make it one grouped pass along one covering index:

* ``appointment_count``: distinct appointment subjects (``appt:...``) among the referral's events;
* ``no_show_appointments``: those of them with a no-show event;
* ``report_bits``: ``refloop.report.report_bits``, what the report counts that does not depend on now.

Backfilled here with SQL that states the same rules (this file must stay as it is when the rules move on:
a later change of them is a later migration).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None

_INDEX = ('status', 'leak_stage', 'report_bits', 'sent_at', 'scheduling_due_at', 'visit_due_at', 'leak_at',
          'first_marked_at', 'completed_at', 'appointment_count', 'no_show_appointments', 'sent_to_scheduled_s',
          'sent_to_appointment_s', 'appointment_to_note_s', 'sent_to_closed_s')

#: refloop.report.BITS at this revision, each with its condition.
_BITS = (
    "accepted_at IS NOT NULL", "scheduled_at IS NOT NULL", "completed_at IS NOT NULL",
    "completed_at IS NOT NULL AND note_received_at IS NOT NULL", "scheduled_at <= scheduling_due_at",
    "completed_at <= visit_due_at", "no_show_appointments > 0", "sent_to_scheduled_s IS NOT NULL",
    "sent_to_appointment_s IS NOT NULL", "appointment_to_note_s IS NOT NULL", "sent_to_closed_s IS NOT NULL",
)


def backfill(conn: sa.Connection) -> None:
    """Fill the three columns from the events and the other columns (also used by a test)."""
    appt = "e.referral_id = referrals.id AND e.subject LIKE 'appt:%'"
    conn.execute(sa.text(
        f"UPDATE referrals SET appointment_count = (SELECT count(DISTINCT e.subject) FROM referral_events e "
        f"WHERE {appt}), no_show_appointments = (SELECT count(DISTINCT e.subject) FROM referral_events e "
        f"WHERE {appt} AND e.kind = 'appointment_no_show') WHERE id IN "
        f"(SELECT referral_id FROM referral_events WHERE subject LIKE 'appt:%' AND referral_id IS NOT NULL)"))
    bits = " + ".join(f"(CASE WHEN {cond} THEN {1 << i} ELSE 0 END)" for i, cond in enumerate(_BITS))
    conn.execute(sa.text(f"UPDATE referrals SET report_bits = {bits}"))


def upgrade() -> None:
    with op.batch_alter_table('referrals', schema=None) as batch_op:
        for column in ('appointment_count', 'no_show_appointments', 'report_bits'):
            batch_op.add_column(sa.Column(column, sa.Integer(), server_default='0', nullable=False))
    backfill(op.get_bind())
    with op.batch_alter_table('referrals', schema=None) as batch_op:
        batch_op.create_index('ix_referrals_report', list(_INDEX), unique=False)


def downgrade() -> None:
    # plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+): a batch copy of ``referrals`` would trip its foreign keys
    op.drop_index('ix_referrals_report', table_name='referrals')
    for column in ('report_bits', 'no_show_appointments', 'appointment_count'):
        op.drop_column('referrals', column)
