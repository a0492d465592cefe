"""One question asked of a real generator through the Telegram or Discord emulator: what
the platform shows, what was stored, and what the generator itself writes for the prompt
the bot gave it (so that a test can compare the three)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass

import pytest

from bot.builtin_commands import builtin_commands
from bot.config import Settings
from bot.dialogue import DialogueManager
from bot.events import conversation_key
from bot.generators.base import ChatMessage, GenerationParams, Generator
from bot.store import StoredMessage
from storage.repository import SqlStore
from tests.auxil.adapters import discord_adapter, telegram_adapter
from tests.auxil.discord_api import DiscordEmulator
from tests.auxil.telegram_api import TelegramEmulator


@dataclass(frozen=True)
class Answered:
    shown: str
    """The reply's text as the platform shows it."""
    stored: Sequence[StoredMessage]
    """The conversation's rows, oldest first."""
    own: str
    """What the generator writes, asked again with the same prompt and parameters."""


def _recording(monkeypatch: pytest.MonkeyPatch, generator: Generator
               ) -> list[tuple[list[ChatMessage], GenerationParams]]:
    asked: list[tuple[list[ChatMessage], GenerationParams]] = []
    original = generator.stream

    def stream(messages: Sequence[ChatMessage],
               params: GenerationParams) -> AsyncIterator[str]:
        asked.append((list(messages), params))
        return original(messages, params)

    monkeypatch.setattr(generator, "stream", stream)
    return asked


async def _answered(store: SqlStore, key: str, shown: str, generator: Generator,
                    asked: list[tuple[list[ChatMessage], GenerationParams]]) -> Answered:
    conversation = await store.find_conversation(key)
    assert conversation is not None, key
    rows = list(reversed(await store.history(conversation.id, 0, 10**9, 10)))
    [(messages, params)] = asked
    own = "".join([piece async for piece in generator.stream(messages, params)])
    return Answered(shown, rows, own)


async def ask_on_telegram(store: SqlStore, settings: Settings, generator: Generator,
                          monkeypatch: pytest.MonkeyPatch, text: str) -> Answered:
    asked = _recording(monkeypatch, generator)
    async with DialogueManager(store=store, generator=generator, settings=settings,
                               commands=builtin_commands()) as manager, \
            TelegramEmulator() as telegram, telegram_adapter(telegram, manager):
        telegram.push_text(text, chat=5, user=5)
        await telegram.wait_for(lambda: len(telegram.final_text(5)) == 1
                                and not manager.active_conversations, 60)
        [shown] = telegram.final_text(5)
    return await _answered(store, conversation_key("telegram", "5"), shown, generator, asked)


async def ask_on_discord(store: SqlStore, settings: Settings, generator: Generator,
                         monkeypatch: pytest.MonkeyPatch, text: str) -> Answered:
    asked = _recording(monkeypatch, generator)
    async with DialogueManager(store=store, generator=generator, settings=settings,
                               commands=builtin_commands()) as manager, \
            DiscordEmulator() as discord, discord_adapter(discord, manager):
        discord.post(text, dm=True, author=5)
        channel = discord.dm_channel(5)
        await discord.wait_for(lambda: len(discord.channel_texts(channel)) == 1
                               and not manager.active_conversations, 60)
        [shown] = discord.channel_texts(channel)
    return await _answered(store, conversation_key("discord", channel), shown, generator,
                           asked)


AskOn = Callable[[SqlStore, Settings, Generator, pytest.MonkeyPatch, str], Awaitable[Answered]]
"""``ask_on_telegram`` or ``ask_on_discord``, for tests parametrized over both."""
