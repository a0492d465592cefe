"""Linear layers packed for oneDNN (``packed_linear.py``): the same outputs, the same memory,
tied weights left alone, everything given back by ``unpack``, and the slot engine packing
while it runs."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bot.generators.base import GenerationParams
from bot.generators.packed_linear import pack, packable, unpack
from bot.generators.scheduler import Request
from bot.generators.slot_scheduler import SlotScheduler
from tests.auxil.waiting import until

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="this torch has no oneDNN")


def tiny(dtype: Any, tied: bool) -> Any:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None,
                         pad_token_id=None)
    return LlamaForCausalLM(config).to(dtype).eval()


def logits(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def linears(model: Any) -> list[Any]:
    return [m for m in model.modules() if type(m) is torch.nn.Linear]


@pytest.mark.parametrize("tied", [True, False])
def test_packed_model_computes_the_same_and_unpack_restores_it(tied: bool) -> None:
    model = tiny(torch.float32, tied)
    ids = torch.tensor([[5, 17, 99, 3, 250, 41, 7]])
    weights = {id(m): m.weight for m in linears(model)}
    before = logits(model, ids)

    packed = pack(model)
    assert packed is not None
    assert all(hasattr(m, "_chinwag_packed") for m in linears(model))
    embedding = model.get_input_embeddings().weight
    if tied:  # the output layer shares the embedding: packed as a copy, left in place
        assert model.lm_head.weight is embedding and embedding.numel() == 256 * 64
    else:
        assert model.lm_head.weight.numel() == 0
    # Every other plain weight is dropped while packed: the packed copy replaces it.
    assert all(m.weight.numel() == 0 for m in linears(model) if m is not model.lm_head)
    assert model.dtype == torch.float32
    during = logits(model, ids)
    torch.testing.assert_close(during, before, rtol=1e-4, atol=1e-4)
    assert torch.equal(during.argmax(-1), before.argmax(-1))

    unpack(packed)
    assert all(torch.equal(m.weight, weights[id(m)]) for m in linears(model))
    assert all(m.weight.requires_grad == weights[id(m)].requires_grad for m in linears(model))
    assert not any(hasattr(m, "_chinwag_packed") or "forward" in vars(m)
                   for m in linears(model))
    assert torch.equal(logits(model, ids), before)


def test_the_plain_weights_packing_drops_are_freed_meanwhile() -> None:
    """The module promises that memory stays as it was: a dropped plain weight must not be
    kept alive (``Packed`` holding it for ``unpack`` doubles the linears' memory)."""
    model = tiny(torch.float32, tied=False)
    plain = [weakref.ref(m.weight) for m in linears(model)]
    packed = pack(model)
    assert packed is not None
    gc.collect()
    kept = sum(ref() is not None for ref in plain)
    unpack(packed)
    assert kept == 0, f"{kept} of {len(plain)} dropped plain weights still held while packed"


def test_bf16_packs_only_where_the_cpu_has_bf16_and_other_dtypes_not_at_all() -> None:
    half = tiny(torch.float16, tied=True)
    assert packable(half) is not None
    assert pack(half) is None
    assert not any(hasattr(m, "_chinwag_packed") for m in linears(half))

    model = tiny(torch.bfloat16, tied=False)
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert packable(model) == "this CPU has no bf16 instructions"
        return
    ids = torch.tensor([[5, 17, 99, 3]])
    before = logits(model, ids)
    packed = pack(model)
    assert packed is not None
    torch.testing.assert_close(logits(model, ids), before, rtol=2e-2, atol=2e-2)
    unpack(packed)
    assert torch.equal(logits(model, ids), before)


async def test_the_slot_engine_packs_while_it_runs_and_unpacks_at_stop() -> None:
    model = tiny(torch.float32, tied=True)
    scheduler = SlotScheduler(model, eos_ids=[], threads=1)
    scheduler.start()
    try:
        assert all(hasattr(m, "_chinwag_packed") for m in linears(model))
        tokens: list[int] = []
        done: list[object] = []

        def emit(item: object) -> None:
            (tokens.append(item) if isinstance(item, int) else done.append(item))

        scheduler.submit(Request([5, 17, 99], GenerationParams(max_new_tokens=6,
                                                                temperature=0.0),
                                 emit, ignore_eos=True))
        await until(lambda: bool(done), "the reply")
        assert done == [None] and len(tokens) == 6
    finally:
        scheduler.stop()
    assert not any(hasattr(m, "_chinwag_packed") for m in linears(model))
    assert all(m.weight.numel() > 0 for m in linears(model))


def test_a_weight_onednn_refuses_leaves_the_model_as_it_was(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    model = tiny(torch.float32, tied=False)
    ids = torch.tensor([[5, 17, 99]])
    weights = {id(m): m.weight for m in linears(model)}
    before = logits(model, ids)
    reorder = torch.ops.mkldnn._reorder_linear_weight
    calls = []

    def refusing(weight: Any, rows: int) -> Any:
        calls.append(weight.shape)
        if len(calls) == 3:  # two layers packed already: they must be given back
            raise RuntimeError("could not create a primitive descriptor")
        return reorder(weight, rows)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refusing)
    assert pack(model) is None
    assert len(calls) == 3
    assert all(torch.equal(m.weight, weights[id(m)]) for m in linears(model))
    assert not any(hasattr(m, "_chinwag_packed") or "forward" in vars(m)
                   for m in linears(model))
    assert torch.equal(logits(model, ids), before)
    assert "not packed for oneDNN (could not create a primitive descriptor)" in caplog.text


def test_a_refused_pack_in_inference_mode_gives_back_ordinary_weights(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine packs under ``inference_mode`` (its thread's ``_prepare``): the weights a
    refused pack rebuilds must not come back as inference tensors, which no later forward
    with autograd (or in-place update) accepts."""
    model = tiny(torch.float32, tied=False)
    reorder = torch.ops.mkldnn._reorder_linear_weight
    calls = []

    def refusing(weight: Any, rows: int) -> Any:
        calls.append(weight.shape)
        if len(calls) == 3:
            raise RuntimeError("could not create a primitive descriptor")
        return reorder(weight, rows)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refusing)
    with torch.inference_mode():
        assert pack(model) is None
    assert not any(m.weight.is_inference() for m in linears(model))
