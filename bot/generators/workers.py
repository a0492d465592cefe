"""Worker processes for the CPU: several scheduler processes, one torch thread each.

On a CPU, two processes with one thread each out-run one process with two threads
(measured here: 1.6-2x), because small matrix products do not spread well over threads.
Each worker loads its own copy of the model and runs a ``BatchScheduler``; the parent
hands each request to the least-loaded worker and streams its tokens back. On a GPU, one
process owns the device: use the in-process scheduler instead.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.errors import Busy, GenerationError
from bot.generators.base import GenerationParams
from bot.generators.scheduler import Request

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0
CANCEL_POLL_S = 0.05


@dataclass(frozen=True, slots=True)
class _Job:
    request_id: int
    prompt: tuple[int, ...]
    params: GenerationParams
    ignore_eos: bool


def _worker(model: str, cache_dir: str, limits: dict[str, int], jobs: Any,
            results: Any, index: int) -> None:
    """A worker process: load the model, then run requests until told to stop."""
    import torch

    torch.set_num_threads(1)
    from bot.generators import model_files
    from bot.generators.scheduler import BatchScheduler, eos_ids

    try:
        _tokenizer, loaded = model_files.load(model, Path(cache_dir), "cpu", torch.float32)
    except Exception as exc:  # reported to the parent, which fails its start
        results.put((index, -1, f"load failed: {exc}"))
        return
    scheduler = BatchScheduler(loaded, eos_ids=eos_ids(loaded), **limits)
    scheduler.start()
    requests: dict[int, Request] = {}
    results.put((index, -1, "ready"))
    while True:
        job = jobs.get()
        if job is None:
            break
        if isinstance(job, int):  # a cancellation
            if job in requests:
                requests[job].cancelled.set()
            continue

        def emit(item: int | BaseException | None, request_id: int = job.request_id) -> None:
            if item is None or isinstance(item, BaseException):
                requests.pop(request_id, None)
            results.put((index, request_id, item if not isinstance(item, BaseException)
                         else str(item)))

        request = Request(job.prompt, job.params, emit, ignore_eos=job.ignore_eos)
        requests[job.request_id] = request
        scheduler.submit(request)
    scheduler.stop()


class WorkerPool:
    """The same ``submit`` as ``BatchScheduler``, spread over worker processes."""

    def __init__(self, model: str, cache_dir: Path, workers: int, *, max_sequences: int = 32,
                 max_queued: int = 256, prefill_chunk: int = 512) -> None:
        self._model = model
        self._cache_dir = cache_dir
        self._count = workers
        self._limits = {"max_sequences": max_sequences, "max_queued": 0,
                        "prefill_chunk": prefill_chunk}
        self._capacity = workers * max_sequences + max_queued
        self._context = multiprocessing.get_context("spawn")
        self._results: Any = self._context.Queue()
        self._jobs: list[Any] = []
        self._processes: list[Any] = []
        self._load: list[int] = [0] * workers
        self._where: dict[int, int] = {}
        self._emits: dict[int, Callable[[Any], None]] = {}
        self._lock = threading.Lock()
        self._next_id = 0
        self._requests: dict[int, Request] = {}
        self._stopping = threading.Event()
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        for index in range(self._count):
            jobs = self._context.Queue()
            process = self._context.Process(
                target=_worker, name=f"chinwag-worker-{index}", daemon=True,
                args=(self._model, str(self._cache_dir), self._limits, jobs, self._results,
                      index))
            process.start()
            self._jobs.append(jobs)
            self._processes.append(process)
        for _ in range(self._count):
            index, _id, status = self._results.get(timeout=READY_TIMEOUT_S)
            if status != "ready":
                self.stop()
                raise GenerationError(f"worker {index}: {status}")
        self._reader = threading.Thread(target=self._read, name="chinwag-workers",
                                        daemon=True)
        self._reader.start()
        threading.Thread(target=self._watch_cancellations, name="chinwag-cancels",
                         daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        for jobs in self._jobs:
            jobs.put(None)
        for process in self._processes:
            process.join(timeout=30)
        self._results.put(None)
        if self._reader is not None:
            self._reader.join(timeout=30)
            self._reader = None

    def submit(self, request: Request) -> None:
        with self._lock:
            if len(self._emits) >= self._capacity:
                raise Busy("too many conversations at once; try again shortly")
            request_id = self._next_id
            self._next_id += 1
            worker = min(range(self._count), key=self._load.__getitem__)
            self._load[worker] += 1
            self._where[request_id] = worker
            self._emits[request_id] = request.emit
            self._requests[request_id] = request
        self._jobs[worker].put(_Job(request_id, tuple(request.prompt), request.params,
                                    request.ignore_eos))

    def _watch_cancellations(self) -> None:
        """The caller cancels through the request's event; tell its worker."""
        while not self._stopping.wait(CANCEL_POLL_S):
            with self._lock:
                cancelled = [(i, self._where[i]) for i, r in self._requests.items()
                             if r.cancelled.is_set() and i in self._where]
                for request_id, _worker in cancelled:
                    del self._requests[request_id]
            for request_id, worker in cancelled:
                self._jobs[worker].put(request_id)

    def _read(self) -> None:
        while (message := self._results.get()) is not None:
            _index, request_id, item = message
            with self._lock:
                emit = self._emits.get(request_id)
                if item is None or isinstance(item, str):
                    self._emits.pop(request_id, None)
                    self._requests.pop(request_id, None)
                    worker = self._where.pop(request_id, None)
                    if worker is not None:
                        self._load[worker] -= 1
            if emit is not None:
                emit(GenerationError(item) if isinstance(item, str) else item)
