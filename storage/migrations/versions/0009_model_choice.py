"""Choosing the model per chat: the model a conversation chose with /model, and the model
whose tokenizer counted each message's tokens (so a prompt for another model counts them
again).

Going down drops both: every chat goes back to the one model, and the counts stay as they
are (those of another model only make that chat's budget approximate until they age out).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("conversations") as batch:
        batch.add_column(sa.Column("model", sa.String(32), nullable=True))
    with op.batch_alter_table("messages") as batch:
        batch.add_column(sa.Column("counted_by", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("counted_by")
    with op.batch_alter_table("conversations") as batch:
        batch.drop_column("model")
