"""Timing requests that arrive over a window, shared by the generation benchmarks
(``generation.py``, ``encoder_decoder.py``): when each arrived, got its first token and
ended; one-at-a-time ``generate`` as the baseline; requests paced into a Chinwag scheduler;
running a strategy on a thread of its own; and loading the built-in model (``turns.py``,
``sampling.py``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Timing:
    arrived: float
    first: float = 0.0
    done: float = 0.0
    tokens: int = 0


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def arrivals(n: int, spread: float) -> list[float]:
    """When each of ``n`` requests arrives, evenly over ``spread`` seconds."""
    return [spread * i / max(1, n - 1) if n > 1 else 0.0 for i in range(n)]


def first_token(noted: Callable[[float], None]) -> Any:
    """A ``generate`` streamer that calls ``noted`` with the time of the first generated
    token (its first ``put`` hands over the prompt, or an encoder–decoder's start token)."""
    from transformers.generation.streamers import BaseStreamer

    class First(BaseStreamer):
        calls = 0

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls == 2:
                noted(time.perf_counter())

        def end(self) -> None:
            pass

    return First()


def run_sequential(model: Any, prompts: list[list[int]], tokens: int, spread: float,
                   **generate: Any) -> list[Timing]:
    """What most bots do: one ``generate`` at a time, in arrival order, each exactly
    ``tokens`` new tokens (``generate``: further arguments, such as ``pad_token_id``)."""
    import torch

    start = time.perf_counter()
    timings = [Timing(start + a) for a in arrivals(len(prompts), spread)]
    for ids, timing in zip(prompts, timings, strict=True):
        time.sleep(max(0.0, timing.arrived - time.perf_counter()))
        inputs = torch.tensor([ids], device=model.device)

        def noted(at: float, timing: Timing = timing) -> None:
            timing.first = at

        with torch.inference_mode():
            model.generate(inputs, attention_mask=torch.ones_like(inputs),
                           max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                           streamer=first_token(noted), **generate)
        timing.done, timing.tokens = time.perf_counter(), tokens
    return timings


def run_paced(scheduler: Any, prompts: Sequence[Sequence[int]], params: Any,
              spread: float) -> list[Timing]:
    """Submit each prompt to a Chinwag scheduler (or worker pool) as it arrives, EOS
    ignored, and wait for every reply; raises if any failed (a rate over failed replies
    would be no measurement)."""
    from bot.generators.scheduler import Request

    start = time.perf_counter()
    timings = [Timing(start + a) for a in arrivals(len(prompts), spread)]
    done = threading.Semaphore(0)
    errors: list[BaseException] = []

    def emitter(timing: Timing) -> Callable[[Any], None]:
        def emit(item: Any) -> None:
            if item is None or isinstance(item, BaseException):
                if item is not None:
                    errors.append(item)
                timing.done = time.perf_counter()
                done.release()
                return
            timing.tokens += 1
            if timing.tokens == 1:
                timing.first = time.perf_counter()
        return emit

    for ids, timing in zip(prompts, timings, strict=True):
        time.sleep(max(0.0, timing.arrived - time.perf_counter()))
        scheduler.submit(Request(ids, params, emitter(timing), ignore_eos=True))
    for _ in prompts:
        done.acquire()
    if errors:
        raise RuntimeError(f"{len(errors)} of Chinwag's requests failed: {errors[0]}")
    return timings


@dataclass
class Reply:
    tokens: list[int]
    ttft: float
    """Seconds from its submission to its first token."""


def replies(scheduler: Any, prompts: Sequence[Sequence[int]], params: Any, *,
            ignore_eos: bool = False, timeout: float = 600.0) -> list[Reply]:
    """Submit every prompt to a Chinwag scheduler at once; each one's reply, once all have
    ended. Raises if any failed or did not end within ``timeout``."""
    from bot.generators.scheduler import Request

    got = [Reply([], 0.0) for _ in prompts]
    ends = [threading.Event() for _ in prompts]
    errors: list[BaseException] = []

    def emitter(reply: Reply, end: threading.Event, submitted: float) -> Callable[[Any], None]:
        def emit(item: Any) -> None:
            if isinstance(item, int):
                if not reply.tokens:
                    reply.ttft = time.perf_counter() - submitted
                reply.tokens.append(item)
                return
            if item is not None:
                errors.append(item)
            end.set()
        return emit

    for ids, reply, end in zip(prompts, got, ends, strict=True):
        emit = emitter(reply, end, time.perf_counter())
        scheduler.submit(Request(ids, params, emit, ignore_eos=ignore_eos))
    for end in ends:
        if not end.wait(timeout=timeout):
            raise RuntimeError("a request never ended")
    if errors:
        raise RuntimeError(f"a request failed: {errors[0]}")
    return got


def isolated(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` on a thread of its own that exits when done, as Chinwag loads its
    model: a thread that ran torch and lives on keeps an OpenMP team that slows every other
    thread's matmuls (bot/generators/torch_threads.py), whichever strategy runs next."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, function(*args)))
        except BaseException as exc:  # re-raised on the calling thread
            outcome.append((False, exc))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def load_builtin() -> tuple[Any, Any]:
    """The built-in model on the CPU in Chinwag's own dtype choice: ``(tokenizer, model)``."""
    from bot.config import BUILTIN_MODEL
    from bot.generators import model_files
    from bot.generators.huggingface import pick_device

    _device, dtype = pick_device("cpu", "auto")
    return model_files.load(BUILTIN_MODEL, Path("~/.cache/chinwag").expanduser(), "cpu",
                            dtype)
