"""A trained model on disk: one folder, as ``chinwag train seq2seq --out DIR`` writes it and
``CHINWAG_GENERATOR=seq2seq CHINWAG_MODEL=DIR`` loads it.

- ``model.safetensors``: the weights;
- ``config.json``: ``{"model_type": "chinwag-seq2seq", "model": {...}, "training": {...}}``,
  the architecture (``ModelConfig``) and a summary of how it was trained;
- ``tokenizer.json``: the ``tokenizers`` tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.errors import ModelUnavailable, TrainingError
from bot.seq2seq.model import Seq2Seq
from bot.seq2seq.options import ModelConfig
from bot.seq2seq.tokenizer import Seq2SeqTokenizer

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
MODEL_TYPE = "chinwag-seq2seq"


@dataclass(frozen=True, slots=True)
class SavedModel:
    model: Seq2Seq
    tokenizer: Seq2SeqTokenizer
    training: dict[str, Any]
    """What ``config.json`` says about the training run (corpus, epochs, perplexity)."""


def check_writable(directory: Path) -> None:
    """Refuse a folder that holds something other than a seq2seq model (say ``--out`` named
    a transformers model's folder): saving would overwrite its ``config.json`` and
    ``tokenizer.json``. Called before training, so a mistake costs no training time."""
    if directory.exists() and not directory.is_dir():
        raise TrainingError(f"{directory} is a file, not a folder to write the model to")
    config = directory / CONFIG
    if directory.is_dir() and any(directory.iterdir()) and not config.is_file():
        raise TrainingError(f"{directory} is not empty and holds no seq2seq model: "
                            "name a new folder with --out")
    if config.is_file():
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None
        if model_type != MODEL_TYPE:
            raise TrainingError(f"{directory} holds another kind of model ({CONFIG} says "
                                f"model_type {model_type!r}): name a new folder with --out")


def save(directory: Path, model: Seq2Seq, tokenizer: Seq2SeqTokenizer,
         training: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    check_writable(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().contiguous() for name, tensor in
               model.state_dict().items()}
    save_file(weights, str(directory / WEIGHTS), metadata={"format": "pt"})
    config = {"model_type": MODEL_TYPE, "model": model.config.as_dict(), "training": training}
    (directory / CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                    encoding="utf-8")
    tokenizer.save(directory / TOKENIZER)


def load(directory: Path) -> SavedModel:
    """The model in eval mode, on the CPU. Raises ``ModelUnavailable`` saying what is
    wrong with the folder."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not directory.is_dir():
        raise ModelUnavailable(f"{directory} is not a folder (train one with "
                               "`chinwag train seq2seq`)")
    for name in (WEIGHTS, CONFIG, TOKENIZER):
        if not (directory / name).is_file():
            raise ModelUnavailable(f"{directory} has no {name}: not a seq2seq model folder "
                                   "(train one with `chinwag train seq2seq`)")
    try:
        config = json.loads((directory / CONFIG).read_text(encoding="utf-8"))
        if config.get("model_type") != MODEL_TYPE:
            raise ValueError(f"model_type is {config.get('model_type')!r}, not {MODEL_TYPE!r}")
        model_config = ModelConfig.from_dict(config["model"])
        weights = load_file(str(directory / WEIGHTS))
        # Shapes checked on a model without memory first: a config.json with absurd sizes
        # fails here instead of allocating (and filling) them.
        with torch.device("meta"):
            expected = {k: v.shape for k, v in Seq2Seq(model_config).state_dict().items()}
        if expected != {k: v.shape for k, v in weights.items()}:
            raise ValueError(f"{WEIGHTS} does not hold the weights {CONFIG} describes")
        model = Seq2Seq(model_config)
        model.load_state_dict(weights)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError,
            SafetensorError) as exc:
        raise ModelUnavailable(f"cannot load the seq2seq model in {directory}: {exc}") from exc
    try:
        tokenizer = Seq2SeqTokenizer.load(directory / TOKENIZER)
    except Exception as exc:  # tokenizers raises a bare Exception for a broken file
        raise ModelUnavailable(f"cannot load the tokenizer in {directory}: {exc}") from exc
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ModelUnavailable(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens "
                               f"and the model {model.config.vocab_size}")
    model.eval()
    return SavedModel(model, tokenizer, dict(config.get("training") or {}))
