"""Wiring: the one module that joins the core to storage and the platform adapters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Protocol, Self

from adapters.console import run_console
from bot.builtin_commands import builtin_commands
from bot.config import Settings
from bot.dialogue import DialogueManager
from bot.generators import Generator
from bot.generators.echo import EchoGenerator
from bot.retention import RetentionSweeper
from storage.engine import create_engine
from storage.migrate import downgrade, upgrade
from storage.repository import SqlStore

logger = logging.getLogger(__name__)


def make_generator(settings: Settings) -> Generator:
    if settings.generator == "echo":
        return EchoGenerator()
    if settings.generator == "openai":
        from bot.generators.openai_compat import OpenAIGenerator

        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        return OpenAIGenerator(settings.openai_base_url, settings.model, key)
    from bot.generators.huggingface import TransformersGenerator

    return TransformersGenerator(settings.model, settings.model_cache_dir, settings.device,
                                 max_sequences=settings.max_sequences,
                                 max_queued=settings.max_queued,
                                 prefill_chunk=settings.max_batch_tokens,
                                 workers=settings.workers)


async def upgrade_database(settings: Settings) -> str | None:
    engine = create_engine(settings.database_url)
    try:
        return await upgrade(engine)
    finally:
        await engine.dispose()


async def downgrade_database(settings: Settings, revision: str) -> str | None:
    engine = create_engine(settings.database_url)
    try:
        return await downgrade(engine, revision)
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
        store = SqlStore(engine)
        async with RetentionSweeper(store, settings.retention_days), \
                (generator or make_generator(settings)) as gen, \
                DialogueManager(store=store, generator=gen, settings=settings,
                                commands=builtin_commands()) as manager:
            yield manager
    finally:
        await engine.dispose()


async def console(settings: Settings) -> None:
    if sys.stdin.isatty() and settings.generator == "transformers":
        print("chinwag: loading the model…", file=sys.stderr, flush=True)
    await console_session(settings)


class PlatformAdapter(Protocol):
    """What `run` needs of an adapter, besides ``async with`` (connect, then close)."""

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None: ...

    async def serve(self) -> None:
        """Until stopped; raises on a fatal platform error (a revoked token)."""
        ...

    async def stop_receiving(self) -> None: ...


def _adapters(settings: Settings, manager: DialogueManager) -> list[PlatformAdapter]:
    adapters: list[PlatformAdapter] = []
    if settings.telegram_token:
        from adapters.telegram import TelegramAdapter

        adapters.append(TelegramAdapter(settings.telegram_token.get_secret_value(), manager,
                                        builtin_commands(), api_url=settings.telegram_api_url))
    if settings.discord_token:
        from adapters.discord import DiscordAdapter

        adapters.append(DiscordAdapter(settings.discord_token.get_secret_value(), manager,
                                       builtin_commands(), api_url=settings.discord_api_url,
                                       gateway_url=settings.discord_gateway_url,
                                       guild_ids=settings.discord_guild_ids))
    return adapters


async def run(settings: Settings) -> None:
    """Serve every platform whose token is set (the console when none is) until SIGTERM or
    SIGINT. Stopping goes in this order: take no more messages, let in-flight replies
    finish within the grace period, then close the platform clients and the database.
    A signal while a platform is still being reached (an outage at start-up is retried)
    stops at once; during the model's loading, as soon as it is loaded."""
    with _stop_signals() as signalled:
        if not settings.telegram_token and not settings.discord_token:
            chatting = asyncio.create_task(console_session(settings))
            if await _until(chatting, signalled):
                chatting.cancel()  # the manager still lets a running reply finish
                with contextlib.suppress(asyncio.CancelledError):
                    await chatting
                return  # a stop asked for, not a failure: the task's cancellation stays here
            chatting.result()  # the input ended, or the session failed
            return
        async with open_chinwag(settings) as manager, contextlib.AsyncExitStack() as stack:
            adapters: list[PlatformAdapter] = []

            async def connect_all() -> None:
                for adapter in _adapters(settings, manager):
                    adapters.append(await stack.enter_async_context(adapter))

            connecting = asyncio.create_task(connect_all())
            if await _until(connecting, signalled):
                connecting.cancel()  # those connected are closed by the stack
                with contextlib.suppress(asyncio.CancelledError):
                    await connecting
                await manager.close()
                return
            connecting.result()  # a refused token ends the run here
            serving = asyncio.create_task(_serve_all(adapters))
            stopped = await _until(serving, signalled)
            for adapter in adapters:
                await adapter.stop_receiving()
            await manager.close()
            if not stopped:
                serving.result()  # a fatal platform error (a revoked token) ends the run
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving


async def _serve_all(adapters: list[PlatformAdapter]) -> None:
    await asyncio.gather(*(adapter.serve() for adapter in adapters))


async def serve(settings: Settings) -> None:
    """``chinwag serve``: the generator as an OpenAI-compatible endpoint until a signal."""
    from adapters.openai_server import OpenAIServer

    key = settings.serve_api_key.get_secret_value() if settings.serve_api_key else None
    with _stop_signals() as signalled:
        async with make_generator(settings) as generator, OpenAIServer(
            generator, settings.model, host=settings.serve_host, port=settings.serve_port,
            api_key=key, default_max_tokens=settings.max_reply_tokens,
        ):
            await signalled.wait()
            logger.info("stopping on signal")


async def console_session(settings: Settings) -> None:
    async with open_chinwag(settings) as manager:
        await run_console(manager)


@contextlib.contextmanager
def _stop_signals() -> Iterator[asyncio.Event]:
    """SIGTERM and SIGINT set the event instead of killing the process."""
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signalled.set)
    try:
        yield signalled
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


async def _until(task: asyncio.Task[None], signalled: asyncio.Event) -> bool:
    """Wait for the task or a stop signal; returns whether a signal came first."""
    waiter = asyncio.create_task(signalled.wait())
    try:
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if signalled.is_set():
        logger.info("stopping on signal")
    return signalled.is_set()
