"""The database fails for a while: a SQLite file locked by another writer, a PostgreSQL
server restarted or down. Messages are retried, or the user is told; none is dropped
silently."""

import asyncio
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from bot import dialogue, intake
from bot.builtin_commands import builtin_commands
from bot.config import Settings
from bot.dialogue import DialogueManager
from bot.errors import StorageError
from bot.intake import INTAKE_FAILED_NOTE, Intake
from bot.store import NewUserMessage
from storage import retries
from storage.engine import create_engine
from storage.migrate import upgrade
from storage.repository import SqlStore
from tests.auxil.adapters import discord_adapter, telegram_adapter
from tests.auxil.db import stored_texts
from tests.auxil.discord_api import DiscordEmulator
from tests.auxil.factories import dm
from tests.auxil.generators import ScriptedGenerator
from tests.auxil.postgres import PostgresServer
from tests.auxil.sinks import RecordingSink
from tests.auxil.telegram_api import TelegramEmulator


@contextmanager
def sqlite_write_lock(path: str) -> Iterator[threading.Event]:
    """Another connection holds the SQLite file's write lock for the duration, or until
    the event it gives is set."""
    locked, release = threading.Event(), threading.Event()

    def hold() -> None:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        locked.set()
        release.wait(60)
        other.execute("COMMIT")
        other.close()

    holder = threading.Thread(target=hold)
    holder.start()
    assert locked.wait(5)
    try:
        yield release
    finally:
        release.set()
        holder.join()


async def test_sqlite_locked_by_another_writer_is_retried(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    # A short busy timeout, so the lock outlasts SQLite's own waiting and the store's
    # retries are what get the message in.
    engine = create_engine(settings.database_url, sqlite_busy_timeout_ms=20)
    await upgrade(engine)
    store = SqlStore(engine)
    conversation = await store.conversation("telegram:1")
    path = settings.database_url.split(":///", 1)[1]
    caplog.set_level(logging.WARNING, logger="storage.retries")
    with sqlite_write_lock(path) as release:
        asyncio.get_running_loop().call_later(0.5, release.set)
        await store.set_persona(conversation.id, "a pirate")
    assert (await store.conversation("telegram:1")).persona == "a pirate"
    assert any("database unavailable (OperationalError)" in r.getMessage()
               for r in caplog.records)
    await engine.dispose()


@pytest.fixture
async def pg_engine(postgres_server: PostgresServer) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(postgres_server.create_database())
    await upgrade(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
async def pg_manager(pg_engine: AsyncEngine,
                     settings: Settings) -> AsyncIterator[DialogueManager]:
    async with DialogueManager(store=SqlStore(pg_engine), generator=ScriptedGenerator(),
                               settings=settings, commands=builtin_commands()) as manager:
        yield manager


async def test_postgres_restart_while_a_message_arrives_is_retried(
        postgres_server: PostgresServer, pg_manager: DialogueManager,
        pg_engine: AsyncEngine) -> None:
    sink = RecordingSink()
    await pg_manager.handle(dm("before"), sink)  # the pool holds a live connection now
    await asyncio.to_thread(postgres_server.stop)
    try:
        ticket = pg_manager.submit(dm("during the restart"), sink)
        await asyncio.sleep(1.0)
        assert not ticket.accepted.done()  # still trying, not given up
    finally:
        await asyncio.to_thread(postgres_server.start)
    assert await asyncio.wait_for(ticket.accepted, 20) is Intake.STORED
    await ticket
    assert sink.texts == ["before", "during the restart"]
    assert await stored_texts(pg_engine) == [
        ("user", "before"), ("assistant", "before"),
        ("user", "during the restart"), ("assistant", "during the restart"),
    ]


async def test_postgres_down_too_long_tells_the_user(
        postgres_server: PostgresServer, pg_manager: DialogueManager,
        pg_engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retries, "RETRY_DELAYS_S", (0.05, 0.05))
    sink = RecordingSink()
    await asyncio.to_thread(postgres_server.stop)
    try:
        await pg_manager.handle(dm("anyone there?"), sink)
    finally:
        await asyncio.to_thread(postgres_server.start)
    assert sink.texts == [INTAKE_FAILED_NOTE]
    await pg_manager.handle(dm("back again"), sink)
    assert sink.texts[-1] == "back again"
    assert await stored_texts(pg_engine) == [("user", "back again"),
                                             ("assistant", "back again")]


async def test_every_pooled_connection_busy_is_waited_out(
        settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(settings.database_url, pool_size=1, max_overflow=0,
                                 pool_timeout=0.1)
    await upgrade(engine)
    store = SqlStore(engine)
    caplog.set_level(logging.WARNING, logger="storage.retries")
    async with engine.connect():  # a burst holds the only connection for a while
        waiting = asyncio.ensure_future(store.conversation("telegram:busy"))
        await asyncio.sleep(0.5)
        assert not waiting.done()
    conversation = await asyncio.wait_for(waiting, 10)
    assert conversation.key == "telegram:busy"
    assert any("(TimeoutError)" in r.getMessage() for r in caplog.records)
    await engine.dispose()


# The database fails while a platform's message is taken in.

@pytest.fixture
async def quick_failing_store(settings: Settings, monkeypatch: pytest.MonkeyPatch
                              ) -> AsyncIterator[tuple[SqlStore, AsyncEngine, str]]:
    """A SQLite store that gives up on a locked file in a fraction of a second."""
    monkeypatch.setattr(retries, "RETRY_DELAYS_S", (0.05,))
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    engine = create_engine(settings.database_url, sqlite_busy_timeout_ms=20)
    await upgrade(engine)
    yield SqlStore(engine), engine, settings.database_url.split(":///", 1)[1]
    await engine.dispose()


def intake_failures(caplog: pytest.LogCaptureFixture) -> int:
    return sum("could not store message" in r.getMessage() for r in caplog.records)


async def test_telegram_leaves_an_update_it_could_not_store_for_redelivery(
        quick_failing_store: tuple[SqlStore, AsyncEngine, str], settings: Settings,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(intake, "RETRY_DELAYS_S", (0.2,))
    store, engine, path = quick_failing_store
    async with TelegramEmulator() as tg, \
            DialogueManager(store=store, generator=ScriptedGenerator(), settings=settings,
                            commands=builtin_commands()) as manager, \
            telegram_adapter(tg, manager):
        with sqlite_write_lock(path):
            tg.push_text("while the database is locked", chat=21, user=21)
            # Tried, not confirmed, fetched again and tried again.
            await tg.wait_for(lambda: intake_failures(caplog) >= 2)
            assert max(tg.offsets) <= 1
            assert tg.sent() == []  # nobody is asked to send it again: Telegram will
        await tg.wait_for(lambda: tg.final_text(21) == ["while the database is locked"]
                          and max(tg.offsets) == 2 and not manager.active_conversations)
    assert await stored_texts(engine) == [("user", "while the database is locked"),
                                          ("assistant", "while the database is locked")]


@pytest.fixture
async def discord_emulator() -> AsyncIterator[DiscordEmulator]:
    async with DiscordEmulator() as emulator:
        yield emulator


async def test_discord_keeps_a_message_it_could_not_store_until_the_database_is_back(
        quick_failing_store: tuple[SqlStore, AsyncEngine, str], settings: Settings,
        discord_emulator: DiscordEmulator, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(intake, "RETRY_DELAYS_S", (0.2,))
    store, engine, path = quick_failing_store
    dc = discord_emulator
    async with DialogueManager(store=store, generator=ScriptedGenerator(), settings=settings,
                               commands=builtin_commands()) as manager, \
            discord_adapter(dc, manager):
        with sqlite_write_lock(path):
            dc.post("while the database is locked", dm=True, author=5)
            await dc.wait_for(lambda: intake_failures(caplog) >= 2)  # kept, tried again
            assert dc.channel_texts(dc.dm_channel(5)) == []  # and the user not bothered
        await dc.wait_for(lambda: dc.channel_texts(dc.dm_channel(5))
                          == ["while the database is locked"]
                          and not manager.active_conversations)
    assert await stored_texts(engine) == [("user", "while the database is locked"),
                                          ("assistant", "while the database is locked")]


async def test_discord_tells_the_user_when_a_message_is_finally_dropped(
        quick_failing_store: tuple[SqlStore, AsyncEngine, str], settings: Settings,
        discord_emulator: DiscordEmulator, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(intake, "RETRY_DELAYS_S", (0.2,))
    monkeypatch.setattr(intake, "INTAKE_RETRY_S", 1.0)
    store, engine, path = quick_failing_store
    dc = discord_emulator
    async with DialogueManager(store=store, generator=ScriptedGenerator(), settings=settings,
                               commands=builtin_commands()) as manager, \
            discord_adapter(dc, manager):
        with sqlite_write_lock(path):
            dc.post("nobody home", dm=True, author=6)
            await dc.wait_for(lambda: dc.channel_texts(dc.dm_channel(6)) == [INTAKE_FAILED_NOTE]
                              and not manager.active_conversations)
            assert intake_failures(caplog) >= 2  # tried more than once before giving up
        dc.post("back again", dm=True, author=6)
        await dc.wait_for(lambda: dc.channel_texts(dc.dm_channel(6))
                          == [INTAKE_FAILED_NOTE, "back again"]
                          and not manager.active_conversations)
    assert await stored_texts(engine) == [("user", "back again"), ("assistant", "back again")]


def down(store: SqlStore, seconds: float, tries: list[str]) -> SqlStore:
    """``store`` with the database down: each try to store a message (noted in ``tries``)
    fails after ``seconds`` (the store's own retries take about 11 s; a stop's grace is
    10 s)."""

    class Down(SqlStore):
        async def add_user_message(self, message: NewUserMessage):  # type: ignore[no-untyped-def]
            tries.append(message.text)
            await asyncio.sleep(seconds)
            raise StorageError("database error: OperationalError: unable to open database")

    failing = Down.__new__(Down)
    failing.__dict__.update(store.__dict__)
    return failing


@pytest.mark.parametrize("try_s", [0.3, 30.0], ids=["tries-end", "a-try-cut-short"])
async def test_a_stop_tells_every_discord_author_whose_message_was_kept_to_try_again(
        try_s: float, store: SqlStore, settings: Settings, discord_emulator: DiscordEmulator,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(intake, "RETRY_DELAYS_S", (0.2,))
    monkeypatch.setattr(dialogue, "LATE_INTAKE_S", 0.5)
    dc = discord_emulator
    tries: list[str] = []
    manager = DialogueManager(store=down(store, try_s, tries), generator=ScriptedGenerator(),
                              settings=settings, commands=builtin_commands(),
                              shutdown_grace=0.2)
    async with discord_adapter(dc, manager) as adapter:
        dc.post("kept during the outage", dm=True, author=7)
        dc.post("queued behind it", dm=True, author=7)
        if try_s < 1:
            # The first one failed and waits to be tried again.
            await dc.wait_for(lambda: intake_failures(caplog) >= 1)
        else:
            # The first one's try runs past the grace and the late intakes' time.
            await dc.wait_for(lambda: tries == ["kept during the outage"])
        await adapter.stop_receiving()
        await manager.close()  # `chinwag run`'s order: the manager, then the clients
        assert dialogue_intakes() == 0  # nothing of the manager outlives close()
        # Each author told, while the client was still open, and nothing tried again.
        assert dc.channel_texts(dc.dm_channel(7)) == [INTAKE_FAILED_NOTE] * 2
    # The first is not tried again once stopping; the second gets its one try if there
    # is time for it.
    assert tries == (["kept during the outage", "queued behind it"] if try_s < 1
                     else ["kept during the outage"])


def dialogue_intakes() -> int:
    return sum(task.get_name().startswith("chinwag:intake:") and not task.done()
               for task in asyncio.all_tasks())
