"""``chinwag serve``: Chinwag's generator as an OpenAI-compatible HTTP endpoint, so one GPU
host can serve several bot processes (which use ``CHINWAG_GENERATOR=openai``).

``POST /v1/chat/completions`` (streaming and not), ``GET /v1/models``, ``GET /health``.
A client that disconnects mid-stream cancels its generation.

Errors are HTTP errors wherever the status line is still unsent: a full generator is
429 with ``Retry-After`` (a stream waits for its first piece before it starts), a request
the model cannot take is 400, a failed generation 500. Only a failure after the first piece
of a stream can no longer change the status, and becomes an ``{"error": ...}`` event.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from aiohttp import web

from bot.errors import BadRequest, Busy, GenerationError
from bot.generators import ChatMessage, GenerationParams, Generator
from bot.generators.base import window_holds_reply

logger = logging.getLogger(__name__)

ROLES = {"system", "user", "assistant"}
MAX_BODY_BYTES = 8 * 1024 * 1024
RETRY_AFTER_S = 1
"""What a busy server asks clients to wait, in whole seconds as HTTP wants: about what a
short reply takes to free a slot."""


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
                    or not isinstance(item.get("content"), str | list):
                raise BadRequest("each message needs a role (system, user or assistant) and "
                                 "text content")
            messages.append(ChatMessage(item["role"], _text(item["content"])))
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


def _text(content: str | list[Any]) -> str:
    """A message's text: a string, or a list of text parts as OpenAI clients send it."""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text":
            raise BadRequest(f"only text content parts are supported, not {kind or part!r}")
        if not isinstance(part.get("text"), str):
            raise BadRequest("a text content part needs its text as a string")
        texts.append(part["text"])
    # Parts are joined a line apart, as vLLM does, so two parts never run into one word.
    return "\n".join(texts)


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
        # The process answering says little; the generator knows whether its scheduler
        # is alive and stepping.
        trouble = self._generator.health()
        if trouble is not None:
            return web.json_response({"status": "unavailable", "reason": trouble}, status=503)
        return web.json_response({"status": "ok"})

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self._model_name, "object": "model", "created": 0, "owned_by": "chinwag"}]})

    def _authorised(self, request: web.Request) -> bool:
        if self._api_key is None:
            return True
        # Constant time, so the key cannot be guessed a character at a time from timings.
        # Bytes, since compare_digest refuses non-ASCII str; surrogateescape keeps the
        # header's undecodable bytes as they came.
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        return hmac.compare_digest(given, f"Bearer {self._api_key}".encode())

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request):
            return _error(401, "invalid API key", "invalid_api_key")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not valid JSON", "invalid_request_error")
        try:
            completion = CompletionRequest.parse(body, self._default_max_tokens)
        except BadRequest as exc:
            return _error(400, str(exc), "invalid_request_error")
        # Tokenizing a body of up to 8 MB takes a while: not on the loop, which serves
        # every other stream meanwhile.
        prompt_tokens = await asyncio.to_thread(self._prompt_tokens, completion.messages)
        window = self._generator.context_window
        # An encoder-decoder model's window is its encoder's input: the reply is not in it.
        wanted = completion.params.max_new_tokens if window_holds_reply(self._generator) else 0
        if window is not None and prompt_tokens + wanted > window:
            asked, remedy = (f" and max_tokens asks for up to {wanted} more",
                             " or lower max_tokens") if wanted else ("", "")
            return _error(400, f"the messages take {prompt_tokens} tokens{asked}, over the "
                               f"model's context window of {window}; shorten the "
                               f"messages{remedy}",
                          "invalid_request_error", code="context_length_exceeded")
        if completion.stream:
            return await self._stream(request, completion)
        try:
            text = "".join([p async for p in self._pieces(completion)])
        except Busy as exc:
            return _busy(exc)
        except GenerationError as exc:
            return _error(500, str(exc), "server_error")
        reply_tokens = await asyncio.to_thread(self._reply_tokens, text)
        return web.json_response({
            "id": _completion_id(), "object": "chat.completion", "created": int(time.time()),
            "model": self._model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": _finish_reason(completion, reply_tokens)}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": reply_tokens,
                      "total_tokens": prompt_tokens + reply_tokens},
        })

    def _pieces(self, completion: CompletionRequest) -> AsyncIterator[str]:
        return self._generator.stream(list(completion.messages), completion.params)

    async def _stream(self, request: web.Request,
                      completion: CompletionRequest) -> web.StreamResponse:
        pieces = self._pieces(completion)
        try:
            return await self._write_stream(request, completion, pieces)
        finally:
            # Closing the generator's stream cancels its generation: the client went
            # away, the generation failed, or the reply is complete (then a no-op).
            close = getattr(pieces, "aclose", None)
            if close is not None:
                await close()

    async def _write_stream(self, request: web.Request, completion: CompletionRequest,
                            pieces: AsyncIterator[str]) -> web.StreamResponse:
        # The first piece comes before the status line, so that a full generator or a
        # failed start is an HTTP error the client can act on, not a 200 with an event.
        try:
            first = await anext(pieces, None)
        except Busy as exc:
            return _busy(exc)
        except GenerationError as exc:
            return _error(500, str(exc), "server_error")
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        completion_id, created = _completion_id(), int(time.time())

        def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
            event = {"id": completion_id, "object": "chat.completion.chunk",
                     "created": created, "model": self._model_name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return f"data: {json.dumps(event)}\n\n".encode()

        parts: list[str] = []
        try:
            await response.prepare(request)
            await response.write(chunk({"role": "assistant"}))
            if first is not None:
                parts.append(first)
                await response.write(chunk({"content": first}))
                async for piece in pieces:
                    parts.append(piece)
                    await response.write(chunk({"content": piece}))
        except GenerationError as exc:
            error = {"error": {"message": str(exc), "type": "server_error"}}
            await response.write(f"data: {json.dumps(error)}\n\n".encode())
            return response
        except ConnectionResetError:
            logger.info("serve: client disconnected mid-stream")
            return response
        reply_tokens = await asyncio.to_thread(self._reply_tokens, "".join(parts))
        await response.write(chunk({}, _finish_reason(completion, reply_tokens)))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    def _prompt_tokens(self, messages: tuple[ChatMessage, ...]) -> int:
        """The prompt's length as the model sees it (blocking: run it off the loop)."""
        return self._generator.prompt_overhead + sum(
            self._generator.count_tokens(m.role, m.content) for m in messages)

    def _reply_tokens(self, text: str) -> int:
        """Tokens of the reply's content, without the template around it (blocking: run it
        off the loop)."""
        return max(0, self._generator.count_tokens("assistant", text)
                   - self._generator.count_tokens("assistant", ""))


def _finish_reason(completion: CompletionRequest, reply_tokens: int) -> str:
    return "length" if reply_tokens >= completion.params.max_new_tokens else "stop"


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def _error(status: int, message: str, kind: str, *, code: str | None = None,
           headers: dict[str, str] | None = None) -> web.Response:
    error = {"message": message, "type": kind, "code": code}
    return web.json_response({"error": error}, status=status, headers=headers)


def _busy(exc: Busy) -> web.Response:
    """429 with ``Retry-After``: the client may try again (Chinwag's own client does)."""
    logger.info("serve: busy, asked a client to come back in %s s", RETRY_AFTER_S)
    return _error(429, str(exc), "rate_limit_error", code="server_busy",
                  headers={"Retry-After": str(RETRY_AFTER_S)})
