"""CUDA graphs of the slot engine's decoding step, one per batch-size bucket and attention
width, captured at start-up in one memory pool.

A small model's decoding step is a few hundred kernel launches of a few microseconds each:
launched one by one from Python it is bound by the launches, replayed from a graph it is
bound by the GPU. The captured step (``StaticSlotScheduler._static_step``) reads and advances
only device tensors, samples inside the graph and writes the tokens to a static buffer, so a
replay needs nothing from the host and the step's one sync is reading those tokens back.

Captures go from the largest bucket down, as vLLM and nano-vllm do, so the smaller graphs
reuse the pool's memory. Out of memory while capturing keeps the graphs captured so far
(smaller batches then run eagerly at the larger sizes), with a log line.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

MIN_WIDTH = 128


def buckets(max_rows: int) -> list[int]:
    """1, 2, 4… below ``max_rows``, then ``max_rows``."""
    sizes, size = [], 1
    while size < max_rows:
        sizes.append(size)
        size *= 2
    return [*sizes, max_rows]


def widths(length: int) -> list[int]:
    """128, 256, 512… below ``length``, then ``length``."""
    sizes, size = [], MIN_WIDTH
    while size < length:
        sizes.append(size)
        size *= 2
    return [*sizes, length]


def bucket_of(rows: int) -> int:
    """The batch size a step of ``rows`` rows runs at: the next power of two."""
    return 1 << (rows - 1).bit_length()


def width_of(needed: int, length: int) -> int:
    """The attention width a step runs at: the next power of two from ``MIN_WIDTH``, at
    most the cache's length."""
    return min(length, max(MIN_WIDTH, 1 << (needed - 1).bit_length()))


class DecodeGraphs:
    def __init__(self, step: Callable[[int, int], Any], max_rows: int, length: int,
                 device: Any) -> None:
        self._step = step
        self._max_rows = max_rows
        self._length = length
        self._device = device
        self._graphs: dict[tuple[int, int], Any] = {}
        self.tokens: Any = None
        """The last replay's sampled tokens (a static buffer of ``max_rows``)."""

    def capture(self) -> None:
        """Capture every (bucket, width). Run with no rows active: the warm-up and captured
        runs then change no state."""
        import torch

        started = time.monotonic()
        self.tokens = torch.zeros(self._max_rows, dtype=torch.long, device=self._device)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self._device)  # type: ignore[no-untyped-call]
        stream.wait_stream(torch.cuda.current_stream(self._device))
        planned = [(rows, width) for rows in reversed(buckets(self._max_rows))
                   for width in reversed(widths(self._length))]
        failed: list[tuple[int, int]] = []
        with torch.inference_mode(), torch.cuda.stream(stream):
            for rows, width in planned:
                try:
                    self._step(rows, width)  # warm-up: allocator, cuBLAS workspaces
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool, stream=stream):
                        self.tokens[:rows] = self._step(rows, width)
                except Exception as exc:  # torch raises RuntimeError for a failed capture
                    graph = None  # a partial capture holds pool memory
                    # Ending a broken capture raises its own error: the cause is its context.
                    cause = exc.__context__ or exc
                    if "out of memory" in f"{exc} {cause}".lower():
                        failed.append((rows, width))
                        torch.cuda.empty_cache()
                        continue
                    # Not memory: this model's step cannot be captured. Serve it eagerly.
                    logger.warning("cannot capture the decoding step in a CUDA graph (%s: %s); "
                                   "decoding runs without graphs", type(cause).__name__, cause)
                    self._graphs.clear()
                    break
                self._graphs[rows, width] = graph
        torch.cuda.current_stream(self._device).wait_stream(stream)
        torch.cuda.synchronize(self._device)
        if failed:
            logger.warning("out of GPU memory capturing %d of %d decoding shapes (largest "
                           "first: batch %s, width %s): those steps run without a graph",
                           len(failed), len(planned), *failed[0])
        logger.info("captured %s CUDA graphs of the decoding step (batch up to %s, width up "
                    "to %s) in %.1f s", len(self._graphs), self._max_rows, self._length,
                    time.monotonic() - started)

    def replay(self, rows: int, width: int) -> bool:
        """Replay the step for this bucket and width; ``False`` when there is no graph of
        it (the caller then runs the step eagerly)."""
        graph = self._graphs.get((rows, width))
        if graph is None:
            return False
        graph.replay()
        return True
