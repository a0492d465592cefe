"""Remember every message an interrupted reply was showing in, not only the first: a long
reply continues in all its parts after a restart.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.alter_column("reply_draft_id", new_column_name="reply_draft_ids",
                           type_=sa.Text(), existing_type=sa.String(128),
                           existing_nullable=True)


def downgrade() -> None:
    # The earlier schema holds one id: keep the first.
    messages = sa.table("messages", sa.column("id", sa.Integer()),
                        sa.column("reply_draft_ids", sa.Text()))
    bind = op.get_bind()
    rows = bind.execute(sa.select(messages.c.id, messages.c.reply_draft_ids)
                        .where(messages.c.reply_draft_ids.contains(" "))).all()
    for row_id, ids in rows:
        bind.execute(messages.update().where(messages.c.id == row_id)
                     .values(reply_draft_ids=ids.split()[0]))
    with op.batch_alter_table("messages") as batch:
        batch.alter_column("reply_draft_ids", new_column_name="reply_draft_id",
                           type_=sa.String(128), existing_type=sa.Text(),
                           existing_nullable=True)
