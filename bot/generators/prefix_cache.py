"""Finished conversations' keys and values, kept for their next turn.

A conversation's next prompt is its last prompt, the reply, and the new message: without
this, every turn recomputes the whole conversation before its first token (on this
project's 2-core CPU, 0.53 s for a 739-token conversation of the built-in model, against
0.06 s with it: ``bench/turns.py``). When a request ends, the slot engine
parks the keys and values its row holds here, in host memory; a new request whose prompt
starts with a parked conversation's tokens gets those positions copied into its row and
computes only the rest. A position's keys and values depend only on the tokens up to it,
so the reply is the one a full prefill would give (up to the rounding of a product computed
with a different number of rows).

Entries are evicted least recently used first, to stay within ``budget`` bytes; one that a
longer conversation now extends (the same conversation, a turn later) is dropped at once.
On CUDA the parked copies live in pinned host memory, copied from the device without
waiting; a restore waits for its entry's copy to have landed (an event), as a part of an
entry is not contiguous and torch gathers such a source on the host before copying it.
Pinned blocks come in powers of two, which is what such an entry counts against the budget.
"""

from __future__ import annotations

from array import array
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MIN_REUSE = 16
"""Fewest prompt tokens worth a copy instead of computing them."""
REMEMBERED = 256
"""Conversations a worker pool remembers per worker (``Served``)."""
LOAD_TOKENS = 256
"""Prompt tokens a worker's keeping of a conversation must save to be worth one more
request ahead of it (``keeper``)."""


@dataclass(eq=False)
class Parked:
    tokens: tuple[int, ...]
    states: Any
    """``[layers, 2, kv_heads, len(tokens), head_dim]``, on the host."""
    size: int
    """What it counts against the budget, in bytes."""
    landed: Any = None
    """On CUDA: the event after the copy from the device."""


class PrefixCache:
    def __init__(self, budget: int, *, pinned: bool = False) -> None:
        self.budget = budget
        self._pinned = pinned
        self._entries: list[Parked] = []
        """Least recently used first."""
        self.bytes = 0
        self.reused_tokens = 0
        """Prompt tokens copied from a parked conversation instead of computed."""

    def __len__(self) -> int:
        return len(self._entries)

    def park(self, tokens: Sequence[int], states: Any) -> None:
        """Keep ``states`` (a row's first ``len(tokens)`` positions, ``[layers, 2, kv_heads,
        length, head_dim]``, on any device) as the keys and values of ``tokens``."""
        import torch

        if len(tokens) < MIN_REUSE:
            return
        size = states.numel() * states.element_size()
        if self._pinned:
            size = 1 << (size - 1).bit_length()  # the pinned allocator's block
        if size > self.budget:
            return
        kept = tuple(tokens)
        # The same conversation a turn ago, or a shorter branch of it: this one serves both.
        for entry in [e for e in self._entries if kept[:len(e.tokens)] == e.tokens]:
            self._drop(entry)
        while self._entries and self.bytes + size > self.budget:
            self._drop(self._entries[0])
        copy = torch.empty(states.shape, dtype=states.dtype, device="cpu",
                           pin_memory=self._pinned)
        copy.copy_(states, non_blocking=self._pinned)
        landed = None
        if self._pinned:
            landed = torch.cuda.Event()  # type: ignore[no-untyped-call]
            landed.record(torch.cuda.current_stream(states.device))  # the copy's device
        self._entries.append(Parked(kept, copy, size, landed))
        self.bytes += size

    def match(self, prompt: Sequence[int], limit: int) -> tuple[int, Parked | None]:
        """The parked conversation sharing the longest start with ``prompt`` and how many of
        its tokens (at most ``limit``) it shares: ``(0, None)`` below ``MIN_REUSE``."""
        best, found = 0, None
        if not prompt:
            return 0, None
        wanted = tuple(prompt)
        for entry in reversed(self._entries):  # the most recent first: it wins a tie
            if entry.tokens[0] != wanted[0]:
                continue
            shared = _common(entry.tokens, wanted, limit)
            if shared > best:
                best, found = shared, entry
        if found is None or best < MIN_REUSE:
            return 0, None
        self._entries.remove(found)  # now the most recently used
        self._entries.append(found)
        return best, found

    def restore(self, entry: Parked, length: int, target: Any) -> None:
        """Copy ``entry``'s first ``length`` positions into ``target`` (a row's ``[layers,
        2, kv_heads, length, head_dim]`` view)."""
        if entry.landed is not None:
            entry.landed.synchronize()  # parked a step ago at most: a short wait, if any
        target.copy_(entry.states[:, :, :, :length], non_blocking=self._pinned)
        self.reused_tokens += length

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0

    def _drop(self, entry: Parked) -> None:
        self._entries.remove(entry)
        self.bytes -= entry.size


class Served:
    """What a worker process has served, as the pool's parent sees it: the tokens of its
    last ``REMEMBERED`` conversations, so that a conversation's next turn goes to the
    worker that keeps its keys and values."""

    def __init__(self) -> None:
        self._seen: deque[array[int]] = deque(maxlen=REMEMBERED)

    def remember(self, tokens: Sequence[int]) -> None:
        if len(tokens) >= MIN_REUSE:
            self._seen.append(array("l", tokens))

    def longest(self, prompt: Sequence[int]) -> int:
        """The most of ``prompt`` (but its last token) one of them shares, if worth it."""
        if not prompt:
            return 0
        wanted = array("l", prompt)
        best = max((_common(seen, wanted, len(wanted) - 1) for seen in self._seen
                    if seen[0] == wanted[0]), default=0)
        return best if best >= MIN_REUSE else 0


def keeper(workers: list[Any], prompt: Sequence[int]) -> Any:
    """The worker for ``prompt``: one with a free row (of its ``rows``) if any, as waiting
    for a row costs a whole reply; among those, the one keeping most of its conversation
    (``served``) less what its ``load`` costs, so that a shared system prompt alone does not
    pull every conversation onto one worker; the least loaded of equals."""
    return max(workers, key=lambda w: (w.load < w.rows,
                                       w.served.longest(prompt) - LOAD_TOKENS * w.load,
                                       -w.load))


def _common(a: Any, b: Any, limit: int) -> int:
    """How many of their first ``limit`` tokens ``a`` and ``b`` (sequences of one type:
    tuples, or arrays) share."""
    limit = min(limit, len(a), len(b))
    if a[:limit] == b[:limit]:
        return limit
    low, high = 0, limit  # a[:low] == b[:low]; they differ before ``high``
    while high - low > 1:  # halving with slice comparisons: C speed, not a Python loop
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low
