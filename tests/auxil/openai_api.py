"""A loopback OpenAI-compatible chat-completions server for fault tests: it streams a
scripted reply as server-sent events and can refuse, cut a stream short, report an error
inside the stream or hang."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.auxil.loopback import start


@dataclass
class Behaviour:
    status: int = 200
    retry_after: float | None = None
    cut_after: int | None = None
    """Close the connection after this many chunks, without [DONE]."""
    hang: float = 0.0
    """Seconds to stall after the first chunk."""
    error_after: int | None = None
    """Send an ``{"error": ...}`` event after this many chunks (0: before the first) and end
    the stream, as servers that report a failure inside a 200 stream do."""
    detail: str = "refused"


@dataclass
class FakeOpenAI:
    reply: str = "Hello from the model server."
    chunk_chars: int = 5
    echo: bool = False
    """Reply with the last user message instead of ``reply``."""
    chunk_delay: float = 0.001
    """Seconds between chunks (a slow model streams for a while)."""
    api_key: str | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)
    """``time.monotonic()`` at each request's arrival, to see how retries are spaced."""
    running: int = 0
    max_running: int = 0
    _script: deque[Behaviour] = field(default_factory=deque)
    _runner: web.AppRunner | None = None
    url: str = ""

    async def __aenter__(self) -> FakeOpenAI:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        self._runner, port = await start(app)
        self.url = f"http://127.0.0.1:{port}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    def then(self, **behaviour: Any) -> None:
        """The next request behaves so (requests after the script get the normal reply)."""
        self._script.append(Behaviour(**behaviour))

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        self.arrivals.append(time.monotonic())
        body = await request.json()
        body["_auth"] = request.headers.get("Authorization")
        self.requests.append(body)
        behaviour = self._script.popleft() if self._script else Behaviour()
        if self.api_key and body["_auth"] != f"Bearer {self.api_key}":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        if behaviour.status != 200:
            headers = {"Retry-After": str(behaviour.retry_after)} \
                if behaviour.retry_after is not None else {}
            return web.json_response({"error": {"message": behaviour.detail}},
                                     status=behaviour.status, headers=headers)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            text = body["messages"][-1]["content"] if self.echo else self.reply
            chunks = [text[i:i + self.chunk_chars] for i in range(0, len(text),
                                                                   self.chunk_chars)]
            for number, chunk in enumerate(chunks):
                if behaviour.cut_after is not None and number >= behaviour.cut_after:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if behaviour.error_after is not None and number >= behaviour.error_after:
                    error = {"error": {"message": behaviour.detail, "type": "server_error"}}
                    await response.write(f"data: {json.dumps(error)}\n\n".encode())
                    await response.write_eof()
                    return response
                event = {"id": "c1", "object": "chat.completion.chunk", "model": body["model"],
                         "choices": [{"index": 0, "delta": {"content": chunk},
                                      "finish_reason": None}]}
                await response.write(f"data: {json.dumps(event)}\n\n".encode())
                if number == 0 and behaviour.hang:
                    await asyncio.sleep(behaviour.hang)
                await asyncio.sleep(self.chunk_delay)
            final = {"id": "c1", "object": "chat.completion.chunk", "model": body["model"],
                     "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            await response.write(f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode())
            await response.write_eof()
            return response
        finally:
            self.running -= 1
