"""The CPU defaults: ``CHINWAG_DTYPE=auto`` (bf16 where the CPU multiplies it natively) and
``CHINWAG_WORKERS=auto`` (the process count measured fastest here), end to end."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.config import BUILTIN_MODEL, load_settings
from bot.errors import ConfigError
from bot.generators import ChatMessage, GenerationParams, cpu_workers, huggingface
from bot.generators.huggingface import TransformersGenerator, native_bf16, pick_device
from bot.generators.workers import WorkerPool

CACHE = Path("~/.cache/chinwag").expanduser()


def test_auto_dtype_is_bf16_exactly_where_the_cpu_has_native_bf16() -> None:
    with open("/proc/cpuinfo", encoding="utf-8") as info:
        flags = set(next(line for line in info if line.startswith("flags")).split())
    assert native_bf16() == bool({"avx512_bf16", "amx_bf16"} & flags)
    expected = torch.bfloat16 if native_bf16() else torch.float32
    assert pick_device("cpu") == ("cpu", expected)
    assert pick_device("cpu", "float32") == ("cpu", torch.float32)
    assert pick_device("cpu", "bfloat16") == ("cpu", torch.bfloat16)


def test_a_dtype_that_is_not_one_of_the_choices_is_refused_by_name() -> None:
    with pytest.raises(ConfigError, match="CHINWAG_DTYPE"):
        load_settings(dtype="float8")
    assert load_settings().dtype == "auto" and load_settings().workers == "auto"
    assert load_settings(workers="3").workers == 3
    with pytest.raises(ConfigError, match="CHINWAG_WORKERS"):
        load_settings(workers="many")


def test_the_measured_choice_splits_the_cores_and_keeps_copies_in_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2)).eval()
    choice = cpu_workers.choose(model, 2)
    assert choice.processes in (1, 2) and choice.processes * choice.threads == 2
    assert set(choice.rates) == {1, 2} and all(rate > 0 for rate in choice.rates.values())
    assert cpu_workers.choose(model, 1).processes == 1
    # No room for a second copy of the model: one process, whatever is measured.
    monkeypatch.setattr(cpu_workers, "free_memory", lambda: 0)
    only = cpu_workers.choose(model, 2)
    assert (only.processes, only.threads, set(only.rates)) == (1, 2, {1})


@pytest.mark.model
async def test_auto_workers_measure_log_their_choice_and_answer(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    # Tests run one torch thread a process (conftest): pretend to have two cores.
    monkeypatch.setattr(huggingface, "intra_op_threads", lambda: 2)
    caplog.set_level(logging.INFO, logger="bot.generators.huggingface")
    async with TransformersGenerator(BUILTIN_MODEL, CACHE, "cpu", dtype="float32",
                                     max_sequences=4) as generator:
        [line] = [r.getMessage() for r in caplog.records if "CHINWAG_WORKERS=auto" in
                  r.getMessage()]
        scheduler: Any = generator.scheduler
        processes = 2 if isinstance(scheduler, WorkerPool) else 1
        assert f"auto: {processes} scheduler process(es) of {2 // processes} thread(s)" in line
        messages = [ChatMessage("user", "What is the capital of France?")]
        reply = "".join([piece async for piece in generator.stream(
            messages, GenerationParams(max_new_tokens=8, temperature=0.0))])
        assert "Paris" in reply
