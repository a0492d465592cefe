"""The embedding worker: stored messages without an embedding are embedded in batches, in
the background, for as long as the bot runs.

It reads the newest messages after the last it embedded, so a pass costs an index range
scan; a message committed out of id order (two writers on PostgreSQL) is picked up by a
full pass every ``SWEEP_S``, and at start. The encoder runs in a thread, and nothing waits
for the worker: a reply computes its own question's embedding.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from types import TracebackType
from typing import Self

import numpy as np

from bot.errors import EncoderError, StorageError
from bot.memory.encoder import Encoder, Vectors
from bot.memory.store import MemoryStore, NewEmbedding, Unembedded

logger = logging.getLogger(__name__)

BATCH = 16
"""Messages embedded at once: about 0.2 s of MiniLM on one busy CPU core, which is also the
longest a reply's query waits behind the worker for the encoder."""
IDLE_S = 5.0
"""How often an idle worker looks for messages it was not told of."""
SWEEP_S = 600.0
"""How often a pass starts from the first message again."""
BACKOFF_S = (1.0, 5.0, 30.0)
"""Waits after a failed batch; the last repeats."""


class EmbeddingWorker:
    def __init__(self, store: MemoryStore, encoder: Encoder, *, batch: int = BATCH,
                 idle: float = IDLE_S, sweep: float = SWEEP_S) -> None:
        self._store = store
        self._encoder = encoder
        self._batch = batch
        self._idle = idle
        self._sweep = sweep
        self._after_id = 0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.embedded = 0
        """How many messages it embedded (for tests and logs)."""

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._run(), name="chinwag:memory-worker")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def wake(self) -> None:
        """New messages were stored: look for them now."""
        self._wake.set()

    async def catch_up(self, *, from_start: bool = False) -> int:
        """Embed every message that has no embedding yet, batch by batch; returns how many
        were embedded. Raises ``StorageError`` and ``EncoderError``."""
        if from_start:
            self._after_id = 0
        done = 0
        while True:
            batch = await self._store.unembedded(self._encoder.name, self._after_id,
                                                 self._batch)
            if not batch:
                return done
            last = batch[-1].message_id
            try:
                vectors = await asyncio.to_thread(self._encoder.encode,
                                                  [m.text for m in batch])
            except EncoderError:
                # Not worth trying again at once: passed over until the next sweep. One
                # text the encoder refuses must not cost the others: they go one by one.
                self._after_id = last
                if len(batch) == 1:
                    raise
                batch, vectors = await asyncio.to_thread(self._one_by_one, batch)
            await self._store.add_embeddings(self._encoder.name, self._encoder.dimension, [
                NewEmbedding(m.message_id, m.conversation_id, vector.tobytes())
                for m, vector in zip(batch, vectors, strict=True)])
            self._after_id = last
            done += len(batch)
            self.embedded += len(batch)

    def _one_by_one(self, batch: Sequence[Unembedded]) -> tuple[list[Unembedded], Vectors]:
        """The batch's messages the encoder takes, each alone, with their vectors."""
        kept: list[Unembedded] = []
        vectors: list[Vectors] = []
        for message in batch:
            try:
                vectors.append(self._encoder.encode([message.text]))
            except EncoderError as exc:
                logger.warning("memory: message %s of conversation %s is not embedded: %s",
                               message.message_id, message.conversation_id, exc)
                continue
            kept.append(message)
        if not vectors:
            return kept, np.zeros((0, self._encoder.dimension), dtype=np.float32)
        return kept, np.concatenate(vectors)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_sweep = loop.time()
        failures = 0
        while True:
            self._wake.clear()
            sweeping = loop.time() >= next_sweep
            if sweeping:
                # Set now: a sweep that fails goes on from where it stopped, not from the
                # first message again (a batch that always fails would be met forever).
                next_sweep = loop.time() + self._sweep
            try:
                done = await self.catch_up(from_start=sweeping)
                failures = 0
                if done:
                    logger.info("memory: embedded %s messages", done)
            except Exception as exc:  # the worker outlives any one failure
                delay = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
                failures += 1
                if isinstance(exc, StorageError | EncoderError):
                    logger.warning("memory: embedding failed (%s); trying again in %s s",
                                   exc, delay)
                else:
                    logger.exception("memory: embedding failed; trying again in %s s", delay)
                await asyncio.sleep(delay)
                continue
            # Not ``wait_for``: on Python 3.11 it can swallow a cancellation that comes as
            # the event is set, and the worker would never stop.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._idle):
                    await self._wake.wait()
