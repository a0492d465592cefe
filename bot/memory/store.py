"""What the long-term memory needs from storage: its records and the ``MemoryStore``
protocol (``storage/memory.py`` implements it; the core never imports it).

An embedding is stored per message, under its model's name, as the float32 bytes of a
unit vector, and deleted with its message (``/forget``, retention).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from bot.store import StoredMessage


@dataclass(frozen=True, slots=True)
class Unembedded:
    """A stored message with no embedding of the current model yet."""

    message_id: int
    conversation_id: int
    text: str


@dataclass(frozen=True, slots=True)
class NewEmbedding:
    message_id: int
    conversation_id: int
    vector: bytes
    """float32, unit length, ``dimension`` of them."""


@dataclass(frozen=True, slots=True)
class EmbeddingState:
    """A fingerprint of one conversation's embeddings: a cached copy with the same one holds
    the same rows (they are only ever added and deleted, never changed)."""

    count: int = 0
    id_sum: int = 0
    newest_id: int = 0


@dataclass(frozen=True, slots=True)
class StoredEmbeddings:
    """A conversation's embeddings, in message id order."""

    ids: Sequence[int]
    anchors: Sequence[int]
    """The id that places each message before or after a ``/reset``: its own, or, for a
    reply, the id of the message it answers (a reply stored after a reset to a question
    from before it belongs before it)."""
    vectors: Sequence[bytes]


@dataclass(frozen=True, slots=True)
class RecalledTurn:
    message: StoredMessage
    similarity: float


@dataclass(frozen=True, slots=True)
class LastRecall:
    """The newest message a user sent in a conversation, and what was recalled for it."""

    message: StoredMessage
    turns: Sequence[RecalledTurn]
    """Most relevant first; empty when nothing was recalled."""


class MemoryStore(Protocol):
    async def unembedded(self, model: str, after_id: int,
                         limit: int) -> Sequence[Unembedded]:
        """Messages with ``id > after_id`` and no embedding of ``model``, oldest first."""
        ...

    async def add_embeddings(self, model: str, dimension: int,
                             embeddings: Sequence[NewEmbedding]) -> None:
        """Store embeddings, replacing any other model's for the same messages; those of
        messages deleted meanwhile are left out."""
        ...

    async def embedding_state(self, conversation_id: int, model: str) -> EmbeddingState: ...

    async def embeddings(self, conversation_id: int, model: str,
                         after_id: int) -> StoredEmbeddings:
        """A conversation's embeddings of ``model`` with ``message id > after_id``."""
        ...

    async def messages(self, conversation_id: int,
                       ids: Sequence[int]) -> Sequence[StoredMessage]:
        """Those of the messages that still exist and belong to the conversation."""
        ...

    async def remember_recall(self, message_id: int,
                              recalled: Sequence[tuple[int, float]]) -> None:
        """Record which messages (with their similarity) were recalled for a message,
        replacing what was recorded for it before."""
        ...

    async def last_recall(self, conversation_id: int, author_id: str) -> LastRecall | None:
        """The author's newest message in the conversation and what was recalled for it;
        None if they have none."""
        ...
