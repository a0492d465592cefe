"""A KV cache of fixed slots, and the attention that reads it.

Every layer's keys and values live in one tensor ``[layers, 2, slots, kv_heads, length + 1,
head_dim]``, allocated up front: a conversation owns one slot (a row) and writes each new
token at its own position, so nothing is concatenated, re-padded or gathered per step.
The running batch is the rows ``0..B-1``: a departure moves the last row into the hole
(one copy, not the batch), and a newcomer is prefilled straight into the next free rows.
The extra position at ``length`` is scratch: padding tokens and the idle rows of a CUDA
graph's batch write there, and no query ever reads it.

On the CPU the cache is reserved whole (every row, the model's window) as an anonymous
memory mapping (``SlotCache.reserved``): the kernel gives it physical memory a page at a time
as rows write, and reads a page never written as zeros. It takes what the conversations
use, never more than a cache grown to fit them would, and nothing is ever reallocated:
growing a cache copies it whole and faults in fresh memory, a stall of a tenth of a second
or more for every conversation in the batch (measured: 0.2 s of the first second of 16
conversations arriving). Where a reservation would be charged whole (strict overcommit,
Windows) or is refused, the cache starts small and grows instead (``reserved_memory.py``). A
reserved cache can give back what no row keeps (``SlotCache.release``), for a machine short
of memory.

``slot_attention`` is registered with transformers' ``AttentionInterface``, so any model
whose attention goes through that interface (Llama, Qwen, Mistral, SmolLM…) runs unchanged.
Each forward passes a ``SlotView`` (which rows, where each token writes) and a boolean
mask ``[rows, 1, queries, keys]`` built once for all layers. Grouped-query attention reads
the kv heads as they are stored: the query heads of one group become extra query rows,
so keys and values are never repeated per head.
"""

from __future__ import annotations

import logging
import mmap
from dataclasses import dataclass
from typing import Any

from bot.generators.reserved_memory import give_back, reserve

logger = logging.getLogger(__name__)

ATTENTION = "chinwag_slots"
LENGTH_STEP = 256
"""The cache's length grows (where it may) in multiples of this many positions."""
CPU_START_ROWS = 4
"""The rows a growing cache starts with."""
MEMORY_SHARE = 0.5
"""Of a GPU's free memory at start-up, the share the KV cache may take."""


def window(config: Any) -> int:
    """The model's window: the longest conversation it was made for."""
    return int(getattr(config, "max_position_embeddings", None) or 2048)


def fitting_length(config: Any, slots: int, device: Any, dtype: Any) -> int:
    """The length of a CUDA cache of ``slots`` rows: the model's window, or what
    ``MEMORY_SHARE`` of the free memory holds (a multiple of ``LENGTH_STEP``), whichever
    is shorter."""
    import torch

    probe = SlotCache(config, slots=1, length=1, device=device, dtype=dtype, growable=False)
    per_token = probe.bytes_per_token()
    del probe
    free, _total = torch.cuda.mem_get_info(device)
    fits = int(free * MEMORY_SHARE) // (per_token * slots)
    length = min(window(config), fits // LENGTH_STEP * LENGTH_STEP)
    if length < min(window(config), LENGTH_STEP):
        raise RuntimeError(f"too little GPU memory for a KV cache of {slots} "
                           f"conversations: lower CHINWAG_MAX_SEQUENCES")
    if length < window(config):
        logger.info("KV cache: %s conversations of at most %s tokens (the model's "
                    "window is %s; memory allows no more)", slots, length, window(config))
    return length


def uncaptured_cache(config: Any, dtype: Any, device: Any, *, slots: int, length: int,
                     start_length: int | None = None, reserve: bool = True,
                     grow_rows: bool = True) -> SlotCache:
    """The cache of a device without CUDA graphs, for ``slots`` rows of ``length``
    positions: on the CPU reserved whole (see above); elsewhere (MPS), or where it is not
    reserved (``reserve`` false, or the system will not), one that starts at
    ``CPU_START_ROWS`` rows (all of them unless ``grow_rows``) of ``start_length``
    positions (``LENGTH_STEP`` at most by default) and grows."""
    import torch

    reserved = SlotCache.reserved(config, slots=slots, length=length, dtype=dtype) \
        if reserve and torch.device(device).type == "cpu" else None
    if reserved is not None:
        return reserved
    return SlotCache(config, slots=min(CPU_START_ROWS, slots) if grow_rows else slots,
                     length=start_length or min(length, LENGTH_STEP), device=device,
                     dtype=dtype, growable=True)


def refusal(model: Any) -> str | None:
    """Why the slot engine cannot run this model, or ``None`` when it can. Sliding-window
    layers need a window mask and rolling writes; RoPE that rescales with the sequence's
    length (``dynamic``, ``longrope``) branches on data; logit soft-capping and attention
    sinks change the attention itself."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return "it is an encoder-decoder model"
    if not getattr(model, "_supports_attention_backend", False):
        return "its attention does not go through transformers' AttentionInterface"
    if getattr(config, "sliding_window", None) or any(
            kind != "full_attention" for kind in getattr(config, "layer_types", None) or ()):
        return "it has sliding-window layers"
    if getattr(config, "attn_logit_softcapping", None):
        return "it soft-caps attention logits"
    for rope in _rope_settings(config):
        kind = rope.get("rope_type") or rope.get("type")
        if kind in ("dynamic", "longrope"):
            return f"its RoPE is {kind!r}, which changes with the sequence's length"
    for module in model.modules():
        if hasattr(module, "sinks"):
            return "its attention has sinks"
    shape = _shape(config)
    if shape is None:
        return "its config does not give the attention's shape"
    if getattr(config, "v_head_dim", None) not in (None, shape[2]) or \
            getattr(config, "kv_lora_rank", None):
        return "its keys and values differ in size (latent attention)"
    return None


def _rope_settings(config: Any) -> list[dict[str, Any]]:
    found = []
    for name in ("rope_scaling", "rope_parameters"):
        value = getattr(config, name, None)
        if isinstance(value, dict):
            nested = [v for v in value.values() if isinstance(v, dict)]
            found += nested or [value]
    return found


def _shape(config: Any) -> tuple[int, int, int] | None:
    """Layers, kv heads and head size, from a decoder's config."""
    layers = getattr(config, "num_hidden_layers", None)
    heads = getattr(config, "num_attention_heads", None)
    if not layers or not heads:
        return None
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return int(layers), int(kv_heads), int(head_dim)


def install(model: Any) -> str:
    """Route the model's attention through ``slot_attention``; the implementation it had
    (for ``uninstall``). A call without a ``SlotView`` (``generate``, say) still gets
    ordinary SDPA with its ordinary mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, slot_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    previous = str(model.config._attn_implementation)
    _set(model, ATTENTION)
    return previous


def uninstall(model: Any, previous: str) -> None:
    """Give the model back the attention it had (transformers' own continuous batching,
    for one, refuses a model with ours)."""
    if model.config._attn_implementation == ATTENTION:
        _set(model, previous)


def _set(model: Any, name: str) -> None:
    try:
        model.set_attn_implementation(name)
    except (ValueError, AttributeError):  # releases that vet the name against their own
        model.config._attn_implementation = name


@dataclass(frozen=True)
class Segment:
    """A prompt chunk of one row inside a packed forward: tokens ``first…first+count-1`` of
    the packed sequence write where ``index`` says (``SlotCache.index``) in row ``row`` and
    see keys as ``mask`` (``[1, 1, count, width]``) says."""

    first: int
    count: int
    row: int
    index: Any
    mask: Any


@dataclass(frozen=True)
class SlotView:
    """What one forward does with the cache. Its first ``rows`` queries are one token each
    of the rows ``0…rows-1``, writing where ``index`` says (``SlotCache.index``: the
    scratch position for a graph's idle rows) and seeing keys as ``mask`` (``[rows, 1, 1,
    width]``) says. In a batched forward (a decoding step) they are the batch; in a packed
    one (batch of one, the tokens of several rows in a row) they come first, followed by
    the ``segments``."""

    cache: SlotCache
    rows: int
    index: Any
    mask: Any
    segments: tuple[Segment, ...] = ()
    packed: bool = False


class SlotCache:
    def __init__(self, config: Any, *, slots: int, length: int, device: Any, dtype: Any,
                 growable: bool, states: Any = None) -> None:
        shape = _shape(config)
        assert shape is not None, "refusal() vets the config first"
        self.layers, self.kv_heads, self.head_dim = shape
        self.device, self.dtype = device, dtype
        self.growable = growable
        self.slots = slots
        self.length = length
        self.states = self._allocate(slots, length) if states is None else states
        self._mapping: mmap.mmap | None = None
        """A reserved cache's memory mapping (``reserved``): what ``release`` advises."""

    @classmethod
    def reserved(cls, config: Any, *, slots: int, length: int, dtype: Any) -> SlotCache | None:
        """A CPU cache of ``slots`` rows of ``length`` positions that takes memory only as
        it is written (see above); ``None`` where the system will not reserve it."""
        layers, kv_heads, head_dim = _shape(config) or (0, 0, 0)
        found = reserve((layers, 2, slots, kv_heads, length + 1, head_dim), dtype,
                        "a KV cache")
        if found is None:
            return None
        states, mapping = found
        cache = cls(config, slots=slots, length=length, device=states.device, dtype=dtype,
                    growable=False, states=states)
        cache._mapping = mapping
        return cache

    @property
    def releasable(self) -> bool:
        """Whether ``release`` can give memory back: only a reserved cache's."""
        return self._mapping is not None and hasattr(mmap, "MADV_DONTNEED")

    def release(self, keep: dict[int, int], rows: range | None = None) -> None:
        """Give the system back the memory of each row's positions from ``keep[row]`` on
        (every position of a row not in ``keep``), of ``rows`` (all by default): whole
        pages of them read as zeros again, and take memory again once written. Only a
        ``releasable`` cache can. A system call per kept row, layer, keys or values and
        head; rows given back whole join up into one per layer and kind."""
        if not self.releasable:
            return
        assert self._mapping is not None
        strides = self.states.stride()
        head = strides[3]  # a head's positions in one row, layer and kind
        spans: list[list[int]] = []  # [first, end) in elements, in address order
        for layer in range(self.layers):
            for kind in (0, 1):
                for row in rows if rows is not None else range(self.slots):
                    base = layer * strides[0] + kind * strides[1] + row * strides[2]
                    start = keep.get(row, 0)
                    if start <= 0:  # the whole row: its heads are contiguous
                        parts = [(base, base + self.kv_heads * head)]
                    else:
                        parts = [(first + start * strides[4], first + head)
                                 for first in range(base, base + self.kv_heads * head, head)]
                    for first, end in parts:
                        if first >= end:
                            continue
                        if spans and spans[-1][1] == first:
                            spans[-1][1] = end
                        else:
                            spans.append([first, end])
        size = self.states.element_size()
        give_back(self._mapping, [(first * size, end * size) for first, end in spans])

    def _allocate(self, slots: int, length: int) -> Any:
        import torch

        return torch.zeros((self.layers, 2, slots, self.kv_heads, length + 1, self.head_dim),
                           device=self.device, dtype=self.dtype)

    @property
    def scratch(self) -> int:
        return self.length

    def bytes_per_token(self) -> int:
        return int(self.states[:, :, 0, :, 0].numel() * self.states.element_size())

    def ensure(self, slots: int, length: int, used: int) -> bool:
        """Room for ``slots`` rows of ``length`` positions, growing if allowed; rows below
        ``used`` are kept. Whether the cache was reallocated (views and graphs on the old
        one are stale)."""
        if slots <= self.slots and length <= self.length:
            return False
        if not self.growable:
            raise ValueError(f"the KV cache holds {self.slots} rows of {self.length} "
                             f"tokens; {slots} of {length} were asked for")
        new_slots = max(self.slots, slots)
        new_length = max(self.length, -(-length // LENGTH_STEP) * LENGTH_STEP)
        if new_slots > self.slots:
            new_slots = max(new_slots, min(2 * self.slots, slots * 2))
        states = self._allocate(new_slots, new_length)
        states[:, :, :used, :, :self.length] = self.states[:, :, :used, :, :self.length]
        self.states, self.slots, self.length = states, new_slots, new_length
        logger.debug("KV cache grown to %s rows of %s tokens", new_slots, new_length)
        return True

    def index(self, start: int, write: Any) -> Any:
        """Where the keys of rows ``start…`` go, as one layer's keys flattened to
        ``[slots * kv_heads * (length + 1), head_dim]``: token ``s`` of row ``r`` writes at
        position ``write[r, s]``; ordered as ``[rows, kv_heads, queries]``. The same for
        every layer, so built once per forward; ``index_copy_`` with it is one cheap kernel
        where advanced-index assignment costs far more (bf16 especially)."""
        import torch

        rows = write.shape[0]
        heads = torch.arange(self.kv_heads, device=write.device)
        base = (torch.arange(start, start + rows, device=write.device)[:, None]
                * self.kv_heads + heads[None]) * (self.length + 1)
        return (base[:, :, None] + write[:, None, :]).reshape(-1)

    def move(self, source: int, target: int, length: int) -> None:
        """Row ``source``'s first ``length`` positions become row ``target``'s."""
        self.states[:, :, target, :, :length] = self.states[:, :, source, :, :length]


def slot_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any,
                   scaling: float | None = None, dropout: float = 0.0,
                   **kwargs: Any) -> tuple[Any, None]:
    """Write this call's keys and values into the slots, then attend over each row's own
    positions. ``query`` is ``[batch, heads, queries, dim]``; returns ``[batch, queries,
    heads, dim]`` as transformers' attention functions do."""
    import torch

    view: SlotView | None = kwargs.get("chinwag_slots")
    if view is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    layer = view.cache.states[module.layer_idx]
    if not view.packed:
        return _attend(layer, 0, query, key, value, view.index, view.mask, scaling), None
    parts = []
    if view.rows:
        # One token per row: make the rows the batch again.
        rows = slice(0, view.rows)
        parts.append(_attend(layer, 0, query[0, :, rows].transpose(0, 1)[:, :, None],
                             key[0, :, rows].transpose(0, 1)[:, :, None],
                             value[0, :, rows].transpose(0, 1)[:, :, None],
                             view.index, view.mask, scaling).transpose(0, 1))
    for segment in view.segments:
        tokens = slice(segment.first, segment.first + segment.count)
        parts.append(_attend(layer, segment.row, query[:, :, tokens], key[:, :, tokens],
                             value[:, :, tokens], segment.index, segment.mask, scaling))
    return (parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)), None


def _attend(layer: Any, start: int, query: Any, key: Any, value: Any, index: Any,
            mask: Any, scaling: float | None) -> Any:
    """Rows ``start…`` of one layer's slots: write ``key``/``value`` (``[rows, kv_heads,
    queries, dim]``) where ``index`` says, attend ``query`` (``[rows, heads, queries,
    dim]``) under ``mask`` (``[rows, 1, queries, width]``); ``[rows, queries, heads,
    dim]``."""
    import torch

    rows, heads, queries, dim = query.shape
    layer[0].view(-1, dim).index_copy_(0, index, key.reshape(-1, dim).to(layer.dtype))
    layer[1].view(-1, dim).index_copy_(0, index, value.reshape(-1, dim).to(layer.dtype))
    keys, values = layer[0, start:start + rows], layer[1, start:start + rows]
    width = mask.shape[-1]
    kv_heads = keys.shape[1]
    group = heads // kv_heads
    # Query heads h = k * group + g all read kv head k: fold the group into the query rows.
    folded = query.reshape(rows, kv_heads, group * queries, dim)
    if queries > 1:
        mask = mask[:, :, None].expand(rows, 1, group, queries, width).reshape(
            rows, 1, group * queries, width)
    out = torch.nn.functional.scaled_dot_product_attention(
        folded, keys[:, :, :width], values[:, :, :width], attn_mask=mask, scale=scaling)
    return out.reshape(rows, heads, queries, dim).transpose(1, 2)
