"""Long-term memory: turns that fell out of the prompt's window come back when relevant.

``encoder`` (a BERT-family sentence encoder), ``store`` (what it needs of storage),
``worker`` (embeds stored messages in the background), ``index`` (searches a
conversation's embeddings, kept in memory), ``recall`` (the policy, and ``Memory``, which
holds them together).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from bot.config import Settings
from bot.memory.encoder import load_encoder
from bot.memory.recall import Memory, Recollection
from bot.memory.store import MemoryStore

__all__ = ["Memory", "MemoryStore", "Recollection", "open_memory"]


@asynccontextmanager
async def open_memory(settings: Settings, store: MemoryStore) -> AsyncIterator[Memory | None]:
    """The memory ``CHINWAG_MEMORY`` asks for (None when off), its encoder loaded and its
    worker running, for as long as the block runs."""
    if not settings.memory:
        yield None
        return
    encoder = await asyncio.to_thread(load_encoder, settings.memory_model)
    async with Memory(store, encoder, recall=settings.memory_recall,
                      tokens=settings.memory_tokens) as memory:
        yield memory
