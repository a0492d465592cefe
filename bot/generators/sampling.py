"""Choosing each row's next token: on the device, the whole batch at once (``Sampler``, the
slot engine's), or request by request (``sample_requests``, the eager schedulers').

Per-row temperature, top-p and repetition penalty live in tensors indexed by slot, with a
``[slots, vocab]`` mask of the tokens each row has seen, so one step's sampling is a fixed
handful of kernels whatever the batch holds, with no host round trip: a CUDA graph can
capture it. Sampling uses the exponential race (the argmax of ``p / E`` with ``E ~ Exp(1)``
picks a token with probability ``p``), which unlike ``multinomial`` needs no sync. On the
CPU, top-p looks for its tokens among the most probable few hundred before it sorts the
whole vocabulary (``_candidates``): a sort was most of a sampled step's cost there; and the
repetition penalty touches only the tokens seen (``penalised``).

``sample_requests`` (``eager_scheduler.py``, ``encoder_decoder.py``) applies the same
settings read from each request, the repetition penalty over the request's own ``seen`` ids,
and samples with ``multinomial``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bot.generators.base import GenerationParams
from bot.generators.host_copy import to_device
from bot.generators.padding import pad_right
from bot.generators.scheduler import Request

CANDIDATES = 256
"""On the CPU, how many of the most probable tokens top-p is first looked for among."""


class Sampler:
    def __init__(self, slots: int, vocab: int, device: Any) -> None:
        import torch

        self.device = device
        self.temperature = torch.zeros(slots, device=device)
        self.top_p = torch.ones(slots, device=device)
        self.penalty = torch.ones(slots, device=device)
        self.seen = torch.zeros((slots, vocab), dtype=torch.bool, device=device)

    def grow(self, slots: int) -> None:
        """Room for ``slots`` rows; the new ones zero (``set_rows`` fills a row's first)."""
        for name in ("temperature", "top_p", "penalty", "seen"):
            setattr(self, name, pad_right(getattr(self, name), slots, dim=0))

    def set_rows(self, start: int, params: Sequence[GenerationParams],
                 prompts: Sequence[Sequence[int]]) -> None:
        """Rows ``start…`` begin requests with these parameters and prompts."""
        import torch

        end = start + len(params)
        values = to_device([[p.temperature, p.top_p, p.repetition_penalty] for p in params],
                           self.device, self.temperature.dtype)
        self.temperature[start:end] = values[:, 0]
        self.top_p[start:end] = values[:, 1]
        self.penalty[start:end] = values[:, 2]
        self.seen[start:end] = False
        rows = [row for row, prompt in enumerate(prompts, start) for _ in prompt]
        tokens = [token for prompt in prompts for token in prompt]
        if tokens:
            index = to_device([rows, tokens], self.device, torch.long)
            self.seen[index[0], index[1]] = True

    def move(self, source: int, target: int) -> None:
        for tensor in (self.temperature, self.top_p, self.penalty, self.seen):
            tensor[target] = tensor[source]

    def sample(self, logits: Any, start: int, *, sampling: bool, penalties: bool,
               active: Any = None) -> Any:
        """The next token of rows ``start…start+len(logits)-1``, marked seen (only where
        ``active``, when given: a graph's idle rows must not touch a neighbour's row).
        ``sampling``/``penalties``: whether any row has a temperature / a penalty, known on
        the host; a row without either is greedy either way."""
        import torch

        rows = logits.shape[0]
        end = start + rows
        logits = logits.float()
        if penalties:
            logits = penalised(logits, self.seen[start:end], self.penalty[start:end],
                               sparse=logits.device.type == "cpu")
        tokens = logits.argmax(dim=-1)
        if sampling:
            temperature = self.temperature[start:end, None]
            probs = torch.softmax(logits / temperature.clamp(min=1e-5), dim=-1)
            top_p = self.top_p[start:end, None]
            ordered, order, cumulative = _candidates(probs, top_p)
            outside = cumulative - ordered > top_p
            ordered = ordered.masked_fill(outside, 0.0)
            race = ordered / torch.empty_like(ordered).exponential_()
            drawn = order.gather(-1, race.argmax(dim=-1, keepdim=True)).squeeze(-1)
            tokens = torch.where(temperature.squeeze(-1) > 0, drawn, tokens)
        index = torch.arange(start, end, device=logits.device)
        if active is None:
            self.seen[index, tokens] = True
        else:
            self.seen[index, tokens] |= active
        return tokens


def penalised(logits: Any, seen: Any, penalty: Any, *, sparse: bool) -> Any:
    """``logits`` with the repetition penalty on the tokens each row has ``seen``: divided
    by the row's ``penalty``, or multiplied where negative. ``sparse`` (the CPU) touches
    only those tokens, a few hundred of the vocabulary a row (0.7 vs 2.4 ms at 16 rows of
    49,152); a CUDA graph cannot size its work by the data, and there a pass over every
    logit costs little."""
    import torch

    if sparse:
        rows, tokens = seen.nonzero(as_tuple=True)
        scores, factor = logits[rows, tokens], penalty[rows]
        scores = torch.where(scores < 0, scores * factor, scores / factor)
        return logits.index_put((rows, tokens), scores.to(logits.dtype))
    factor = penalty[:, None]
    return torch.where(seen, torch.where(logits < 0, logits * factor, logits / factor), logits)


def _candidates(probs: Any, top_p: Any) -> tuple[Any, Any, Any]:
    """The tokens top-p may keep, most probable first: probabilities, ids and running sums.
    Sorting the whole vocabulary is most of a CPU step's sampling (32 of 56 ms for 16 rows
    of the built-in model's 49,152 tokens), so on the CPU the ``CANDIDATES`` most probable
    stand in when they hold more than ``top_p`` of every row: top-p keeps none past them
    then. A CUDA graph cannot branch on that, and sorting costs a GPU little: it sorts."""
    if probs.device.type == "cpu" and probs.shape[-1] > CANDIDATES + 1:
        # One more than the candidates, to ask of it what the caller asks of every token
        # (the mass before it past ``top_p``: it is left out), rounded the same way.
        ordered, order = probs.topk(CANDIDATES + 1, dim=-1)
        cumulative = ordered.cumsum(dim=-1)
        if bool((cumulative[:, -1:] - ordered[:, -1:] > top_p).all()):
            return ordered[:, :-1], order[:, :-1], cumulative[:, :-1]
    ordered, order = probs.sort(dim=-1, descending=True)
    return ordered, order, ordered.cumsum(dim=-1)


def sample_requests(logits: Any, requests: Sequence[Request]) -> Any:
    """The next token of each request from its row of ``logits``, under its own parameters
    (the repetition penalty is applied to ``logits`` in place)."""
    import torch

    for row, request in enumerate(requests):
        penalty = request.params.repetition_penalty
        if penalty != 1.0:
            scores = logits[row, request.seen]
            logits[row, request.seen] = torch.where(scores < 0, scores * penalty,
                                                    scores / penalty)
    tokens = logits.argmax(dim=-1)
    sampled = [i for i, r in enumerate(requests) if r.params.temperature > 0]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        temperatures = torch.tensor([requests[i].params.temperature for i in sampled],
                                    device=logits.device)[:, None]
        probs = torch.softmax(logits[index] / temperatures, dim=-1)
        top_p = torch.tensor([requests[i].params.top_p for i in sampled],
                             device=logits.device)[:, None]
        ordered, order, cumulative = _candidates(probs, top_p)
        outside = cumulative - ordered > top_p
        ordered[outside] = 0.0
        choice = torch.multinomial(ordered, 1)
        tokens[index] = order.gather(-1, choice).squeeze(-1)
    return tokens

