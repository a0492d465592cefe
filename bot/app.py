"""Wiring: the one module that joins the core to storage and the platform adapters."""

from __future__ import annotations

import asyncio
import contextlib
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
    await console_session(settings)


async def run(settings: Settings) -> None:
    """Serve every platform whose token is set (the console when none is) until SIGTERM or
    SIGINT. Stopping goes in this order: take no more messages, let in-flight replies
    finish within the grace period, then close the platform clients and the database."""
    if settings.discord_token:
        logger.error("Discord support is not part of this version yet; its token is ignored")
    if not settings.telegram_token:
        chatting = asyncio.create_task(console_session(settings))
        if await _run_until_signal(chatting):
            chatting.cancel()  # the manager still lets a running reply finish
            with contextlib.suppress(asyncio.CancelledError):
                await chatting
        chatting.result()
        return
    from adapters.telegram import TelegramAdapter

    async with open_chinwag(settings) as manager, TelegramAdapter(
        settings.telegram_token.get_secret_value(), manager, builtin_commands(),
        api_url=settings.telegram_api_url,
    ) as telegram:
        serving = asyncio.create_task(telegram.serve())
        stopped = await _run_until_signal(serving)
        await telegram.stop_receiving()
        await manager.close()
        if not stopped:
            serving.result()  # a fatal platform error (a revoked token) ends the run


async def console_session(settings: Settings) -> None:
    async with open_chinwag(settings) as manager:
        await run_console(manager)


async def _run_until_signal(task: asyncio.Task[None]) -> bool:
    """Wait for the task or a stop signal; returns whether a signal came first."""
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled.set)
    waiter = asyncio.create_task(signalled.wait())
    try:
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    if signalled.is_set():
        logger.info("stopping on signal")
    return signalled.is_set()
