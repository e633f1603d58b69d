"""referrals.first_marked_at

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05 13:00:00

Hand-written: ``referrals.first_marked_at`` is the earliest instant a referral was on the worklist (an alert's
``raised_at``) or reminded (an outbox row's ``created_at``), kept on write from now on
(``refloop.store.referrals.mark``). The report's "recovered" figure (referrals on the worklist or reminded,
then completed at or after that) becomes two counts in its aggregate pass; it joined every alert and outbox
row with its referral, 0.7 s at 1M referrals. Backfilled here from the alerts and outbox rows, in chunks.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None

_CHUNK = 1000


def upgrade() -> None:
    with op.batch_alter_table('referrals', schema=None) as batch_op:
        batch_op.add_column(sa.Column('first_marked_at', sa.DateTime(timezone=True), nullable=True))
    conn = op.get_bind()
    alerts = sa.table('alerts', sa.column('referral_id', sa.Integer), sa.column('raised_at', sa.DateTime(timezone=True)))
    outbox = sa.table('outbox', sa.column('referral_id', sa.Integer), sa.column('created_at', sa.DateTime(timezone=True)))
    referrals = sa.table('referrals', sa.column('id', sa.Integer), sa.column('first_marked_at', sa.DateTime(timezone=True)))
    marks = sa.union_all(sa.select(alerts.c.referral_id.label('rid'), alerts.c.raised_at.label('at')),
                         sa.select(outbox.c.referral_id, outbox.c.created_at)
                         .where(outbox.c.referral_id.is_not(None))).subquery()
    first = conn.execute(sa.select(marks.c.rid, sa.func.min(marks.c.at)).group_by(marks.c.rid)).all()
    stmt = sa.update(referrals).where(referrals.c.id == sa.bindparam('b_id')).values(first_marked_at=sa.bindparam('b_at'))
    for start in range(0, len(first), _CHUNK):
        conn.execute(stmt, [{'b_id': rid, 'b_at': at} for rid, at in first[start:start + _CHUNK]])


def downgrade() -> None:
    with op.batch_alter_table('referrals', schema=None) as batch_op:
        batch_op.drop_column('first_marked_at')
