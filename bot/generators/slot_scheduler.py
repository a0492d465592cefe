"""Continuous batching over a slot KV cache (``slot_cache.py``): the engine for decoder-only
models whose attention goes through transformers' ``AttentionInterface``.

The thread and the queue are ``BatchScheduler``'s, and admission order and chunked prefill
follow the eager path's (``eager_scheduler.py``); what differs is where the cache lives and
how a step runs:

- Prompts are prefilled straight into the rows after the batch's (``B…``), packed without
  padding into one sequence: the prompts that arrived together whole, a long one a chunk per
  step. A newcomer joins as the next row, and a departure moves the last row into its hole,
  so the batch is always the rows ``0…B-1``.
- On the CPU a step is one packed forward: the batch's next tokens and this step's prompt
  tokens together. A CPU forward is bound by reading the weights, so a prompt that rides
  along with the batch's tokens costs little more than the step would have anyway.
- On CUDA (``static_scheduler.StaticSlotScheduler``, which ``engine.make_scheduler`` picks
  there) prompts get a forward of their own, and the decoding step is replayed from a graph
  captured at start-up for each batch-size bucket and attention width; the cache is then
  allocated once, sized from free memory. On the CPU the cache is reserved whole and takes
  memory as the conversations write to it (or, where the system will not reserve it, grows
  with them). Should the machine run short of memory, the engine gives back what no row
  keeps and holds new prompts, and ends the longest replies only if memory gets critical
  (``_relieve``, ``host_memory.py``): the kernel would otherwise kill the whole bot.
- A request that ends leaves its row's keys and values in the prefix cache
  (``prefix_cache.py``); a new prompt that starts as one of those did (the conversation's
  next turn) gets them copied into its row and prefills only the rest.
- On the CPU the model's linear layers are packed for oneDNN while the engine runs
  (``packed_linear.py``): most of a CPU step is those products. The Llama family's
  decoder layers then run fused (``fused_layers.py``): fewer, larger operations.
- A step reads its inputs from device tensors (each row's next token and length) that it
  advances itself, samples on the device (``sampling.py``) and brings the sampled tokens to
  the host once: one host sync per step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from bot.errors import GenerationError
from bot.generators.fused_layers import Fused, fuse, unfuse
from bot.generators.host_copy import to_device
from bot.generators.host_memory import MemoryGuard
from bot.generators.packed_linear import Packed, pack, unpack
from bot.generators.padding import pad_right
from bot.generators.prefix_cache import Parked, PrefixCache
from bot.generators.sampling import Sampler
from bot.generators.scheduler import STALL_AFTER_S, BatchScheduler, Chunk, Request
from bot.generators.slot_cache import (
    Segment,
    SlotCache,
    SlotView,
    install,
    uncaptured_cache,
    uninstall,
    window,
)
from bot.i18n import N_

logger = logging.getLogger(__name__)


class SlotScheduler(BatchScheduler):
    def __init__(self, model: Any, *, eos_ids: Sequence[int], max_sequences: int = 32,
                 max_queued: int = 256, prefill_chunk: int = 512,
                 stall_after: float = STALL_AFTER_S, threads: int | None = None,
                 cache_length: int | None = None, prefix_cache_bytes: int = 0,
                 reserve: bool = True, memory: Callable[[], int | None] | None = None) -> None:
        super().__init__(model, eos_ids=eos_ids, max_sequences=max_sequences,
                         max_queued=max_queued, prefill_chunk=prefill_chunk,
                         stall_after=stall_after, threads=threads)
        self._attention = install(model)
        self._cuda = model.device.type == "cuda"
        self._limit = window(model.config)
        """A row ends when its next token would not fit: at the model's window, or (on CUDA)
        the cache's length."""
        self._cache_setting = cache_length
        self._reserve = reserve
        """On the CPU, reserve the whole cache (``SlotCache.reserved``); tests of the cache
        that grows instead turn it off."""
        self._memory = memory
        """What memory is left (``host_memory.HostMemory`` unless a test stands in)."""
        self._guard: MemoryGuard | None = None
        """For a reserved cache: says when memory runs short (``_relieve``)."""
        self._short = False
        """Memory was short at this step's start: new prompts wait while replies run, and
        no finished conversation is parked."""
        self._host_lengths: list[int] = []
        # Allocated by _prepare, on the scheduler's thread.
        self._slots: SlotCache = None  # type: ignore[assignment]
        self._sampler: Sampler = None  # type: ignore[assignment]
        self._next: Any = None
        """Each row's next input token (the one it sampled last)."""
        self._lengths: Any = None
        """Each row's tokens in the cache: where its next token writes."""
        self._active: Any = None
        self._widths: Any = None
        self._packed_linears: Packed | None = None
        self._fused: Fused | None = None
        self.prefixes = PrefixCache(prefix_cache_bytes, pinned=self._cuda)
        """Finished conversations' keys and values, for their next turn (``prefix_cache.py``;
        a budget of 0 keeps none)."""
        self._reusing: dict[Request, tuple[int, Parked]] = {}
        """Waiting requests whose prompt starts as a parked conversation: how much of it."""

    @property
    def window(self) -> int:
        """The longest conversation (prompt and reply) a row holds: the model's window, or
        on CUDA the cache's length where memory allowed less (known once started)."""
        return self._limit

    def _prepare(self) -> None:
        """Allocate the cache and the step's state on the scheduler's thread: a CPU thread
        that ran torch and lives on slows every step (see ``torch_threads.py``)."""
        import torch

        model, device = self._model, self._model.device
        self._slots = self._cache()
        slots, length = self._slots.slots, self._slots.length
        vocab = model.get_output_embeddings().weight.shape[0]
        self._sampler = Sampler(slots, vocab, device)
        self._packed_linears = pack(model)  # after reading the weights' shapes
        self._fused = fuse(model, self._packed_linears)
        self._next = torch.zeros(slots, dtype=torch.long, device=device)
        self._lengths = torch.zeros(slots, dtype=torch.long, device=device)
        self._active = torch.zeros(slots, dtype=torch.bool, device=device)
        self._widths = torch.arange(length + 1, device=device)

    def _cache(self, *, grow_rows: bool = True) -> SlotCache:
        """The cache of a device without graphs (``slot_cache.uncaptured_cache``), watched
        by a ``MemoryGuard`` where it can give memory back."""
        config, model = self._model.config, self._model
        cache = uncaptured_cache(
            config, model.dtype, model.device, slots=self._max_sequences,
            length=self._cache_setting or self._limit, start_length=self._cache_setting,
            reserve=self._reserve, grow_rows=grow_rows)
        if not cache.growable:
            self._limit = min(self._limit, cache.length)
        if cache.releasable:
            # Room for what one step may write: a prompt chunk and a token a row.
            most = (self._prefill_chunk + cache.slots) * cache.bytes_per_token()
            self._guard = MemoryGuard.for_steps(most, self._memory)
        return cache

    def stop(self) -> None:
        thread = self._thread
        super().stop()
        if thread is not None and thread.is_alive():
            # A step still running uses the packed weights and the slot attention: taking
            # them away would fail it in odd ways. The model stays as the engine left it.
            logger.warning("the scheduler thread did not stop in time: the model keeps the "
                           "engine's packed weights, fused layers and attention")
            return
        self.prefixes.clear()
        unfuse(self._fused)
        self._fused = None
        unpack(self._packed_linears)
        self._packed_linears = None
        uninstall(self._model, self._attention)
        self._stopped()

    def _stopped(self) -> None:
        """Run once the thread has stopped cleanly and the model is given back."""

    # Memory: growing a CPU cache the system would not reserve whole, giving back a
    # reserved one's.

    def _part_prefilled(self) -> list[Request]:
        """The long prompts part prefilled: each holds a row past the batch's."""
        return [r for r in self._waiting if r.prefilled and r.row >= 0]

    def _used(self) -> int:
        return max([len(self._rows), *(r.row + 1 for r in self._part_prefilled())])

    def _ensure(self, rows: int, length: int) -> None:
        import torch

        if length > self._limit:
            raise ValueError(f"a conversation of {length} tokens is beyond the model's "
                             f"window of {self._limit}")
        used = self._used()
        if not self._slots.ensure(rows, length, used):
            return
        slots = self._slots.slots
        self._sampler.grow(slots)
        # New rows are idle (``_active`` false) until a request joins and sets them.
        for name in ("_next", "_lengths", "_active"):
            setattr(self, name, pad_right(getattr(self, name), slots, dim=0))
        self._widths = torch.arange(self._slots.length + 1, device=self._slots.device)

    def _relieve(self) -> int:
        """Memory is short (``_step`` asked): drop the parked conversations and give back
        the cache's memory that no row keeps (all of the rows on a shortage's first step,
        then the idle ones: a system call per row, layer and head). Should the guard say
        replies must give memory back (critical, a step later), end those that hold the
        most: the kernel's OOM killer would otherwise end the whole bot. How many ended."""
        guard = self._guard
        assert guard is not None
        self.prefixes.clear()
        self._reusing = {}  # (they hold parked conversations too)
        idle = range(len(self._rows), self._slots.slots)
        self._slots.release(self._kept(), None if guard.strained == 1 else idle)
        missing = guard.cut_due()
        ended = self._end_holding(missing) if missing else 0
        guard.report(ended, waiting=bool(self._rows))
        return ended

    def _end_holding(self, missing: int) -> int:
        """End the replies, and the long prompts part prefilled, that hold the most, until
        they have given back ``missing`` bytes (counted: what a system reports may lag).
        None where all of them together hold less: the memory is not theirs."""
        per_token = self._slots.bytes_per_token()
        holding = [*zip(self._host_lengths, self._rows, strict=True),
                   *((r.prefilled, r) for r in self._part_prefilled())]
        if sum(tokens for tokens, _request in holding) * per_token < missing:
            return 0
        ended = 0
        for tokens, request in sorted(holding, key=lambda held: -held[0]):
            if missing <= 0:
                break
            missing -= tokens * per_token
            self._finish(request, GenerationError(N_(
                "the machine ran short of memory, so this reply was cut short")))
            if request in self._waiting:
                self._waiting.remove(request)
            else:
                self._leave(request.row)
            ended += 1
        self._slots.release(self._kept(), range(len(self._rows), self._slots.slots))
        return ended

    def _kept(self) -> dict[int, int]:
        """The positions each row keeps (``SlotCache.release``): the batch's and those of
        the long prompts part prefilled."""
        keep = dict(enumerate(self._host_lengths))
        for request in self._part_prefilled():
            keep[request.row] = max(keep.get(request.row, 0), request.prefilled)
        return keep

    # A step.

    def _step(self) -> None:
        self._waiting = [r for r in self._waiting
                         if not self._dropped(r) and not self._too_long(r)]
        self._short = self._guard is not None and self._guard.short()
        ended = self._relieve() if self._short else 0
        if self._reusing:
            self._reusing = {r: found for r, found in self._reusing.items()
                             if r in self._waiting}
        # A new prompt may start past a parked one. Short of memory, it waits for the batch
        # (or a step, where conversations were just ended to give memory back).
        held = self._short and bool(self._rows or ended)
        self._advance([] if held else self._chunks(self._start))

    def _advance(self, plan: list[Chunk]) -> None:
        """Prefill ``plan`` and decode the batch: one packed forward."""
        if plan or self._rows:
            decoding = bool(self._rows)
            started = time.perf_counter()
            self._packed(plan, decode=decoding)
            if decoding:
                self.steps += 1
                self.decode_seconds += time.perf_counter() - started

    def _too_long(self, request: Request) -> bool:
        if len(request.prompt) < self._limit:
            return False
        self._finish(request, GenerationError(N_("the conversation is too long for the "
                                                 "model")))
        return True

    def _start(self, request: Request) -> int:
        """Where ``request``'s prompt goes on from: what it has prefilled, or for a new one
        what a parked conversation gives it (all but its last token, whose logits are
        needed; looked up once)."""
        if request.prefilled or not self.prefixes.budget:
            return request.prefilled
        if request not in self._reusing:
            found = self.prefixes.match(request.prompt, len(request.prompt) - 1)
            if found[1] is None:
                return 0
            self._reusing[request] = (found[0], found[1])
        return self._reusing[request][0]

    def _packed(self, plan: list[Chunk], *, decode: bool) -> None:
        """One forward over the batch's next tokens (when ``decode``) and the planned prompt
        chunks, packed in one sequence; then sampling, one host sync, and the bookkeeping."""
        import torch

        batch = len(self._rows) if decode else 0
        first = len(self._rows)
        for index, (request, start, _end) in enumerate(plan):
            if request.prefilled and request.row != first + index:  # the batch shrank
                self._move(request.row, first + index, start)
            request.row = first + index
        longest = max([*self._host_lengths[:batch], *(end for _r, _s, end in plan)])
        self._ensure(first + len(plan), longest + 1)
        for request, start, _end in plan:
            if not request.prefilled and start:
                _length, parked = self._reusing.pop(request)
                self.prefixes.restore(parked, start,
                                      self._slots.states[:, :, request.row, :, :start])
        device = self._slots.device
        ids: list[int] = []
        positions: list[int] = []
        for _request, start, end in plan:
            ids += _request.prompt[start:end]
            positions += range(start, end)
        prompt = to_device([ids, positions], device, torch.long)
        segments, keep, offset = [], list(range(batch)), batch
        for index, (request, start, end) in enumerate(plan):
            write = prompt[1, offset - batch:offset - batch + end - start]
            segments.append(Segment(offset, end - start, first + index,
                                    self._slots.index(first + index, write[None]),
                                    self._sees(write[None], end)))
            offset += end - start
            if end == len(request.prompt):
                keep.append(offset - 1)
        lengths = self._lengths[:batch, None]
        mask = self._sees(lengths, max([*self._host_lengths[:batch], 0]) + 1)
        view = SlotView(self._slots, batch, self._slots.index(0, lengths), mask,
                        tuple(segments), packed=True)
        out = self._model(input_ids=torch.cat([self._next[:batch], prompt[0]])[None],
                          position_ids=torch.cat([self._lengths[:batch], prompt[1]])[None],
                          attention_mask=mask if batch else segments[0].mask,
                          use_cache=False, chinwag_slots=view,
                          logits_to_keep=to_device(keep or [0], device, torch.long))
        for request, _start, end in plan:
            request.prefilled = end
        joining = [request for request, _start, end in plan if end == len(request.prompt)]
        self._waiting = [r for r in self._waiting if r not in joining]
        if not keep:
            return  # a long prompt's chunk, and no batch: nothing to sample yet
        self._sample_and_account(out.logits[0], batch, joining)

    def _sample_and_account(self, logits: Any, batch: int, joining: list[Request]) -> None:
        """Sample the next token of the batch's rows ``0…batch-1`` and the first of the
        ``joining`` requests (rows ``len(self._rows)…``), then emit, admit and retire."""
        import torch

        start = 0 if batch else len(self._rows)
        first = len(self._rows)
        self._admitting = joining
        if joining:
            self._sampler.set_rows(first, [r.params for r in joining],
                                   [r.prompt for r in joining])
        involved = [*self._rows[:batch], *joining]
        tokens = self._sampler.sample(
            logits, start, sampling=any(r.params.temperature > 0 for r in involved),
            penalties=any(r.params.repetition_penalty != 1.0 for r in involved))
        self._next[start:start + len(tokens)] = tokens
        self._lengths[:batch] += 1
        if joining:
            lengths = [len(r.prompt) for r in joining]
            self._lengths[first:first + len(joining)] = to_device(lengths, self._slots.device,
                                                                  torch.long)
            self._active[first:first + len(joining)] = True
        host = tokens.tolist()  # the step's one host sync
        for request in joining:
            self._rows.append(request)
            self._host_lengths.append(len(request.prompt))
        self._admitting = []
        self.max_batch = max(self.max_batch, len(self._rows))
        self._account(host, start, batch)

    def _account(self, tokens: list[int], start: int, batch: int) -> None:
        """Rows ``start…`` got ``tokens`` (the ones below ``batch`` fed their previous
        token this step): emit them and retire the rows that are done."""
        finished: list[int] = []
        for row, token in enumerate(tokens, start):
            request = self._rows[row]
            if row < batch:
                self._host_lengths[row] += 1
            if not self._accept(request, token):
                finished.append(row)
            elif self._host_lengths[row] + 1 >= self._limit:
                # Its next token would sit at position ``limit``: past the window (or the
                # cache). The token just emitted, at ``limit - 1``, was the last that fits.
                self._finish(request)
                finished.append(row)
        for row in reversed(finished):
            self._park(row)
            self._leave(row)

    def _sees(self, positions: Any, width: int) -> Any:
        """The attention mask of queries at ``positions`` (``[rows, queries]``) over the
        keys ``0…width-1`` of their own rows: each sees the keys up to its own position.
        ``[rows, 1, queries, width]``, built once per forward for every layer."""
        return self._widths[:width] <= positions[:, None, :, None]

    def _move(self, source: int, target: int, length: int) -> None:
        self._slots.move(source, target, length)
        self._sampler.move(source, target)
        for tensor in (self._next, self._lengths, self._active):
            tensor[target] = tensor[source]

    def _reused(self) -> int:
        return self.prefixes.reused_tokens

    def _park(self, row: int) -> None:
        """Keep row ``row``'s keys and values for its conversation's next turn: its prompt
        and reply but the last token, which was never fed."""
        if not self.prefixes.budget or self._short:
            return
        request, length = self._rows[row], self._host_lengths[row]
        tokens = [*request.prompt, *request.generated][:length]
        self.prefixes.park(tokens, self._slots.states[:, :, row, :, :length])

    def _leave(self, row: int) -> None:
        """Row ``row`` is done: the last row takes its place."""
        last = len(self._rows) - 1
        if row != last:
            self._move(last, row, self._host_lengths[last])
            self._rows[row] = self._rows[last]
            self._rows[row].row = row
            self._host_lengths[row] = self._host_lengths[last]
        self._active[last] = False
        self._rows.pop()
        self._host_lengths.pop()

    def _fail_all(self, error: BaseException) -> None:
        super()._fail_all(error)
        self._host_lengths = []
        self._reusing = {}
        self._active.zero_()
