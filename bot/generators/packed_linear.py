"""A CPU model's linear layers with their weights laid out once for oneDNN.

A decoding step on the CPU is mostly matrix products of a few rows by every weight of the
model. ``torch.nn.functional.linear`` hands each product to oneDNN or MKL with the weight
in PyTorch's plain layout, which the library re-blocks, call after call; a weight reordered
once into oneDNN's own blocked layout (what inductor's ``freezing`` does) skips that. On
the 2-core AMD EPYC this was measured on (``bench/linear.py``), the 211 products of one
step of the built-in model at 16 rows took 15 ms instead of 23 in bf16, and 24 ms instead
of 59 in fp32.

``pack`` swaps each ``nn.Linear``'s forward for one that calls the packed weight and
drops the plain weight (the packed one replaces it; memory stays as it was); ``unpack``
rebuilds the plain weight from the packed one (the same values) and gives the class's
forward back. Weights shared with another module (tied input and output embeddings) are
packed as a copy and left in place. Only where oneDNN runs the model's dtype natively:
fp32 on x86, bf16 where the CPU has bf16 instructions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

ROWS_HINT = 16
"""The row count oneDNN lays the weights out for; any count works, this one is typical of
a decoding step with a few conversations."""


def packable(model: Any) -> str | None:
    """Why this model's linears are not packed, or ``None`` when they can be."""
    import torch

    if model.device.type != "cpu":
        return "not on the CPU"
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return "this torch has no oneDNN"
    if model.dtype == torch.bfloat16:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return "this CPU has no bf16 instructions"
    elif model.dtype != torch.float32:
        return f"oneDNN packs no {model.dtype} weights here"
    return None


@dataclass
class Packed:
    """What ``pack`` changed, for ``unpack``."""

    modules: list[tuple[Any, bool, bool]] = field(default_factory=list)
    """Each packed linear, whether its plain weight was dropped (else it is shared and
    stayed in place), and whether that weight required grad."""


def pack(model: Any) -> Packed | None:
    """Pack the model's linear layers; ``None`` (and nothing changed) where they cannot
    be."""
    import torch

    reason = packable(model)
    if reason is not None:
        logger.debug("linear layers not packed: %s", reason)
        return None
    shared = _shared_weights(model)
    packed = Packed()
    try:
        with torch.no_grad():
            for module in model.modules():
                if type(module) is torch.nn.Linear and module.weight.dtype == model.dtype \
                        and "forward" not in vars(module):  # not one hooked by accelerate
                    _pack_one(module, drop=id(module.weight) not in shared, packed=packed)
    except RuntimeError as exc:  # oneDNN refusing a shape: serve unpacked, as before
        unpack(packed)
        logger.warning("linear layers not packed for oneDNN (%s): decoding runs slower", exc)
        return None
    logger.debug("%s linear layers packed for oneDNN", len(packed.modules))
    return packed


def _pack_one(module: Any, *, drop: bool, packed: Packed) -> None:
    import torch

    weight = module.weight
    module._chinwag_packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(),
                                                                     ROWS_HINT)
    if drop:
        # An empty stand-in keeps ``model.dtype``/``device`` and what reads the weight's
        # dtype; the packed copy is the weight meanwhile (nothing here keeps the plain one).
        module.weight = torch.nn.Parameter(weight.new_empty(0), requires_grad=False)
    # On the instance: ``unpack`` deletes it and the class's forward is back.
    setattr(module, "forward", _packed_forward.__get__(module))  # noqa: B010
    packed.modules.append((module, drop, weight.requires_grad))


def unpack(packed: Packed | None) -> None:
    """Give every packed linear its plain weight and forward back."""
    import torch

    if packed is None:
        return
    for module, dropped, grad in packed.modules:
        if dropped:
            # Ordinary tensors, also when a refused pack is undone under inference mode
            # (the engine's thread): an inference tensor would fail any later autograd use.
            with torch.inference_mode(False):
                dense = module._chinwag_packed.to_dense()
            module.weight = torch.nn.Parameter(dense, requires_grad=grad)
        del module.forward
        del module._chinwag_packed
    packed.modules.clear()


def _shared_weights(model: Any) -> set[int]:
    import torch

    seen: dict[int, int] = {}
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if name == "weight" or isinstance(module, torch.nn.Embedding):
                seen[id(parameter)] = seen.get(id(parameter), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def packed_product(input: Any, weight: Any, bias: Any) -> Any:
    """``input`` times a packed ``weight`` (``_reorder_linear_weight``), plus ``bias``."""
    import torch

    # The op's overload itself: the packet's dispatch costs as much as a small product.
    return torch.ops.mkldnn._linear_pointwise.default(
        input if input.is_contiguous() else input.contiguous(), weight, bias, "none", [], "")


def _packed_forward(self: Any, input: Any) -> Any:
    return packed_product(input, self._chinwag_packed, self.bias)
