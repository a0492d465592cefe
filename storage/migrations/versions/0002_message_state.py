"""Message state: pending, answered or failed, so a restart answers what was left.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("state", sa.String(16), nullable=True))
        batch.create_index("ix_messages_pending", ["platform", "state"])
    # Messages stored before this revision are history, not work left to do.
    op.execute("UPDATE messages SET state = 'answered' WHERE role = 'user'")


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_index("ix_messages_pending")
        batch.drop_column("state")
