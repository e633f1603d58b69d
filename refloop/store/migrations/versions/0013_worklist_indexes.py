"""worklist paging indexes

Revision ID: 0013
Revises: 0009
Create Date: 2026-12-05 08:30:00

Hand-written: the coordinator's worklist (``refloop.store.worklist_view``) pages through the unresolved alerts
by keyset, most overdue first, for everyone or for one owner. These two indexes make each page one index
range read instead of a sort of every open alert:

* ``ix_alerts_worklist`` (open_key, overdue_days, id): everyone's view;
* ``ix_alerts_worklist_owner`` (open_key, owner, overdue_days, id): "my open items", the default view when
  the person is known.

The cost: the scan's ``overdue_days`` refresh rewrites an entry in each for every unresolved alert it touches.
"""

from __future__ import annotations

from alembic import op

revision = '0013'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.create_index('ix_alerts_worklist', ['open_key', 'overdue_days', 'id'], unique=False)
        batch_op.create_index('ix_alerts_worklist_owner', ['open_key', 'owner', 'overdue_days', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('alerts', schema=None) as batch_op:
        batch_op.drop_index('ix_alerts_worklist_owner')
        batch_op.drop_index('ix_alerts_worklist')
