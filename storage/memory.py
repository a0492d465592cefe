"""``SqlMemoryStore``: long-term memory's ``MemoryStore`` protocol (``bot/memory/store.py``)
on the tables ``message_embeddings`` and ``memory_recalls``, in ``SqlStore``'s transactions
(so SQLite writers still take turns)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager

from sqlalchemy import delete, exists, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from bot.memory.store import (
    EmbeddingState,
    LastRecall,
    NewEmbedding,
    RecalledTurn,
    StoredEmbeddings,
    Unembedded,
)
from bot.metrics import Metrics
from bot.store import Role, StoredMessage
from storage.models import EmbeddingRow, MessageRow, RecallRow
from storage.records import as_stored
from storage.retries import retrying

Transaction = Callable[..., AbstractAsyncContextManager[AsyncSession]]
"""``SqlStore._transaction``: ``write=True`` for a writer's turn."""


class SqlMemoryStore:
    def __init__(self, transaction: Transaction, metrics: Metrics) -> None:
        self._transaction = transaction
        self._metrics = metrics

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    @retrying
    async def unembedded(self, model: str, after_id: int,
                         limit: int) -> Sequence[Unembedded]:
        async with self._transaction() as session:
            rows = await session.execute(
                select(MessageRow.id, MessageRow.conversation_id, MessageRow.text)
                .where(MessageRow.id > after_id,
                       ~exists().where(EmbeddingRow.message_id == MessageRow.id,
                                       EmbeddingRow.model == model))
                .order_by(MessageRow.id)
                .limit(limit))
            return [Unembedded(row.id, row.conversation_id, row.text) for row in rows]

    @retrying
    async def add_embeddings(self, model: str, dimension: int,
                             embeddings: Sequence[NewEmbedding]) -> None:
        if not embeddings:
            return
        ids = [e.message_id for e in embeddings]
        async with self._transaction(write=True) as session:
            # FOR KEY SHARE (PostgreSQL; SQLite's writers take turns anyway): a /forget
            # deleting one of them meanwhile either waits for this commit (and its cascade
            # takes the embedding), or has committed and the message is not found; without
            # it the insert fails on the foreign key.
            existing = set(await session.scalars(
                select(MessageRow.id).where(MessageRow.id.in_(ids))
                .with_for_update(read=True, key_share=True)))
            await session.execute(delete(EmbeddingRow).where(EmbeddingRow.message_id.in_(ids)))
            rows = [{"message_id": e.message_id, "conversation_id": e.conversation_id,
                     "model": model, "dimension": dimension, "vector": e.vector}
                    for e in embeddings if e.message_id in existing]
            if rows:
                await session.execute(insert(EmbeddingRow), rows)

    @retrying
    async def embedding_state(self, conversation_id: int, model: str) -> EmbeddingState:
        async with self._transaction() as session:
            row = (await session.execute(
                select(func.count(), func.coalesce(func.sum(EmbeddingRow.message_id), 0),
                       func.coalesce(func.max(EmbeddingRow.message_id), 0))
                .where(EmbeddingRow.conversation_id == conversation_id,
                       EmbeddingRow.model == model))).one()
            return EmbeddingState(int(row[0]), int(row[1]), int(row[2]))

    @retrying
    async def embeddings(self, conversation_id: int, model: str,
                         after_id: int) -> StoredEmbeddings:
        async with self._transaction() as session:
            rows = (await session.execute(
                select(EmbeddingRow.message_id, MessageRow.role, MessageRow.reply_to_id,
                       EmbeddingRow.vector)
                .join(MessageRow, MessageRow.id == EmbeddingRow.message_id)
                .where(EmbeddingRow.conversation_id == conversation_id,
                       EmbeddingRow.model == model, EmbeddingRow.message_id > after_id)
                .order_by(EmbeddingRow.message_id))).all()
        anchors = [reply_to if role == Role.ASSISTANT.value and reply_to is not None
                   else message_id for message_id, role, reply_to, _vector in rows]
        return StoredEmbeddings(ids=[row[0] for row in rows], anchors=anchors,
                                vectors=[bytes(row[3]) for row in rows])

    @retrying
    async def messages(self, conversation_id: int,
                       ids: Sequence[int]) -> Sequence[StoredMessage]:
        if not ids:
            return []
        async with self._transaction() as session:
            rows = await session.scalars(
                select(MessageRow).where(MessageRow.conversation_id == conversation_id,
                                         MessageRow.id.in_(list(ids))))
            return [as_stored(row) for row in rows]

    @retrying
    async def remember_recall(self, message_id: int,
                              recalled: Sequence[tuple[int, float]]) -> None:
        async with self._transaction(write=True) as session:
            await session.execute(delete(RecallRow).where(RecallRow.message_id == message_id))
            if recalled:
                await session.execute(insert(RecallRow), [
                    {"message_id": message_id, "recalled_id": recalled_id,
                     "similarity": similarity} for recalled_id, similarity in recalled])

    @retrying
    async def last_recall(self, conversation_id: int, author_id: str) -> LastRecall | None:
        async with self._transaction() as session:
            newest = await session.scalar(
                select(MessageRow)
                .where(MessageRow.conversation_id == conversation_id,
                       MessageRow.author_id == author_id,
                       MessageRow.role == Role.USER.value)
                .order_by(MessageRow.id.desc())
                .limit(1))
            if newest is None:
                return None
            rows = await session.execute(
                select(MessageRow, RecallRow.similarity)
                .join(RecallRow, RecallRow.recalled_id == MessageRow.id)
                .where(RecallRow.message_id == newest.id)
                .order_by(RecallRow.similarity.desc(), MessageRow.id))
            return LastRecall(as_stored(newest), [RecalledTurn(as_stored(message), similarity)
                                                  for message, similarity in rows])
