"""Searching a conversation's embeddings: one matrix product over a copy kept in memory.

Each active conversation's embeddings are read from the database once and kept as one
float32 matrix (rows in message id order); a search is a dot product with the query and a
partial sort, vectorised by numpy. Before each search the database is asked only for the
embeddings newer than the copy's newest (an index range scan, usually empty), which are
appended. Every ``VERIFY_S`` a fingerprint of them all (``EmbeddingState``) is compared
too: a difference (retention deleted some, or some were embedded out of id order) reloads
the copy. ``/forget`` drops every copy at once (``clear``); until a copy is checked, a
deleted message it still holds is found but not recalled, since its text is gone. Copies
are kept for the most recently searched conversations, within ``max_bytes``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from bot.memory.store import EmbeddingState, MemoryStore, StoredEmbeddings

logger = logging.getLogger(__name__)

CACHE_BYTES = 512 * 2**20
"""About 340,000 embeddings of 384 dimensions."""
VERIFY_S = 60.0
"""How often a copy is checked whole against the database (deletions by retention)."""

Ids = npt.NDArray[np.int64]
Matrix = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A conversation's embeddings at one moment; appending later does not change it."""

    ids: Ids
    anchors: Ids
    matrix: Matrix

    def search(self, query: npt.NDArray[np.float32], *, after_id: int, before_id: int,
               limit: int) -> list[tuple[int, float]]:
        """The ``limit`` most similar messages with ``after_id < anchor`` and
        ``id < before_id``, as (id, cosine similarity), most similar first."""
        # Ids are sorted and an anchor is never above its id: slice first, mask the rest.
        low = int(np.searchsorted(self.ids, after_id, side="right"))
        high = int(np.searchsorted(self.ids, before_id, side="left"))
        if high <= low or limit <= 0:
            return []
        scores = self.matrix[low:high] @ query
        scores[self.anchors[low:high] <= after_id] = -np.inf
        if limit < len(scores):
            best = np.argpartition(-scores, limit - 1)[:limit]
        else:
            best = np.arange(len(scores))
        best = best[np.argsort(-scores[best], kind="stable")]
        return [(int(self.ids[low + i]), float(scores[i])) for i in best
                if np.isfinite(scores[i])]


class _Copy:
    """One conversation's embeddings, growable: rows are written before ``size`` counts
    them, so a snapshot taken earlier (searched in a thread) never sees a half-written row."""

    def __init__(self, dimension: int) -> None:
        self.ids: Ids = np.zeros(0, dtype=np.int64)
        self.anchors: Ids = np.zeros(0, dtype=np.int64)
        self.matrix: Matrix = np.zeros((0, dimension), dtype=np.float32)
        self.size = 0
        self.state = EmbeddingState()
        """Of the rows appended."""
        self.verified_at = 0.0
        """When ``state`` was last found equal to the database's (the loop's clock)."""

    @property
    def nbytes(self) -> int:
        return self.matrix.nbytes + self.ids.nbytes + self.anchors.nbytes

    def snapshot(self) -> Snapshot:
        return Snapshot(self.ids[:self.size], self.anchors[:self.size],
                        self.matrix[:self.size])

    def append(self, ids: Ids, anchors: Ids, matrix: Matrix) -> None:
        needed = self.size + len(ids)
        if needed > len(self.ids):
            capacity = max(needed, 2 * len(self.ids), 64)
            self.ids = _grown(self.ids, capacity, self.size)
            self.anchors = _grown(self.anchors, capacity, self.size)
            self.matrix = _grown(self.matrix, capacity, self.size)
        self.ids[self.size:needed] = ids
        self.anchors[self.size:needed] = anchors
        self.matrix[self.size:needed] = matrix
        self.size = needed
        self.state = EmbeddingState(
            count=self.state.count + len(ids), id_sum=self.state.id_sum + int(ids.sum()),
            newest_id=max(self.state.newest_id, int(ids[-1]) if len(ids) else 0))


def _grown(array: Any, capacity: int, size: int) -> Any:
    grown = np.zeros((capacity, *array.shape[1:]), dtype=array.dtype)
    grown[:size] = array[:size]
    return grown


def _decode(rows: StoredEmbeddings, dimension: int) -> tuple[Ids, Ids, Matrix]:
    """The rows as arrays; a vector of the wrong length (never written by this model) is
    left out."""
    width = 4 * dimension
    keep = [i for i, vector in enumerate(rows.vectors) if len(vector) == width]
    if len(keep) < len(rows.vectors):
        logger.warning("memory: %s stored embeddings have the wrong size; left out",
                       len(rows.vectors) - len(keep))
    ids = np.fromiter((rows.ids[i] for i in keep), dtype=np.int64, count=len(keep))
    anchors = np.fromiter((rows.anchors[i] for i in keep), dtype=np.int64, count=len(keep))
    joined = b"".join(rows.vectors[i] for i in keep)
    matrix = np.frombuffer(joined, dtype=np.float32).reshape(len(keep), dimension)
    return ids, anchors, matrix


class VectorCache:
    """The conversations' embeddings of one model, kept between searches."""

    def __init__(self, store: MemoryStore, model: str, dimension: int, *,
                 max_bytes: int = CACHE_BYTES, verify_every: float = VERIFY_S) -> None:
        self._store = store
        self._verify_every = verify_every
        self._model = model
        self._dimension = dimension
        self._max_bytes = max_bytes
        self._copies: OrderedDict[int, _Copy] = OrderedDict()
        self._loading: dict[int, asyncio.Task[_Copy]] = {}
        self._cleared = 0
        """How many times ``clear`` ran: a load begun before it keeps nothing."""

    @property
    def conversations(self) -> int:
        return len(self._copies)

    def clear(self) -> None:
        """Drop every copy (``/forget``): the next search reads the database again."""
        self._copies.clear()
        self._cleared += 1

    async def close(self) -> None:
        loading = list(self._loading.values())
        for task in loading:
            task.cancel()
        await asyncio.gather(*loading, return_exceptions=True)

    async def snapshot(self, conversation_id: int) -> Snapshot:
        """The conversation's embeddings as stored now. A load cut short by the caller's
        timeout goes on, so the next search finds it done."""
        task = self._loading.get(conversation_id)
        if task is None:
            task = asyncio.create_task(self._refresh(conversation_id),
                                       name=f"chinwag:memory-load:{conversation_id}")
            self._loading[conversation_id] = task
            task.add_done_callback(lambda _t: self._loading.pop(conversation_id, None))
        copy = await asyncio.shield(task)
        return copy.snapshot()

    async def _refresh(self, conversation_id: int) -> _Copy:
        now = asyncio.get_running_loop().time
        cleared = self._cleared
        copy = self._copies.get(conversation_id)
        if copy is not None:
            await self._add_newer(conversation_id, copy)
            if now() < copy.verified_at + self._verify_every:
                self._keep(conversation_id, copy, cleared)
                return copy
            state = await self._store.embedding_state(conversation_id, self._model)
            if state != copy.state and state.newest_id > copy.state.newest_id:
                await self._add_newer(conversation_id, copy)  # embedded meanwhile
            if state == copy.state:
                copy.verified_at = now()
                self._keep(conversation_id, copy, cleared)
                return copy
            # Some were deleted, or embedded out of id order: read it whole.
        copy = _Copy(self._dimension)
        await self._add_newer(conversation_id, copy)
        copy.verified_at = now()
        self._keep(conversation_id, copy, cleared)
        logger.debug("memory: read %s embeddings of conversation %s", copy.size,
                     conversation_id)
        return copy

    async def _add_newer(self, conversation_id: int, copy: _Copy) -> None:
        """Append what was embedded above the copy's newest id (an index range scan)."""
        added = await self._store.embeddings(conversation_id, self._model,
                                             copy.state.newest_id)
        if added.ids:
            copy.append(*await asyncio.to_thread(_decode, added, self._dimension))

    def _keep(self, conversation_id: int, copy: _Copy, cleared: int) -> None:
        if cleared != self._cleared:  # it may hold what a /forget deleted meanwhile
            return
        self._copies[conversation_id] = copy
        self._copies.move_to_end(conversation_id)
        total = sum(kept.nbytes for kept in self._copies.values())
        while total > self._max_bytes and len(self._copies) > 1:
            _evicted, oldest = self._copies.popitem(last=False)
            total -= oldest.nbytes
