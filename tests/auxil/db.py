"""Reading what a test's database holds."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from storage.models import MessageRow


async def stored_texts(engine: AsyncEngine) -> list[tuple[str, str]]:
    """``(role, text)`` of every stored message, oldest first."""
    async with engine.connect() as connection:
        rows = await connection.execute(select(MessageRow.role, MessageRow.text)
                                        .order_by(MessageRow.id))
        return [(role, text) for role, text in rows]
