from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

# One torch thread per process in tests (read before torch loads, by every model process
# a test starts too): tests run models in this process and in child processes at once, and
# on a small box two spinning OpenMP teams fight for the cores (a test file took 431 s
# instead of 34 s with two threads each). Speed is measured in bench/, not here.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.builtin_commands import builtin_commands
from bot.config import Settings, load_settings
from bot.dialogue import DialogueManager
from storage.engine import create_engine
from storage.migrate import upgrade
from storage.repository import SqlStore
from tests.auxil.generators import ScriptedGenerator
from tests.auxil.postgres import REQUIRED_ENV, PostgresServer, bin_dir


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's .env or CHINWAG_* variables."""

    for name in list(os.environ):
        if name.startswith("CHINWAG_"):
            monkeypatch.delenv(name)
    # Every server a test talks to is on loopback; httpx and aiohttp honour proxy settings.
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (each test takes a new database in it)."""
    programs = bin_dir()
    if programs is None:
        message = "PostgreSQL is not installed here (apt-get install postgresql)"
        if os.environ.get(REQUIRED_ENV) == "required":
            pytest.fail(message)
        pytest.skip(message)
    server = PostgresServer(programs)
    server.init()
    server.start()
    yield server
    server.remove()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # No rate limit here: tests send bursts on purpose; tests of the limit turn it on.
    return load_settings(data_dir=tmp_path / "data", generator="echo", edit_interval=0.0,
                         admins="telegram:admin1", rate_per_minute=0)


@pytest.fixture(params=["sqlite", "postgresql"])
def any_database_url(request: pytest.FixtureRequest, settings: Settings) -> str:
    """A SQLite file, or a new database on the real PostgreSQL server: a test that takes
    it runs on both backends."""
    if request.param == "sqlite":
        return settings.database_url
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()


@pytest.fixture
async def any_engine(any_database_url: str) -> AsyncIterator[AsyncEngine]:
    """A migrated engine on each backend (see ``any_database_url``)."""
    engine = create_engine(any_database_url)
    await upgrade(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings.database_url)
    await upgrade(engine)
    yield engine
    await engine.dispose()


@pytest.fixture
def store(engine: AsyncEngine) -> SqlStore:
    return SqlStore(engine)


@pytest.fixture
def generator() -> ScriptedGenerator:
    return ScriptedGenerator()


@pytest.fixture
async def manager(store: SqlStore, generator: ScriptedGenerator,
                  settings: Settings) -> AsyncIterator[DialogueManager]:
    async with DialogueManager(store=store, generator=generator, settings=settings,
                               commands=builtin_commands()) as manager:
        yield manager
