"""Counting Discord's 429s. discord.py waits each out by itself (the ``retry_after`` of
the answer's body) and tries again, so the count is taken where it can see every answer:
an ``aiohttp`` trace on its HTTP session."""

from __future__ import annotations

from types import SimpleNamespace

import aiohttp

from adapters.discord.normalize import PLATFORM
from bot.metrics import Metrics


def rate_limit_trace(metrics: Metrics) -> aiohttp.TraceConfig:
    """A trace for ``discord.Client(http_trace=...)`` that counts each 429, and the wait
    discord.py takes after it."""

    async def on_end(session: aiohttp.ClientSession, context: SimpleNamespace,
                     params: aiohttp.TraceRequestEndParams) -> None:
        response = params.response
        if response.status != 429:
            return
        metrics.rate_limited(PLATFORM)
        # discord.py waits only for a 429 from Discord itself (Cloudflare's come without
        # the Via header and a JSON body, and are raised).
        if not response.headers.get("Via"):
            return
        try:
            # Read once: aiohttp keeps the body, which discord.py reads next.
            body = await response.json(content_type=None)
            seconds = float(body["retry_after"])
        except (aiohttp.ClientError, ValueError, TypeError, KeyError):
            return
        metrics.flood_wait(PLATFORM, seconds)

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(on_end)
    return trace
