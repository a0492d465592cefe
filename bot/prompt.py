"""Prompt building: the system prompt, the newest context that fits, room for the reply.

Token counts come stored with each message (counted once, with the model's own tokenizer
and chat template), so building a prompt never re-tokenizes the history.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from bot.generators.base import ChatMessage

SAFETY_MARGIN_TOKENS = 8
"""Slack for template details that per-message counts miss (BOS, joins)."""


class ContextMessage(Protocol):
    @property
    def role(self) -> str: ...

    @property
    def text(self) -> str: ...

    @property
    def tokens(self) -> int: ...


@dataclass(frozen=True, slots=True)
class Budget:
    context_tokens: int
    """The whole window: prompt plus reply."""
    reply_tokens: int
    """Kept free for the reply."""
    overhead_tokens: int
    """What a prompt costs beyond its messages (generation prompt)."""

    @property
    def prompt_tokens(self) -> int:
        return self.context_tokens - self.reply_tokens - self.overhead_tokens - SAFETY_MARGIN_TOKENS


@dataclass(frozen=True, slots=True)
class Prompt:
    messages: tuple[ChatMessage, ...]
    tokens: int
    history_used: int
    """How many stored messages made it into the prompt."""
    input_truncated: bool
    """The user's message alone was too long and was cut to fit."""


def input_room(budget: Budget, system_tokens: int) -> int:
    """The most tokens the user's new message may take."""
    return max(0, budget.prompt_tokens - system_tokens)


def history_room(budget: Budget, system_tokens: int, input_tokens: int) -> int:
    return max(0, budget.prompt_tokens - system_tokens - input_tokens)


def select_newest(candidates: Sequence[ContextMessage], room: int) -> list[ContextMessage]:
    """The newest messages that fit in ``room``, oldest first. ``candidates`` is newest first;
    selection stops at the first message that does not fit, so the context has no gaps."""
    chosen: list[ContextMessage] = []
    used = 0
    for message in candidates:
        if used + message.tokens > room:
            break
        chosen.append(message)
        used += message.tokens
    chosen.reverse()
    return chosen


def build_prompt(
    *,
    system: str,
    user_text: str,
    history: Sequence[ContextMessage],
    budget: Budget,
    count: Callable[[str, str], int],
    truncate: Callable[[str, int], str],
    user_tokens: int | None = None,
) -> Prompt:
    """Assemble a prompt. The system prompt is never dropped; the user's message is cut if
    it alone exceeds the room left; the rest is filled with the newest history that fits."""
    system_tokens = count("system", system)
    if user_tokens is None:
        user_tokens = count("user", user_text)
    truncated = False
    room = input_room(budget, system_tokens)
    if user_tokens > room:
        template_cost = count("user", "")
        user_text = truncate(user_text, max(0, room - template_cost))
        user_tokens = count("user", user_text)
        truncated = True
    chosen = select_newest(history, history_room(budget, system_tokens, user_tokens))
    messages = (
        ChatMessage("system", system),
        *(ChatMessage(str(m.role), m.text) for m in chosen),
        ChatMessage("user", user_text),
    )
    tokens = (system_tokens + user_tokens + sum(m.tokens for m in chosen)
              + budget.overhead_tokens)
    return Prompt(messages, tokens, len(chosen), truncated)
