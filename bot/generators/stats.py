"""What a batch scheduler has done, for the metrics: a meter its thread writes after each
step, and the snapshot anyone reads from it (picklable, so a worker process sends it to
the parent in its heartbeat)."""

from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

STEP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Upper bounds of the step-time histogram: a small model's decoding step on a GPU takes
milliseconds, a prefill chunk of a larger one on a CPU seconds."""
RATE_WINDOW_S = 10.0
"""Tokens per second are those generated over this many seconds, divided by it."""


@dataclass(frozen=True, slots=True)
class SchedulerStats:
    """A scheduler's work at one moment: gauges (``waiting``, ``running``,
    ``tokens_per_second``) and counters since it started (the rest)."""

    waiting: int = 0
    """Requests taken and not generating yet (queued, or their prompt being prefilled)."""
    running: int = 0
    """Sequences in the batch."""
    steps: int = 0
    tokens: int = 0
    """Tokens generated."""
    step_seconds: float = 0.0
    """Time spent in steps, in all."""
    step_buckets: tuple[int, ...] = (0,) * (len(STEP_BUCKETS_S) + 1)
    """Steps per bucket of ``STEP_BUCKETS_S``, the last one past every bound (not
    cumulative)."""
    tokens_per_second: float = 0.0
    prompt_tokens_reused: int = 0
    """Prompt tokens whose keys and values came from a finished conversation
    (``prefix_cache.py``) instead of being computed."""

    def __add__(self, other: SchedulerStats) -> SchedulerStats:
        """Two schedulers' work together (a pool's workers)."""
        return SchedulerStats(
            waiting=self.waiting + other.waiting, running=self.running + other.running,
            steps=self.steps + other.steps, tokens=self.tokens + other.tokens,
            step_seconds=self.step_seconds + other.step_seconds,
            step_buckets=tuple(a + b for a, b in zip(self.step_buckets, other.step_buckets,
                                                     strict=True)),
            tokens_per_second=self.tokens_per_second + other.tokens_per_second,
            prompt_tokens_reused=self.prompt_tokens_reused + other.prompt_tokens_reused)

    def counters(self) -> SchedulerStats:
        """Only what it did (a worker that died does not wait or run anything)."""
        return SchedulerStats(steps=self.steps, tokens=self.tokens,
                              step_seconds=self.step_seconds, step_buckets=self.step_buckets,
                              prompt_tokens_reused=self.prompt_tokens_reused)


class StepMeter:
    """Counts a scheduler's steps; ``record`` from its thread, ``snapshot`` from any."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._steps = 0
        self._tokens = 0
        self._seconds = 0.0
        self._buckets = [0] * (len(STEP_BUCKETS_S) + 1)
        self._recent: deque[tuple[float, int]] = deque()
        """``(when, tokens)`` of the steps within the rate window that made tokens."""
        self._recent_tokens = 0
        self._reused = 0

    def record(self, seconds: float, tokens: int, reused: int = 0) -> None:
        now = self._clock()
        with self._lock:
            self._steps += 1
            self._tokens += tokens
            self._reused += reused
            self._seconds += seconds
            self._buckets[bisect.bisect_left(STEP_BUCKETS_S, seconds)] += 1
            if tokens:
                self._recent.append((now, tokens))
                self._recent_tokens += tokens
            self._forget(now)

    def snapshot(self, *, waiting: int, running: int) -> SchedulerStats:
        with self._lock:
            self._forget(self._clock())
            return SchedulerStats(
                waiting=waiting, running=running, steps=self._steps, tokens=self._tokens,
                step_seconds=self._seconds, step_buckets=tuple(self._buckets),
                tokens_per_second=self._recent_tokens / RATE_WINDOW_S,
                prompt_tokens_reused=self._reused)

    def _forget(self, now: float) -> None:
        while self._recent and self._recent[0][0] <= now - RATE_WINDOW_S:
            self._recent_tokens -= self._recent.popleft()[1]
