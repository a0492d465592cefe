"""Message ids are never given twice on SQLite: ids order a conversation (a /reset hides
every id up to the newest), and SQLite reuses the ids of the newest rows once they are
deleted (a /forget) unless the table is AUTOINCREMENT. PostgreSQL's sequences never reuse.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _rebuild_messages(autoincrement: bool) -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("messages", recreate="always",
                              table_kwargs={"sqlite_autoincrement": autoincrement}):
        pass


def upgrade() -> None:
    _rebuild_messages(True)


def downgrade() -> None:
    _rebuild_messages(False)
