"""Each user's language: the one they chose with /language, and the one their platform
gave last (a Discord message carries none, so their last slash command's locale stands
for it, also after a restart).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("language", sa.String(16), nullable=True))
        batch.add_column(sa.Column("platform_language", sa.String(35), nullable=True))


def downgrade() -> None:
    # The earlier schema has no place for them: users get CHINWAG_LANGUAGE's texts again.
    with op.batch_alter_table("users") as batch:
        batch.drop_column("platform_language")
        batch.drop_column("language")
