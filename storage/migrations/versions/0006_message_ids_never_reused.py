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
    if op.get_bind().dialect.name == "sqlite":
        # The next id goes above every id ever handed out that is still known: the
        # newest message's, and a /reset's mark (its messages may have been forgotten).
        op.execute("INSERT INTO sqlite_sequence (name, seq) SELECT 'messages', 0 "
                   "WHERE NOT EXISTS (SELECT 1 FROM sqlite_sequence WHERE name = 'messages')")
        op.execute("UPDATE sqlite_sequence SET seq = max(seq, (SELECT coalesce("
                   "max(reset_after_id), 0) FROM conversations)) WHERE name = 'messages'")


def downgrade() -> None:
    _rebuild_messages(False)
