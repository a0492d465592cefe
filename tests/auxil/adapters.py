"""The platform adapters under test, pointed at the loopback emulators."""

from __future__ import annotations

from adapters.discord import DiscordAdapter
from adapters.telegram import TelegramAdapter
from bot.builtin_commands import builtin_commands
from bot.dialogue import DialogueManager
from tests.auxil.discord_api import DiscordEmulator
from tests.auxil.telegram_api import TelegramEmulator


def telegram_adapter(emulator: TelegramEmulator, manager: DialogueManager) -> TelegramAdapter:
    """Chinwag's Telegram adapter on the emulator (``async with`` it to serve)."""
    return TelegramAdapter(emulator.token, manager, builtin_commands(), api_url=emulator.url,
                           poll_timeout=1)


def discord_adapter(emulator: DiscordEmulator, manager: DialogueManager) -> DiscordAdapter:
    """Chinwag's Discord adapter on the emulator (``async with`` it to serve)."""
    return DiscordAdapter(emulator.token, manager, builtin_commands(),
                          api_url=emulator.api_url, gateway_url=emulator.gateway_url)
