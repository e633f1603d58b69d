"""Alembic environment: always runs on the connection handed in by refloop.store.migrate."""

from __future__ import annotations

from alembic import context

from refloop.store.models import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - refloop always passes one
    raise RuntimeError("run migrations through `refloop db upgrade`")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
