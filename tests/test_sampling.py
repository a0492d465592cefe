"""Sampling (``sampling.py``), the slot engine's and the eager schedulers': top-p keeps exactly
the nucleus and draws from it in proportion, whether the CPU finds it among its top
candidates or sorts the whole vocabulary, and a greedy row in the same batch stays
greedy."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bot.generators.base import GenerationParams
from bot.generators.sampling import (
    CANDIDATES,
    Sampler,
    _candidates,
    penalised,
    sample_requests,
)
from bot.generators.scheduler import Request

VOCAB = 1000
ROWS = 16


def draw(logits: torch.Tensor, params: list[GenerationParams], calls: int,
         way: str = "engine") -> torch.Tensor:
    """``calls`` draws of every row: ``[calls, rows]``, by the slot engine's sampler or
    request by request as the eager schedulers sample."""
    torch.manual_seed(0)
    sampler = Sampler(len(params), logits.shape[-1], "cpu")
    sampler.set_rows(0, params, [[] for _ in params])
    requests = [Request([], p, lambda _item: None) for p in params]
    with torch.inference_mode():
        if way == "eager":
            return torch.stack([sample_requests(logits.clone(), requests)
                                for _ in range(calls)])
        return torch.stack([sampler.sample(logits, 0, sampling=True, penalties=False)
                            for _ in range(calls)])


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """What top-p keeps, by its definition: the most probable tokens until their mass
    reaches ``top_p``, renormalised (a whole vocabulary sorted in float64)."""
    ordered, order = probs.double().sort(descending=True)
    kept = ordered.cumsum(0) - ordered <= top_p
    expected = torch.zeros_like(probs, dtype=torch.float64)
    expected[order[kept]] = ordered[kept] / ordered[kept].sum()
    return expected


@pytest.mark.parametrize("way", ["engine", "eager"])
@pytest.mark.parametrize("shape", ["peaked", "flat"])
def test_top_p_draws_the_nucleus_in_proportion(shape: str, way: str) -> None:
    if shape == "peaked":  # the nucleus is 5 tokens: among the CPU's top candidates
        head = torch.tensor([0.3, 0.2, 0.15, 0.1, 0.08, 0.06, 0.04, 0.03])
        probs = torch.cat([head, torch.full((VOCAB - len(head),), 0.04 / (VOCAB - 8))])
        top_p = 0.8
    else:  # slowly falling: the nucleus is ~700 tokens, past them: the whole vocabulary sorted
        probs = torch.softmax(-torch.arange(VOCAB, dtype=torch.float32) / 2000, dim=0)
        top_p = 0.7
    logits = probs.log()[None].expand(ROWS, VOCAB).contiguous()
    params = [GenerationParams(max_new_tokens=1, temperature=1.0, top_p=top_p)] * ROWS
    drawn = draw(logits, params, 250 if shape == "peaked" else 40, way).flatten()
    expected = nucleus(probs, top_p)
    kept = int((expected > 0).sum())
    assert (kept <= CANDIDATES) == (shape == "peaked")
    assert bool((expected[drawn] > 0).all())  # nothing outside the nucleus
    if shape == "peaked":
        seen = torch.bincount(drawn, minlength=VOCAB).double() / len(drawn)
        assert torch.allclose(seen[:kept], expected[:kept], atol=0.03)  # 4000 draws: ~4 sd
    else:
        # Drawn across the whole nucleus, far past what the candidates would hold.
        assert int(drawn.max()) > 2 * CANDIDATES and int((drawn >= CANDIDATES).sum()) > 200


def test_a_greedy_row_beside_sampled_rows_stays_greedy() -> None:
    torch.manual_seed(3)
    logits = torch.randn(ROWS, VOCAB) * 4
    params = [GenerationParams(max_new_tokens=1, temperature=0.0 if row == 2 else 0.9,
                               top_p=0.95) for row in range(ROWS)]
    drawn = draw(logits, params, 20)
    assert bool((drawn[:, 2] == logits[2].argmax()).all())
    assert len(set(drawn[:, 0].tolist())) > 1  # the others do sample


def test_the_cpu_candidates_are_the_head_of_the_whole_sort() -> None:
    torch.manual_seed(5)
    probs = torch.softmax(torch.randn(ROWS, VOCAB) * 6, dim=-1)
    top_p = torch.full((ROWS, 1), 0.9)
    ordered, order, cumulative = _candidates(probs, top_p)
    assert ordered.shape == (ROWS, CANDIDATES)  # peaked enough: the short way
    full, full_order = probs.sort(dim=-1, descending=True)
    assert torch.equal(ordered, full[:, :CANDIDATES])
    assert torch.equal(order, full_order[:, :CANDIDATES])
    assert torch.equal(cumulative, full.cumsum(dim=-1)[:, :CANDIDATES])
    # One row too flat for the candidates to hold its nucleus: every row is sorted whole.
    probs[7] = torch.softmax(torch.zeros(VOCAB), dim=-1)
    assert _candidates(probs, top_p)[0].shape == (ROWS, VOCAB)


def test_the_candidates_keep_what_the_whole_sort_keeps_at_the_boundary() -> None:
    # top_p one float step under the 256 candidates' mass: the whole sort keeps the 257th
    # token (the mass before it, rounded, is not past top_p), so the candidates must not
    # stand in. (Found by a review: checking the candidates' own sum rounded differently.)
    tail = 49152 - CANDIDATES
    generator = torch.Generator().manual_seed(19)
    head = torch.rand(CANDIDATES, generator=generator, dtype=torch.float64) + 1
    small = 4e-8 * (0.3 + torch.rand(1, generator=generator).item())
    head = head / head.sum() * (1 - tail * small)
    probs = torch.cat([head, torch.full((tail,), small, dtype=torch.float64)]).float()[None]
    ordered = probs.sort(descending=True).values
    cumulative = ordered.cumsum(-1)
    top_p = torch.nextafter(cumulative[:, CANDIDATES - 1:CANDIDATES], torch.zeros(1, 1))
    whole = int((cumulative - ordered <= top_p).sum())
    assert whole > CANDIDATES
    got, _order, running_sum = _candidates(probs, top_p)
    assert int((running_sum - got <= top_p).sum()) == whole


def test_the_repetition_penalty_falls_on_the_seen_tokens_alone() -> None:
    torch.manual_seed(4)
    logits = torch.randn(4, VOCAB) * 3
    seen = torch.rand(4, VOCAB) < 0.05
    penalty = torch.tensor([1.0, 1.1, 1.5, 2.0])
    expected = logits.clone()
    for row, token in seen.nonzero().tolist():
        score, factor = logits[row, token], penalty[row]
        expected[row, token] = score * factor if score < 0 else score / factor
    for sparse in (True, False):  # the CPU's, the GPU's
        assert torch.equal(penalised(logits, seen, penalty, sparse=sparse), expected)
    # The engine's sampler: a row's prompt tokens are seen, and so is what it picks.
    sampler = Sampler(2, VOCAB, "cpu")
    top = int(logits[0].argmax())
    second = int(logits[0].topk(2).indices[1])
    strict = GenerationParams(max_new_tokens=4, temperature=0.0, repetition_penalty=100.0)
    sampler.set_rows(0, [strict, replace(strict, repetition_penalty=1.0)], [[top], [top]])
    both = torch.stack([logits[0], logits[0]])
    with torch.inference_mode():
        assert sampler.sample(both, 0, sampling=False, penalties=True).tolist() == \
            [second, top]
        third = int(logits[0].topk(3).indices[2])
        assert sampler.sample(both, 0, sampling=False, penalties=True).tolist()[0] == third
