"""Generators for tests: they record prompts and can be told to fail, hang or wait."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

from bot.errors import GenerationError
from bot.generators import ChatMessage, GenerationParams
from bot.generators.echo import EchoGenerator


@dataclass
class ScriptedGenerator(EchoGenerator):
    """Echoes by default; ``reply`` overrides the text; records every prompt it is given."""

    reply: Callable[[Sequence[ChatMessage]], str] | None = None
    pieces_count: int = 3
    fail_after_pieces: int | None = None
    hang: bool = False
    hang_after_pieces: int | None = None
    """Hang after yielding this many pieces (a reply cut short mid-stream)."""
    gate: asyncio.Event | None = None
    prompts: list[list[ChatMessage]] = field(default_factory=list)
    params: list[GenerationParams] = field(default_factory=list)
    running: int = 0
    max_running: int = 0

    def __post_init__(self) -> None:
        super().__init__(pieces=self.pieces_count)

    async def stream(self, messages: Sequence[ChatMessage],
                     params: GenerationParams) -> AsyncIterator[str]:
        self.prompts.append(list(messages))
        self.params.append(params)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.hang:
                await asyncio.sleep(3600)
            text = self.reply(messages) if self.reply else messages[-1].content
            size = max(1, -(-len(text) // self.pieces_count))
            for number, start in enumerate(range(0, len(text), size)):
                if self.fail_after_pieces is not None and number >= self.fail_after_pieces:
                    raise GenerationError("the model crashed")
                if self.hang_after_pieces is not None and number >= self.hang_after_pieces:
                    await asyncio.sleep(3600)
                await asyncio.sleep(0)
                yield text[start:start + size]
        finally:
            self.running -= 1


async def wait_running(generator: ScriptedGenerator, count: int = 1,
                       timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Wait until ``count`` generations are running at once."""
    for _ in range(int(timeout / 0.01)):
        if generator.running >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{generator.running} running, expected {count}")


class SickGenerator(EchoGenerator):
    """An echo generator whose health the test sets (as a stalled scheduler would report)."""

    def __init__(self) -> None:
        super().__init__()
        self.trouble: str | None = None

    def health(self) -> str | None:
        return self.trouble
