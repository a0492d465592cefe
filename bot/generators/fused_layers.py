"""A CPU decoder layer's step in fewer, larger operations, while the slot engine runs.

After ``packed_linear.py`` a CPU step at 16 rows is about two thirds matrix products; the
rest is a few hundred small operations and the Python that calls them, which the library's
generic layer spends freely (seven operations for a norm, rotary embeddings applied to the
queries and the keys apart, a module call per product). For the decoder layers of the
Llama family (Llama, SmolLM, Mistral, Qwen2), whose step this module knows, ``fuse``
replaces the layer's forward by one that multiplies by the query, key and value weights at
once and by the gate and up weights at once (one packed weight each: a larger product runs
nearer the CPU's peak), normalises with one ``rms_norm`` and rotates the queries and keys
together. It computes what the layer computes, in the same order per element; the greedy
tests hold it to the layer's tokens.

The fused weights replace the packed ones they were built from (memory stays as it was);
``unfuse`` splits them back, so that ``packed_linear.unpack`` finds what it packed. Layers of
other kinds, or with anything this module does not know (per-head norms, another
activation, an unpacked product), keep their own forward. While its layers are fused, the
model serves the engine alone: a forward without the engine's slots raises (it would miss
its caller's cache); nothing else in the bot runs it meanwhile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from bot.generators.packed_linear import ROWS_HINT, Packed, packed_product

logger = logging.getLogger(__name__)

LAYERS = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"})
"""Decoder layers whose step is the one written below: pre-norm attention with rotary
embeddings, then a gated SiLU MLP."""


@dataclass
class Fused:
    """What ``fuse`` changed, for ``unfuse``."""

    layers: list[Any] = field(default_factory=list)


def fuse(model: Any, packed: Packed | None) -> Fused | None:
    """Fuse every layer of a known kind whose products ``packed`` holds; ``None`` when no
    layer was (nothing changed)."""
    if packed is None:
        return None
    fused = Fused()
    try:
        for module in model.modules():
            if _fusable(module):
                _fuse_one(module)
                fused.layers.append(module)
    except RuntimeError as exc:  # oneDNN refusing a joined weight: run the layers unfused
        unfuse(fused)
        logger.warning("decoder layers not fused (%s): decoding runs slower", exc)
        return None
    if not fused.layers:
        return None
    logger.debug("%s decoder layers fused", len(fused.layers))
    return fused


def unfuse(fused: Fused | None) -> None:
    """Give every fused layer its packed products and its own forward back."""
    import torch

    if fused is None:
        return
    for layer in fused.layers:
        attention, mlp = layer.self_attn, layer.mlp
        with torch.no_grad():
            _split(layer._chinwag_qkv, [attention.q_proj, attention.k_proj, attention.v_proj])
            _split(layer._chinwag_gate_up, [mlp.gate_proj, mlp.up_proj])
        del layer.forward, layer._chinwag_qkv, layer._chinwag_gate_up, layer._chinwag_biases
    fused.layers.clear()


def _fusable(layer: Any) -> bool:
    kind = type(layer)
    # The library's own classes: a model's remote code may name its layers alike.
    if kind.__name__ not in LAYERS or not kind.__module__.startswith("transformers.models."):
        return False
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attention is None or mlp is None or hasattr(attention, "q_norm"):
        return False
    products = [getattr(attention, name, None) for name in ("q_proj", "k_proj", "v_proj",
                                                              "o_proj")]
    products += [getattr(mlp, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if any(p is None or getattr(p, "_chinwag_packed", None) is None for p in products):
        return False
    norms = (getattr(layer, "input_layernorm", None),
             getattr(layer, "post_attention_layernorm", None))
    if any(not hasattr(norm, "variance_epsilon") for norm in norms):
        return False
    return type(getattr(mlp, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation") \
        and "forward" not in vars(layer)


def _fuse_one(layer: Any) -> None:
    """Fuse one layer; a refused join leaves it as it was."""
    import torch

    attention, mlp = layer.self_attn, layer.mlp
    with torch.no_grad():
        qkv = _join([attention.q_proj, attention.k_proj, attention.v_proj])
        gate_up = _join([mlp.gate_proj, mlp.up_proj])
    # Joined: the parts' own packed weights go (the joined ones replace them).
    for product in (attention.q_proj, attention.k_proj, attention.v_proj, mlp.gate_proj,
                    mlp.up_proj):
        product._chinwag_packed = None
    layer._chinwag_qkv, layer._chinwag_gate_up = qkv, gate_up
    layer._chinwag_biases = (_bias([attention.q_proj, attention.k_proj, attention.v_proj]),
                             _bias([mlp.gate_proj, mlp.up_proj]))
    # On the instance: ``unfuse`` deletes it and the class's forward is back.
    setattr(layer, "forward", _fused_forward.__get__(layer))  # noqa: B010


def _join(products: list[Any]) -> Any:
    """One packed weight of the products' stacked rows."""
    import torch

    dense = torch.cat([p._chinwag_packed.to_dense() for p in products])
    return torch.ops.mkldnn._reorder_linear_weight(dense, ROWS_HINT)


def _split(joined: Any, products: list[Any]) -> None:
    import torch

    dense, start = joined.to_dense(), 0
    for product in products:
        rows = product.out_features
        product._chinwag_packed = torch.ops.mkldnn._reorder_linear_weight(
            dense[start:start + rows].contiguous(), ROWS_HINT)
        start += rows


def _bias(products: list[Any]) -> Any:
    import torch

    if all(p.bias is None for p in products):
        return None
    return torch.cat([p.bias if p.bias is not None else p.weight.new_zeros(p.out_features)
                      for p in products]).detach()


def _norm(norm: Any, hidden: Any) -> Any:
    """What the Llama family's ``RMSNorm`` computes: in fp32, cast back, then the weight."""
    import torch

    normed = torch.nn.functional.rms_norm(hidden.float(), (hidden.shape[-1],),
                                          eps=norm.variance_epsilon)
    return norm.weight * normed.to(hidden.dtype)


def _fused_forward(self: Any, hidden_states: Any, attention_mask: Any = None,
                   position_embeddings: Any = None, **kwargs: Any) -> Any:
    """The layer's step (its class's forward, fused): a ``[batch, tokens, hidden]`` in,
    the same out. The cache is the slot engine's (``chinwag_slots`` in ``kwargs``)."""
    import torch

    from bot.generators.slot_cache import slot_attention

    if kwargs.get("chinwag_slots") is None:
        # Only the slot engine calls a fused layer: any other caller's cache would be missed.
        raise RuntimeError("a fused decoder layer runs only inside Chinwag's slot engine")
    attention, mlp = self.self_attn, self.mlp
    batch, tokens, _ = hidden_states.shape
    dim = attention.head_dim
    heads = attention.q_proj.out_features // dim
    kv_heads = attention.k_proj.out_features // dim
    qkv_bias, gate_up_bias = self._chinwag_biases

    qkv = packed_product(_norm(self.input_layernorm, hidden_states), self._chinwag_qkv, qkv_bias)
    rotated = qkv[..., :(heads + kv_heads) * dim].view(batch, tokens, heads + kv_heads, dim)
    cos, sin = (part[:, :, None] for part in position_embeddings)
    half = dim // 2
    turned = torch.cat((-rotated[..., half:], rotated[..., :half]), dim=-1)
    rotated = (rotated * cos) + (turned * sin)  # as ``apply_rotary_pos_emb``, both at once
    query = rotated[:, :, :heads].transpose(1, 2)
    key = rotated[:, :, heads:].transpose(1, 2)
    value = qkv[..., (heads + kv_heads) * dim:].view(batch, tokens, kv_heads, dim).transpose(1, 2)
    out, _ = slot_attention(attention, query, key, value, attention_mask,
                            scaling=attention.scaling, **kwargs)
    hidden_states = hidden_states + packed_product(out.reshape(batch, tokens, heads * dim),
                                                   attention.o_proj._chinwag_packed,
                                                   attention.o_proj.bias)

    gate_up = packed_product(_norm(self.post_attention_layernorm, hidden_states),
                             self._chinwag_gate_up, gate_up_bias)
    size = mlp.gate_proj.out_features
    gated = torch.nn.functional.silu(gate_up[..., :size]) * gate_up[..., size:]
    down = mlp.down_proj
    return hidden_states + packed_product(gated, down._chinwag_packed, down.bias)
