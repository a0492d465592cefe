"""The generator interface the dialogue manager relies on."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    """``system``, ``user`` or ``assistant``."""
    content: str


@dataclass(frozen=True, slots=True)
class GenerationParams:
    max_new_tokens: int
    temperature: float
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()


class Generator(Protocol):
    """Streams reply text for a chat and counts tokens the way its model does.

    Token counts are of a message as the chat template renders it, so the sum over a
    prompt's messages plus ``prompt_overhead`` is the prompt's length.
    """

    name: str

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None: ...

    @property
    def context_window(self) -> int | None:
        """The model's maximum sequence length, if it has one."""
        ...

    @property
    def prompt_overhead(self) -> int:
        """Tokens a prompt costs beyond its messages (the generation prompt, BOS)."""
        ...

    def health(self) -> str | None:
        """``None`` while the generator can answer; otherwise why not, in a few words (a
        scheduler that stopped stepping with work queued, a dead worker). Cheap: it is
        asked by health endpoints."""
        ...

    def count_tokens(self, role: str, text: str) -> int:
        """Tokens one message of this role takes in the chat template."""
        ...

    def truncate(self, text: str, max_tokens: int) -> str:
        """The longest start of ``text`` whose content is at most ``max_tokens`` tokens."""
        ...

    def stream(self, messages: Sequence[ChatMessage],
               params: GenerationParams) -> AsyncIterator[str]:
        """Yield the reply in pieces. Raises ``GenerationError``; closing the iterator cancels."""
        ...


def window_holds_reply(generator: Generator) -> bool:
    """Whether a reply is written into ``context_window`` after its prompt, as a decoder-only
    model's is (the default). An encoder–decoder model reads the prompt with its encoder,
    whose input is its ``context_window``, and writes the reply with its decoder: it says
    ``window_holds_reply = False``, and no room is kept in the window for the reply."""
    return bool(getattr(generator, "window_holds_reply", True))


def held_back(text: str, stop: Sequence[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop string, and
    so must not be shown yet."""
    longest = 0
    for s in stop:
        for size in range(min(len(s) - 1, len(text)), longest, -1):
            if text.endswith(s[:size]):
                longest = size
                break
    return longest


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """Cut ``text`` at the first stop string; returns the kept text and whether one was found."""
    positions = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    if not positions:
        return text, False
    return text[: min(positions)], True
