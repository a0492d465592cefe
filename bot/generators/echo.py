"""A deterministic generator for tests and demos: it echoes the latest user message."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Self

from bot.generators.base import ChatMessage, GenerationParams

MESSAGE_OVERHEAD_TOKENS = 4


class EchoGenerator:
    """Streams back the latest user message in ``pieces`` parts, ``delay`` seconds apart.

    Tokens are whitespace-separated words, plus a small per-message overhead, so budgets
    behave like a real model's without loading one.
    """

    name = "echo"

    def __init__(self, pieces: int = 3, delay: float = 0.0) -> None:
        self._pieces = max(1, pieces)
        self._delay = delay

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        return None

    def health(self) -> str | None:
        return None

    @property
    def context_window(self) -> int | None:
        return None

    @property
    def prompt_overhead(self) -> int:
        return 2

    def count_tokens(self, role: str, text: str) -> int:
        return len(text.split()) + MESSAGE_OVERHEAD_TOKENS

    def truncate(self, text: str, max_tokens: int) -> str:
        words = text.split()
        if len(words) <= max_tokens:
            return text
        # Keep the original spacing of the words that stay.
        end = 0
        for word in words[: max(0, max_tokens)]:
            end = text.index(word, end) + len(word)
        return text[:end]

    async def stream(self, messages: Sequence[ChatMessage],
                     params: GenerationParams) -> AsyncIterator[str]:
        text = next((m.content for m in reversed(messages) if m.role == "user"), "")
        size = max(1, -(-len(text) // self._pieces))
        for start in range(0, len(text), size):
            if self._delay:
                await asyncio.sleep(self._delay)
            yield text[start:start + size]
