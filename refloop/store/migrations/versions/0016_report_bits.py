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
* ``report_bits``: ``refloop.report.report_bits``, what the report counts that does not depend on now;
* ``cms50_first``: 1 on each patient's first CMS50 candidate of a year (``refloop.store.cms50``), so the
  CMS50 figure is one range of the partial index ``ix_referrals_cms50`` instead of a pass over every
  referral in patient order (2x a bare pass at 1M).

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
    """Fill the four columns from the events and the other columns (also used by a test)."""
    appt = "e.referral_id = referrals.id AND e.subject LIKE 'appt:%'"
    conn.execute(sa.text(
        f"UPDATE referrals SET appointment_count = (SELECT count(DISTINCT e.subject) FROM referral_events e "
        f"WHERE {appt}), no_show_appointments = (SELECT count(DISTINCT e.subject) FROM referral_events e "
        f"WHERE {appt} AND e.kind = 'appointment_no_show') WHERE id IN "
        f"(SELECT referral_id FROM referral_events WHERE subject LIKE 'appt:%' AND referral_id IS NOT NULL)"))
    bits = " + ".join(f"(CASE WHEN {cond} THEN {1 << i} ELSE 0 END)" for i, cond in enumerate(_BITS))
    conn.execute(sa.text(f"UPDATE referrals SET report_bits = {bits}"))
    # the first candidate (earliest sent_at, then lowest id) per patient and UTC year, sent by 31 October
    if conn.dialect.name == "sqlite":
        year, month = "strftime('%Y', sent_at)", "CAST(strftime('%m', sent_at) AS INTEGER)"
    else:
        year, month = "EXTRACT(YEAR FROM sent_at AT TIME ZONE 'UTC')", "EXTRACT(MONTH FROM sent_at AT TIME ZONE 'UTC')"
    conn.execute(sa.text(
        "UPDATE referrals SET cms50_first = 1 WHERE id IN (SELECT id FROM (SELECT id, row_number() OVER "
        f"(PARTITION BY patient_key, {year} ORDER BY sent_at, id) AS rn FROM referrals WHERE patient_key != '' "
        f"AND sent_at IS NOT NULL AND status != 'cancelled' AND {month} <= 10) AS ranked WHERE rn = 1)"))


def upgrade() -> None:
    with op.batch_alter_table('referrals', schema=None) as batch_op:
        for column in ('appointment_count', 'no_show_appointments', 'report_bits', 'cms50_first'):
            batch_op.add_column(sa.Column(column, sa.Integer(), server_default='0', nullable=False))
    backfill(op.get_bind())
    with op.batch_alter_table('referrals', schema=None) as batch_op:
        batch_op.create_index('ix_referrals_report', list(_INDEX), unique=False)
    op.create_index('ix_referrals_cms50', 'referrals', ['sent_at', 'note_received_at'], unique=False,
                    sqlite_where=sa.text('cms50_first = 1'), postgresql_where=sa.text('cms50_first = 1'))


def downgrade() -> None:
    # plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+): a batch copy of ``referrals`` would trip its foreign keys
    op.drop_index('ix_referrals_cms50', table_name='referrals')
    op.drop_index('ix_referrals_report', table_name='referrals')
    for column in ('cms50_first', 'report_bits', 'no_show_appointments', 'appointment_count'):
        op.drop_column('referrals', column)
