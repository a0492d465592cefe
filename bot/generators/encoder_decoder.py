"""Continuous batching for encoder–decoder models (T5 and Flan-T5, BART, BlenderBot, Marian).

The same thread, queue, limits, health and stopping as the decoder-only schedulers
(``scheduler.py``'s ``BatchScheduler``, which this subclasses) and the eager one's sampling
(``sampling.sample_requests``); what differs is how a request runs:

- **Admission.** Requests waiting together (as many as there are free rows, within
  ``prefill_chunk`` prompt tokens; at least one) are encoded in one encoder pass,
  right-padded so every prompt starts at position 0, and take their first decoder step
  together: the decoder start token, and the generation config's forced first token if it
  names one. The encoder runs once per request; a bidirectional encoder cannot take a
  prompt in chunks, so a long prompt holds the batch up for one encoder pass.
- **Decoding.** Each step runs the decoder once for every row: one new token each, against
  the row's encoder states (their cross-attention keys and values are computed at its
  first step and kept) and its own self-attention cache. A row leaves the moment it ends
  (EOS, ``max_new_tokens``, cancelled), which frees its place.
- **Joining.** A group that has taken its first step is padded into the running batch: its
  decoder cache on the left (to the longest row), its encoder states and cross-attention
  cache on the right (to the longest prompt); the attention masks hide the padding, and
  padding no row needs any more is trimmed when rows leave. That copy is the price of
  joining, paid once per admitted group, not per step.

Rows that joined at different steps are at different decoder positions. T5's relative
position bias sees only distances, so left padding changes nothing. A position table that
the decoder indexes with one position for the whole batch (BART, Marian, BlenderBot,
Pegasus) gets a hook that looks up each row's own position; it is checked against the
model's own lookup at the first step, where the two must agree. A decoder with neither
keeps each admitted group in a batch of its own (one forward per group and step), which
is still exact. Greedy output is therefore the same alone or batched.

The repetition penalty counts the decoder's tokens (its start token, any forced first token
and the reply), not the prompt's, as transformers' ``generate`` does for these models. Not
done: beam search and the generation config's n-gram, minimum-length, length-penalty and
forced-last-token rules (BlenderBot's and BART's defaults); the bot's own sampling settings
apply, as for decoder-only models.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from bot.errors import ModelUnavailable
from bot.generators.padding import pad_left, pad_mask_left, pad_right
from bot.generators.sampling import sample_requests
from bot.generators.scheduler import STALL_AFTER_S, BatchScheduler, Request

logger = logging.getLogger(__name__)


def is_encoder_decoder(config: Any) -> bool:
    return bool(getattr(config, "is_encoder_decoder", False))


def relative_positions(config: Any) -> bool:
    """T5 and its kin (mT5, UL2, LongT5) place tokens by relative distance only."""
    return hasattr(config, "relative_attention_num_buckets")


def decoder_limit(config: Any) -> int | None:
    """The most tokens the decoder can hold: the end of its position table, or ``None``
    for relative positions."""
    if relative_positions(config):
        return None
    for name in ("max_decoder_position_embeddings", "max_target_positions",
                 "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def decoder_prefix(model: Any) -> list[int]:
    """What the decoder is fed before the reply: its start token, then the token the
    generation config forces first (BART's summarisers), if any."""
    generation, config = model.generation_config, model.config
    start = getattr(generation, "decoder_start_token_id", None)
    if start is None:
        start = getattr(config, "decoder_start_token_id", None)
    if start is None:
        raise ModelUnavailable("the model's config names no decoder_start_token_id")
    forced = getattr(generation, "forced_bos_token_id", None)
    return [int(start)] if forced is None else [int(start), int(forced)]


class RowPositions:
    """Gives each row of a decoder step its own place in the decoder's position table.

    The decoder looks positions up for the whole batch at the cache's length; a forward
    hook on the table replaces that lookup with one per row. ``offset`` is where the table
    starts (BART's learned table keeps two spare entries in front)."""

    def __init__(self, table: Any) -> None:
        self._offset = int(getattr(table, "offset", 0))
        self.rows: Any = None
        """Each row's positions for the next forward, ``[rows, tokens]``; ``None``: the
        model's own lookup."""
        self.checked = False
        self.sound = True
        """The hook's lookup matched the model's own when they had to agree."""
        self._handle = table.register_forward_hook(self._hook)

    def _hook(self, module: Any, args: Any, output: Any) -> Any:
        import torch
        from torch.nn import functional

        if self.rows is None or not self.sound:
            return None
        mine = functional.embedding(self.rows + self._offset, module.weight)
        if not self.checked:
            # The first step ever: every row at the model's own positions.
            self.checked = True
            try:
                self.sound = bool(torch.equal(mine, output.expand_as(mine)))
            except RuntimeError:
                self.sound = False
            if not self.sound:
                logger.warning("the decoder's position table is not the kind expected; "
                               "requests admitted at different steps will decode apart")
                return None
        return mine

    def close(self) -> None:
        self._handle.remove()


@dataclass(eq=False)
class _Batch:
    """Rows that decode together, and what a decoder step needs of them."""

    rows: list[Request]
    states: Any
    """Encoder output, ``[rows, source, hidden]``, right-padded."""
    source_mask: Any
    cache: Any
    """``EncoderDecoderCache``: self-attention (left-padded), cross-attention (right)."""
    mask: Any
    """Decoder self-attention mask, ``[rows, target]``, left-padded."""
    positions: list[int]
    """Per row: tokens it has fed the decoder, so the position of its next one."""
    last: list[int]
    """Per row: the token it feeds next."""


class EncoderDecoderScheduler(BatchScheduler):
    def __init__(self, model: Any, *, eos_ids: Sequence[int], max_sequences: int = 32,
                 max_queued: int = 256, prefill_chunk: int = 512,
                 stall_after: float = STALL_AFTER_S) -> None:
        import torch

        super().__init__(model, eos_ids=eos_ids, max_sequences=max_sequences,
                         max_queued=max_queued, prefill_chunk=prefill_chunk,
                         stall_after=stall_after)
        config = model.config
        self._prefix = decoder_prefix(model)
        self._limit = decoder_limit(config)
        self._pad_id = int(getattr(config, "pad_token_id", None) or 0)
        self._batches: list[_Batch] = []
        self._row_positions: RowPositions | None = None
        self._merging = relative_positions(config)
        if not self._merging:
            table = getattr(model.get_decoder(), "embed_positions", None)
            if isinstance(table, torch.nn.Embedding):
                self._row_positions = RowPositions(table)
                self._merging = True
        if not self._merging:
            logger.info("the decoder's positions cannot be set per row: requests admitted "
                        "at different steps decode in batches of their own")

    def stop(self) -> None:
        super().stop()
        if self._row_positions is not None:
            self._row_positions.close()

    def _fail_all(self, error: BaseException) -> None:
        super()._fail_all(error)
        self._batches = []

    def _step(self) -> None:
        self._waiting = [r for r in self._waiting if not self._dropped(r)]
        free = self._max_sequences - len(self._rows)
        if self._waiting and free > 0:
            group: list[Request] = []
            budget = self._prefill_chunk
            for request in self._waiting:
                if group and (len(group) == free or len(request.prompt) > budget):
                    break
                group.append(request)
                budget -= len(request.prompt)
            self._admit_group(group)
        for batch in list(self._batches):
            self._decode_batch(batch)
        self._rows = [row for batch in self._batches for row in batch.rows]

    def _decoder_step(self, batch: _Batch, ids: Any) -> Any:
        """Feed ``ids`` (``[rows, tokens]``) to the decoder; the last position's logits."""
        import torch
        from transformers.modeling_outputs import BaseModelOutput

        rows, tokens = ids.shape
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((rows, tokens))], dim=1)
        if self._row_positions is not None:
            self._row_positions.rows = torch.tensor(batch.positions, device=ids.device)[:, None] \
                + torch.arange(tokens, device=ids.device)
        try:
            out = self._model(encoder_outputs=BaseModelOutput(last_hidden_state=batch.states),
                              attention_mask=batch.source_mask, decoder_input_ids=ids,
                              decoder_attention_mask=batch.mask, use_cache=True,
                              **{self._cache_arg: batch.cache})
        finally:
            if self._row_positions is not None:
                self._row_positions.rows = None
        batch.cache = getattr(out, self._cache_arg)
        batch.positions = [position + tokens for position in batch.positions]
        return out.logits[:, -1, :].float()

    def _admit_group(self, group: list[Request]) -> None:
        """Encode the group's prompts, take its first decoder step, join the batch."""
        import torch
        from transformers import DynamicCache, EncoderDecoderCache

        device = self._model.device
        self._admitting = group
        for request in group:
            self._waiting.remove(request)
            request.prefilled = len(request.prompt)
            # The decoder's input so far, as generate's repetition penalty counts it.
            request.seen = torch.tensor(sorted(set(self._prefix)), device=device)
            if self._limit is not None:  # the position table ends there
                room = max(1, self._limit - len(self._prefix))
                if request.params.max_new_tokens > room:
                    request.params = replace(request.params, max_new_tokens=room)
        width = max(len(r.prompt) for r in group)
        ids = torch.full((len(group), width), self._pad_id, dtype=torch.long, device=device)
        source_mask = torch.zeros((len(group), width), dtype=torch.long, device=device)
        for row, request in enumerate(group):
            ids[row, :len(request.prompt)] = torch.tensor(request.prompt)
            source_mask[row, :len(request.prompt)] = 1
        states = self._model.get_encoder()(input_ids=ids,
                                           attention_mask=source_mask).last_hidden_state
        batch = _Batch(rows=list(group), states=states, source_mask=source_mask,
                       cache=EncoderDecoderCache(DynamicCache(), DynamicCache()),
                       mask=source_mask.new_zeros((len(group), 0)),
                       positions=[0] * len(group), last=[])
        prefix = torch.tensor([self._prefix] * len(group), device=device)
        tokens = sample_requests(self._decoder_step(batch, prefix), group)
        batch.last = [int(token) for token in tokens]
        keep = [row for row, request in enumerate(group)
                if self._accept(request, batch.last[row])]
        if keep:
            if len(keep) < len(group):
                _select(batch, keep)
            self._join(batch)
        self._admitting = []

    def _join(self, batch: _Batch) -> None:
        if self._batches and self._merging and (
                self._row_positions is None or self._row_positions.sound):
            self._batches[0] = _merge(self._batches[0], batch)
        else:
            self._batches.append(batch)
        self._rows = [row for batch in self._batches for row in batch.rows]
        self.max_batch = max(self.max_batch, len(self._rows))

    def _decode_batch(self, batch: _Batch) -> None:
        import torch

        logits = self._decoder_step(batch, torch.tensor(batch.last,
                                                        device=self._model.device)[:, None])
        self.steps += 1
        tokens = sample_requests(logits, batch.rows)
        keep: list[int] = []
        for index, request in enumerate(batch.rows):
            batch.last[index] = int(tokens[index])
            if self._accept(request, batch.last[index]):
                keep.append(index)
        if not keep:
            self._batches.remove(batch)
        elif len(keep) < len(batch.rows):
            _select(batch, keep)


def _layers(cache: Any) -> list[tuple[Any, Any]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _select(batch: _Batch, keep: list[int]) -> None:
    """Keep these rows, then trim the padding none of them needs."""
    import torch

    index = torch.tensor(keep, device=batch.mask.device)
    batch.cache.batch_select_indices(index)
    batch.rows = [batch.rows[i] for i in keep]
    batch.positions = [batch.positions[i] for i in keep]
    batch.last = [batch.last[i] for i in keep]
    batch.states, batch.source_mask = batch.states[index], batch.source_mask[index]
    batch.mask = batch.mask[index]
    lead = int((batch.mask.sum(dim=0) > 0).nonzero()[0])
    if lead:
        batch.mask = batch.mask[:, lead:]
        for layer in batch.cache.self_attention_cache.layers:
            layer.keys, layer.values = layer.keys[..., lead:, :], layer.values[..., lead:, :]
    width = int((batch.source_mask.sum(dim=0) > 0).nonzero()[-1]) + 1
    if width < batch.source_mask.shape[1]:
        batch.states, batch.source_mask = batch.states[:, :width], batch.source_mask[:, :width]
        for layer in batch.cache.cross_attention_cache.layers:
            layer.keys, layer.values = layer.keys[..., :width, :], layer.values[..., :width, :]


def _merge(old: _Batch, new: _Batch) -> _Batch:
    """One batch of both: decoder states left-padded, encoder states right-padded."""
    import torch
    from transformers import DynamicCache, EncoderDecoderCache

    target = max(old.mask.shape[1], new.mask.shape[1])
    source = max(old.source_mask.shape[1], new.source_mask.shape[1])
    selves = [(torch.cat([pad_left(ok, target), pad_left(nk, target)]),
               torch.cat([pad_left(ov, target), pad_left(nv, target)]))
              for (ok, ov), (nk, nv) in zip(_layers(old.cache.self_attention_cache),
                                            _layers(new.cache.self_attention_cache),
                                            strict=True)]
    crosses = [(torch.cat([pad_right(ok, source), pad_right(nk, source)]),
                torch.cat([pad_right(ov, source), pad_right(nv, source)]))
               for (ok, ov), (nk, nv) in zip(_layers(old.cache.cross_attention_cache),
                                             _layers(new.cache.cross_attention_cache),
                                             strict=True)]
    return _Batch(
        rows=[*old.rows, *new.rows],
        states=torch.cat([pad_right(old.states, source, dim=1),
                          pad_right(new.states, source, dim=1)]),
        source_mask=torch.cat([pad_right(old.source_mask, source, dim=1),
                               pad_right(new.source_mask, source, dim=1)]),
        cache=EncoderDecoderCache(DynamicCache(ddp_cache_data=selves),
                                  DynamicCache(ddp_cache_data=crosses)),
        mask=torch.cat([pad_mask_left(old.mask, target), pad_mask_left(new.mask, target)]),
        positions=[*old.positions, *new.positions], last=[*old.last, *new.last])
