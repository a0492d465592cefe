"""Which threads run torch on the CPU, and with how many OpenMP threads each.

torch's CPU kernels run on OpenMP (libgomp), and every thread that starts a parallel region
gets a team of worker threads that lives as long as that thread does. When libgomp manages
more threads, over all teams, than there are CPUs, it stops spinning between parallel
regions and parks its workers on futexes, so every small matmul of a decoding step pays a
wake-up. Measured on a 2-core box: a 16-row bf16 matmul took 72 µs on the scheduler's
thread when the thread that loaded the model had exited, 164 µs when that thread lived on
in asyncio's pool, and 80 µs on the main thread.

Hence: a model is loaded on a thread that exits when done (``in_own_thread``), the
scheduler's thread sets its own thread count (``intra_op_threads``; a new thread otherwise
takes whatever count some other thread set last), and other torch work in the process (the
memory encoder) runs on one thread, which starts no team.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def intra_op_threads() -> int:
    """torch's own default for the process: ``OMP_NUM_THREADS``, else the CPUs it may use."""
    setting = os.environ.get("OMP_NUM_THREADS", "")
    if setting.isdigit() and int(setting) > 0:
        return int(setting)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def use_threads(count: int) -> None:
    """Give the calling thread ``count`` torch CPU threads, as its own. A thread's first
    parallel op applies the process-wide default, which ``set_num_threads`` in any thread
    also changes: take the default first, so that a later op cannot undo this count."""
    import torch

    torch.get_num_threads()
    torch.set_num_threads(count)


async def in_own_thread(function: Callable[..., T], *args: Any, name: str = "chinwag-load") -> T:
    """``function(*args)`` on a new thread that exits when it returns (so the OpenMP team it
    may start goes with it), awaited without blocking the loop."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(outcome: Callable[[], None]) -> None:
        if not future.done():  # the awaiting task may have been cancelled meanwhile
            outcome()

    def run() -> None:
        try:
            result = function(*args)
        except BaseException as exc:  # handed to the awaiting task, which raises it
            error = exc
            loop.call_soon_threadsafe(settle, lambda: future.set_exception(error))
        else:
            loop.call_soon_threadsafe(settle, lambda: future.set_result(result))

    threading.Thread(target=run, name=name, daemon=True).start()
    return await future
