"""The classic seq2seq chat model (``bot.seq2seq``), trained with ``chinwag train seq2seq``.

The encoder reads the conversation's recent turns (the system prompt and persona do not
apply: the model was never trained with one), cut from the oldest end to the model's
maximum input length; the decoder writes the reply. Decoding runs on a small thread pool,
never on the event loop, on the CPU (``CHINWAG_DEVICE`` does not apply: a model this small,
decoding one token at a time, gains little from a GPU). Greedy decoding (``beam=1``,
the default) streams each token as it is chosen; beam search can only show the reply once
it has finished, and is not interrupted by a stop (it takes well under a second). Replies
are deterministic: temperature, top-p and the repetition penalty do not apply.

Token counts are the model's own: a message costs its tokens plus its role marker (a
system message costs nothing, since it is left out). There is no context window in the
sense of a decoder-only model: the input is cut here and the reply is at most the model's
``max_target_len`` tokens, so any prompt fits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from bot.errors import Busy, GenerationError
from bot.generators.base import ChatMessage, GenerationParams
from bot.generators.reply_text import ReplyText, stream_reply
from bot.i18n import N_
from bot.seq2seq import files
from bot.seq2seq.decoding import beam_search, greedy_steps
from bot.seq2seq.tokenizer import encoder_input

logger = logging.getLogger(__name__)

DECODING_THREADS = 2
SHUTTING_DOWN = N_("the model is shutting down")

T = TypeVar("T")


class Seq2SeqGenerator:
    name = "seq2seq"

    def __init__(self, model_dir: Path, *, beam: int = 1, max_requests: int = 64,
                 threads: int = DECODING_THREADS) -> None:
        self._dir = model_dir
        self._beam = max(1, beam)
        self._threads = max(1, threads)
        self._max_requests = max_requests
        self._active = 0
        self._saved: files.SavedModel | None = None
        self._pool: ThreadPoolExecutor | None = None

    async def __aenter__(self) -> Self:
        self._saved = await asyncio.to_thread(files.load, self._dir)
        self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="seq2seq")
        config = self._saved.model.config
        logger.info("seq2seq model %s loaded: %s %s, hidden %s, %s layer(s), %s tokens",
                    self._dir, "bidirectional" if config.bidirectional else "unidirectional",
                    config.cell, config.hidden, config.layers, config.vocab_size)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            # Jobs still waiting for a thread are dropped: their streams end with
            # SHUTTING_DOWN (see _in_pool and _greedy_reply) rather than wait for ever.
            await asyncio.to_thread(pool.shutdown, wait=True, cancel_futures=True)
        self._saved = None  # unloaded: the memory goes back (a pool of models may load another)

    def health(self) -> str | None:
        return None if self._pool is not None else "the model is not loaded"

    @property
    def context_window(self) -> int | None:
        return None

    @property
    def prompt_overhead(self) -> int:
        return 0

    def count_tokens(self, role: str, text: str) -> int:
        if role == "system":
            return 0
        return len(self._loaded().tokenizer.encode(text)) + 1

    def truncate(self, text: str, max_tokens: int) -> str:
        return self._loaded().tokenizer.head(text, max_tokens)

    def source_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The encoder's input: the newest turns that fit, system messages left out."""
        saved = self._loaded()
        turns = [(m.role, m.content) for m in messages if m.role != "system"]
        return encoder_input(saved.tokenizer, turns, saved.model.config.max_source_len)

    def _loaded(self) -> files.SavedModel:
        if self._saved is None:
            raise GenerationError("the model is not loaded")
        return self._saved

    async def stream(self, messages: Sequence[ChatMessage],
                     params: GenerationParams) -> AsyncIterator[str]:
        pool, saved = self._pool, self._saved
        if pool is None or saved is None:
            raise GenerationError("the model is not loaded")
        if self._active >= self._max_requests:
            raise Busy(f"{self._active} replies are being written")
        self._active += 1
        try:
            source = await _in_pool(pool, lambda: self.source_ids(messages))
            max_len = max(1, min(params.max_new_tokens, saved.model.config.max_target_len))
            reply = ReplyText(saved.tokenizer, params.stop)
            if self._beam > 1:
                async for piece in self._beam_reply(pool, source, max_len, reply):
                    yield piece
            else:
                async for piece in self._greedy_reply(pool, source, max_len, reply):
                    yield piece
        finally:
            self._active -= 1

    async def _beam_reply(self, pool: ThreadPoolExecutor, source: list[int], max_len: int,
                          reply: ReplyText) -> AsyncIterator[str]:
        saved = self._loaded()
        tokenizer = saved.tokenizer
        try:
            best = await _in_pool(pool, lambda: beam_search(
                saved.model, source, tokenizer.bos_id, tokenizer.eos_id, max_len, self._beam))
        except GenerationError:
            raise
        except Exception as exc:  # converted where it enters: the reply fails cleanly
            logger.exception("seq2seq beam search failed")
            raise GenerationError(f"decoding failed: {exc.__class__.__name__}: {exc}") from exc
        text = "".join(reply.add(token) for token in best.ids) + reply.end()
        if text:
            yield text

    async def _greedy_reply(self, pool: ThreadPoolExecutor, source: list[int], max_len: int,
                            reply: ReplyText) -> AsyncIterator[str]:
        saved = self._loaded()
        tokenizer = saved.tokenizer
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | BaseException | None] = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item: int | BaseException | None) -> None:
            loop.call_soon_threadsafe(tokens.put_nowait, item)

        def decode() -> None:
            try:
                steps = greedy_steps(saved.model, source, tokenizer.bos_id, tokenizer.eos_id,
                                     max_len)
                for count, (token, _) in enumerate(steps):
                    if cancelled.is_set() or token == tokenizer.eos_id or count == max_len:
                        break
                    emit(token)
                emit(None)
            except Exception as exc:  # converted where it enters: the reply fails cleanly
                logger.exception("seq2seq decoding failed")
                emit(GenerationError(f"decoding failed: {exc.__class__.__name__}: {exc}"))

        done = _submit(loop, pool, decode)

        def dropped(future: asyncio.Future[None]) -> None:
            # Dropped from the queue by the generator closing, decode never runs, so nothing
            # else would end the stream (an escaping BaseException would not either).
            if future.cancelled():
                tokens.put_nowait(GenerationError(SHUTTING_DOWN))
            elif future.exception() is not None:
                tokens.put_nowait(GenerationError(f"decoding failed: {future.exception()!r}"))

        done.add_done_callback(dropped)
        try:
            async with contextlib.aclosing(stream_reply(reply, tokens)) as pieces:
                async for piece in pieces:
                    yield piece
        finally:
            cancelled.set()  # a stop string, /stop or a timeout: the thread ends at its next step
            await asyncio.wait([done])  # not cancelled with the caller; its error is on tokens


def _submit(loop: asyncio.AbstractEventLoop, pool: ThreadPoolExecutor,
            call: Callable[[], T]) -> asyncio.Future[T]:
    try:
        return loop.run_in_executor(pool, call)
    except RuntimeError as exc:  # the pool has shut down: the generator is closing
        raise GenerationError(SHUTTING_DOWN) from exc


async def _in_pool(pool: ThreadPoolExecutor, call: Callable[[], T]) -> T:
    """``call`` on a decoding thread. Closing the generator while it waits for a thread
    is a GenerationError to the caller, not a CancelledError it did not ask for."""
    future = _submit(asyncio.get_running_loop(), pool, call)
    try:
        return await future
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():  # the caller was cancelled: let it end
            raise
        raise GenerationError(SHUTTING_DOWN) from None

