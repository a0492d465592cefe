"""Wiring: the one module that joins the core to storage and the platform adapters."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from adapters.console import run_console
from bot.builtin_commands import builtin_commands
from bot.config import Settings
from bot.dialogue import DialogueManager
from bot.generators import Generator
from bot.generators.echo import EchoGenerator
from storage.engine import create_engine
from storage.migrate import upgrade
from storage.repository import SqlStore

logger = logging.getLogger(__name__)


def make_generator(settings: Settings) -> Generator:
    if settings.generator == "echo":
        return EchoGenerator()
    from bot.generators.huggingface import TransformersGenerator

    return TransformersGenerator(settings.model, settings.model_cache_dir, settings.device)


async def upgrade_database(settings: Settings) -> str | None:
    engine = create_engine(settings.database_url)
    try:
        return await upgrade(engine)
    finally:
        await engine.dispose()


@asynccontextmanager
async def open_chinwag(settings: Settings,
                       generator: Generator | None = None) -> AsyncIterator[DialogueManager]:
    """The database (migrated), the generator (loaded) and the dialogue manager, for as
    long as the block runs; everything is closed in reverse order afterwards."""
    engine = create_engine(settings.database_url)
    try:
        await upgrade(engine)
        async with (generator or make_generator(settings)) as gen, DialogueManager(
            store=SqlStore(engine), generator=gen, settings=settings,
            commands=builtin_commands(),
        ) as manager:
            yield manager
    finally:
        await engine.dispose()


async def console(settings: Settings) -> None:
    if sys.stdin.isatty() and settings.generator == "transformers":
        print("chinwag: loading the model…", file=sys.stderr, flush=True)
    async with open_chinwag(settings) as manager:
        await run_console(manager)


async def _serve_telegram(settings: Settings, manager: DialogueManager) -> None:
    from adapters.telegram import TelegramAdapter

    assert settings.telegram_token is not None
    async with TelegramAdapter(settings.telegram_token.get_secret_value(), manager,
                               builtin_commands(), api_url=settings.telegram_api_url):
        await asyncio.Event().wait()  # until cancelled by a signal


async def run(settings: Settings) -> None:
    """Start every adapter whose token is set; the console when none is."""
    if settings.discord_token:
        logger.error("Discord support is not part of this version yet; its token is ignored")
    loop = asyncio.get_running_loop()
    async with open_chinwag(settings) as manager:
        task = asyncio.create_task(_serve_telegram(settings, manager)
                                   if settings.telegram_token else run_console(manager))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            logger.info("stopping on signal")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
