"""``CHINWAG_WORKERS=auto``: how many scheduler processes run the model on a CPU.

One process whose matrix products use every core, or ``k`` processes using ``cores / k``
each: which is faster depends on how well this CPU's products of the model's shape spread
over threads, which differs from machine to machine. So it is measured at start-up: for
each candidate ``k`` (1, 2, 4… while ``k`` copies of the model fit in half the free
memory), a decoding-sized product (16 rows × the model's hidden size, by its MLP's width)
timed with ``cores / k`` threads, times ``k``. More processes must win by ``MARGIN`` per
doubling, for each costs a copy of the model and splits the batch. About 0.2 s, in rounds
(best of each: a shared machine is noisy); run it on a
thread that exits (``torch_threads.in_own_thread``), as its OpenMP team must not outlive it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

MARGIN = 1.15
ROWS = 16
MEASURE_S = 0.02
"""Timing per thread count and round, after a warm-up."""
ROUNDS = 3


@dataclass(frozen=True)
class WorkerChoice:
    processes: int
    threads: int
    """torch threads in each process."""
    rates: dict[int, float]
    """Products a second, all processes together, by process count: what was measured."""


def choose(config: Any, dtype: Any, cores: int) -> WorkerChoice:
    import torch

    hidden = int(getattr(config, "hidden_size", 0) or getattr(config, "d_model", 0) or 1024)
    width = int(getattr(config, "intermediate_size", 0) or 4 * hidden)
    layers = int(getattr(config, "num_hidden_layers", 0) or 12)
    vocab = int(getattr(config, "vocab_size", 0) or 32000)
    # A rough size (attention and MLP weights, embeddings): only to keep copies in memory.
    model_bytes = (layers * (4 * hidden * hidden + 3 * hidden * width) + vocab * hidden) \
        * torch.empty((), dtype=dtype).element_size()
    room = _free_memory() // 2
    candidates = [k for k in (1, 2, 4, 8, 16, 32, 64)
                  if k <= cores and cores % k == 0 and (k == 1 or k * model_bytes <= room)]
    x = torch.randn(ROWS, hidden, dtype=dtype)
    w = torch.randn(width, hidden, dtype=dtype)
    rates = dict.fromkeys(candidates, 0.0)
    try:
        for _round in range(ROUNDS):  # interleaved, best of each: a shared box is noisy
            for processes in candidates:
                torch.set_num_threads(cores // processes)  # this thread's own count
                rates[processes] = max(rates[processes], processes * _rate(x, w))
    finally:
        torch.set_num_threads(cores)
    best = 1
    for processes in candidates[1:]:
        doublings = processes.bit_length() - best.bit_length()
        if rates[processes] > rates[best] * MARGIN ** doublings:
            best = processes
    return WorkerChoice(best, cores // best, rates)


def _rate(x: Any, w: Any) -> float:
    import torch

    with torch.inference_mode():
        for _ in range(3):
            torch.nn.functional.linear(x, w)
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < MEASURE_S:
            torch.nn.functional.linear(x, w)
            count += 1
    return count / (time.perf_counter() - started)


def _free_memory() -> int:
    try:
        with open("/proc/meminfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages, size = os.sysconf("SC_AVPHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    return int(pages * size)
