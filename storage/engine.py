"""Engine factory: any SQLAlchemy async URL; SQLite gets WAL, foreign keys and a busy timeout."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from bot.errors import ConfigError

logger = logging.getLogger(__name__)

SQLITE_BUSY_TIMEOUT_MS = 10_000


def _sqlite_pragmas(busy_timeout_ms: int) -> Callable[[Any, Any], None]:
    def on_connect(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    return on_connect


def create_engine(url: str, *, sqlite_busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS
                  ) -> AsyncEngine:
    """Create the async engine; a SQLite file's folder is created on first use. A server
    database's pooled connections are checked before use, so a restarted server costs a
    reconnect, not an error."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ConfigError(f"CHINWAG_DATABASE_URL is not a database URL: {exc}") from None
    sqlite = parsed.get_backend_name() == "sqlite"
    if sqlite:
        database = parsed.database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    try:
        if sqlite:
            engine = create_async_engine(parsed)
        else:
            # More connections than SQLAlchemy's default 5 + 10: under a burst every
            # conversation's intake and answer want one (PostgreSQL allows 100).
            engine = create_async_engine(parsed, pool_pre_ping=True, pool_size=10,
                                         max_overflow=20)
    except (ArgumentError, ImportError) as exc:
        raise ConfigError(f"CHINWAG_DATABASE_URL cannot be used: {exc}") from None
    if sqlite:
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas(sqlite_busy_timeout_ms))
    logger.debug("database engine for %s", parsed.render_as_string(hide_password=True))
    return engine


def session_factory(engine: AsyncEngine) -> async_sessionmaker[Any]:
    return async_sessionmaker(engine, expire_on_commit=False)
