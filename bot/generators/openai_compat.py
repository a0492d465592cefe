"""Any OpenAI-compatible server (vLLM, TGI, Ollama, ``transformers serve``, ``chinwag
serve``) as a generator: streaming chat completions over one pooled HTTP client.

Faults before the first token (429, 5xx, a refused connection, an ``{"error": ...}`` event
inside a 200 stream, as some servers report being busy) are retried with backoff,
honouring ``Retry-After``; after the first token there is no retrying (the user has seen
part of the reply), so a cut stream or a stall becomes a clear ``GenerationError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from bot.errors import GenerationError, ModelUnavailable
from bot.generators.base import ChatMessage, GenerationParams, cut_at_stop, held_back
from bot.generators.tokens import EstimateCounter, TemplateCounter, TokenCounter
from bot.i18n import N_

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 4
BACKOFF_S = (0.5, 1.0, 2.0)
MAX_RETRY_AFTER_S = 30.0
CONNECT_TIMEOUT_S = 10.0
CHUNK_TIMEOUT_S = 60.0
"""Longest wait for the next piece of a stream (or the first, while a server is busy)."""
POOL = httpx.Limits(max_connections=256, max_keepalive_connections=64)
_RETRYABLE = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """An ``{"error": ...}`` event in a stream: the server failed after answering 200."""

    message: str


def local_counter(model: str) -> TokenCounter:
    """The model's own tokenizer when ``model`` is a local folder (or a hub id already in
    the local cache); the estimate otherwise."""
    try:
        from transformers import AutoTokenizer

        folder = Path(model).expanduser()
        source = str(folder) if folder.is_dir() else model
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except Exception as exc:  # any failure here just means "no tokenizer at hand"
        logger.info("no local tokenizer for %s (%s); estimating token counts", model,
                    exc.__class__.__name__)
        return EstimateCounter()
    return TemplateCounter(tokenizer, model)


class OpenAIGenerator:
    name = "openai"

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *,
                 counter: TokenCounter | None = None,
                 chunk_timeout: float = CHUNK_TIMEOUT_S) -> None:
        self._base_url = base_url.rstrip("/")
        self._model = model
        self._api_key = api_key
        self._counter = counter
        self._chunk_timeout = chunk_timeout
        self._client: httpx.AsyncClient | None = None
        self._repetition_penalty = True
        """Sent until the server refuses the field (vLLM and TGI take it; strict servers
        such as `transformers serve` answer 422)."""

    async def __aenter__(self) -> Self:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self._base_url, headers=headers, limits=POOL,
            timeout=httpx.Timeout(self._chunk_timeout, connect=CONNECT_TIMEOUT_S))
        if self._counter is None:
            self._counter = await asyncio.to_thread(local_counter, self._model)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def health(self) -> str | None:
        return None

    @property
    def context_window(self) -> int | None:
        return None  # the server knows; CHINWAG_CONTEXT_TOKENS is the budget

    @property
    def prompt_overhead(self) -> int:
        return self._count.prompt_overhead

    @property
    def _count(self) -> TokenCounter:
        if self._counter is None:
            raise ModelUnavailable("the OpenAI-compatible generator is not opened")
        return self._counter

    def count_tokens(self, role: str, text: str) -> int:
        return self._count.count(role, text)

    def truncate(self, text: str, max_tokens: int) -> str:
        return self._count.truncate(text, max_tokens)

    def _request(self, messages: Sequence[ChatMessage],
                 params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self._model, "stream": True,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "max_tokens": params.max_new_tokens, "temperature": params.temperature,
            "top_p": params.top_p,
        }
        if params.repetition_penalty != 1.0 and self._repetition_penalty:
            body["repetition_penalty"] = params.repetition_penalty
        if params.stop:
            body["stop"] = list(params.stop)
        return body

    async def stream(self, messages: Sequence[ChatMessage],
                     params: GenerationParams) -> AsyncIterator[str]:
        if self._client is None:
            raise GenerationError(N_("the model server client is not open"))
        emitted = ""
        for attempt in range(MAX_ATTEMPTS):
            body = self._request(messages, params)
            # Retries happen only while nothing is shown, so text held back by a failed
            # attempt was never the user's: each attempt starts from what they saw.
            held = ""
            try:
                async with self._client.stream("POST", "/chat/completions",
                                               json=body) as response, \
                        contextlib.aclosing(self._pieces(response)) as pieces:
                    if response.status_code != 200:
                        delay = await self._refusal(response, attempt)
                        await asyncio.sleep(delay)
                        continue
                    failure: ErrorEvent | None = None
                    async for piece in pieces:
                        if isinstance(piece, ErrorEvent):
                            failure = piece
                            break
                        text, stopped = cut_at_stop(emitted + held + piece, params.stop)
                        # Hold back what may be the start of a stop string.
                        ready = len(text) - (0 if stopped else held_back(text, params.stop))
                        if ready > len(emitted):
                            yield text[len(emitted):ready]
                            emitted = text[:ready]
                        held = text[len(emitted):]
                        if stopped:
                            return
                    if failure is None:
                        if held:
                            yield held
                        return
                # Waited out with the failed stream closed, not holding its connection.
                await asyncio.sleep(self._failed_stream(failure, attempt, emitted))
            except httpx.TimeoutException as exc:
                if emitted or attempt == MAX_ATTEMPTS - 1:
                    raise GenerationError(N_("the model server stopped answering")) from exc
                await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
            except (httpx.TransportError, httpx.StreamError) as exc:
                if emitted:
                    raise GenerationError(N_("the model server cut the reply short")) from exc
                if attempt == MAX_ATTEMPTS - 1:
                    raise GenerationError(f"cannot reach the model server ({exc})") from exc
                delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                logger.info("model server unreachable (%s); retrying in %s s", exc, delay)
                await asyncio.sleep(delay)
        raise GenerationError(N_("the model server is busy"))

    async def _refusal(self, response: httpx.Response, attempt: int) -> float:
        """How long to wait before retrying a refused request; raises if it is final."""
        detail = (await response.aread()).decode(errors="replace")[:200]
        status = response.status_code
        if status in {400, 422} and "repetition_penalty" in detail and self._repetition_penalty:
            logger.info("the model server does not take repetition_penalty; sending without")
            self._repetition_penalty = False
            return 0.0
        if status not in _RETRYABLE or attempt == MAX_ATTEMPTS - 1:
            reason = N_("the model server is busy") if status == 429 else \
                f"the model server answered {status}"
            logger.warning("model server refused a request: %s %s", status, detail)
            raise GenerationError(reason)
        try:
            delay = float(response.headers.get("retry-after", ""))
        except ValueError:
            delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
        logger.info("model server answered %s; retrying in %s s", status, delay)
        return min(delay, MAX_RETRY_AFTER_S)

    def _failed_stream(self, event: ErrorEvent, attempt: int, emitted: str) -> float:
        """How long to wait before retrying a stream that reported an error; raises if the
        user has seen part of the reply or this was the last attempt."""
        if emitted or attempt == MAX_ATTEMPTS - 1:
            raise GenerationError(f"the model server failed: {event.message}")
        delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
        logger.info("model server reported an error before the first token (%s); "
                    "retrying in %s s", event.message, delay)
        return delay

    async def _pieces(self, response: httpx.Response) -> AsyncGenerator[str | ErrorEvent, None]:
        """The content pieces of a server-sent-events stream; ends at ``[DONE]`` or after
        an ``ErrorEvent``."""
        finished = False
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                chunk = json.loads(data)
            except ValueError as exc:
                raise GenerationError(N_("the model server sent a malformed stream")) from exc
            if "error" in chunk:
                error = chunk["error"]
                message = error.get("message") if isinstance(error, dict) else None
                yield ErrorEvent(str(message or error)[:500])
                return
            for choice in chunk.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    yield content
                finished = finished or bool(choice.get("finish_reason"))
        if not finished:
            raise httpx.StreamError("the stream ended without [DONE]")
