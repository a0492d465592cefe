"""Which scheduler runs a decoder-only model: the slot engine where the model allows it (on
CUDA over static shapes replayed from graphs, ``static_scheduler.py``; elsewhere packed,
``slot_scheduler.py``), else the eager ``DynamicCache`` path (``eager_scheduler.py``), said
once in the log."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from bot.generators.eager_scheduler import EagerScheduler
from bot.generators.scheduler import BatchScheduler
from bot.generators.slot_cache import refusal
from bot.generators.slot_scheduler import SlotScheduler
from bot.generators.static_scheduler import StaticSlotScheduler

logger = logging.getLogger(__name__)


def make_scheduler(model: Any, *, eos_ids: Sequence[int], prefix_cache_bytes: int = 0,
                   **limits: Any) -> BatchScheduler:
    """``prefix_cache_bytes``: host memory for finished conversations' keys and values
    (``prefix_cache.py``), which only the slot engine keeps."""
    reason = refusal(model)
    if reason is None:
        engine = StaticSlotScheduler if model.device.type == "cuda" else SlotScheduler
        return engine(model, eos_ids=eos_ids, prefix_cache_bytes=prefix_cache_bytes, **limits)
    logger.warning("model %s runs on the eager path (no slot cache, no CUDA graphs: slower) "
                   "because %s", getattr(model.config, "name_or_path", "?") or "?", reason)
    return EagerScheduler(model, eos_ids=eos_ids, **limits)
