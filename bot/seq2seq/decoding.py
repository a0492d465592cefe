"""Writing a reply with a trained model: greedy (streams token by token) or beam search
(the best of several hypotheses, known only at the end).

Both are blocking (a forward pass a token, milliseconds each on a CPU); the generator runs
them on a thread. Scores are the reply's log-probability, EOS included, divided by
``length ** length_penalty`` (0: the plain sum, which prefers short replies; about 0.6 is
the usual compromise in translation).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from bot.seq2seq.model import Encoded, Seq2Seq, State, select_state

DEFAULT_LENGTH_PENALTY = 0.6


@dataclass(frozen=True, slots=True)
class Hypothesis:
    ids: tuple[int, ...]
    """The reply's tokens, EOS not included."""
    log_prob: float
    """Of the reply ending there: its tokens, then EOS (also when ``max_len`` cut it)."""
    finished: bool
    """The model ended it (EOS was its most likely next token); otherwise it was cut."""

    def score(self, length_penalty: float = DEFAULT_LENGTH_PENALTY) -> float:
        return self.log_prob / math.pow(len(self.ids) + 1, length_penalty)


def _encode(model: Seq2Seq, source: Sequence[int]) -> tuple[Encoded, State]:
    ids = torch.tensor([list(source) or [0]], dtype=torch.long)
    return model.encode(ids, torch.tensor([max(1, len(source))]))


def _step(model: Seq2Seq, tokens: list[int], encoded: Encoded,
          state: State) -> tuple[torch.Tensor, State]:
    """Log-probabilities (hypotheses, vocab) of the next token after ``tokens``."""
    logits, state = model.decode(torch.tensor(tokens, dtype=torch.long).unsqueeze(1),
                                 encoded, state)
    return torch.log_softmax(logits[:, -1], dim=-1), state


def _allowed(log_probs: torch.Tensor, step: int, eos: int, max_len: int) -> torch.Tensor:
    """The choices at ``step``: a reply has at least one token, so not EOS first."""
    if step > 0 or max_len == 0:
        return log_probs
    allowed = log_probs.clone()
    allowed[:, eos] = float("-inf")
    return allowed


def greedy_steps(model: Seq2Seq, source: Sequence[int], bos: int, eos: int,
                 max_len: int) -> Iterator[tuple[int, torch.Tensor]]:
    """The most likely next token, again and again (never EOS first): yields each token as
    it is chosen with the log-probabilities it was chosen from, EOS last when the model
    ends the reply; after ``max_len`` tokens, one more step (what the model would say next)
    and no more. Closing the iterator stops the work."""
    model.eval()
    with torch.inference_mode():
        encoded, state = _encode(model, source)
    token = bos
    for step in range(max_len + 1):
        # Not across the yield: a generator closed later, or on another thread, would
        # leave inference mode wherever that happens.
        with torch.inference_mode():
            log_probs, state = _step(model, [token], encoded, state)
        token = int(_allowed(log_probs, step, eos, max_len)[0].argmax())
        yield token, log_probs[0]
        if token == eos:
            return


def greedy(model: Seq2Seq, source: Sequence[int], bos: int, eos: int,
           max_len: int) -> Hypothesis:
    ids: list[int] = []
    total = 0.0
    for token, log_probs in greedy_steps(model, source, bos, eos, max_len):
        if token == eos or len(ids) == max_len:
            return Hypothesis(tuple(ids), total + float(log_probs[eos]),
                              finished=token == eos)
        ids.append(token)
        total += float(log_probs[token])
    raise AssertionError("greedy_steps ends with EOS or after max_len + 1 steps")


def beam_search(model: Seq2Seq, source: Sequence[int], bos: int, eos: int, max_len: int,
                beam: int, length_penalty: float = DEFAULT_LENGTH_PENALTY, *,
                with_greedy: bool = True) -> Hypothesis:
    """The best-scoring reply found keeping the ``beam`` best hypotheses at each step.

    A hypothesis that ends (EOS) leaves the beam, which then keeps one fewer, so the
    search ends when ``beam`` replies are finished; with ``beam=1`` it follows exactly the
    greedy path. ``with_greedy``: the greedy reply is a candidate too, so the answer never
    scores worse than greedy's (beam search alone can lose the greedy path when the
    other hypotheses score better early on).
    """
    if beam < 1:
        raise ValueError("beam must be at least 1")
    finished: list[Hypothesis] = []
    if with_greedy:
        finished.append(greedy(model, source, bos, eos, max_len))
    model.eval()
    with torch.inference_mode():
        encoded, state = _encode(model, source)
        live: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
        room = beam
        for step in range(max_len + 1):
            last = [ids[-1] if ids else bos for ids, _ in live]
            rows = torch.zeros(len(live), dtype=torch.long)
            log_probs, state = _step(model, last, encoded.repeat(rows), state)
            if step == max_len:  # as long as a reply may be: each ends here
                finished += [Hypothesis(ids, total + float(log_probs[i, eos]),
                                        finished=int(log_probs[i].argmax()) == eos)
                             for i, (ids, total) in enumerate(live)]
                break
            totals = torch.tensor([total for _, total in live]).unsqueeze(1) \
                + _allowed(log_probs, step, eos, max_len)
            values, indices = totals.view(-1).topk(min(room, totals.numel()))
            kept: list[tuple[tuple[int, ...], float]] = []
            parents: list[int] = []
            for value, index in zip(values.tolist(), indices.tolist(), strict=True):
                parent, token = divmod(index, log_probs.size(1))
                ids = live[parent][0]
                if token == eos:
                    finished.append(Hypothesis(ids, value, finished=True))
                    room -= 1
                else:
                    kept.append(((*ids, token), value))
                    parents.append(parent)
            if not kept:
                break
            live = kept
            state = select_state(state, torch.tensor(parents, dtype=torch.long))
    return max(finished, key=lambda h: h.score(length_penalty))


def sequence_log_prob(model: Seq2Seq, source: Sequence[int], ids: Sequence[int],
                      bos: int, eos: int) -> float:
    """The model's log-probability of a reply (its tokens, then EOS), all at once with
    teacher forcing: what decoding's scores must agree with."""
    model.eval()
    with torch.inference_mode():
        encoded, state = _encode(model, source)
        logits, _ = model.decode(torch.tensor([[bos, *ids]], dtype=torch.long), encoded,
                                 state)
        log_probs = torch.log_softmax(logits[0], dim=-1)
        return sum(float(log_probs[i, token]) for i, token in enumerate([*ids, eos]))
