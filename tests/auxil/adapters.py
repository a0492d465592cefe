"""The platform adapters under test, pointed at the loopback emulators."""

from __future__ import annotations

from adapters.discord import DiscordAdapter
from adapters.telegram import TelegramAdapter
from adapters.telegram.webhook import WebhookConfig
from bot.builtin_commands import builtin_commands
from bot.commands import CommandRegistry
from bot.dialogue import DialogueManager
from tests.auxil.discord_api import DiscordEmulator
from tests.auxil.telegram_api import TelegramEmulator


def telegram_adapter(emulator: TelegramEmulator, manager: DialogueManager,
                     commands: CommandRegistry | None = None) -> TelegramAdapter:
    """Chinwag's Telegram adapter on the emulator (``async with`` it to serve);
    ``commands``: the menu it registers, the built-in commands by default."""
    return TelegramAdapter(emulator.token, manager,
                           builtin_commands() if commands is None else commands,
                           api_url=emulator.url, poll_timeout=1)


WEBHOOK_SECRET = "webhook-secret_0123456789"


def telegram_webhook_adapter(emulator: TelegramEmulator, manager: DialogueManager,
                             port: int) -> TelegramAdapter:
    """Chinwag's Telegram adapter taking updates by webhook on loopback ``port``, at
    ``/telegram``."""
    webhook = WebhookConfig(f"http://127.0.0.1:{port}/telegram", "127.0.0.1", port,
                            WEBHOOK_SECRET)
    return TelegramAdapter(emulator.token, manager, builtin_commands(), api_url=emulator.url,
                           webhook=webhook)


def discord_adapter(emulator: DiscordEmulator, manager: DialogueManager,
                    commands: CommandRegistry | None = None) -> DiscordAdapter:
    """Chinwag's Discord adapter on the emulator (``async with`` it to serve);
    ``commands``: the slash commands it registers, the built-in commands by default."""
    return DiscordAdapter(emulator.token, manager,
                          builtin_commands() if commands is None else commands,
                          api_url=emulator.api_url, gateway_url=emulator.gateway_url)
