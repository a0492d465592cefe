"""The in-process ``transformers`` + ``torch`` generator.

One worker thread owns the model, so ``generate`` never runs on the event loop and
requests take turns on the device. The tokenizer is only used on the event-loop thread
(fast tokenizers are not safe to share across threads): the worker streams token ids back
and the loop decodes them.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from bot.errors import GenerationError, ModelUnavailable
from bot.generators import model_files
from bot.generators.base import ChatMessage, GenerationParams, cut_at_stop, held_back
from bot.generators.tokens import TemplateCounter

logger = logging.getLogger(__name__)

_DONE = object()


def pick_device(setting: str) -> tuple[str, Any]:
    """``auto`` means CUDA in bf16 where present, else the CPU in fp32."""
    import torch

    device = setting
    if setting == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelUnavailable("CHINWAG_DEVICE asks for CUDA, but torch sees no CUDA device")
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return device, dtype
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelUnavailable("CHINWAG_DEVICE asks for mps, but torch sees no MPS device")
    return device, torch.float32


class _TokenIdStreamer:
    """Hands generated token ids from the worker thread to the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
        self._loop = loop
        self._queue = queue
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt itself
            self._prompt_seen = True
            return
        self._loop.call_soon_threadsafe(self._queue.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, _DONE)


class TransformersGenerator:
    name = "transformers"

    def __init__(self, model: str, cache_dir: Path, device: str = "auto") -> None:
        self._model_name = model
        self._cache_dir = cache_dir
        self._device_setting = device
        self._executor: ThreadPoolExecutor | None = None
        self._tokenizer: Any = None
        self._model: Any = None
        self._counter: TemplateCounter | None = None

    async def __aenter__(self) -> Self:
        device, dtype = pick_device(self._device_setting)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="chinwag-model")
        loop = asyncio.get_running_loop()
        self._tokenizer, self._model = await loop.run_in_executor(
            self._executor, model_files.load, self._model_name, self._cache_dir, device, dtype
        )
        self._counter = TemplateCounter(self._tokenizer, self._model_name)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._model = None

    @property
    def context_window(self) -> int | None:
        config = getattr(self._model, "config", None)
        window = getattr(config, "max_position_embeddings", None)
        return int(window) if window else None

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

    def _generate(self, inputs: Any, params: GenerationParams, streamer: _TokenIdStreamer,
                  cancelled: threading.Event) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        sampling: dict[str, Any] = {"do_sample": False,
                                    "repetition_penalty": params.repetition_penalty}
        if params.temperature > 0:
            sampling.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
        try:
            with torch.inference_mode():
                self._model.generate(
                    **inputs.to(self._model.device),
                    max_new_tokens=params.max_new_tokens,
                    streamer=streamer,
                    stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                    pad_token_id=self._tokenizer.pad_token_id or self._tokenizer.eos_token_id,
                    **sampling,
                )
        except BaseException:
            streamer.end()
            raise

    async def stream(self, messages: Sequence[ChatMessage],
                     params: GenerationParams) -> AsyncIterator[str]:
        if self._executor is None:
            raise GenerationError("the model is not loaded")
        inputs = self._tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in messages],
            add_generation_prompt=True, return_tensors="pt", return_dict=True,
        )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()
        streamer = _TokenIdStreamer(loop, queue)
        job = loop.run_in_executor(self._executor, self._generate, inputs, params, streamer,
                                   cancelled)
        generated: list[int] = []
        emitted = ""
        text, stopped = "", False
        try:
            while (item := await queue.get()) is not _DONE:
                generated.extend(item)
                text = self._tokenizer.decode(generated, skip_special_tokens=True)
                if text.endswith("\ufffd"):  # half of a multi-byte character
                    continue
                text, stopped = cut_at_stop(text, params.stop)
                # Hold back what may be the start of a stop string.
                ready = text[:len(text) - (0 if stopped else held_back(text, params.stop))]
                if ready.startswith(emitted) and len(ready) > len(emitted):
                    yield ready[len(emitted):]
                    emitted = ready
                if stopped:
                    break
            if not stopped and text.startswith(emitted) and len(text) > len(emitted):
                yield text[len(emitted):]  # the held-back tail was no stop string after all
            cancelled.set()
            await job
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            # torch and transformers raise these (CUDA out of memory is a RuntimeError).
            if "out of memory" in str(exc).lower():
                raise GenerationError("the model ran out of memory") from exc
            raise GenerationError(f"generation failed: {exc}") from exc
        finally:
            # Closing the stream early (timeout, shutdown) stops the worker at the next token.
            cancelled.set()
