"""The slot engine over static shapes: the decoding step a CUDA graph captures.

A small model's decoding step is a few hundred kernel launches: launched one by one from
Python it is bound by the launches, replayed from a graph by the GPU. A graph fixes its
shapes and the memory it reads, so here, unlike the packed CPU step
(``slot_scheduler.SlotScheduler``):

- the cache is allocated once, on CUDA as long as a share of the free memory allows
  (``slot_cache.fitting_length``), and never moves;
- prompts get a forward of their own (the packed one, without the batch), and the batch
  decodes over a batch-size bucket and an attention width (``cuda_graphs.bucket_of``,
  ``width_of``), its idle rows writing only to the scratch position;
- the step reads and advances only device state (each row's next token, length, whether it
  is active) and samples on the device, so a replay needs nothing from the host: its one
  sync is reading the sampled tokens back.

``engine.make_scheduler`` picks it on CUDA, where it captures a graph for each bucket and
width at start-up (``cuda_graphs.DecodeGraphs``). On the CPU only tests run it, eagerly: the
same steps, checked against the packed engine's tokens.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

from bot.generators.cuda_graphs import bucket_of, width_of
from bot.generators.scheduler import Chunk
from bot.generators.slot_cache import SlotCache, SlotView, fitting_length
from bot.generators.slot_scheduler import SlotScheduler

logger = logging.getLogger(__name__)

_cudnn_lock = threading.Lock()
_cudnn_holders = 0
"""CUDA engines running, which forbid torch's cuDNN attention (a setting of the process's)."""
_cudnn_before = True
"""Whether torch could pick it before the first of them."""


def _forbid_cudnn_attention() -> None:
    global _cudnn_holders, _cudnn_before
    import torch

    with _cudnn_lock:
        if _cudnn_holders == 0:
            enabled = torch.backends.cuda.cudnn_sdp_enabled
            _cudnn_before = bool(enabled())  # type: ignore[no-untyped-call]
            torch.backends.cuda.enable_cudnn_sdp(False)
        _cudnn_holders += 1


def _allow_cudnn_attention() -> None:
    """The last engine to stop gives torch its setting back."""
    global _cudnn_holders
    import torch

    with _cudnn_lock:
        _cudnn_holders -= 1
        if _cudnn_holders == 0:
            torch.backends.cuda.enable_cudnn_sdp(_cudnn_before)


class StaticSlotScheduler(SlotScheduler):
    def __init__(self, model: Any, *, eos_ids: Sequence[int], graphs: bool | None = None,
                 **options: Any) -> None:
        """``graphs``: capture CUDA graphs (on CUDA, unless false); other options are the
        slot engine's."""
        super().__init__(model, eos_ids=eos_ids, **options)
        self._use_graphs = self._cuda and graphs is not False
        self._graphs: Any = None
        self._cudnn_forbidden = False

    def _prepare(self) -> None:
        """The slot engine's preparation, then the graphs' capture: on the scheduler's
        thread, which replays them."""
        super()._prepare()
        if self._use_graphs:
            from bot.generators.cuda_graphs import DecodeGraphs

            self._graphs = DecodeGraphs(self._static_step, self._max_sequences,
                                        self._slots.length, self._slots.device)
            self._graphs.capture()

    def _cache(self, *, grow_rows: bool = True) -> SlotCache:
        """On CUDA a cache allocated once; on the CPU the slot engine's, with every row
        from the start (a bucket may need them)."""
        import torch

        if not self._cuda:
            return super()._cache(grow_rows=False)
        model, config, device = self._model, self._model.config, self._model.device
        # Memory-efficient attention takes a mask and plans nothing per shape; cuDNN, which
        # torch picks on sm90, plans anew for every batch and width. Set for the process
        # while CUDA engines run: a per-call context would race with other threads' calls.
        _forbid_cudnn_attention()
        self._cudnn_forbidden = True
        # An engine stopped before this one may hold its cache still, in reference cycles:
        # free it before this cache is sized from the memory that is free.
        gc.collect()
        torch.cuda.empty_cache()
        slots = self._max_sequences
        length = self._cache_setting or fitting_length(config, slots, device, model.dtype)
        self._limit = min(self._limit, length)
        return SlotCache(config, slots=slots, length=length, device=device,
                         dtype=model.dtype, growable=False)

    def _stopped(self) -> None:
        """On CUDA, give the GPU back the cache, the step's state and the graphs now, and
        torch its attention setting: the graphs hold the engine's step, a cycle the
        collector would break late, and the next engine sizes its cache from the memory
        free at its start."""
        if not self._cuda:
            return
        import torch

        self._graphs = self._slots = self._sampler = None  # type: ignore[assignment]
        self._next = self._lengths = self._active = self._widths = None
        if self._cudnn_forbidden:
            self._cudnn_forbidden = False
            _allow_cudnn_attention()
        torch.cuda.empty_cache()

    def _advance(self, plan: list[Chunk]) -> None:
        """Prefill ``plan`` in a forward of its own, then decode the batch."""
        if plan:
            self._packed(plan, decode=False)
            self._flush()  # newcomers' first tokens: not after the decoding step too
        if self._rows:
            started = time.perf_counter()
            self._decode()
            self.decode_seconds += time.perf_counter() - started

    def _decode(self) -> None:
        """A decoding step over static shapes: a graph's replay where one was captured."""
        rows = len(self._rows)
        longest = max(self._host_lengths)
        bucket = min(bucket_of(rows), self._max_sequences)
        self._ensure(bucket, longest + 1)
        width = width_of(longest + 1, self._slots.length)
        if self._graphs is not None and self._graphs.replay(bucket, width):
            self.graph_replays += 1
            tokens = self._graphs.tokens[:rows].tolist()  # the step's one host sync
        else:
            tokens = self._static_step(bucket, width)[:rows].tolist()
        self.steps += 1
        self._account(tokens, 0, rows)

    def _static_step(self, rows: int, width: int) -> Any:
        """A step over ``rows`` rows (a bucket: idle rows among them write only to the
        scratch position and change nothing) and ``width`` key positions, reading and
        advancing only device state: the body of a CUDA graph."""
        import torch

        active = self._active[:rows]
        positions = self._lengths[:rows, None]
        write = torch.where(active[:, None], positions, self._slots.scratch)
        mask = self._sees(positions, width)
        out = self._model(input_ids=self._next[:rows, None], position_ids=positions,
                          attention_mask=mask, use_cache=False, logits_to_keep=1,
                          chinwag_slots=SlotView(self._slots, rows, self._slots.index(0, write),
                                                 mask))
        tokens = self._sampler.sample(out.logits[:, -1], 0, sampling=True, penalties=True,
                                      active=active)
        self._next[:rows] = torch.where(active, tokens, self._next[:rows])
        self._lengths[:rows] += active
        return tokens
