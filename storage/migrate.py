"""Run Alembic migrations on a live async engine (the asyncio connection-sharing recipe).

On SQLite a migration runs with foreign keys off, in one transaction, after the file was
copied aside: Alembic's batch mode rebuilds a table by copy, drop and rename, and with
foreign keys on the drop would cascade to every row that refers to the table.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.errors import StorageError
from storage.backup import KEEP_BACKUPS, copy_aside

__all__ = ["KEEP_BACKUPS", "downgrade", "head_revision", "upgrade"]

logger = logging.getLogger(__name__)


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    return config


async def upgrade(engine: AsyncEngine, revision: str = "head") -> str | None:
    """Bring the schema to ``revision``; returns the revision it is at afterwards."""
    return await _migrate(engine, command.upgrade, revision)


async def downgrade(engine: AsyncEngine, revision: str) -> str | None:
    """Take the schema back to ``revision`` (to run an earlier release on this database)."""
    return await _migrate(engine, command.downgrade, revision)


async def _migrate(engine: AsyncEngine, step: Callable[[Config, str], None],
                   revision: str) -> str | None:
    config = alembic_config()
    sqlite = engine.dialect.name == "sqlite"
    try:
        target = _resolve(config, revision)
        async with engine.connect() as connection:
            current = await connection.run_sync(_current_revision)
        if current != target:
            database = engine.url.database
            if sqlite and current is not None and database and database != ":memory:":
                copy = await asyncio.to_thread(copy_aside, database, current)
                logger.info("copied the database to %s before migrating it from revision "
                            "%s to %s", copy, current, target)
            async with engine.connect() as connection:
                if sqlite:
                    current = await _migrate_sqlite(connection, config, step, revision)
                else:
                    async with connection.begin():
                        current = await connection.run_sync(_run, config, step, revision)
    # CommandError: an unknown revision; OSError: a server that refuses the connection
    # (asyncpg lets it through unwrapped), or a copy that cannot be written.
    except (SQLAlchemyError, CommandError, OSError, sqlite3.Error) as exc:
        raise StorageError(f"database migration failed: {exc}") from exc
    logger.info("database schema at revision %s", current)
    return current


async def _migrate_sqlite(connection: AsyncConnection, config: Config,
                          step: Callable[[Config, str], None], revision: str) -> str | None:
    # PRAGMA foreign_keys is ignored inside a transaction, so the driver must not open one
    # on its own (AUTOCOMMIT); the migration's transaction is then begun by hand, and
    # SQLite's DDL is transactional: a failed migration leaves the file as it was.
    connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
    await connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    try:
        await connection.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            broken_before = await _foreign_key_problems(connection)
            current = await connection.run_sync(_run, config, step, revision)
            broken_after = await _foreign_key_problems(connection)
            if len(broken_after) > len(broken_before):
                raise StorageError(
                    f"the migration to {current} would break {len(broken_after)} "
                    f"references (first: {broken_after[0]}); nothing was changed")
        except BaseException:
            await connection.rollback()
            raise
        await connection.commit()
    finally:
        await connection.exec_driver_sql("PRAGMA foreign_keys=ON")
    if broken_after:
        logger.warning("the database holds %d rows whose references are broken, from "
                       "before this migration (first: %s)", len(broken_after), broken_after[0])
    return current


async def _foreign_key_problems(connection: AsyncConnection) -> list[tuple[object, ...]]:
    result = await connection.exec_driver_sql("PRAGMA foreign_key_check")
    return [tuple(row) for row in result.all()]


def _run(connection: Connection, config: Config, step: Callable[[Config, str], None],
         revision: str) -> str | None:
    config.attributes["connection"] = connection
    step(config, revision)
    return _current_revision(connection)


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _resolve(config: Config, revision: str) -> str | None:
    """The revision id ``revision`` names (``head``, ``base``, an id or its prefix)."""
    scripts = ScriptDirectory.from_config(config)
    if revision == "head":
        return scripts.get_current_head()
    if revision == "base":
        return None
    script = scripts.get_revision(revision)
    return script.revision if script is not None else None


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
