"""Retention: messages older than ``CHINWAG_RETENTION_DAYS`` are deleted, at start and then
every hour, for as long as the bot runs."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Self

from bot.errors import StorageError
from bot.store import Store

logger = logging.getLogger(__name__)

SWEEP_EVERY_S = 3600.0


def _utcnow() -> datetime:
    return datetime.now(UTC)


class RetentionSweeper:
    def __init__(self, store: Store, days: float | None, *, every: float = SWEEP_EVERY_S,
                 now: Callable[[], datetime] = _utcnow) -> None:
        self._store = store
        self._days = days
        self._every = every
        self._now = now
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        if self._days:
            self._task = asyncio.create_task(self._run(), name="chinwag:retention")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def sweep(self) -> int:
        """Delete what is past the retention period now; returns how many messages went."""
        if not self._days:
            return 0
        return await self._store.delete_older_than(self._now() - timedelta(days=self._days))

    async def _run(self) -> None:
        while True:
            try:
                await self.sweep()
            except StorageError as exc:  # the next sweep tries again
                logger.warning("retention sweep failed: %s", exc)
            await asyncio.sleep(self._every)
