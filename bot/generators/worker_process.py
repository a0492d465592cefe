"""One worker process of the pool (``workers.py``): it loads the model, runs a
``BatchScheduler`` and talks to the parent over a queue (jobs in) and a pipe (results out).
The shapes that cross between the two are here as well.

Every message on the pipe is ``(request_id, item)``: a token id, ``None`` (the end) or a
``Failure`` for a request; ``request_id`` ``NEWS`` for the worker's own state: ``READY``,
``LoadFailed`` (then it exits), and a ``Heartbeat`` every ``heartbeat`` seconds with its
scheduler's health, so the parent can tell a hung worker from a quiet one, and its
scheduler's stats, for the metrics.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bot.errors import GenerationError
from bot.generators.base import GenerationParams
from bot.generators.scheduler import Request
from bot.generators.stats import SchedulerStats

HEARTBEAT_S = 1.0
"""How often a worker says it is alive (and checks that its parent is: an orphan exits)."""
NEWS = -1
"""The request id of a worker's messages about itself."""
READY = "ready"


@dataclass(frozen=True, slots=True)
class Job:
    request_id: int
    prompt: tuple[int, ...]
    params: GenerationParams
    ignore_eos: bool


@dataclass(frozen=True, slots=True)
class Failure:
    """The exception that ended a request, as its message: a worker's scheduler refuses
    nothing (the parent keeps within its limits), so every failure is a
    ``GenerationError``."""

    message: str

    def error(self) -> GenerationError:
        return GenerationError(self.message)


@dataclass(frozen=True, slots=True)
class LoadFailed:
    """The model could not be loaded (a real error, reported; not a crash)."""

    message: str


@dataclass(frozen=True, slots=True)
class Heartbeat:
    health: str | None
    """The worker's scheduler's ``health()``."""
    stats: SchedulerStats | None = None
    """Its ``stats()``."""


def run(model: str, cache_dir: str, limits: dict[str, int], jobs: Any,
        results: Connection, heartbeat: float = HEARTBEAT_S, dtype: str = "float32",
        threads: int = 1) -> None:
    """The worker process: load the model, then run requests until told to stop (``None``
    on the queue). A job is a ``Job`` or, to cancel one, its request id."""
    import torch

    torch.set_num_threads(threads)
    from bot.generators import model_files
    from bot.generators.engine import make_scheduler
    from bot.generators.scheduler import eos_ids

    parent = os.getppid()
    sending = threading.Lock()  # the scheduler thread and this one both send

    def send(message: tuple[int, Any]) -> None:
        with sending:
            results.send(message)

    try:
        _, loaded = model_files.load(model, Path(cache_dir), "cpu", getattr(torch, dtype))
    except Exception as exc:  # reported to the parent, which decides whether to retry
        send((NEWS, LoadFailed(str(exc))))
        return
    scheduler = make_scheduler(loaded, eos_ids=eos_ids(loaded), threads=threads, **limits)
    scheduler.start()
    requests: dict[int, Request] = {}
    send((NEWS, READY))
    beat_at = time.monotonic() + heartbeat
    while True:
        if time.monotonic() >= beat_at:
            if os.getppid() != parent:
                break  # the parent is gone (killed): nobody reads our results
            send((NEWS, Heartbeat(scheduler.health(), scheduler.stats())))
            beat_at = time.monotonic() + heartbeat
        try:
            job = jobs.get(timeout=max(0.0, beat_at - time.monotonic()))
        except queue.Empty:
            continue
        if job is None:
            break
        if isinstance(job, int):  # a cancellation; the request may have ended meanwhile
            cancelled = requests.get(job)
            if cancelled is not None:
                cancelled.cancelled.set()
            continue

        def emit(item: int | BaseException | None, request_id: int = job.request_id) -> None:
            if item is None or isinstance(item, BaseException):
                requests.pop(request_id, None)
            send((request_id, Failure(str(item)) if isinstance(item, BaseException) else item))

        request = Request(job.prompt, job.params, emit, ignore_eos=job.ignore_eos)
        requests[job.request_id] = request
        try:
            scheduler.submit(request)
        except GenerationError as exc:  # its scheduler died: the request ends with why
            emit(exc)
    scheduler.stop()
