"""``chinwag serve``: Chinwag's generator as an OpenAI-compatible HTTP endpoint, so one GPU
host can serve several bot processes (which use ``CHINWAG_GENERATOR=openai``).

``POST /v1/chat/completions`` (streaming and not), ``GET /v1/models``, ``GET /health``.
A client that disconnects mid-stream cancels its generation.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from bot.errors import BadRequest, ChinwagError, GenerationError
from bot.generators import ChatMessage, GenerationParams, Generator

logger = logging.getLogger(__name__)

ROLES = {"system", "user", "assistant"}
MAX_BODY_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class CompletionRequest:
    """The parts of a chat-completions request Chinwag honours (typed, checked)."""

    messages: tuple[ChatMessage, ...]
    params: GenerationParams
    stream: bool

    @classmethod
    def parse(cls, body: Any, default_max_tokens: int) -> CompletionRequest:
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw:
            raise BadRequest("messages must be a non-empty list")
        messages = []
        for item in raw:
            if not isinstance(item, dict) or item.get("role") not in ROLES \
                    or not isinstance(item.get("content"), str):
                raise BadRequest("each message needs a role (system, user or assistant) and "
                                 "text content")
            messages.append(ChatMessage(item["role"], item["content"]))
        stop = body.get("stop") or ()
        stop = (stop,) if isinstance(stop, str) else tuple(stop)
        try:
            params = GenerationParams(
                max_new_tokens=int(body.get("max_tokens") or body.get("max_completion_tokens")
                                   or default_max_tokens),
                temperature=float(body.get("temperature", 0.7)),
                top_p=float(body.get("top_p", 1.0)),
                repetition_penalty=float(body.get("repetition_penalty", 1.0)),
                stop=tuple(str(s) for s in stop),
            )
        except (TypeError, ValueError) as exc:
            raise BadRequest(f"a sampling parameter is not a number: {exc}") from None
        if not 1 <= params.max_new_tokens <= 100_000 or not 0 <= params.temperature <= 2 \
                or not 0 < params.top_p <= 1:
            raise BadRequest("max_tokens, temperature or top_p is out of range")
        return cls(tuple(messages), params, bool(body.get("stream", False)))


class OpenAIServer:
    def __init__(self, generator: Generator, model_name: str, *, host: str, port: int,
                 api_key: str | None = None, default_max_tokens: int = 512) -> None:
        self._generator = generator
        self._model_name = model_name
        self._host = host
        self._port = port
        self._api_key = api_key
        self._default_max_tokens = default_max_tokens
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> Self:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/v1/chat/completions", self._completions)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self._host, self._port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{self._host}:{port}/v1"
        logger.info("serving %s at %s", self._model_name, self.url)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self._model_name, "object": "model", "created": 0, "owned_by": "chinwag"}]})

    def _authorised(self, request: web.Request) -> bool:
        return self._api_key is None or \
            request.headers.get("Authorization") == f"Bearer {self._api_key}"

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            return _error(401, "invalid API key", "invalid_api_key")
        try:
            body = await request.json()
            completion = CompletionRequest.parse(body, self._default_max_tokens)
        except ValueError:
            return _error(400, "the body is not valid JSON", "invalid_request_error")
        except BadRequest as exc:
            return _error(400, str(exc), "invalid_request_error")
        if completion.stream:
            return await self._stream(request, completion)
        try:
            text = "".join([p async for p in self._pieces(completion)])
        except GenerationError as exc:
            return _error(500, str(exc), "server_error")
        return web.json_response({
            "id": _completion_id(), "object": "chat.completion", "created": int(time.time()),
            "model": self._model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": self._finish_reason(completion, text)}],
            "usage": self._usage(completion, text),
        })

    def _pieces(self, completion: CompletionRequest) -> AsyncIterator[str]:
        return self._generator.stream(list(completion.messages), completion.params)

    async def _stream(self, request: web.Request,
                      completion: CompletionRequest) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        completion_id, created = _completion_id(), int(time.time())

        def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
            event = {"id": completion_id, "object": "chat.completion.chunk",
                     "created": created, "model": self._model_name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(event)}\n\n".encode()

        await response.write(chunk({"role": "assistant"}))
        parts: list[str] = []
        try:
            async for piece in self._pieces(completion):
                parts.append(piece)
                await response.write(chunk({"content": piece}))
        except GenerationError as exc:
            error = {"error": {"message": str(exc), "type": "server_error"}}
            await response.write(f"data: {json.dumps(error)}\n\n".encode())
            return response
        except ConnectionResetError:
            # The client went away; leaving the loop closed the stream and so the generation.
            logger.info("serve: client disconnected mid-stream")
            return response
        text = "".join(parts)
        await response.write(chunk({}, self._finish_reason(completion, text)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _reply_tokens(self, text: str) -> int:
        """Tokens of the reply's content, without the template around it."""
        return max(0, self._generator.count_tokens("assistant", text)
                   - self._generator.count_tokens("assistant", ""))

    def _finish_reason(self, completion: CompletionRequest, text: str) -> str:
        produced = self._reply_tokens(text)
        return "length" if produced >= completion.params.max_new_tokens else "stop"

    def _usage(self, completion: CompletionRequest, text: str) -> dict[str, int]:
        prompt = self._generator.prompt_overhead + sum(
            self._generator.count_tokens(m.role, m.content) for m in completion.messages)
        reply = self._reply_tokens(text)
        return {"prompt_tokens": prompt, "completion_tokens": reply,
                "total_tokens": prompt + reply}


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": kind}}, status=status)
