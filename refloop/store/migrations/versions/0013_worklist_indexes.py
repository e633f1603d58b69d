"""worklist paging indexes

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05 08:30:00

Hand-written: the coordinator's worklist (``refloop.store.worklist_view``) pages through the unresolved alerts
by keyset, longest overdue first (the earliest due instant), for everyone or for one owner. These two indexes
make each page one index range read instead of a sort of every open alert:

* ``ix_alerts_worklist`` (open_key, due_at, id): everyone's view;
* ``ix_alerts_worklist_owner`` (open_key, owner, due_at, id): "my open items", the default view when the
  person is known.

``alerts.due_at`` is written once, when an alert is raised or escalated (never per scan tick), so the indexes
cost nothing on the scan. Unresolved alerts raised before migration 0012 kept no due instant: they get one
here, estimated as ``raised_at`` minus the ``overdue_days`` stored when they were raised (calendar days; for
business-day windows the estimate errs towards "later"), so they sort among the others.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

_CHUNK = 500


def _aware(value: datetime | str) -> datetime:
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def upgrade() -> None:
    conn = op.get_bind()
    alerts = sa.table('alerts', sa.column('id', sa.Integer), sa.column('open_key', sa.Integer),
                      sa.column('raised_at', sa.DateTime(timezone=True)), sa.column('overdue_days', sa.Float),
                      sa.column('due_at', sa.DateTime(timezone=True)))
    last = 0
    while True:
        rows = conn.execute(sa.select(alerts.c.id, alerts.c.raised_at, alerts.c.overdue_days).where(
            alerts.c.open_key == 0, alerts.c.due_at.is_(None), alerts.c.id > last)
            .order_by(alerts.c.id).limit(_CHUNK)).all()
        if not rows:
            break
        for row in rows:
            due = _aware(row.raised_at) - timedelta(days=float(row.overdue_days or 0.0))
            conn.execute(sa.update(alerts).where(alerts.c.id == row.id).values(due_at=due))
        last = rows[-1].id
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.create_index('ix_alerts_worklist', ['open_key', 'due_at', 'id'], unique=False)
        batch_op.create_index('ix_alerts_worklist_owner', ['open_key', 'owner', 'due_at', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.drop_index('ix_alerts_worklist_owner')
        batch_op.drop_index('ix_alerts_worklist')
