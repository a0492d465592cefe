"""Worker processes for the CPU: several scheduler processes, each with its share of the
cores' torch threads.

Small matrix products do not always spread well over threads, so on some CPUs several
processes out-run one process with every thread: ``CHINWAG_WORKERS=auto`` measures which
at start-up (``cpu_workers.py``). Each worker (``worker_process.py``) loads its own copy of
the model and runs the scheduler ``engine.make_scheduler`` picks; the parent hands each
request to the least-loaded worker (with the prefix cache on, to the one that keeps most of
its conversation, weighed against load: ``prefix_cache.keeper``) and streams its tokens
back. On a GPU, one process owns the device: use the in-process scheduler.

Each worker gets the limits of its share of the pool, and the parent never hands a worker
more than that, so a worker's scheduler never refuses a job: beyond the pool's limits the
parent answers ``Busy`` itself. Each worker streams back over a pipe of its own, so a
worker killed mid-write (SIGKILL, the OOM killer) cannot corrupt or lock the others'
results. One thread in the parent waits on every pipe and every worker's exit at once.

A worker that exits is noticed as soon as it does: what it wrote before is delivered,
then its remaining streams end with ``GenerationError`` and it is started again: at once
if it had been serving, else after ``RESTART_BACKOFF_S`` (a crash or a kill while loading
the model is retried for as long as it takes; a load that reports a real error is given
up after ``LOAD_ATTEMPTS`` tries in a row). A worker that stops answering while it has
requests (stopped, hung: no heartbeat for ``stall_after`` seconds) makes the pool
unhealthy and gets no new requests; after ``kill_after`` seconds it is killed, which ends
its streams and restarts it: a user waits a minute at most, not for ever.

``health()`` is liveness: ``None`` while some worker serves and none is stalled with work.
A worker restarting while the others answer is not a fault a health check should act on
(it would restart a server that is healing itself); it is logged.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
import time
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from bot.errors import Busy, GenerationError, ModelUnavailable
from bot.generators import worker_process
from bot.generators.prefix_cache import Served, keeper
from bot.generators.scheduler import STALL_AFTER_S, Request
from bot.generators.stats import SchedulerStats
from bot.generators.worker_process import NEWS, READY, Failure, Heartbeat, Job, LoadFailed
from bot.i18n import N_

logger = logging.getLogger(__name__)

READY_TIMEOUT_S = 300.0
POLL_S = 0.05
"""How often the parent forwards cancellations, starts due restarts and looks for stalls."""
STOP_TIMEOUT_S = 30.0
RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Waits before each further start of a worker whose last start did not reach ready."""
LOAD_ATTEMPTS = 3
"""Starts in a row whose load reports an error, after which the worker is given up."""
KILL_STALLED_AFTER_S = 60.0


class _Worker:
    """One worker process as the parent sees it; a replacement takes its place."""

    def __init__(self, index: int, rows: int, capacity: int, process: Any, jobs: Any,
                 results: Connection, *, attempt: int, load_errors: int) -> None:
        self.index = index
        self.rows = rows
        """Requests it generates at once; beyond those they wait for a row."""
        self.capacity = capacity
        self.process = process
        self.jobs = jobs
        self.results = results
        self.started = self.heard = time.monotonic()
        """When it was started; when it last sent anything (a token, a heartbeat)."""
        self.attempt = attempt
        """Starts in a row, before this one, that did not reach ready."""
        self.load_errors = load_errors
        """Of those, the ones that reported a load error."""
        self.ready = False
        self.dead = False
        self.load = 0
        self.reported: str | None = None
        """Its scheduler's health, from its last heartbeat."""
        self.stats: SchedulerStats | None = None
        """Its scheduler's stats, from its last heartbeat."""
        self.load_error: str | None = None
        self.killed_for: str | None = None
        self.restart_at: float | None = None
        self.failed: str | None = None
        """Given up: why."""
        self.served = Served()
        """What its prefix cache may hold (a replacement starts with none)."""

    def close(self) -> None:
        self.results.close()
        # Unsent jobs of a dead worker must not keep this process from exiting.
        self.jobs.cancel_join_thread()
        self.jobs.close()

    def describe(self) -> str:
        if self.failed is not None:
            return f"worker {self.index} {self.failed}"
        if self.dead:
            return f"worker {self.index} is restarting"
        return f"worker {self.index} is loading the model"


class WorkerPool:
    """The same ``submit`` as ``BatchScheduler``, spread over worker processes."""

    def __init__(self, model: str, cache_dir: Path, workers: int, *, dtype: str = "float32",
                 threads: int = 1, max_sequences: int = 32,
                 max_queued: int = 256, prefill_chunk: int = 512,
                 prefix_cache_bytes: int = 0, ready_timeout: float = READY_TIMEOUT_S,
                 heartbeat: float = worker_process.HEARTBEAT_S,
                 stall_after: float = STALL_AFTER_S,
                 kill_after: float = KILL_STALLED_AFTER_S) -> None:
        self._model = model
        self._cache_dir = cache_dir
        self._dtype = dtype
        self._threads = threads
        self._count = workers
        self._ready_timeout = ready_timeout
        self._heartbeat = heartbeat
        self._stall_after = stall_after
        self._kill_after = kill_after
        self._affinity = prefix_cache_bytes > 0
        """A conversation's next turn goes to the worker that served it (its keys and
        values are kept there), while that worker has room."""
        # The queue limit is shared out, so the pool takes exactly what its workers take.
        self._limits = [{"max_sequences": max_sequences,
                         "max_queued": max_queued // workers + (i < max_queued % workers),
                         "prefill_chunk": prefill_chunk,
                         # Each worker keeps the conversations it served: a share each.
                         "prefix_cache_bytes": prefix_cache_bytes // workers}
                        for i in range(workers)]
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []
        self._where: dict[int, _Worker] = {}
        self._requests: dict[int, Request] = {}
        self._lock = threading.Lock()
        self._next_id = 0
        self._stopping = threading.Event()
        self._reader: threading.Thread | None = None
        self._retired = SchedulerStats()
        """What workers that exited had done, as their last heartbeats told."""

    def _spawn(self, index: int, *, attempt: int = 0, load_errors: int = 0) -> _Worker:
        limits = self._limits[index]
        jobs = self._context.Queue()
        receiver, sender = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=worker_process.run, name=f"chinwag-worker-{index}", daemon=True,
            args=(self._model, str(self._cache_dir), limits, jobs, sender, self._heartbeat,
                  self._dtype, self._threads))
        try:
            process.start()
        finally:
            sender.close()  # only the worker writes: its exit then reads as end-of-file here
        return _Worker(index, limits["max_sequences"],
                       limits["max_sequences"] + limits["max_queued"], process, jobs,
                       receiver, attempt=attempt, load_errors=load_errors)

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
                if isinstance(status, LoadFailed):
                    raise ModelUnavailable(f"worker {worker.index}: {status.message}")
                if status == READY:
                    worker.ready = True
                    worker.heard = time.monotonic()
                    continue
                worker.process.join(timeout=STOP_TIMEOUT_S)
                raise ModelUnavailable(f"worker {worker.index} exited with code "
                                       f"{worker.process.exitcode} while loading the model")

    def stop(self) -> None:
        self._stopping.set()
        if self._reader is not None:  # first, so that it starts no worker meanwhile
            self._reader.join(timeout=STOP_TIMEOUT_S)
            self._reader = None
        self._end_processes()
        for worker in self._workers:
            worker.close()
        self._fail(list(self._where), GenerationError(N_("the model is shutting down")))

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
        """``None`` while some worker serves and none is stalled with work (see the
        module's docstring); otherwise why not."""
        if self._reader is None or not self._reader.is_alive():
            return "the worker pool is not running"
        now = time.monotonic()
        with self._lock:
            serving = [w for w in self._workers if w.ready and not w.dead]
            for worker in serving:
                silent = now - worker.heard
                if worker.load and silent > self._stall_after:
                    return (f"worker {worker.index} has not answered for {silent:.0f} s "
                            f"with {worker.load} requests")
                if worker.reported is not None:
                    return f"worker {worker.index}: {worker.reported}"
            if not serving:
                return "no worker can serve: " + "; ".join(w.describe() for w in self._workers)
        return None

    def stats(self) -> SchedulerStats:
        """The workers' schedulers' stats together, as their last heartbeats told (so up
        to a heartbeat old); what a worker did before it exited stays counted."""
        with self._lock:
            total = self._retired
            for worker in self._workers:
                if worker.stats is not None and not worker.dead:
                    total += worker.stats
        return total

    def _open(self) -> list[_Worker]:
        """Workers that take a request now (under the lock)."""
        if self._stopping.is_set() or self._reader is None:
            raise GenerationError(N_("the model is not running"))
        now = time.monotonic()
        open_ = [w for w in self._workers if w.ready and not w.dead and w.load < w.capacity
                 and now - w.heard <= self._stall_after]
        if not open_:
            raise Busy(N_("too many conversations at once; try again shortly"))
        return open_

    def ensure_room(self) -> None:
        """Raise ``Busy`` now if a request would be refused, before its prompt is built."""
        with self._lock:
            self._open()

    def submit(self, request: Request) -> None:
        """Hand a request to a worker (``keeper``, or the least loaded without a prefix
        cache); raise ``Busy`` at once when every worker is full (or restarting, or
        stalled)."""
        with self._lock:
            open_ = self._open()
            worker = keeper(open_, request.prompt) if self._affinity \
                else min(open_, key=lambda w: w.load)
            request_id = self._next_id
            self._next_id += 1
            worker.load += 1
            self._where[request_id] = worker
            self._requests[request_id] = request
            # Under the lock, so a worker found dead meanwhile fails this request too.
            worker.jobs.put(Job(request_id, tuple(request.prompt), request.params,
                                request.ignore_eos))

    # The pool's thread.

    def _serve(self) -> None:
        next_check = 0.0
        while not self._stopping.is_set():
            owners: dict[Any, _Worker] = {}
            with self._lock:
                for worker in self._workers:
                    if not worker.dead:
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
            if time.monotonic() >= next_check:
                self._forward_cancellations()
                self._kill_stalled()
                self._restart_due()
                next_check = time.monotonic() + POLL_S

    def _deliver(self, worker: _Worker, message: tuple[int, Any]) -> None:
        worker.heard = time.monotonic()
        request_id, item = message
        if request_id == NEWS:
            if isinstance(item, Heartbeat):
                worker.reported = item.health
                worker.stats = item.stats
            elif isinstance(item, LoadFailed):
                worker.load_error = item.message  # it exits next: _lost decides what then
            elif item == READY:
                with self._lock:
                    worker.ready = True
                    worker.attempt = worker.load_errors = 0
                logger.info("worker %d is back", worker.index)
            return
        with self._lock:
            request = self._requests.get(request_id)
            if self._affinity and request is not None:
                if isinstance(item, int):
                    request.generated.append(item)
                elif item is None:  # its worker keeps what it computed
                    worker.served.remember([*request.prompt, *request.generated])
            if item is None or isinstance(item, Failure):
                self._requests.pop(request_id, None)
                if self._where.pop(request_id, None) is not None:
                    worker.load -= 1
        if request is not None:
            _tell(request, item.error() if isinstance(item, Failure) else item)

    def _drain(self, worker: _Worker) -> None:
        """Deliver what an exited worker wrote before it died (tokens, ends, why it
        failed): it is all in the pipe, unread."""
        while True:
            try:
                if not worker.results.poll():
                    return
                message = worker.results.recv()
            except (EOFError, OSError):  # the end, or a message its death cut short
                return
            self._deliver(worker, message)

    def _lost(self, worker: _Worker) -> None:
        """A worker exited: deliver what it wrote, end its other streams, correct the
        load, and arrange its restart (or give it up)."""
        if self._stopping.is_set():
            return
        self._drain(worker)
        with self._lock:
            worker.dead, was_ready, worker.ready = True, worker.ready, False
            orphans = [i for i, w in self._where.items() if w is worker]
            if worker.stats is not None:
                self._retired += worker.stats.counters()
        worker.process.join(timeout=STOP_TIMEOUT_S)
        code = worker.process.exitcode
        worker.close()
        why = worker.killed_for or f"died (exit code {code})"
        self._fail(orphans, GenerationError(
            f"the model's worker process {why}; please try again"))
        load_errors = worker.load_errors + (worker.load_error is not None)
        if load_errors >= LOAD_ATTEMPTS:
            worker.failed = f"cannot load the model: {worker.load_error}"
            logger.error("worker %d %s (%d tries); giving it up", worker.index, worker.failed,
                         load_errors)
            return
        attempt = 0 if was_ready else worker.attempt + 1
        delay = RESTART_BACKOFF_S[min(attempt, len(RESTART_BACKOFF_S)) - 1] if attempt else 0.0
        worker.attempt, worker.load_errors = attempt, load_errors
        worker.restart_at = time.monotonic() + delay
        logger.error("worker %d %s%s with %d requests; restarting it in %g s", worker.index,
                     why, "" if was_ready else " while loading the model", len(orphans), delay)

    def _restart_due(self) -> None:
        now = time.monotonic()
        for worker in list(self._workers):
            if worker.restart_at is None or worker.restart_at > now:
                continue
            worker.restart_at = None
            try:
                replacement = self._spawn(worker.index, attempt=worker.attempt,
                                          load_errors=worker.load_errors)
            except OSError as exc:  # out of processes or descriptors: try again later
                worker.attempt += 1
                worker.restart_at = now + RESTART_BACKOFF_S[
                    min(worker.attempt, len(RESTART_BACKOFF_S)) - 1]
                logger.error("worker %d cannot be restarted: %s", worker.index, exc)
                continue
            with self._lock:
                self._workers[self._workers.index(worker)] = replacement

    def _kill_stalled(self) -> None:
        """End a worker that has requests and has said nothing for ``kill_after``: its
        exit ends its streams and restarts it."""
        now = time.monotonic()
        with self._lock:
            stalled = [w for w in self._workers if w.ready and not w.dead and w.load
                       and w.killed_for is None and now - w.heard > self._kill_after]
        for worker in stalled:
            worker.killed_for = f"stopped answering for {now - worker.heard:.0f} s"
            logger.error("worker %d %s with %d requests; killing it", worker.index,
                         worker.killed_for, worker.load)
            worker.process.kill()

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
                    if self._affinity:  # stopped: its worker keeps what it computed
                        self._where[request_id].served.remember(
                            [*request.prompt, *request.generated])
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
