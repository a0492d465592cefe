"""Worker processes for the CPU: several scheduler processes, one torch thread each.

On a CPU, two processes with one thread each out-run one process with two threads
(measured here: 1.6-2x), because small matrix products do not spread well over threads.
Each worker loads its own copy of the model and runs a ``BatchScheduler``; the parent
hands each request to the least-loaded worker and streams its tokens back. On a GPU, one
process owns the device: use the in-process scheduler instead.

Each worker gets the limits of its share of the pool, and the parent never hands a worker
more than that, so a worker's scheduler never refuses a job: beyond the pool's limits the
parent answers ``Busy`` itself. Each worker streams back over a pipe of its own, so a
worker killed mid-write (SIGKILL, the OOM killer) cannot corrupt or lock the others'
results. One thread in the parent waits on every pipe and every worker's exit at once: a
dead worker is noticed as soon as it exits, its streams end with ``GenerationError`` and
it is started again.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from bot.errors import Busy, GenerationError, ModelUnavailable
from bot.generators.base import GenerationParams
from bot.generators.scheduler import Request

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0
POLL_S = 0.05
"""How often the parent forwards cancellations and picks up restarted workers' pipes."""
PARENT_CHECK_S = 1.0
"""How often an idle worker checks that its parent is still there (an orphan exits)."""
STOP_TIMEOUT_S = 30.0
_READY = "ready"


@dataclass(frozen=True, slots=True)
class _Job:
    request_id: int
    prompt: tuple[int, ...]
    params: GenerationParams
    ignore_eos: bool


@dataclass(frozen=True, slots=True)
class _Failure:
    """An exception crossing the process boundary, as its kind and message."""

    message: str
    busy: bool = False

    def error(self) -> GenerationError:
        return Busy(self.message) if self.busy else GenerationError(self.message)


@dataclass(frozen=True, slots=True)
class _LoadFailed:
    message: str


def _worker(model: str, cache_dir: str, limits: dict[str, int], jobs: Any,
            results: Connection, index: int) -> None:
    """A worker process: load the model, then run requests until told to stop."""
    import torch

    torch.set_num_threads(1)
    from bot.generators import model_files
    from bot.generators.scheduler import BatchScheduler, eos_ids

    parent = os.getppid()
    sending = threading.Lock()  # the scheduler thread and this one both send

    def send(message: tuple[int, Any]) -> None:
        with sending:
            results.send(message)

    try:
        _tokenizer, loaded = model_files.load(model, Path(cache_dir), "cpu", torch.float32)
    except Exception as exc:  # reported to the parent, which fails its start
        send((-1, _LoadFailed(str(exc))))
        return
    scheduler = BatchScheduler(loaded, eos_ids=eos_ids(loaded), **limits)
    scheduler.start()
    requests: dict[int, Request] = {}
    send((-1, _READY))
    while True:
        try:
            job = jobs.get(timeout=PARENT_CHECK_S)
        except queue.Empty:
            if os.getppid() != parent:
                break  # the parent is gone (killed): nobody reads our results
            continue
        if job is None:
            break
        if isinstance(job, int):  # a cancellation
            if job in requests:
                requests[job].cancelled.set()
            continue

        def emit(item: int | BaseException | None, request_id: int = job.request_id) -> None:
            if item is None or isinstance(item, BaseException):
                requests.pop(request_id, None)
            send((request_id, _Failure(str(item), busy=isinstance(item, Busy))
                  if isinstance(item, BaseException) else item))

        request = Request(job.prompt, job.params, emit, ignore_eos=job.ignore_eos)
        requests[job.request_id] = request
        try:
            scheduler.submit(request)
        except GenerationError as exc:  # the parent keeps within our limits; in case not
            emit(exc)
    scheduler.stop()


class _Worker:
    """One worker process as the parent sees it."""

    def __init__(self, index: int, capacity: int, process: Any, jobs: Any,
                 results: Connection) -> None:
        self.index = index
        self.capacity = capacity
        self.process = process
        self.jobs = jobs
        self.results = results
        self.ready = False
        self.dead = False
        self.failed: str | None = None
        self.load = 0

    def close(self) -> None:
        self.results.close()
        # Unsent jobs of a dead worker must not keep this process from exiting.
        self.jobs.cancel_join_thread()
        self.jobs.close()


class WorkerPool:
    """The same ``submit`` as ``BatchScheduler``, spread over worker processes."""

    def __init__(self, model: str, cache_dir: Path, workers: int, *, max_sequences: int = 32,
                 max_queued: int = 256, prefill_chunk: int = 512,
                 ready_timeout: float = READY_TIMEOUT_S) -> None:
        self._model = model
        self._cache_dir = cache_dir
        self._count = workers
        self._ready_timeout = ready_timeout
        # The queue limit is shared out, so the pool takes exactly what its workers take.
        self._limits = [{"max_sequences": max_sequences,
                         "max_queued": max_queued // workers + (i < max_queued % workers),
                         "prefill_chunk": prefill_chunk} for i in range(workers)]
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._where: dict[int, _Worker] = {}
        self._requests: dict[int, Request] = {}
        self._lock = threading.Lock()
        self._next_id = 0
        self._stopping = threading.Event()
        self._reader: threading.Thread | None = None

    def _spawn(self, index: int) -> _Worker:
        limits = self._limits[index]
        jobs = self._context.Queue()
        receiver, sender = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_worker, name=f"chinwag-worker-{index}", daemon=True,
            args=(self._model, str(self._cache_dir), limits, jobs, sender, index))
        process.start()
        sender.close()  # only the worker writes: its exit then reads as end-of-file here
        capacity = limits["max_sequences"] + limits["max_queued"]
        return _Worker(index, capacity, process, jobs, receiver)

    def start(self) -> None:
        """Start the workers and wait until each has loaded the model; raises
        ``ModelUnavailable`` (with no worker left running) when one cannot."""
        try:
            for index in range(self._count):
                self._workers.append(self._spawn(index))
            self._wait_ready(time.monotonic() + self._ready_timeout)
        except BaseException:
            self._stopping.set()
            self._end_processes()
            for worker in self._workers:
                worker.close()
            raise
        self._reader = threading.Thread(target=self._serve, name="chinwag-workers",
                                        daemon=True)
        self._reader.start()

    def _wait_ready(self, deadline: float) -> None:
        while not all(worker.ready for worker in self._workers):
            owners: dict[Any, _Worker] = {}
            for worker in self._workers:
                if not worker.ready:
                    owners[worker.results] = owners[worker.process.sentinel] = worker
            ready = wait(list(owners), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise ModelUnavailable(
                    f"the worker processes did not load the model within "
                    f"{self._ready_timeout:g} s")
            for item in ready:
                worker = owners[item]
                if worker.ready:
                    continue
                status: Any = None
                # Read what it said even when its exit woke us first: why it failed.
                if worker.results.poll():
                    try:
                        _id, status = worker.results.recv()
                    except (EOFError, OSError):
                        pass  # it exited: said below
                if isinstance(status, _LoadFailed):
                    raise ModelUnavailable(f"worker {worker.index}: {status.message}")
                if status == _READY:
                    worker.ready = True
                    continue
                worker.process.join(timeout=STOP_TIMEOUT_S)
                raise ModelUnavailable(f"worker {worker.index} exited with code "
                                       f"{worker.process.exitcode} while loading the model")

    def stop(self) -> None:
        self._stopping.set()
        self._end_processes()
        if self._reader is not None:
            self._reader.join(timeout=STOP_TIMEOUT_S)
            self._reader = None
        for worker in self._workers:
            worker.close()
        self._fail(list(self._where), GenerationError("the model is shutting down"))

    def _end_processes(self) -> None:
        """Ask the workers to exit, wait for them, then end the ones that do not."""
        for worker in self._workers:
            try:
                worker.jobs.put(None)
            except (ValueError, OSError):  # its queue is closed: it is gone
                pass
        for worker in self._workers:
            # One still loading the model would not read its queue for a while.
            worker.process.join(timeout=STOP_TIMEOUT_S if worker.ready else 0)
            if worker.process.is_alive():
                worker.process.kill()
                worker.process.join(timeout=STOP_TIMEOUT_S)

    def health(self) -> str | None:
        """``None`` while every worker process runs; otherwise which does not."""
        if self._reader is None or not self._reader.is_alive():
            return "the worker pool is not running"
        with self._lock:
            for worker in self._workers:
                if worker.failed is not None:
                    return f"worker {worker.index} cannot load the model: {worker.failed}"
                if worker.dead or not worker.process.is_alive():
                    return f"worker {worker.index} died (exit code {worker.process.exitcode})"
                if not worker.ready:
                    return f"worker {worker.index} is restarting"
        return None

    def submit(self, request: Request) -> None:
        """Hand a request to the least-loaded worker, or raise ``Busy`` at once when every
        worker is full (or restarting)."""
        with self._lock:
            if self._stopping.is_set() or self._reader is None:
                raise GenerationError("the model is not running")
            open_ = [w for w in self._workers if w.ready and w.load < w.capacity]
            if not open_:
                raise Busy("too many conversations at once; try again shortly")
            worker = min(open_, key=lambda w: w.load)
            request_id = self._next_id
            self._next_id += 1
            worker.load += 1
            self._where[request_id] = worker
            self._requests[request_id] = request
            # Under the lock, so a worker found dead meanwhile fails this request too.
            worker.jobs.put(_Job(request_id, tuple(request.prompt), request.params,
                                 request.ignore_eos))

    # The pool's thread.

    def _serve(self) -> None:
        next_cancel_check = 0.0
        while not self._stopping.is_set():
            owners: dict[Any, _Worker] = {}
            with self._lock:
                for worker in self._workers:
                    if worker.failed is None and not worker.dead:
                        owners[worker.results] = owners[worker.process.sentinel] = worker
            for item in wait(list(owners), timeout=POLL_S):
                worker = owners[item]
                if worker.dead:
                    continue  # its pipe and its exit both woke us
                if item is worker.results:
                    try:
                        message = worker.results.recv()
                    except (EOFError, OSError):
                        self._lost(worker)
                        continue
                    self._deliver(worker, message)
                else:
                    self._lost(worker)
            if time.monotonic() >= next_cancel_check:
                self._forward_cancellations()
                next_cancel_check = time.monotonic() + POLL_S

    def _deliver(self, worker: _Worker, message: tuple[int, Any]) -> None:
        request_id, item = message
        if request_id < 0:  # a restarted worker's start-up
            with self._lock:
                if isinstance(item, _LoadFailed):
                    worker.failed = item.message
                    logger.error("worker %d cannot load the model: %s", worker.index,
                                 item.message)
                else:
                    worker.ready = True
                    logger.info("worker %d is back", worker.index)
            return
        with self._lock:
            request = self._requests.get(request_id)
            if item is None or isinstance(item, _Failure):
                self._requests.pop(request_id, None)
                if self._where.pop(request_id, None) is not None:
                    worker.load -= 1
        if request is not None:
            _tell(request, item.error() if isinstance(item, _Failure) else item)

    def _lost(self, worker: _Worker) -> None:
        """A worker exited: end its streams, correct the load and start another."""
        with self._lock:
            if self._stopping.is_set():
                return
            worker.dead, was_ready, worker.ready = True, worker.ready, False
            orphans = [i for i, w in self._where.items() if w is worker]
        worker.process.join(timeout=STOP_TIMEOUT_S)
        code = worker.process.exitcode
        self._fail(orphans, GenerationError(
            f"the model's worker process died (exit code {code}); please try again"))
        worker.close()
        if not was_ready:
            # Dying while loading the model would only happen again: leave it to health.
            worker.failed = f"exited with code {code} while loading the model"
            logger.error("worker %d %s", worker.index, worker.failed)
            return
        logger.error("worker %d died (exit code %s) with %d requests; restarting it",
                     worker.index, code, len(orphans))
        try:
            replacement = self._spawn(worker.index)
        except OSError as exc:  # out of processes or descriptors: leave it to health
            worker.failed = f"cannot be restarted: {exc}"
            logger.error("worker %d %s", worker.index, worker.failed)
            return
        with self._lock:
            if not self._stopping.is_set():
                self._workers[self._workers.index(worker)] = replacement
                return
        # ``stop`` began meanwhile and would not see this one.
        replacement.process.kill()
        replacement.process.join(timeout=STOP_TIMEOUT_S)
        replacement.close()

    def _fail(self, request_ids: list[int], error: GenerationError) -> None:
        with self._lock:
            requests = [self._requests.pop(i, None) for i in request_ids]
            for request_id in request_ids:
                worker = self._where.pop(request_id, None)
                if worker is not None:
                    worker.load -= 1
        for request in requests:
            if request is not None:
                _tell(request, error)

    def _forward_cancellations(self) -> None:
        """The caller cancels through the request's event; tell its worker."""
        with self._lock:
            for request_id, request in list(self._requests.items()):
                if request.cancelled.is_set() and request_id in self._where:
                    del self._requests[request_id]
                    try:
                        self._where[request_id].jobs.put(request_id)
                    except (ValueError, OSError):  # its worker died; _lost ends it
                        pass


def _tell(request: Request, item: int | BaseException | None) -> None:
    """Emit to one request; a caller that cannot take it (its loop closed) must not stop
    the pool's thread, which serves every other request."""
    try:
        request.emit(item)
    except Exception:
        logger.exception("cannot deliver to a request; cancelling it")
        request.cancelled.set()
