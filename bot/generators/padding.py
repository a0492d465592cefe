"""Zero padding for batched caches and masks: rows of different lengths made one tensor
when they join a running batch. Causal caches pad on the left (every row ends at the
current step); an encoder's states pad on the right (positions are learned from the start)."""

from __future__ import annotations

from typing import Any


def pad_left(states: Any, length: int) -> Any:
    """Left-pad ``[batch, heads, seq, dim]`` states with zeros to ``length`` positions."""
    import torch

    missing = length - states.shape[-2]
    if missing == 0:
        return states
    shape = (*states.shape[:-2], missing, states.shape[-1])
    return torch.cat([states.new_zeros(shape), states], dim=-2)


def pad_mask_left(mask: Any, length: int) -> Any:
    """Left-pad a ``[batch, seq]`` attention mask with zeros (masked) to ``length``."""
    import torch

    missing = length - mask.shape[-1]
    if missing == 0:
        return mask
    return torch.cat([mask.new_zeros((mask.shape[0], missing)), mask], dim=-1)


def pad_right(states: Any, length: int, dim: int = -2) -> Any:
    """Zeros after ``states`` along ``dim`` up to ``length``."""
    import torch

    missing = length - states.shape[dim]
    if missing == 0:
        return states
    shape = list(states.shape)
    shape[dim] = missing
    return torch.cat([states, states.new_zeros(shape)], dim=dim)
