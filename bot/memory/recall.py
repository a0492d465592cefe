"""The recall policy: which dropped turns come back into a prompt, and how they are shown.

When the prompt's budget leaves older turns out, the new message is embedded (in a
thread, within ``timeout``) and compared with the conversation's stored embeddings; up to
``recall`` of the most similar turns older than the prompt's oldest, and after the
conversation's ``/reset`` mark, come back as a note at the end of the system prompt,
within ``tokens`` (counted with the chat model's tokenizer). Only the conversation's own
turns are ever searched. What was recalled is recorded for ``/memory``. Any failure here
(slow encoder, database) means a reply without recall, never no reply.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from bot.errors import EncoderError, StorageError
from bot.memory.encoder import Encoder
from bot.memory.index import CACHE_BYTES, VectorCache
from bot.memory.store import LastRecall, MemoryStore, RecalledTurn
from bot.memory.worker import EmbeddingWorker
from bot.store import Conversation, Role, StoredMessage

logger = logging.getLogger(__name__)

# For the model, not the user: English whatever the user's language, like the template.
NOTE_HEADER = "Earlier in this conversation (recalled from turns no longer shown above):"
ROLE_NAMES = {Role.USER: "User", Role.ASSISTANT: "Assistant"}
MIN_SIMILARITY = 0.3
"""Below this (cosine) a turn is taken as unrelated and not recalled: MiniLM gives unrelated
sentences about 0 to 0.2, a question and the statement answering it about 0.5 and more."""
RECALL_TIMEOUT_S = 2.0
"""How long a reply may wait for its recall before going on without it."""
MIN_CUT_TOKENS = 24
"""A turn too long for the room left is cut to fit when at least this much room is left."""

Count = Callable[[str, str], int]
Truncate = Callable[[str, int], str]


@dataclass(frozen=True, slots=True)
class Recollection:
    note: str
    """To add to the system prompt."""
    turns: tuple[RecalledTurn, ...]
    """What the note holds, most relevant first."""


class Memory:
    """Long-term memory: the embedding worker, the search cache and the recall policy."""

    def __init__(self, store: MemoryStore, encoder: Encoder, *, recall: int, tokens: int,
                 timeout: float = RECALL_TIMEOUT_S, cache_bytes: int = CACHE_BYTES,
                 worker: EmbeddingWorker | None = None) -> None:
        self._store = store
        self._encoder = encoder
        self._recall = recall
        self._tokens = tokens
        self._timeout = timeout
        self._cache = VectorCache(store, encoder.name, encoder.dimension,
                                  max_bytes=cache_bytes)
        self.worker = worker or EmbeddingWorker(store, encoder)

    async def __aenter__(self) -> Self:
        await self.worker.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.worker.__aexit__(exc_type, exc, tb)
        await self._cache.close()

    @property
    def cache(self) -> VectorCache:
        return self._cache

    def stored(self) -> None:
        """Messages were stored: the worker embeds them soon."""
        self.worker.wake()

    def forgotten(self) -> None:
        """Messages were deleted (``/forget``): no copy of their embeddings is kept."""
        self._cache.clear()

    async def recall(self, key: str, conversation: Conversation, question: StoredMessage, *,
                     before_id: int, room: int, count: Count,
                     truncate: Truncate) -> Recollection | None:
        """The turns to bring back for ``question`` from those with an id below
        ``before_id`` (the oldest in the prompt), as a note of at most ``room`` tokens
        (and ``CHINWAG_MEMORY_TOKENS``); None when none is relevant or recall failed."""
        room = min(room, self._tokens)
        if room < MIN_CUT_TOKENS or before_id <= conversation.reset_after_id + 1:
            return None
        try:
            async with asyncio.timeout(self._timeout):
                turns = await self._find(conversation, question, before_id)
        except TimeoutError:
            logger.warning("%s: answering %s without recall: it took over %s s", key,
                           question.id, self._timeout)
            return None
        except (StorageError, EncoderError) as exc:
            logger.warning("%s: answering %s without recall: %s", key, question.id, exc)
            return None
        except Exception:  # recall is a help: whatever breaks it, the reply goes on
            logger.exception("%s: answering %s without recall", key, question.id)
            return None
        note, used = compose_note(turns, room, count, truncate)
        if not used:
            return None
        logger.info("%s: recalled %s earlier turns for %s (similarity %s)", key, len(used),
                    question.id, ", ".join(f"{t.similarity:.2f}" for t in used))
        try:
            await self._store.remember_recall(
                question.id, [(t.message.id, t.similarity) for t in used])
        except StorageError as exc:  # /memory will not show it; the reply goes on
            logger.warning("%s: could not record what was recalled for %s: %s", key,
                           question.id, exc)
        return Recollection(note, tuple(used))

    async def _find(self, conversation: Conversation, question: StoredMessage,
                    before_id: int) -> list[RecalledTurn]:
        [query] = await asyncio.to_thread(self._encoder.encode, [question.text])
        snapshot = await self._cache.snapshot(conversation.id)
        # A few more than needed: some may have been deleted since they were cached.
        found = await asyncio.to_thread(snapshot.search, query,
                                        after_id=conversation.reset_after_id,
                                        before_id=before_id, limit=2 * self._recall)
        found = [(message_id, score) for message_id, score in found
                 if score >= MIN_SIMILARITY]
        if not found:
            return []
        messages = {m.id: m for m in await self._store.messages(
            conversation.id, [message_id for message_id, _score in found])}
        turns = [RecalledTurn(messages[message_id], score) for message_id, score in found
                 if message_id in messages]
        return turns[:self._recall]

    async def last_recall(self, conversation_id: int, author_id: str) -> LastRecall | None:
        return await self._store.last_recall(conversation_id, author_id)


def compose_note(turns: Sequence[RecalledTurn], room: int, count: Count,
                 truncate: Truncate) -> tuple[str, list[RecalledTurn]]:
    """The note for the most relevant turns that fit in ``room`` tokens, in the order they
    were said; a turn too long for what is left is cut, if enough is left."""
    used: list[RecalledTurn] = []
    texts: dict[int, str] = {}
    note = ""
    for turn in turns:
        text = turn.message.text.strip()
        trial = _note([*used, turn], {**texts, turn.message.id: text})
        spent = count("system", trial)
        if spent > room:
            left = room - count("system", _note([*used, turn], {**texts, turn.message.id: ""}))
            if left < MIN_CUT_TOKENS:
                continue
            text = truncate(text, left - 2) + " …"
            trial = _note([*used, turn], {**texts, turn.message.id: text})
            if count("system", trial) > room:
                continue
        used.append(turn)
        texts[turn.message.id] = text
        note = trial
    return note, used


def _note(turns: Sequence[RecalledTurn], texts: dict[int, str]) -> str:
    lines = [NOTE_HEADER]
    for turn in sorted(turns, key=lambda t: t.message.id):
        lines.append(f"- {ROLE_NAMES[turn.message.role]}: {texts[turn.message.id]}")
    return "\n".join(lines)
