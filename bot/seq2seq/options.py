"""What a seq2seq model is (``ModelConfig``, saved in its ``config.json``) and how it is
trained (``TrainOptions``). Plain data: reading them imports no torch."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

Cell = Literal["gru", "lstm"]
Score = Literal["general", "dot", "concat"]
CELLS: tuple[Cell, ...] = ("gru", "lstm")
SCORES: tuple[Score, ...] = ("general", "dot", "concat")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    vocab_size: int
    hidden: int = 192
    embedding: int = 128
    layers: int = 1
    cell: Cell = "gru"
    bidirectional: bool = True
    attention: Score = "general"
    dropout: float = 0.5
    """On embeddings and on the attentional state; between layers too. The corpora are
    small: without much of it the model learns the training replies by heart."""
    max_source_len: int = 64
    """Encoder input tokens: a longer input keeps its newest tokens."""
    max_target_len: int = 64
    """Reply tokens the decoder writes at most (and is trained on)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown model settings: {', '.join(sorted(unknown))}")
        config = cls(**data)
        if config.cell not in CELLS or config.attention not in SCORES:
            raise ValueError(f"cell {config.cell!r} or attention {config.attention!r} unknown")
        sizes = ("vocab_size", "hidden", "embedding", "layers", "max_source_len",
                 "max_target_len")
        for name in sizes:
            value = getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} is {value!r}, not a positive whole number")
        if not isinstance(config.bidirectional, bool) \
                or not isinstance(config.dropout, int | float) or not 0 <= config.dropout < 1:
            raise ValueError(f"bidirectional {config.bidirectional!r} or dropout "
                             f"{config.dropout!r} is not valid")
        return config


DEFAULT_VOCAB = 1000
"""Enough for a corpus of some tens of thousands of tokens (chatterbot's English has 40k):
a bigger vocabulary leaves most of its tokens seen a few times only."""


@dataclass(frozen=True, slots=True)
class TrainOptions:
    model: ModelConfig = field(default_factory=lambda: ModelConfig(vocab_size=DEFAULT_VOCAB))
    """Its ``vocab_size`` is the size the tokenizer is trained to (at most)."""
    epochs: int = 30
    lr: float = 2e-3
    batch_size: int = 64
    seed: int = 0
    held_out: float = 0.1
    """The share of distinct prompts held out for perplexity and early stopping."""
    patience: int = 3
    """Epochs without a better held-out perplexity before training stops."""
    weight_decay: float = 1e-5
    clip: float = 1.0
    progress: bool = False
    """A progress bar (tqdm, on standard error) over each epoch's batches."""
    threads: int = 1
    """Torch threads while training. Small RNNs gain little from more, and lose much when
    the cores are busy: on 2 shared cores, 2 threads made epochs several times slower."""
