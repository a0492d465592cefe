"""Continuous batching: one scheduler thread owns the model and runs every conversation's
request in one batch, token by token.

``BatchScheduler`` is what every engine shares: the thread and its queue, the limits
(``Busy`` beyond them), health and stats, and a request's life from ``submit`` to its end:
its tokens recorded and emitted, each step's handed to each event loop in one call.
Requests join the batch between steps and leave the moment they finish or are cancelled.
How a step runs (where the KV cache lives, how prompts are prefilled) is a subclass's
``_step``:

- ``slot_scheduler.SlotScheduler``, over a slot KV cache: decoder-only models, by default;
- ``eager_scheduler.EagerScheduler``, over transformers' ``DynamicCache``: the decoder-only
  models the slot engine refuses (``engine.make_scheduler`` picks);
- ``encoder_decoder.EncoderDecoderScheduler``: encoder–decoder models.

Transformers' own continuous-batching manager is the benchmark's reference point
(``bench/generation.py``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bot.errors import Busy, GenerationError
from bot.generators.base import GenerationParams
from bot.generators.stats import SchedulerStats, StepMeter
from bot.generators.torch_threads import intra_op_threads, use_threads
from bot.i18n import N_

logger = logging.getLogger(__name__)

STALL_AFTER_S = 10.0
"""With work to do, a scheduler that has not finished a step for this long is unhealthy.
Generous: one prefill chunk of a larger model on a CPU takes seconds, and a health check
that fails a sound server gets it restarted for nothing."""

Emit = Callable[[int | BaseException | None], None]
"""Called with each new token id, then ``None`` at the end (or the exception that ended
the request)."""


def eos_ids(model: Any) -> list[int]:
    """The token ids that end a reply, from the model's generation config."""
    eos = model.generation_config.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@dataclass(eq=False)
class Request:
    prompt: Sequence[int]
    params: GenerationParams
    emit: Emit
    """Called from the scheduler's thread (or the worker pool's)."""
    ignore_eos: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    sink: Emit | None = None
    """When given with ``loop``: called on that loop instead of ``emit``, with one step's
    items for all of the loop's requests handed over in one ``call_soon_threadsafe``."""
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: list[int] = field(default_factory=list)
    prefilled: int = 0
    done: bool = False
    """Its end (or error) has been emitted."""
    cache: Any = None
    """A long prompt's cache while the eager path prefills it, a chunk per step."""
    seen: Any = None
    """Token ids seen so far, for the repetition penalty of the eager and encoder–decoder
    paths (the slot engine keeps its own, in ``sampling.Sampler``)."""
    row: int = -1
    """Its row in the slot engine's cache (``slot_scheduler.py``), once it has one."""


Chunk = tuple[Request, int, int]
"""Prompt tokens ``start…end-1`` of a request, prefilled in one step."""


class BatchScheduler(ABC):
    def __init__(self, model: Any, *, eos_ids: Sequence[int], max_sequences: int = 32,
                 max_queued: int = 256, prefill_chunk: int = 512,
                 stall_after: float = STALL_AFTER_S, threads: int | None = None) -> None:
        self._model = model
        self._threads = threads or intra_op_threads()
        """torch's CPU threads for the scheduler's thread (``torch_threads.py``)."""
        self._eos = set(eos_ids)
        self._max_sequences = max_sequences
        self._max_queued = max_queued
        self._prefill_chunk = prefill_chunk
        self._incoming: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self._waiting: list[Request] = []
        self._rows: list[Request] = []
        self._admitting: list[Request] = []
        """Prefilled, no longer waiting, not yet rows: in hand should a step fail."""
        self._count_lock = threading.Lock()
        self._count = 0
        self._open = False
        """Whether ``submit`` takes requests: from ``start`` until ``stop`` or the thread's
        death (under ``_count_lock``, so no request is queued to a thread that is gone)."""
        self._stall_after = stall_after
        self._stepped = time.monotonic()
        """When the thread last finished a step, or idle work last arrived."""
        self._died: str | None = None
        self._prepared = threading.Event()
        self._thread: threading.Thread | None = None
        self._running = 0
        """Rows in the batch after the last step (under ``_count_lock``)."""
        self._generated = 0
        self._meter = StepMeter()
        self._outbox: dict[asyncio.AbstractEventLoop, list[tuple[Emit, Any]]] = {}
        self.steps = 0
        """Decoding steps run."""
        self.graph_replays = 0
        """Of those, the ones that replayed a captured CUDA graph."""
        self.decode_seconds = 0.0
        """Wall time spent in decoding steps, host sync included."""
        self.max_batch = 0
        # For the subclasses that hand the model a cache (eager, encoder–decoder):
        # transformers 5.2x renamed `past_key_values` to `cache`; accept either release.
        self._cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters \
            else "past_key_values"

    # The event loop's side.

    def start(self) -> None:
        """Start the thread and wait until it has prepared (``_prepare``): allocated what it
        needs, on its own thread (see ``torch_threads.py``)."""
        self._open = True
        self._prepared = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chinwag-scheduler",
                                        daemon=True)
        self._thread.start()
        self._prepared.wait()
        if self._died is not None:
            self.stop()
            raise GenerationError(f"the model's scheduler could not start: {self._died}")

    def _prepare(self) -> None:  # noqa: B027 - a hook, empty unless a subclass needs one
        """Run first on the scheduler's thread, before any request."""

    def stop(self) -> None:
        with self._count_lock:
            self._open = False
        if self._thread is not None:
            self._incoming.put(None)
            self._thread.join(timeout=30)
            self._thread = None

    def ensure_room(self) -> None:
        """Raise ``Busy`` now if a request would be refused (``GenerationError`` when not
        running), so a caller refuses it before the work of tokenizing its prompt."""
        with self._count_lock:
            self._check_room()

    def _check_room(self) -> None:
        if not self._open:
            raise GenerationError(f"the model's scheduler is not running"
                                  f"{': ' + self._died if self._died else ''}")
        if self._count >= self._max_sequences + self._max_queued:
            raise Busy(N_("too many conversations at once; try again shortly"))

    def submit(self, request: Request) -> None:
        """Queue a request, or raise ``Busy`` at once when the scheduler is full."""
        with self._count_lock:
            self._check_room()
            if self._count == 0:
                self._stepped = time.monotonic()  # idle until now is not a stall
            self._count += 1
            self._incoming.put(request)

    def health(self) -> str | None:
        """``None`` while the thread runs and, with work to do, keeps stepping."""
        if self._died is not None:
            return f"the scheduler thread died: {self._died}"
        if self._thread is None or not self._thread.is_alive():
            return "the scheduler thread is not running"
        with self._count_lock:
            busy, idle = self._count > 0, time.monotonic() - self._stepped
        if busy and idle > self._stall_after:
            return f"the scheduler has not stepped for {idle:.0f} s with work queued"
        return None

    def stats(self) -> SchedulerStats:
        """What it holds now and has done so far (cheap: asked at every metrics scrape)."""
        with self._count_lock:
            held, running = self._count, self._running
        return self._meter.snapshot(waiting=max(0, held - running), running=running)

    # The scheduler thread.

    def _run(self) -> None:
        try:
            self._loop()
            self._flush()
        except Exception as exc:  # a bug or a broken emit: say so instead of hanging
            logger.exception("the scheduler thread died")
            self._died = f"{type(exc).__name__}: {exc}"
            with self._count_lock:
                self._open = False
                self._running = 0
            while True:
                try:
                    item = self._incoming.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    self._waiting.append(item)
            for request in self._held():
                try:
                    self._finish(request, GenerationError(N_("the model's scheduler stopped")))
                except Exception:
                    logger.exception("cannot tell a request that the scheduler stopped")
            self._flush()
        finally:
            self._prepared.set()  # a thread that died preparing must not hang start()

    def _loop(self) -> None:
        import torch

        use_threads(self._threads)
        with torch.inference_mode():
            self._prepare()
            self._prepared.set()
            while True:
                if not self._rows and not self._waiting:
                    item = self._incoming.get()
                    if item is None:
                        return
                    self._waiting.append(item)
                while True:
                    try:
                        item = self._incoming.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        self._fail_all(GenerationError(N_("the model is shutting down")))
                        return
                    self._waiting.append(item)
                started, generated, reused = time.monotonic(), self._generated, self._reused()
                try:
                    self._step()
                except Exception as exc:  # torch raises RuntimeError for OOM and the like
                    logger.exception("scheduler step failed")
                    message = N_("the model ran out of memory") if "out of memory" in \
                        str(exc).lower() else f"generation failed: {exc}"
                    self._fail_all(GenerationError(message))
                self._flush()
                now = time.monotonic()
                self._meter.record(now - started, self._generated - generated,
                                   self._reused() - reused)
                with self._count_lock:
                    self._stepped = now
                    self._running = len(self._rows)

    def _reused(self) -> int:
        """Prompt tokens so far whose keys and values were copied, not computed."""
        return 0

    def _finish(self, request: Request, outcome: BaseException | None = None) -> None:
        request.cache = None
        request.done = True
        with self._count_lock:
            self._count -= 1
        self._emit(request, outcome)

    def _emit(self, request: Request, item: int | BaseException | None) -> None:
        if request.loop is None or request.sink is None:
            request.emit(item)
        else:
            self._outbox.setdefault(request.loop, []).append((request.sink, item))

    def _flush(self) -> None:
        """Hand each loop what its requests got since the last flush, in one call."""
        outbox, self._outbox = self._outbox, {}
        for loop, items in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # its loop is closed: nobody is listening any more
                logger.warning("an event loop closed with %d replies streaming", len(
                    {id(sink) for sink, _item in items}))

    def _held(self) -> list[Request]:
        """Every request taken in and not finished: running, waiting, or being admitted."""
        return [r for r in dict.fromkeys([*self._rows, *self._waiting, *self._admitting])
                if not r.done]

    def _fail_all(self, error: BaseException) -> None:
        """End every request held with ``error`` and empty the batch (a subclass empties
        its own state too)."""
        for request in self._held():
            self._finish(request, error)
        self._rows, self._waiting, self._admitting = [], [], []

    @abstractmethod
    def _step(self) -> None:
        """One step of the batch, run while the thread holds requests: admit what fits of
        ``_waiting`` (minus the ``_dropped``) into ``_rows``, give each row its next token
        and ``_accept`` it. An exception fails every request held (``_fail_all``)."""

    def _chunks(self, start: Callable[[Request], int] | None = None) -> list[Chunk]:
        """This step's prompt chunks, ``(request, start, end)``: the head's next chunk when
        it is long or part prefilled, else the short prompts at the head of the queue that
        fit the chunk budget and the free rows. ``start``: where a request's prompt goes on
        from (by default what it has prefilled; the slot engine's may begin past a parked
        conversation's tokens)."""
        start = start or _prefilled
        free = self._max_sequences - len(self._rows)
        if not self._waiting or free <= 0:
            return []
        head = self._waiting[0]
        first = start(head)
        if head.prefilled or len(head.prompt) - first > self._prefill_chunk:
            return [(head, first, min(len(head.prompt), first + self._prefill_chunk))]
        chunks: list[Chunk] = []
        budget = self._prefill_chunk
        for request in self._waiting:
            if len(chunks) == free or request.prefilled:
                break
            first = start(request)  # asked only of a request that may join
            if len(request.prompt) - first > budget:
                break
            chunks.append((request, first, len(request.prompt)))
            budget -= len(request.prompt) - first
        return chunks

    def _dropped(self, request: Request) -> bool:
        if request.cancelled.is_set():
            self._finish(request)
            return True
        return False

    def _accept(self, request: Request, token: int) -> bool:
        """Record and emit a token; whether the request goes on."""
        import torch

        request.generated.append(token)
        self._generated += 1
        if request.seen is not None and token not in request.seen:
            request.seen = torch.cat([request.seen, request.seen.new_tensor([token])])
        ended = (token in self._eos and not request.ignore_eos)
        if not ended:
            self._emit(request, token)
        if ended or len(request.generated) >= request.params.max_new_tokens \
                or request.cancelled.is_set():
            self._finish(request)
            return False
        return True


def _prefilled(request: Request) -> int:
    return request.prefilled


def _deliver(items: list[tuple[Emit, Any]]) -> None:
    for sink, item in items:
        try:
            sink(item)
        except Exception:  # one broken stream must not starve the others in this batch
            logger.exception("cannot deliver a token to a stream")
