"""Index messages by creation time, for the retention sweep; remember where an interrupted
reply started showing.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_messages_created_at", "messages", ["created_at"])
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("reply_draft_id", sa.String(128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("reply_draft_id")
    op.drop_index("ix_messages_created_at", table_name="messages")
