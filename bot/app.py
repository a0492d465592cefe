"""Wiring: the one module that joins the core to storage and the platform adapters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Protocol, Self

from adapters.console import run_console
from bot.builtin_commands import builtin_commands
from bot.config import Settings
from bot.dialogue import DialogueManager
from bot.errors import ConfigError
from bot.generators import Generator
from bot.generators.catalog import ModelEntry
from bot.generators.echo import EchoGenerator
from bot.generators.pool import ModelPool
from bot.memory import open_memory
from bot.metrics import Metrics
from bot.probes import Probes
from bot.retention import RetentionSweeper
from storage.engine import create_engine
from storage.migrate import downgrade, upgrade
from storage.repository import SqlStore

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from bot.seq2seq.command import TrainCommand
    from bot.seq2seq.corpus import Pair

logger = logging.getLogger(__name__)


def make_generator(settings: Settings) -> Generator:
    if settings.generator == "echo":
        return EchoGenerator()
    if settings.generator == "openai":
        from bot.generators.openai_compat import OpenAIGenerator

        key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
        return OpenAIGenerator(settings.openai_base_url, settings.model, key)
    if settings.generator == "seq2seq":
        from bot.generators.seq2seq import Seq2SeqGenerator

        return Seq2SeqGenerator(Path(settings.model).expanduser(), beam=settings.seq2seq_beam,
                                max_requests=settings.max_sequences + settings.max_queued)
    from bot.generators.huggingface import TransformersGenerator

    return TransformersGenerator(settings.model, settings.model_cache_dir, settings.device,
                                 dtype=settings.dtype, max_sequences=settings.max_sequences,
                                 max_queued=settings.max_queued,
                                 prefill_chunk=settings.max_batch_tokens,
                                 workers=settings.workers,
                                 prefix_cache_mb=settings.prefix_cache_mb)


def make_model(settings: Settings, entry: ModelEntry) -> Generator:
    """The generator of one of ``CHINWAG_MODELS``: as ``make_generator`` makes it for
    ``CHINWAG_GENERATOR=<kind>`` and ``CHINWAG_MODEL=<model>``."""
    return make_generator(settings.model_copy(update={"generator": entry.kind,
                                                      "model": entry.model}))


@asynccontextmanager
async def open_models(settings: Settings,
                      generator: Generator | None = None) -> AsyncIterator[ModelPool]:
    """The models chats may choose, the default loaded (the others as they are used);
    or only ``generator``, loaded here."""
    if generator is not None:
        async with generator as loaded:
            yield ModelPool.serving(loaded)
        return
    async with ModelPool(settings.model_catalog(), partial(make_model, settings),
                         max_loaded=settings.max_loaded_models) as models:
        yield models


def train_seq2seq(settings: Settings, command: TrainCommand) -> Path:
    """``chinwag train seq2seq``; ``--corpus db`` reads this bot's stored exchanges."""
    from bot.seq2seq.command import run

    return run(command, settings.data_dir,
               stored=lambda: asyncio.run(stored_exchanges(settings.database_url)))


async def stored_exchanges(database_url: str, page: int = 1000) -> list[Pair]:
    """Every user message that has a reply, with the reply, oldest first."""
    from bot.seq2seq.corpus import Pair

    async with _database(database_url) as engine:
        await upgrade(engine)
        store = SqlStore(engine)
        pairs: list[Pair] = []
        after = 0
        while batch := await store.exchanges(after, page):
            pairs += [Pair(e.prompt, e.reply) for e in batch]
            after = batch[-1].reply_id
        return pairs


async def upgrade_database(settings: Settings) -> str | None:
    async with _database(settings.database_url) as engine:
        return await upgrade(engine)


async def downgrade_database(settings: Settings, revision: str) -> str | None:
    async with _database(settings.database_url) as engine:
        return await downgrade(engine, revision)


@asynccontextmanager
async def _database(url: str) -> AsyncIterator[AsyncEngine]:
    """The database's engine for the block; its connections are closed after."""
    engine = create_engine(url)
    try:
        yield engine
    finally:
        await engine.dispose()


@asynccontextmanager
async def open_chinwag(settings: Settings, generator: Generator | None = None, *,
                       metrics: Metrics | None = None,
                       probes: Probes | None = None) -> AsyncIterator[DialogueManager]:
    """The database (migrated), the generator (loaded) and the dialogue manager, for as
    long as the block runs; everything is closed in reverse order afterwards. ``metrics``
    and ``probes`` learn of each part as it starts."""
    metrics = metrics or Metrics()
    async with _database(settings.database_url) as engine:
        await upgrade(engine)
        store = SqlStore(engine, metrics=metrics)
        async with RetentionSweeper(store, settings.retention_days), \
                open_models(settings, generator) as models, \
                open_memory(settings, store.memory_store()) as memory, \
                DialogueManager(store=store, models=models, settings=settings,
                                commands=builtin_commands(models.catalog.names),
                                metrics=metrics, memory=memory) as manager:
            _loaded(models, settings, metrics, probes)
            yield manager


def _loaded(generator: Generator | ModelPool, settings: Settings, metrics: Metrics,
            probes: Probes | None) -> None:
    """The model is loaded: the metrics read its scheduler, and health asks it."""
    metrics.watch(generator, model=settings.model)
    if probes is not None:
        probes.loaded(generator)


@asynccontextmanager
async def _observed(settings: Settings, metrics: Metrics, probes: Probes) -> AsyncIterator[None]:
    """``/metrics``, ``/health`` and ``/ready`` on ``CHINWAG_METRICS_PORT`` (when it is set)
    for as long as the block runs: started first, so they answer while the model loads."""
    metrics.describe(model=settings.model, generator=settings.generator,
                     device=settings.device)
    if settings.metrics_port is None:
        yield
        return
    from adapters.metrics_server import MetricsServer

    async with MetricsServer(metrics, probes, host=settings.metrics_host,
                             port=settings.metrics_port):
        yield


async def console(settings: Settings) -> None:
    if sys.stdin.isatty() and settings.generator == "transformers":
        print("chinwag: loading the model…", file=sys.stderr, flush=True)
    await console_session(settings)


class PlatformAdapter(Protocol):
    """What `run` needs of an adapter, besides ``async with`` (connect, then close)."""

    platform: str

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
        from adapters.telegram.webhook import WebhookConfig

        webhook = None
        if settings.telegram_webhook_url and settings.telegram_webhook_secret:
            host, port = settings.telegram_webhook_listen
            webhook = WebhookConfig(settings.telegram_webhook_url, host, port,
                                    settings.telegram_webhook_secret.get_secret_value())
        adapters.append(TelegramAdapter(settings.telegram_token.get_secret_value(), manager,
                                        builtin_commands(settings.model_catalog().names),
                                        api_url=settings.telegram_api_url,
                                        webhook=webhook, language=settings.language))
    if settings.discord_token:
        from adapters.discord import DiscordAdapter

        adapters.append(DiscordAdapter(settings.discord_token.get_secret_value(), manager,
                                       builtin_commands(settings.model_catalog().names),
                                       api_url=settings.discord_api_url,
                                       gateway_url=settings.discord_gateway_url,
                                       guild_ids=settings.discord_guild_ids,
                                       language=settings.language))
    return adapters


async def run(settings: Settings) -> None:
    """Serve every platform whose token is set (the console when none is) until SIGTERM or
    SIGINT. Stopping goes in this order: take no more messages, let in-flight replies
    finish within the grace period, then close the platform clients and the database.
    A signal while a platform is still being reached (an outage at start-up is retried)
    stops at once; during the model's loading, as soon as it is loaded."""
    if settings.telegram_token and settings.telegram_webhook_url \
            and settings.metrics_port == settings.telegram_webhook_listen[1]:
        # Said now, not once the model is loaded and the listener cannot bind.
        raise ConfigError("CHINWAG_METRICS_PORT must differ from the port of "
                          "CHINWAG_TELEGRAM_WEBHOOK_LISTEN")
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
        platforms = tuple(name for name, token in (("telegram", settings.telegram_token),
                                                   ("discord", settings.discord_token))
                          if token)
        metrics, probes = Metrics(platforms=platforms), Probes(platforms)
        async with _observed(settings, metrics, probes), \
                open_chinwag(settings, metrics=metrics, probes=probes) as manager, \
                contextlib.AsyncExitStack() as stack:
            adapters: list[PlatformAdapter] = []

            async def connect_all() -> None:
                for adapter in _adapters(settings, manager):
                    adapters.append(await stack.enter_async_context(adapter))
                    probes.connected(adapter.platform)

            connecting = asyncio.create_task(connect_all())
            if await _until(connecting, signalled):
                probes.stopping()
                connecting.cancel()  # those connected are closed by the stack
                with contextlib.suppress(asyncio.CancelledError):
                    await connecting
                for adapter in adapters:  # those connected take nothing more, as below
                    await adapter.stop_receiving()
                await manager.close()
                return
            connecting.result()  # a refused token ends the run here
            serving = asyncio.create_task(_serve_all(adapters))
            stopped = await _until(serving, signalled)
            probes.stopping()
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

    if settings.metrics_port == settings.serve_port:
        raise ConfigError("CHINWAG_METRICS_PORT must differ from CHINWAG_SERVE_PORT")
    key = settings.serve_api_key.get_secret_value() if settings.serve_api_key else None
    metrics, probes = Metrics(), Probes()
    with _stop_signals() as signalled:
        async with _observed(settings, metrics, probes), \
                make_generator(settings) as generator, OpenAIServer(
                    generator, settings.model, host=settings.serve_host,
                    port=settings.serve_port, api_key=key,
                    default_max_tokens=settings.max_reply_tokens):
            _loaded(generator, settings, metrics, probes)
            await signalled.wait()
            probes.stopping()
            logger.info("stopping on signal")


async def console_session(settings: Settings) -> None:
    metrics, probes = Metrics(platforms=("console",)), Probes()
    async with _observed(settings, metrics, probes), \
            open_chinwag(settings, metrics=metrics, probes=probes) as manager:
        await run_console(manager, language=settings.language)


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
