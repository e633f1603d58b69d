"""journal-first ingest

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05 08:30:00

The ACK path now only journals a frame (outcome ``queued``); the projector applies it afterwards.

* ``messages.applied_at``: when the projector committed the row's effects (NULL for rows that were never
  applied: rejects, duplicates, broken frames, and every row journaled before this version, which was applied
  inside its own journal transaction).
* ``ix_messages_unapplied``: a partial index on the rows still waiting for the projector (``queued``, and
  ``requeued`` by ``refloop replay``), so finding the next batch and measuring the lag read only those rows
  however long the journal grows.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None

_WHERE = sa.text("outcome IN ('queued', 'requeued')")


def upgrade() -> None:
    op.add_column('messages', sa.Column('applied_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_messages_unapplied', 'messages', ['id'], unique=False,
                    sqlite_where=_WHERE, postgresql_where=_WHERE)


def downgrade() -> None:
    op.drop_index('ix_messages_unapplied', table_name='messages')
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('applied_at')
