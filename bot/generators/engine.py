"""Which scheduler runs a decoder-only model: the slot engine (``slot_scheduler.py``) where
the model allows it, else the eager ``DynamicCache`` path (``eager_scheduler.py``), said once
in the log."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from bot.generators.eager_scheduler import EagerScheduler
from bot.generators.scheduler import BatchScheduler
from bot.generators.slot_cache import refusal
from bot.generators.slot_scheduler import SlotScheduler

logger = logging.getLogger(__name__)


def make_scheduler(model: Any, *, eos_ids: Sequence[int], prefix_cache_bytes: int = 0,
                   **limits: Any) -> BatchScheduler:
    """``prefix_cache_bytes``: host memory for finished conversations' keys and values
    (``prefix_cache.py``), which only the slot engine keeps."""
    reason = refusal(model)
    if reason is None:
        return SlotScheduler(model, eos_ids=eos_ids, prefix_cache_bytes=prefix_cache_bytes,
                             **limits)
    logger.warning("model %s runs on the eager path (no slot cache, no CUDA graphs: slower) "
                   "because %s", getattr(model.config, "name_or_path", "?") or "?", reason)
    return EagerScheduler(model, eos_ids=eos_ids, **limits)
