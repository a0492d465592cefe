"""Run Alembic migrations on a live async engine (the asyncio connection-sharing recipe)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.errors import StorageError

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

    def run(connection: Connection) -> str | None:
        config.attributes["connection"] = connection
        step(config, revision)
        return MigrationContext.configure(connection).get_current_revision()

    try:
        async with engine.begin() as connection:
            current = await connection.run_sync(run)
    except (SQLAlchemyError, CommandError) as exc:  # CommandError: an unknown revision
        raise StorageError(f"database migration failed: {exc}") from exc
    logger.info("database schema at revision %s", current)
    return current


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
