"""Turns for SQLite writers within the process: one at a time, urgent ones first.

SQLite admits one writer at a time and makes the others sleep and poll for its lock; under
load that costs far more than waiting in line here. Storing a newly arrived message is
urgent: a platform is waiting to be told it arrived (Telegram delivers the next batch only
then), while a reply's writes can wait a moment.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

URGENT = 0
NORMAL = 1


class WriterTurns:
    def __init__(self) -> None:
        self._held = False
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrival = itertools.count()

    @asynccontextmanager
    async def turn(self, priority: int = NORMAL) -> AsyncIterator[None]:
        if self._held or self._waiting:
            granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            heapq.heappush(self._waiting, (priority, next(self._arrival), granted))
            try:
                await granted
            except asyncio.CancelledError:
                if granted.done() and not granted.cancelled():
                    self._pass_on()  # handed the turn just as it was cancelled
                else:
                    granted.cancel()  # skipped when its turn comes
                raise
        else:
            self._held = True
        try:
            yield
        finally:
            self._pass_on()

    def _pass_on(self) -> None:
        while self._waiting:
            _priority, _arrival, granted = heapq.heappop(self._waiting)
            if not granted.done():
                granted.set_result(None)  # the turn goes over; still held
                return
        self._held = False
