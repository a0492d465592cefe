"""Run Alembic migrations on a live async engine (the asyncio connection-sharing recipe).

A migration keeps every row. On SQLite it runs with foreign keys off, in one transaction
that holds the write lock from the first read to the commit, after the file was copied
aside (``storage.backup``): Alembic's batch mode rebuilds a table by copy, drop and
rename, and with foreign keys on the drop would cascade to every row that refers to the
table. References are checked before the commit; a migration that breaks one is undone.
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
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from bot.errors import StorageError
from storage.backup import KEEP_BACKUPS, copy_aside, prune

__all__ = ["KEEP_BACKUPS", "downgrade", "head_revision", "upgrade"]

logger = logging.getLogger(__name__)

Step = Callable[[Config, str], None]


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    return config


async def upgrade(engine: AsyncEngine, revision: str = "head") -> str | None:
    """Bring the schema to ``revision``; returns the revision it is at afterwards."""
    return await _migrate(engine, command.upgrade, revision, up=True)


async def downgrade(engine: AsyncEngine, revision: str) -> str | None:
    """Take the schema back to ``revision`` (to run an earlier release on this database).
    Going below the first revision, which would drop every table, is refused."""
    return await _migrate(engine, command.downgrade, revision, up=False)


async def _migrate(engine: AsyncEngine, step: Step, revision: str, *, up: bool) -> str | None:
    config = alembic_config()
    try:
        order = _revisions(config)
        target = _resolve(config, revision)
        if target is None and not up:
            raise StorageError("going below the first revision would delete every table; "
                               "nothing was changed")
        async with engine.connect() as connection:
            if engine.dialect.name == "sqlite":
                current = await _migrate_sqlite(connection, engine.url.database, config,
                                                step, order, target, up)
            else:
                async with connection.begin():
                    current = await connection.run_sync(_run, config, step, order, target,
                                                        up)
    except DBAPIError as exc:  # the driver's own words, without SQLAlchemy's SQL and link
        raise StorageError(f"database migration failed: {_busy_or(exc.orig)}") from exc
    # CommandError: an unknown revision; OSError: a server that refuses the connection
    # (asyncpg lets it through unwrapped).
    except (SQLAlchemyError, CommandError, OSError) as exc:
        raise StorageError(f"database migration failed: {exc}") from exc
    logger.info("database schema at revision %s", current)
    return current


async def _migrate_sqlite(connection: AsyncConnection, database: str | None, config: Config,
                          step: Step, order: list[str | None], target: str | None,
                          up: bool) -> str | None:
    # PRAGMA foreign_keys is ignored inside a transaction, so the driver must not open one
    # on its own (AUTOCOMMIT, which SQLAlchemy undoes when the connection goes back to
    # the pool); the migration's transaction is then begun by hand. SQLite's DDL is
    # transactional: a failed migration leaves the file as it was.
    connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
    await connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
    copy: Path | None = None
    try:
        # IMMEDIATE: the write lock from here on, so the copy holds exactly what is
        # migrated, and a second process migrating at once waits, then finds it done.
        await connection.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            current = await connection.run_sync(_current_revision)
            if current == target:
                await connection.rollback()
                return current
            _check_path(order, current, target, up)
            if current is not None and database and database != ":memory:":
                try:
                    copy = await asyncio.to_thread(copy_aside, database, current)
                except (OSError, sqlite3.Error) as exc:
                    raise StorageError(f"could not copy the database aside before migrating "
                                       f"it ({exc}); nothing was changed") from exc
                logger.info("copied the database to %s before migrating it from revision "
                            "%s to %s", copy, current, target)
            broken_before = await _broken_references(connection)
            current = await connection.run_sync(_run, config, step, order, target, up)
            broken = await _broken_references(connection) - broken_before
            if broken:
                raise StorageError(f"the migration to {current} would break {len(broken)} "
                                   f"references (one: {min(broken)}); nothing was changed")
        except BaseException:
            await connection.rollback()
            if copy is not None:  # the file is as it was: that copy adds nothing
                copy.unlink(missing_ok=True)
            raise
        await connection.commit()
    finally:
        await connection.exec_driver_sql("PRAGMA foreign_keys=ON")
    if copy is not None:
        for old in prune(database or ""):
            logger.info("deleted the older copy %s", old)
    if broken_before:
        logger.warning("the database holds %d rows whose references were broken before "
                       "this migration (one: %s)", len(broken_before), min(broken_before))
    return current


async def _broken_references(connection: AsyncConnection) -> set[tuple[object, ...]]:
    """``PRAGMA foreign_key_check``: (table, rowid, referred table, constraint) of each
    row whose reference points at nothing."""
    result = await connection.exec_driver_sql("PRAGMA foreign_key_check")
    return {tuple(row) for row in result.all()}


def _run(connection: Connection, config: Config, step: Step, order: list[str | None],
         target: str | None, up: bool) -> str | None:
    current = _current_revision(connection)
    if current != target:
        _check_path(order, current, target, up)
        config.attributes["connection"] = connection
        step(config, "base" if target is None else target)
    return _current_revision(connection)


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _revisions(config: Config) -> list[str | None]:
    """Every revision, oldest first, after ``None`` for the empty schema (the history is
    one line)."""
    scripts = ScriptDirectory.from_config(config)
    return [None, *reversed([script.revision for script in scripts.walk_revisions()])]


def _resolve(config: Config, revision: str) -> str | None:
    """The revision id ``revision`` names (``head``, ``base``, an id or its prefix)."""
    scripts = ScriptDirectory.from_config(config)
    if revision == "head":
        return scripts.get_current_head()
    if revision == "base":
        return None
    script = scripts.get_revision(revision)
    return script.revision if script is not None else None


def _check_path(order: list[str | None], current: str | None, target: str | None,
                up: bool) -> None:
    """Refuse, before anything is copied or changed, a migration that cannot run."""
    if current not in order:
        raise StorageError(
            f"the database is at revision {current}, which this release of Chinwag does not "
            "know: a newer release migrated it. Run that release's `chinwag db downgrade "
            f"{order[-1]}` first, or use that release; nothing was changed")
    if up and order.index(target) < order.index(current):
        raise StorageError(f"the database is at revision {current}, past {target}: use "
                           "`chinwag db downgrade` to go back; nothing was changed")
    if not up and order.index(target) > order.index(current):
        raise StorageError(f"the database is at revision {current}, before {target}: use "
                           "`chinwag db upgrade`; nothing was changed")


def _busy_or(error: BaseException | None) -> str:
    if "database is locked" in str(error):  # SQLite's busy timeout ran out
        return ("the database is locked: another process (a running Chinwag?) is writing "
                "to it; stop it and try again")
    return str(error)


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
