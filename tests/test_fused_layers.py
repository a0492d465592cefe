"""Decoder layers fused while the slot engine runs on the CPU (``fused_layers.py``): the
same greedy tokens as the library's own layers for each family it knows (biases included),
other layers left alone, and the model given back as it was."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from bot.generators.fused_layers import fuse, unfuse
from bot.generators.packed_linear import pack, unpack
from bot.generators.slot_scheduler import SlotScheduler
from tests.auxil.schedulers import answers, generate, greedy, ids, running, tiny

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(),
                                reason="this torch has no oneDNN")

def biased(model: Any) -> Any:
    """The model with its biases drawn at random (they start at zero: invisible)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(std=0.5)
    return model


# Weights drawn wider than the library's 0.02: a tiny model's layers then change its tokens
# (at 0.02 its replies hardly depend on them, and a mistake in a layer would go unseen).
WIDE = 0.2
FAMILIES = {
    "llama-with-biases": lambda: biased(tiny(LlamaForCausalLM, LlamaConfig,
                                             attention_bias=True, mlp_bias=True,
                                             initializer_range=WIDE)),
    "mistral": lambda: tiny(MistralForCausalLM, MistralConfig, sliding_window=None,
                            initializer_range=WIDE),
    "qwen2": lambda: biased(tiny(Qwen2ForCausalLM, Qwen2Config, initializer_range=WIDE)),
}


def layers(model: Any) -> list[Any]:
    return list(model.model.layers)


@pytest.mark.parametrize("family", FAMILIES)
async def test_fused_layers_reply_as_the_library_s_own(family: str) -> None:
    model = FAMILIES[family]()
    if family == "qwen2":
        assert layers(model)[0].self_attn.q_proj.bias is not None
    state = {name: value.clone() for name, value in model.state_dict().items()}
    prompts = [ids(n, n) for n in (5, 23, 60)]
    expected = [generate(model, prompt, 16) for prompt in prompts]
    scheduler = SlotScheduler(model, eos_ids=[], max_sequences=4, threads=1)
    with running(scheduler):
        assert scheduler._fused is not None and scheduler._fused.layers == layers(model)
        assert all("forward" in vars(layer) for layer in layers(model))
        assert await answers(scheduler, prompts, greedy(16, 1.0)) == expected
    # Given back: the class's forward, and every weight as it was.
    assert all("forward" not in vars(layer) for layer in layers(model))
    after = model.state_dict()
    assert all(torch.equal(state[name], after[name]) for name in state)
    assert [generate(model, prompt, 16) for prompt in prompts] == expected


async def test_a_layer_it_does_not_know_keeps_its_own_forward() -> None:
    # Qwen3 normalises each head's queries and keys: not the step fused_layers writes.
    model = tiny(Qwen3ForCausalLM, Qwen3Config)
    prompt = ids(30, 4)
    expected = generate(model, prompt, 12)
    scheduler = SlotScheduler(model, eos_ids=[], max_sequences=2, threads=1)
    with running(scheduler):
        assert scheduler._fused is None
        assert all("forward" not in vars(layer) for layer in layers(model))
        assert await answers(scheduler, [prompt], greedy(12, 1.0)) == [expected]


def test_fusing_keeps_the_memory_and_a_fused_layer_serves_only_the_engine() -> None:
    model = tiny(LlamaForCausalLM, LlamaConfig)
    packed = pack(model)
    attention = layers(model)[0].self_attn
    fused = fuse(model, packed)
    assert fused is not None and len(fused.layers) == 2
    # The joined weights replace the packed ones they were built from.
    assert all(getattr(attention, name)._chinwag_packed is None
               for name in ("q_proj", "k_proj", "v_proj"))
    with pytest.raises(RuntimeError, match="only inside Chinwag's slot engine"), \
            torch.inference_mode():
        model(input_ids=torch.tensor([[1, 2, 3]]))
    unfuse(fused)
    assert attention.q_proj._chinwag_packed is not None
    unpack(packed)
    assert fuse(model, None) is None  # nothing packed (not a CPU oneDNN runs): nothing fused


async def test_a_joined_weight_onednn_refuses_leaves_every_layer_unfused(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny(LlamaForCausalLM, LlamaConfig, initializer_range=WIDE)
    state = {name: value.clone() for name, value in model.state_dict().items()}
    prompt = ids(10, 3)
    expected = generate(model, prompt, 8)
    reorder = torch.ops.mkldnn._reorder_linear_weight
    packs = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    calls: list[tuple[int, ...]] = []

    def refusing(weight: Any, rows: Any) -> Any:
        calls.append(tuple(weight.shape))
        # The linears packed, layer 0's joins done: layer 1's query, key and value refused.
        if len(calls) == packs + 3:
            raise RuntimeError("could not create a primitive descriptor")
        return reorder(weight, rows)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refusing)
    scheduler = SlotScheduler(model, eos_ids=[], max_sequences=2, threads=1)
    with running(scheduler):
        assert len(calls) > packs + 3  # the refusal happened, and layer 0 was split back
        assert scheduler._fused is None
        assert all("forward" not in vars(layer) for layer in layers(model))
        assert await answers(scheduler, [prompt], greedy(8, 1.0)) == [expected]
    after = model.state_dict()
    assert all(torch.equal(state[name], after[name]) for name in state)
