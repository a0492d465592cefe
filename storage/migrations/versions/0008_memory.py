"""Long-term memory: each message's embedding (``message_embeddings``) and the turns
recalled for a message (``memory_recalls``), both deleted with their messages.

Going down drops both: embeddings are made again from the messages by the memory's worker
after the next upgrade; which turns were recalled for past messages is lost.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "message_embeddings",
        sa.Column("message_id", BIGID, sa.ForeignKey("messages.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("conversation_id", sa.Integer(),
                  sa.ForeignKey("conversations.id", ondelete="CASCADE"), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("dimension", sa.Integer(), nullable=False),
        sa.Column("vector", sa.LargeBinary(), nullable=False),
    )
    op.create_index("ix_message_embeddings_conversation", "message_embeddings",
                    ["conversation_id", "model", "message_id"])
    op.create_table(
        "memory_recalls",
        sa.Column("message_id", BIGID, sa.ForeignKey("messages.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("recalled_id", BIGID, sa.ForeignKey("messages.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("similarity", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("message_id", "recalled_id"),
    )
    op.create_index("ix_memory_recalls_recalled_id", "memory_recalls", ["recalled_id"])


def downgrade() -> None:
    op.drop_index("ix_memory_recalls_recalled_id", table_name="memory_recalls")
    op.drop_table("memory_recalls")
    op.drop_index("ix_message_embeddings_conversation", table_name="message_embeddings")
    op.drop_table("message_embeddings")
