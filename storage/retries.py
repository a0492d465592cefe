"""Which database failures may pass, and trying a store call again after one."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from bot.errors import StorageError
from bot.metrics import Metrics

logger = logging.getLogger(__name__)


class Metered(Protocol):
    """A store whose retries and failures are counted."""

    @property
    def metrics(self) -> Metrics: ...


P = ParamSpec("P")
S = TypeVar("S", bound=Metered)
T = TypeVar("T")

RETRY_DELAYS_S = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0)
"""Waits between tries of a call the database refused for a passing reason (SQLite locked
by another writer, PostgreSQL restarting, every pooled connection busy): about 11 s in
all, then the error goes up."""

ASYNCPG_TRANSIENT = frozenset({"CannotConnectNowError", "AdminShutdownError",
                               "ConnectionDoesNotExistError", "ConnectionFailureError",
                               "TooManyConnectionsError"})


def transient(exc: BaseException | None) -> bool:
    """Whether trying again later may work: a lock, a lost or refused connection."""
    if isinstance(exc, IntegrityError):
        return False
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError | InterfaceError | OSError | PoolTimeout):
        return True  # PoolTimeout: every pooled connection busy (a burst of load)
    # asyncpg's own errors (server starting up or shutting down) pass unwrapped on connect.
    return type(exc).__name__ in ASYNCPG_TRANSIENT


def retrying(method: Callable[Concatenate[S, P], Coroutine[Any, Any, T]]
             ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
    """Runs a store call again, whole, after a passing database failure (a
    ``StorageError`` caused by one). Each call is one transaction, so a failed try left
    nothing behind. Each retry, and each call that fails for good, is counted in the
    store's metrics."""

    async def call(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
        for attempt, delay in enumerate((*RETRY_DELAYS_S, None), start=1):
            try:
                return await method(self, *args, **kwargs)
            except StorageError as exc:
                if delay is None or not transient(exc.__cause__):
                    self.metrics.database_failure(method.__name__)
                    raise
                self.metrics.database_retry(method.__name__)
                logger.warning("%s: database unavailable (%s); try %s again in %.1f s",
                               method.__name__, exc.__cause__.__class__.__name__, attempt,
                               delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    functools.update_wrapper(call, method)
    return call
