"""``CHINWAG_WORKERS=auto``: how many scheduler processes run the model on a CPU.

One process whose products use every core, or ``k`` processes using ``cores / k`` each:
which is faster depends on the CPU, its memory bandwidth and the model. So it is measured
at start-up, with the model itself: for each candidate ``k`` (1, 2, 4, 8 dividing the
cores, while ``k`` copies fit in half the free memory), ``k`` threads at once, each with
``cores / k`` torch threads, run decoding-sized forwards of their share of ``ROWS`` rows;
the rows a second add up. (Matrix products alone mislead: on this project's 2-core box
they favoured 2 processes by 1.2-1.5x, while the benchmark ran one process of 2 threads
faster every time, 237-376 against 188-320 tok/s in bf16.) The threads share one copy of
the weights and the GIL, which favours one process; more processes must also win by
``MARGIN`` per doubling, for each costs a copy of the model. Interleaved rounds, best of
each (a shared machine is noisy); under a second for a small model. Run it on a thread
that exits (``torch_threads.in_own_thread``): its OpenMP teams must not outlive it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from bot.generators.host_memory import free_memory
from bot.generators.torch_threads import use_threads

logger = logging.getLogger(__name__)

MARGIN = 1.15
ROWS = 16
FORWARDS = 3
"""Forwards per thread, per round, after one to warm up."""
ROUNDS = 2
MAX_PROCESSES = 8


@dataclass(frozen=True)
class WorkerChoice:
    processes: int
    threads: int
    """torch threads in each process."""
    rates: dict[int, float]
    """Rows a second, all processes together, by process count: what was measured."""


def choose(model: Any, cores: int) -> WorkerChoice:
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    room = free_memory() // 2
    candidates = [k for k in (1, 2, 4, 8) if k <= min(cores, MAX_PROCESSES)
                  and cores % k == 0 and (k == 1 or k * model_bytes <= room)]
    rates = dict.fromkeys(candidates, 0.0)
    for _round in range(ROUNDS):
        for processes in candidates:
            rates[processes] = max(rates[processes], _rate(model, processes, cores))
    best = 1
    for processes in candidates[1:]:
        doublings = processes.bit_length() - best.bit_length()
        if rates[processes] > rates[best] * MARGIN ** doublings:
            best = processes
    return WorkerChoice(best, cores // best, rates)


def _rate(model: Any, processes: int, cores: int) -> float:
    """Rows a second of ``processes`` threads at once, each forwarding its share of
    ``ROWS`` rows, one token each, with ``cores / processes`` torch threads."""
    import torch

    rows = max(1, ROWS // processes)
    ids = torch.randint(0, int(model.config.vocab_size), (rows, 1))
    start = threading.Barrier(processes)
    took = [0.0] * processes

    def run(index: int) -> None:
        use_threads(cores // processes)
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm-up
            start.wait()
            began = time.perf_counter()
            for _ in range(FORWARDS):
                model(input_ids=ids, use_cache=False, logits_to_keep=1)
            took[index] = time.perf_counter() - began

    workers = [threading.Thread(target=run, args=(i,)) for i in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return processes * rows * FORWARDS / max(took)
