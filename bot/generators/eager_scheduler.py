"""Continuous batching on transformers' ``DynamicCache``: the eager path.

It runs the decoder-only models the slot engine refuses (``engine.make_scheduler``, with the
reason from ``slot_cache.refusal``: sliding-window layers, RoPE that rescales with the
sequence's length, …), without a slot cache or CUDA graphs, so slower; and it is the
reference the slot engine's tests compare its greedy tokens against
(``tests/test_slot_engine.py``).

A new request's prompt is prefilled on its own, in chunks of at most ``prefill_chunk``
tokens interleaved with the batch's decoding steps, so a long prompt delays the others by
one chunk per step rather than by the whole prompt; short prompts that arrived together are
prefilled together. Its KV cache is then merged into the batch's, left-padded to a common
length; each row keeps its own attention mask and positions, so a request's tokens do not
depend on its neighbours (greedy output is the same alone or batched). Sampling parameters
are per request (``sampling.sample_requests``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from bot.generators.padding import pad_left, pad_mask_left
from bot.generators.sampling import sample_requests
from bot.generators.scheduler import STALL_AFTER_S, BatchScheduler, Request


class EagerScheduler(BatchScheduler):
    def __init__(self, model: Any, *, eos_ids: Sequence[int], max_sequences: int = 32,
                 max_queued: int = 256, prefill_chunk: int = 512,
                 stall_after: float = STALL_AFTER_S, threads: int | None = None) -> None:
        super().__init__(model, eos_ids=eos_ids, max_sequences=max_sequences,
                         max_queued=max_queued, prefill_chunk=prefill_chunk,
                         stall_after=stall_after, threads=threads)
        # The batch: one DynamicCache and attention mask for all rows, left-padded.
        self._cache: Any = None
        self._mask: Any = None
        self._positions: list[int] = []
        """Per row: the position of the token it feeds next."""
        self._last: list[int] = []
        """Per row: the token it feeds next (the one it sampled last)."""

    def _fail_all(self, error: BaseException) -> None:
        super()._fail_all(error)
        self._cache = self._mask = None
        self._positions, self._last = [], []

    def _step(self) -> None:
        self._waiting = [r for r in self._waiting if not self._dropped(r)]
        chunks = self._chunks()
        if chunks:
            head, _start, end = chunks[0]
            if head.prefilled or end < len(head.prompt):
                self._prefill_long(head)
            else:
                # Short prompts that arrived together are prefilled together, within budget.
                self._prefill_group([request for request, _start, _end in chunks])
        if self._rows:
            started = time.perf_counter()
            self._decode()
            self.decode_seconds += time.perf_counter() - started

    def _forward(self, ids: Any, mask: Any, positions: Any, cache: Any) -> tuple[Any, Any]:
        out = self._model(input_ids=ids, attention_mask=mask, position_ids=positions,
                          use_cache=True, logits_to_keep=1, **{self._cache_arg: cache})
        return out.logits[:, -1, :].float(), getattr(out, self._cache_arg)

    def _prefill_group(self, group: list[Request]) -> None:
        """One left-padded forward pass over several whole prompts."""
        import torch
        from transformers import DynamicCache

        device = self._model.device
        length = max(len(r.prompt) for r in group)
        ids = torch.zeros((len(group), length), dtype=torch.long, device=device)
        mask = torch.zeros((len(group), length), dtype=torch.long, device=device)
        for row, request in enumerate(group):
            ids[row, length - len(request.prompt):] = torch.tensor(request.prompt)
            mask[row, length - len(request.prompt):] = 1
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        logits, cache = self._forward(ids, mask, positions, DynamicCache())
        for request in group:
            self._waiting.remove(request)
            request.prefilled = len(request.prompt)
            request.seen = torch.tensor(sorted(set(request.prompt)), device=device)
        self._admit(group, sample_requests(logits, group), cache, mask)

    def _prefill_long(self, request: Request) -> None:
        """A long prompt, one chunk per step, so the batch keeps decoding meanwhile."""
        import torch
        from transformers import DynamicCache

        device = self._model.device
        start = request.prefilled
        chunk = list(request.prompt[start:start + self._prefill_chunk])
        end = start + len(chunk)
        logits, request.cache = self._forward(
            torch.tensor([chunk], device=device),
            torch.ones((1, end), dtype=torch.long, device=device),
            torch.arange(start, end, device=device)[None],
            request.cache if request.cache is not None else DynamicCache())
        request.prefilled = end
        if end < len(request.prompt):
            return  # the rest in later steps, between the batch's decoding steps
        self._waiting.remove(request)
        request.seen = torch.tensor(sorted(set(request.prompt)), device=device)
        cache, request.cache = request.cache, None
        self._admit([request], sample_requests(logits, [request]), cache,
                    torch.ones((1, end), dtype=torch.long, device=device))

    def _admit(self, requests: list[Request], tokens: Any, cache: Any, mask: Any) -> None:
        """Emit the first tokens of freshly prefilled requests and merge the ones that go on
        into the running batch (both caches left-padded to a common length)."""
        import torch
        from transformers import DynamicCache

        self._admitting = requests
        keep = [row for row, request in enumerate(requests)
                if self._accept(request, int(tokens[row]))]
        if not keep:
            self._admitting = []
            return
        if len(keep) < len(requests):
            index = torch.tensor(keep, device=mask.device)
            cache.batch_select_indices(index)
            mask = mask[index]
        new = [(layer.keys, layer.values) for layer in cache.layers]
        if self._cache is None:
            self._cache, self._mask = DynamicCache(ddp_cache_data=new), mask
        else:
            old = [(layer.keys, layer.values) for layer in self._cache.layers]
            length = max(old[0][0].shape[-2], new[0][0].shape[-2])
            merged = [(torch.cat([pad_left(ok, length), pad_left(nk, length)]),
                       torch.cat([pad_left(ov, length), pad_left(nv, length)]))
                      for (ok, ov), (nk, nv) in zip(old, new, strict=True)]
            self._cache = DynamicCache(ddp_cache_data=merged)
            self._mask = torch.cat([pad_mask_left(self._mask, length), pad_mask_left(mask, length)])
        for row in keep:
            self._rows.append(requests[row])
            self._positions.append(len(requests[row].prompt))
            self._last.append(int(tokens[row]))
        self._admitting = []
        self.max_batch = max(self.max_batch, len(self._rows))

    def _decode(self) -> None:
        import torch

        device = self._model.device
        rows = len(self._rows)
        self._mask = torch.cat([self._mask, self._mask.new_ones((rows, 1))], dim=1)
        logits, self._cache = self._forward(
            torch.tensor(self._last, device=device)[:, None], self._mask,
            torch.tensor(self._positions, device=device)[:, None], self._cache)
        self.steps += 1
        tokens = sample_requests(logits, self._rows)
        keep: list[int] = []
        for index, request in enumerate(self._rows):
            self._positions[index] += 1
            self._last[index] = int(tokens[index])
            if self._accept(request, int(tokens[index])):
                keep.append(index)
        if len(keep) < rows:
            self._select(keep)

    def _select(self, keep: list[int]) -> None:
        import torch

        if not keep:
            self._rows, self._positions, self._last = [], [], []
            self._cache = self._mask = None
            return
        index = torch.tensor(keep, device=self._mask.device)
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._rows = [self._rows[i] for i in keep]
        self._positions = [self._positions[i] for i in keep]
        self._last = [self._last[i] for i in keep]
        # Drop leading columns that are padding in every row.
        lead = int((self._mask.sum(dim=0) > 0).nonzero()[0])
        if lead:
            self._mask = self._mask[:, lead:]
            for layer in self._cache.layers:
                layer.keys = layer.keys[..., lead:, :]
                layer.values = layer.values[..., lead:, :]
