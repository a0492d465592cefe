"""Shared plumbing of the loopback servers the tests start (platform and model emulators)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

from aiohttp import web


async def start(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    """Serve ``app`` on 127.0.0.1 at ``port`` (0: a free one); returns the runner and the
    port."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, int(port)


def free_port() -> int:
    """A loopback port free now, for a server whose URL must be known before it starts."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def wait_until(predicate: Callable[[], bool], timeout: float,  # noqa: ASYNC109
                     describe: Callable[[], str]) -> None:
    """Poll ``predicate`` until it holds; on timeout, fail with ``describe()``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out; {describe()}")
        await asyncio.sleep(0.02)
