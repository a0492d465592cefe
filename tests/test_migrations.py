"""Migrations keep every row: up from every earlier revision, down to every earlier revision
and up again, on SQLite and on a real PostgreSQL server; a SQLite file is copied aside
before a migration changes it."""

from __future__ import annotations

import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, MetaData, Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.config import Settings
from bot.errors import StorageError
from bot.store import NewUserMessage
from storage import migrate
from storage.backup import copies_of
from storage.engine import create_engine
from storage.migrate import downgrade, head_revision, upgrade
from storage.repository import SqlStore
from tests.auxil.process import ROOT, chinwag

EARLIER = ["0001", "0002", "0003", "0004", "0005", "0006", "0007", "0008"]
"""Every revision before the head."""

TABLES = ["conversations", "users", "messages", "platform_messages", "usage"]
MEMORY_TABLES = ["message_embeddings", "memory_recalls"]
"""Long-term memory's (0008): made from the messages, so dropped going below 0008 and made
again by the memory's worker."""

WHEN = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

# One row per case the store knows: a persona and generation settings, a conversation
# that answers everything, a blocked user, a question answered by a reply that is
# linked to it and shown in two platform messages, a pending question with an
# interrupted reply's message ids, a failed one in a thread, and a day's usage; a chat
# that chose its model, and a reply counted by that model.
ROWS: dict[str, list[dict[str, Any]]] = {
    "conversations": [
        {"id": 1, "key": "telegram:1", "platform": "telegram", "chat_id": "1",
         "thread_id": None, "persona": "a pirate", "temperature": 0.3,
         "max_reply_tokens": 99, "reset_after_id": 0, "answer_all": True, "created_at": WHEN,
         "model": "smol"},
        {"id": 2, "key": "discord:5:9", "platform": "discord", "chat_id": "5",
         "thread_id": "9", "persona": None, "temperature": None, "max_reply_tokens": None,
         "reset_after_id": 0, "answer_all": False, "created_at": WHEN},
    ],
    "users": [
        {"id": 1, "platform": "telegram", "user_id": "u1", "display_name": "Ann",
         "blocked": False, "created_at": WHEN, "last_seen_at": WHEN, "language": "zh",
         "platform_language": "en-US"},
        {"id": 2, "platform": "telegram", "user_id": "u2", "display_name": "Spammer",
         "blocked": True, "created_at": WHEN, "last_seen_at": WHEN},
    ],
    "messages": [
        {"id": 1, "conversation_id": 1, "role": "user", "platform": "telegram",
         "author_id": "u1", "platform_message_id": "p1", "reply_to_id": None,
         "text": "hello", "tokens": 1, "generation_ms": None, "created_at": WHEN,
         "state": "answered"},
        {"id": 2, "conversation_id": 1, "role": "assistant", "platform": "telegram",
         "author_id": "u1", "platform_message_id": None, "reply_to_id": 1,
         "text": "hi there", "tokens": 2, "generation_ms": 120, "created_at": WHEN,
         "state": None, "counted_by": "smol"},
        {"id": 3, "conversation_id": 1, "role": "user", "platform": "telegram",
         "author_id": "u1", "platform_message_id": "p3", "reply_to_id": None,
         "text": "tell me more", "tokens": 3, "generation_ms": None, "created_at": WHEN,
         "state": "pending", "reply_draft_id": "31", "reply_draft_ids": "31 32"},
        {"id": 4, "conversation_id": 2, "role": "user", "platform": "discord",
         "author_id": "d7", "platform_message_id": "d4", "reply_to_id": None,
         "text": "and in a thread?", "tokens": 4, "generation_ms": None,
         "created_at": WHEN, "state": "failed"},
    ],
    "platform_messages": [
        {"id": 1, "conversation_id": 1, "platform_message_id": "p1", "message_id": 1},
        {"id": 2, "conversation_id": 1, "platform_message_id": "r1", "message_id": 2},
        {"id": 3, "conversation_id": 1, "platform_message_id": "r1b", "message_id": 2},
        {"id": 4, "conversation_id": 1, "platform_message_id": "p3", "message_id": 3},
        {"id": 5, "conversation_id": 2, "platform_message_id": "d4", "message_id": 4},
    ],
    "usage": [
        {"id": 1, "platform": "telegram", "user_id": "u1", "conversation_id": 1,
         "day": date(2026, 11, 30), "messages": 1, "prompt_tokens": 10, "reply_tokens": 2},
    ],
    # Two embedded messages, and the first recalled for the pending question.
    "message_embeddings": [
        {"message_id": 1, "conversation_id": 1, "model": "m", "dimension": 2,
         "vector": bytes(8)},
        {"message_id": 2, "conversation_id": 1, "model": "m", "dimension": 2,
         "vector": bytes(8)},
    ],
    "memory_recalls": [{"message_id": 3, "recalled_id": 1, "similarity": 0.5}],
}


def _reflect(connection: Connection) -> dict[str, Table]:
    metadata = MetaData()
    metadata.reflect(connection, only=lambda name, _metadata: name in TABLES + MEMORY_TABLES)
    return dict(metadata.tables)


async def fill(engine: AsyncEngine) -> None:
    """Every table's rows, with the columns the schema has at its current revision."""

    def run(connection: Connection) -> None:
        tables = _reflect(connection)
        for name in TABLES + [name for name in MEMORY_TABLES if name in tables]:
            table = tables[name]
            for row in ROWS[name]:  # one by one: rows differ in the columns they set
                connection.execute(insert(table).values(
                    {k: v for k, v in row.items() if k in table.c}))

    async with engine.begin() as connection:
        await connection.run_sync(run)


async def snapshot(engine: AsyncEngine) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, in the columns every revision has (0001's)."""

    def run(connection: Connection) -> dict[str, list[tuple[Any, ...]]]:
        tables = _reflect(connection)
        result = {}
        for name in TABLES:
            table = tables[name]
            columns = [table.c[k] for k in ROWS[name][0] if k in table.c
                       and k not in ("state", "answer_all", "reply_draft_id", "reply_draft_ids",
                                     "language", "platform_language", "model", "counted_by")]
            result[name] = [tuple(row) for row in
                            connection.execute(select(*columns).order_by(table.c.id))]
        return result

    async with engine.connect() as connection:
        return await connection.run_sync(run)


async def column(engine: AsyncEngine, table: str, name: str) -> list[Any]:
    def run(connection: Connection) -> list[Any]:
        reflected = _reflect(connection)[table]
        return list(connection.execute(select(reflected.c[name])
                                       .order_by(reflected.c.id)).scalars())

    async with engine.connect() as connection:
        return await connection.run_sync(run)


async def rows_in(engine: AsyncEngine, names: list[str]) -> list[int | None]:
    """How many rows each table holds; None for a table the schema does not have."""

    def run(connection: Connection) -> list[int | None]:
        tables = _reflect(connection)
        return [connection.execute(select(func.count()).select_from(tables[name])).scalar_one()
                if name in tables else None for name in names]

    async with engine.connect() as connection:
        return await connection.run_sync(run)


async def foreign_key_problems(engine: AsyncEngine) -> list[Any]:
    if engine.dialect.name != "sqlite":
        return []  # PostgreSQL checks every constraint as rows change
    async with engine.connect() as connection:
        return list((await connection.exec_driver_sql("PRAGMA foreign_key_check")).all())


@pytest.fixture
async def bare(any_database_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on an empty database, on each backend: no migration has run."""
    engine = create_engine(any_database_url)
    yield engine
    await engine.dispose()


@pytest.mark.parametrize("start", EARLIER)
async def test_upgrading_from_every_revision_keeps_every_row(bare: AsyncEngine,
                                                             start: str) -> None:
    assert await upgrade(bare, start) == start
    await fill(bare)
    before = await snapshot(bare)
    assert [len(before[name]) for name in TABLES] == [2, 2, 4, 5, 1]

    assert await upgrade(bare) == head_revision()
    assert await snapshot(bare) == before
    assert await foreign_key_problems(bare) == []
    expected_states = (["answered", None, "pending", "failed"] if start != "0001"
                       else ["answered", None, "answered", "answered"])  # 0002: all answered
    assert await column(bare, "messages", "state") == expected_states
    assert await column(bare, "conversations", "answer_all") == [start >= "0003", False]
    if bare.dialect.name == "sqlite":  # the ids in use are never given again
        async with bare.connect() as connection:
            assert (await connection.exec_driver_sql(
                "SELECT seq FROM sqlite_sequence WHERE name = 'messages'")).scalar() == 4
    assert await column(bare, "messages", "reply_draft_ids") == [
        None, None, "31 32" if start >= "0005" else {"0004": "31"}.get(start), None]
    assert await column(bare, "users", "language") == (  # None before /language
        ["zh", None] if start >= "0007" else [None, None])
    # The worker embeds them (those filled at 0008 stay).
    assert await rows_in(bare, MEMORY_TABLES) == ([2, 1] if start >= "0008" else [0, 0])
    assert await column(bare, "conversations", "model") == [None, None]  # before /model
    assert await column(bare, "messages", "counted_by") == [None] * 4  # the default's


@pytest.mark.parametrize("target", EARLIER)
async def test_going_down_to_every_revision_and_up_again_keeps_every_row(
        bare: AsyncEngine, target: str) -> None:
    await upgrade(bare)
    await fill(bare)
    before = await snapshot(bare)
    assert await column(bare, "users", "platform_language") == ["en-US", None]
    assert await rows_in(bare, MEMORY_TABLES) == [2, 1]
    assert await column(bare, "conversations", "model") == ["smol", None]
    assert await column(bare, "messages", "counted_by") == [None, "smol", None, None]

    assert await downgrade(bare, target) == target
    assert await snapshot(bare) == before
    assert await foreign_key_problems(bare) == []
    memory_kept = [2, 1] if target >= "0008" else [None, None]  # no such tables below 0008
    assert await rows_in(bare, MEMORY_TABLES) == memory_kept
    if target == "0004":  # the earlier schema holds an interrupted reply's first message
        assert await column(bare, "messages", "reply_draft_id") == [None, None, "31", None]

    assert await upgrade(bare) == head_revision()
    assert await snapshot(bare) == before
    assert await foreign_key_problems(bare) == []
    assert await rows_in(bare, MEMORY_TABLES) == ([2, 1] if target >= "0008" else [0, 0])
    assert await column(bare, "conversations", "model") == [None, None]  # 0009 dropped it


async def test_the_migration_gives_sqlite_connections_their_foreign_keys_back(
        settings: Settings) -> None:
    engine = create_engine(settings.database_url)
    try:
        await upgrade(engine, "0004")
        await upgrade(engine)
        async with engine.connect() as connection:  # the pool's one, used by the migration
            assert (await connection.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
    finally:
        await engine.dispose()


def copies(folder: Path) -> list[str]:
    """The names of the copies in ``folder`` (and of anything a copy left beside it)."""
    return sorted(p.name for p in folder.iterdir() if ".bak-" in p.name)


def revisions(folder: Path) -> list[str]:
    """The revision each copy in ``folder`` holds, oldest copy first."""
    return [p.name.split(".bak-")[1].split("-")[0] for p in copies_of(folder / "chinwag.db")]


def _counts(path: Path) -> dict[str, int]:
    with sqlite3.connect(path) as connection:
        counts = {name: connection.execute(f"SELECT count(*) FROM {name}").fetchone()[0]
                  for name in TABLES}
        counts["revision"] = connection.execute(
            "SELECT version_num FROM alembic_version").fetchone()[0]
    connection.close()
    return counts


async def filled(path: Path, revision: str) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        await upgrade(engine, revision)
        await fill(engine)
    finally:
        await engine.dispose()


@pytest.mark.parametrize("command", [("db", "upgrade"), ("console",)])
async def test_db_upgrade_and_start_up_copy_the_file_aside_first(
        tmp_path: Path, command: tuple[str, ...]) -> None:
    path = tmp_path / "chinwag.db"
    await filled(path, "0004")

    env = {"CHINWAG_DATA_DIR": str(tmp_path), "CHINWAG_GENERATOR": "echo"}
    result = chinwag(*command, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    [copy] = copies_of(path)
    assert copy.name.startswith("chinwag.db.bak-0004-")
    if command == ("db", "upgrade"):
        assert f"database is at revision {head_revision()}" in result.stdout
        assert str(copy) in result.stderr  # the log says where the copy is
    assert _counts(copy) == {"conversations": 2, "users": 2, "messages": 4,
                             "platform_messages": 5, "usage": 1, "revision": "0004"}
    assert _counts(path) == {**_counts(copy), "revision": head_revision()}

    again = chinwag(*command, env=env, timeout=120)  # nothing to migrate, nothing copied
    assert again.returncode == 0, again.stderr
    assert copies(tmp_path) == [copy.name]  # and opening the copy left nothing beside it


async def test_copies_are_never_overwritten_and_the_last_few_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "chinwag.db"
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        await upgrade(engine, "0001")  # a new, empty database is not copied
        assert copies(tmp_path) == []
        await fill(engine)
        for revision in ["0002", "0003", "0004", "0005"]:
            await upgrade(engine, revision)
        await downgrade(engine, "0004")
        async with engine.begin() as connection:  # the second copy of 0004 differs
            await connection.exec_driver_sql("DELETE FROM usage")
        await upgrade(engine, "0005")
    finally:
        await engine.dispose()
    # The newest three: taken before 0004→0005, 0005→0004 and 0004→0005 again.
    assert len(copies(tmp_path)) == migrate.KEEP_BACKUPS
    assert revisions(tmp_path) == ["0004", "0005", "0004"]
    first, down, second = copies_of(path)
    assert _counts(first)["usage"] == 1 and _counts(second)["usage"] == 0
    assert _counts(down) == {**_counts(first), "revision": "0005"}
    assert len(copies(tmp_path)) == migrate.KEEP_BACKUPS  # reading them added no file


async def test_a_failed_sqlite_migration_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "chinwag.db"
    await filled(path, "0002")
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        await upgrade(engine, "0003")
        before = await snapshot(engine)
        # 0004 creates an index, then rebuilds `messages` through this table name.
        async with engine.begin() as connection:
            await connection.exec_driver_sql("CREATE TABLE _alembic_tmp_messages (x INTEGER)")
        with pytest.raises(StorageError, match="migration failed"):
            await upgrade(engine)
        async with engine.connect() as connection:
            indexes = await connection.exec_driver_sql(
                "SELECT name FROM sqlite_master WHERE name = 'ix_messages_created_at'")
            assert indexes.all() == []  # the index made before the failure is gone too
            assert (await connection.exec_driver_sql(
                "SELECT version_num FROM alembic_version")).scalar() == "0003"
        assert await snapshot(engine) == before
    finally:
        await engine.dispose()
    assert revisions(tmp_path) == ["0002"]  # the failed try's copy is not kept


async def test_a_migration_that_would_break_references_is_undone(tmp_path: Path) -> None:
    path = tmp_path / "chinwag.db"
    await filled(path, "0004")

    def and_lose_a_conversation(config: Config, revision: str) -> None:
        command.upgrade(config, revision)
        config.attributes["connection"].exec_driver_sql("DELETE FROM conversations WHERE id = 2")

    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        before = await snapshot(engine)
        with pytest.raises(StorageError, match="would break 2 references"):
            await migrate._migrate(engine, and_lose_a_conversation, "head", up=True)
        assert await snapshot(engine) == before
        assert await upgrade(engine, "0004") == "0004"  # still there
    finally:
        await engine.dispose()
    assert copies(tmp_path) == []


async def test_a_database_a_newer_release_migrated_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "chinwag.db"
    await filled(path, "0004")
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        await upgrade(engine)
        async with engine.begin() as connection:
            await connection.exec_driver_sql("UPDATE alembic_version SET version_num = '0099'")
        for _start in range(2):  # a service manager restarting the older release
            with pytest.raises(StorageError, match=r"newer release.*nothing was changed"):
                await upgrade(engine)
        assert revisions(tmp_path) == ["0004"]  # no copy made, the good one kept
        async with engine.begin() as connection:
            await connection.exec_driver_sql("UPDATE alembic_version SET version_num = '0003'")
        with pytest.raises(StorageError, match="chinwag db upgrade"):
            await downgrade(engine, "0005")
        assert revisions(tmp_path) == ["0004"]
    finally:
        await engine.dispose()


async def test_going_below_the_first_revision_is_refused(bare: AsyncEngine) -> None:
    await upgrade(bare)
    await fill(bare)
    before = await snapshot(bare)
    with pytest.raises(StorageError, match="delete every table"):
        await downgrade(bare, "base")
    assert await snapshot(bare) == before


async def test_a_locked_database_is_one_clear_line_and_no_copy(tmp_path: Path) -> None:
    path = tmp_path / "chinwag.db"
    await filled(path, "0004")
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process writing
    engine = create_engine(f"sqlite+aiosqlite:///{path}", sqlite_busy_timeout_ms=200)
    try:
        with pytest.raises(StorageError) as raised:
            await upgrade(engine)
    finally:
        holder.rollback()
        holder.close()
        await engine.dispose()
    assert str(raised.value).splitlines() == [
        "database migration failed: the database is locked: another process (a running "
        "Chinwag?) is writing to it; stop it and try again"]
    assert copies(tmp_path) == []


def test_two_processes_migrating_at_once_both_succeed_with_one_copy(tmp_path: Path) -> None:
    path = tmp_path / "chinwag.db"
    asyncio.run(filled(path, "0004"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    env.update({"CHINWAG_DATA_DIR": str(tmp_path), "PYTHONPATH": str(ROOT)})
    both = [subprocess.Popen([sys.executable, "-m", "bot", "db", "upgrade"], env=env,
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    for process in both:
        _out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
    assert revisions(tmp_path) == ["0004"]
    assert _counts(path)["messages"] == 4


async def test_new_ids_after_0006_are_above_a_reset_made_before_it(tmp_path: Path) -> None:
    path = tmp_path / "chinwag.db"
    await filled(path, "0005")
    engine = create_engine(f"sqlite+aiosqlite:///{path}")
    try:
        async with engine.begin() as connection:
            # A /reset, then a /forget of the newest messages, before ids were kept.
            await connection.exec_driver_sql(
                "UPDATE conversations SET reset_after_id = 10 WHERE id = 1")
        await upgrade(engine)
        store = SqlStore(engine)
        conversation = await store.conversation("telegram:1")
        admission = await store.add_user_message(NewUserMessage(
            conversation_id=conversation.id, platform="telegram", author_id="u1",
            author_name="Ann", platform_message_id="p9", text="after it all", tokens=3,
            reply_to_platform_id=None))
        assert admission.message.id > 10
        context = await store.history(conversation.id, conversation.reset_after_id, 10**9, 9)
        assert [m.text for m in context] == ["after it all"]
    finally:
        await engine.dispose()


def test_a_database_server_that_refuses_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"postgresql+asyncpg://chinwag@127.0.0.1:{port}/chinwag"
    result = chinwag("db", "upgrade", env={"CHINWAG_DATABASE_URL": url}, cwd=tmp_path,
                     timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "chinwag: error: database migration failed"), result.stderr
