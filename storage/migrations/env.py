"""Alembic environment. Migrations run through ``storage.migrate.upgrade`` on a live
connection (``chinwag db upgrade`` and start-up), never from an ini file."""

from alembic import context

from storage.models import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `chinwag db upgrade`")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
