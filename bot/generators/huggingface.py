"""The in-process ``transformers`` + ``torch`` generator.

The model is run by a continuous-batching scheduler thread (``scheduler.py``), so no
forward pass ever runs on the event loop and concurrent conversations share each step.
The scheduler streams token ids back and the loop decodes them incrementally, at a cost
per token that does not grow with the reply.

An encoder–decoder model (T5, BART…: its config says ``is_encoder_decoder``) is run by a
batcher of its own (``encoder_decoder.py``, always in this process) and prompted as
``encoder_prompt.py`` renders and fits; the streaming below is shared.

A request beyond the scheduler's limits is refused with ``Busy`` before its prompt is
tokenized. Prompts are rendered and tokenized off the loop with ``asyncio.to_thread``, each
on a thread of the loop's pool, so a long prompt holds up neither the loop nor another
request's prompt. They share the one tokenizer: a fast tokenizer is safe to use from
several threads as long as none changes its truncation or padding settings (the only
state its calls mutate, "Already borrowed" otherwise), and nothing here does: prompts,
counts and truncation all encode without truncation or padding.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from bot.errors import GenerationError, ModelUnavailable
from bot.generators import cpu_workers, model_files
from bot.generators.base import ChatMessage, GenerationParams
from bot.generators.encoder_decoder import EncoderDecoderScheduler, is_encoder_decoder
from bot.generators.encoder_prompt import EncoderPrompt
from bot.generators.engine import make_scheduler
from bot.generators.host_memory import free_memory
from bot.generators.reply_text import ReplyText, stream_reply
from bot.generators.scheduler import STALL_AFTER_S, BatchScheduler, Request, eos_ids
from bot.generators.stats import SchedulerStats
from bot.generators.tokens import TemplateCounter, TokenCounter
from bot.generators.torch_threads import in_own_thread, intra_op_threads
from bot.generators.workers import WorkerPool
from bot.i18n import N_

logger = logging.getLogger(__name__)

PREFIX_SHARE = 0.125
"""Of the host memory available at start-up, the most that finished conversations' keys and
values may take (``CHINWAG_PREFIX_CACHE_MB`` is the limit below that)."""


def native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there a bf16 model's
    matrix products run about 3x faster than fp32 (measured: a 16-row product, 105 µs
    against 304 µs on a 2-core Zen 4). Elsewhere bf16 is emulated, and slower than fp32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            flags = next((line for line in info if line.startswith("flags")), "").split()
    except OSError:  # not Linux: no way to tell cheaply, so the safe choice
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_device(setting: str, dtype: str = "auto") -> tuple[str, Any]:
    """``auto`` means CUDA where present, else the CPU. ``dtype`` ``auto``: bf16 on CUDA
    (fp16 where bf16 is not supported) and on a CPU with native bf16, else fp32."""
    import torch

    device = setting
    if setting == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelUnavailable("CHINWAG_DEVICE asks for CUDA, but torch sees no CUDA device")
        if dtype == "auto":
            return device, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return device, getattr(torch, dtype)
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelUnavailable("CHINWAG_DEVICE asks for mps, but torch sees no MPS device")
    if dtype == "auto":
        return device, torch.bfloat16 if device == "cpu" and native_bf16() else torch.float32
    return device, getattr(torch, dtype)


class TransformersGenerator:
    name = "transformers"

    def __init__(self, model: str, cache_dir: Path, device: str = "auto", *,
                 dtype: str = "auto", max_sequences: int = 32, max_queued: int = 256,
                 prefill_chunk: int = 512, workers: int | str = "auto",
                 prefix_cache_mb: int = 0, stall_after: float = STALL_AFTER_S) -> None:
        self._model_name = model
        self._cache_dir = cache_dir
        self._device_setting = device
        self._dtype_setting = dtype
        self._device: str | None = None
        self._limits = {"max_sequences": max_sequences, "max_queued": max_queued,
                        "prefill_chunk": prefill_chunk}
        self._stall_after = stall_after
        self._prefix_cache = prefix_cache_mb << 20
        """Bytes of finished conversations kept for their next turn (decoder-only models),
        at most ``PREFIX_SHARE`` of the host memory available when the model loads."""
        self._tokenizer: Any = None
        self._config: Any = None
        self._counter: TokenCounter | None = None
        self._encoder_prompt: EncoderPrompt | None = None
        """Set for an encoder–decoder model: how its prompts are rendered and fitted."""
        self._scheduler: BatchScheduler | WorkerPool | None = None
        self._workers = workers

    async def __aenter__(self) -> Self:
        device, dtype = pick_device(self._device_setting, self._dtype_setting)
        config = await asyncio.to_thread(model_files.load_config, self._model_name,
                                         self._cache_dir)
        if is_encoder_decoder(config):
            await self._load_encoder_decoder(device, dtype)
        else:
            await self._load_decoder(device, dtype)
        self._counter = self._encoder_prompt.counter if self._encoder_prompt is not None \
            else TemplateCounter(self._tokenizer, self._model_name)
        self._device = device
        return self

    async def _load_decoder(self, device: str, dtype: Any) -> None:
        """A decoder-only model: in this process, or on a CPU in worker processes when
        ``CHINWAG_WORKERS`` says so or, for ``auto``, when they measure faster here
        (``cpu_workers.py``, measured with the model loaded here)."""
        cores = intra_op_threads()
        processes = 1 if device != "cpu" or self._workers == "auto" else int(self._workers)
        threads = cores if processes == 1 else 1
        model = None
        if processes == 1:
            self._tokenizer, model = await in_own_thread(
                model_files.load, self._model_name, self._cache_dir, device, dtype)
            self._config = model.config
            if device == "cpu" and self._workers == "auto":
                choice = await in_own_thread(cpu_workers.choose, model, cores)
                logger.info("CHINWAG_WORKERS=auto: %d scheduler process(es) of %d thread(s) "
                            "(measured, rows a second by processes: %s)", choice.processes,
                            choice.threads, {k: round(v) for k, v in choice.rates.items()})
                processes, threads = choice.processes, choice.threads
                if processes > 1:
                    model = None  # the workers load their own copies
        budget = min(self._prefix_cache, int(free_memory() * PREFIX_SHARE))
        if budget < self._prefix_cache:
            logger.info("CHINWAG_PREFIX_CACHE_MB=%d: %d MiB kept at most, %.0f%% of the "
                        "memory available", self._prefix_cache >> 20, budget >> 20,
                        100 * PREFIX_SHARE)
        if model is not None:
            scheduler = make_scheduler(model, eos_ids=eos_ids(model), threads=threads,
                                       stall_after=self._stall_after,
                                       prefix_cache_bytes=budget, **self._limits)
            await asyncio.to_thread(scheduler.start)  # waits while it prepares (graphs)
            self._scheduler = scheduler
            return
        if self._tokenizer is None:  # the workers load the model; this process tokenizes
            self._tokenizer, self._config = await asyncio.to_thread(
                model_files.load_tokenizer, self._model_name, self._cache_dir)
        pool = WorkerPool(self._model_name, self._cache_dir, processes,
                          dtype=str(dtype).removeprefix("torch."), threads=threads,
                          stall_after=self._stall_after,
                          prefix_cache_bytes=budget, **self._limits)
        await asyncio.to_thread(pool.start)
        self._scheduler = pool

    async def _load_encoder_decoder(self, device: str, dtype: Any) -> None:
        """T5, BART and the like (``encoder_decoder.py``), always in this process: the
        worker processes run the decoder-only scheduler."""
        if self._workers not in ("auto", 1):
            logger.info("model %s is an encoder-decoder model: it runs in this process "
                        "(CHINWAG_WORKERS=%s applies to decoder-only models)",
                        self._model_name, self._workers)
        self._tokenizer, model = await in_own_thread(
            model_files.load, self._model_name, self._cache_dir, device, dtype)
        self._config = model.config
        self._encoder_prompt = EncoderPrompt(self._tokenizer, model.config, self._model_name)
        scheduler = EncoderDecoderScheduler(model, eos_ids=eos_ids(model),
                                            stall_after=self._stall_after, **self._limits)
        scheduler.start()
        self._scheduler = scheduler
        logger.info("model %s is an encoder-decoder model: prompts use %s, at most %s tokens",
                    self._model_name, self._encoder_prompt.rendering, self._encoder_prompt.limit)

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._scheduler is not None:
            scheduler, self._scheduler = self._scheduler, None
            await asyncio.to_thread(scheduler.stop)

    @property
    def scheduler(self) -> BatchScheduler | WorkerPool | None:
        return self._scheduler

    @property
    def device(self) -> str | None:
        """Where the model runs (``cpu``, ``cuda``…), once it is loaded."""
        return self._device

    def health(self) -> str | None:
        if self._scheduler is None:
            return "the model is not loaded"
        return self._scheduler.health()

    def scheduler_stats(self) -> SchedulerStats | None:
        """Its scheduler's (or worker pool's) stats, while the model is loaded."""
        scheduler = self._scheduler
        return None if scheduler is None else scheduler.stats()

    @property
    def context_window(self) -> int | None:
        """The longest prompt plus reply; for an encoder–decoder model, the encoder's
        input (the reply is the decoder's: ``window_holds_reply`` is false)."""
        if self._encoder_prompt is not None:
            return self._encoder_prompt.limit
        window = getattr(self._config, "max_position_embeddings", None)
        # On CUDA the slot engine's rows may be shorter, where memory allowed no more.
        rows = getattr(self._scheduler, "window", None)
        if window and isinstance(rows, int):
            return min(int(window), rows)
        return int(window) if window else None

    @property
    def window_holds_reply(self) -> bool:
        return self._encoder_prompt is None

    @property
    def prompt_overhead(self) -> int:
        assert self._counter is not None, "the model is not loaded"
        return self._counter.prompt_overhead

    def count_tokens(self, role: str, text: str) -> int:
        assert self._counter is not None, "the model is not loaded"
        return self._counter.count(role, text)

    def truncate(self, text: str, max_tokens: int) -> str:
        assert self._counter is not None, "the model is not loaded"
        return self._counter.truncate(text, max_tokens)

    def prompt_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The prompt's token ids. Blocking (the template and the tokenizer take
        milliseconds per thousand tokens): ``stream`` calls it on a thread."""
        if self._encoder_prompt is not None:
            return self._encoder_prompt.ids(messages)
        rendered = self._tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(rendered["input_ids"])

    async def stream(self, messages: Sequence[ChatMessage], params: GenerationParams, *,
                     ignore_eos: bool = False) -> AsyncIterator[str]:
        scheduler = self._scheduler
        if scheduler is None:
            raise GenerationError(N_("the model is not loaded"))
        scheduler.ensure_room()  # Busy at once when full, before tokenizing the prompt
        loop = asyncio.get_running_loop()
        tokens: asyncio.Queue[int | BaseException | None] = asyncio.Queue()

        def emit(item: int | BaseException | None) -> None:
            loop.call_soon_threadsafe(tokens.put_nowait, item)

        prompt = await asyncio.to_thread(self.prompt_ids, messages)
        if self._scheduler is not scheduler:  # shut down meanwhile
            raise GenerationError(N_("the model is shutting down"))
        request = Request(prompt, params, emit, ignore_eos=ignore_eos, loop=loop,
                          sink=tokens.put_nowait)
        # Busy still, when others took the last places while this prompt was tokenized.
        scheduler.submit(request)
        reply = ReplyText(self._tokenizer, params.stop)
        try:
            async with contextlib.aclosing(stream_reply(reply, tokens)) as pieces:
                async for piece in pieces:
                    yield piece
        finally:
            # Closing the stream early (a stop string, timeout, shutdown) frees the slot at
            # the scheduler's next step.
            request.cancelled.set()
