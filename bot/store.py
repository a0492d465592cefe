"""What the core needs from storage: domain records and the ``Store`` protocol.

``storage/`` implements the protocol with SQLAlchemy; the core never imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Protocol

from bot.events import IncomingMessage


class Role(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"


class State(StrEnum):
    """Where a user message stands. Replies have no state."""

    PENDING = "pending"
    """Stored, not answered yet: answered when seen again, and after a restart."""
    ANSWERED = "answered"
    FAILED = "failed"
    """Generation failed and the user was told; not answered again on its own."""


@dataclass(frozen=True, slots=True)
class Conversation:
    id: int
    key: str
    persona: str | None
    temperature: float | None
    max_reply_tokens: int | None
    reset_after_id: int
    """Messages with an id at or below this are outside the context (``/reset``)."""
    answer_all: bool = False
    """A group chat where every message is answered (``/listen on``), not only mentions
    and replies; its context is then the whole history, as in a direct chat."""
    model: str | None = None
    """The model chosen with ``/model`` (a name in ``CHINWAG_MODELS``); ``None``: the
    default."""


@dataclass(frozen=True, slots=True)
class User:
    """What intake needs to know of a message's author."""

    blocked: bool
    language: str | None = None
    """The language they chose with ``/language`` (``bot.i18n.LANGUAGES``), if any."""
    platform_language: str | None = None
    """The language tag their platform gave last (a Discord message carries none: the
    locale of their last slash command stands for it)."""


@dataclass(frozen=True, slots=True)
class StoredMessage:
    id: int
    conversation_id: int
    role: Role
    author_id: str | None
    text: str
    tokens: int
    created_at: datetime
    reply_to_id: int | None
    reply_draft_ids: tuple[str, ...] = ()
    """A user message's reply as far as it got: the platform ids of the messages it was
    showing in when a crash or a stop cut it short (the next try writes into them)."""
    counted_by: str | None = None
    """The model whose tokenizer counted ``tokens`` (``bot.generators.pool.Counter``);
    ``None``: the default."""


@dataclass(frozen=True, slots=True)
class NewUserMessage:
    conversation_id: int
    platform: str
    author_id: str
    author_name: str
    platform_message_id: str
    text: str
    tokens: int
    reply_to_platform_id: str | None
    counted_by: str | None = None
    """The model that counted ``tokens``; ``None``: the default."""


@dataclass(frozen=True, slots=True)
class Admission:
    """What storing a user message found."""

    message: StoredMessage
    new: bool
    """False when this platform message was stored before (a redelivery)."""
    state: State


@dataclass(frozen=True, slots=True)
class PendingMessage:
    """A stored user message still waiting for its answer, with what an adapter needs to
    answer it after a restart."""

    message: StoredMessage
    conversation_key: str
    chat_id: str
    thread_id: str | None
    platform_message_id: str
    author_name: str

    def as_incoming(self, platform: str, *, is_direct: bool) -> IncomingMessage:
        """The message as an adapter resubmits it after a restart (it was addressed to the
        bot when it was stored)."""
        return IncomingMessage(
            platform=platform, chat_id=self.chat_id, thread_id=self.thread_id,
            author_id=self.message.author_id or "", author_name=self.author_name,
            message_id=self.platform_message_id, text=self.message.text,
            is_direct=is_direct, mentions_bot=not is_direct,
            received_at=self.message.created_at,
        )


@dataclass(frozen=True, slots=True)
class NewReply:
    conversation_id: int
    reply_to_id: int
    platform: str
    author_id: str
    """The user the reply answers; usage is counted against them."""
    text: str
    tokens: int
    prompt_tokens: int
    generation_ms: int
    platform_message_ids: Sequence[str]
    counted_by: str | None = None
    """The model that wrote it and counted ``tokens``; ``None``: the default."""


@dataclass(frozen=True, slots=True)
class Stats:
    conversations: int
    users: int
    user_messages: int
    replies: int
    prompt_tokens: int
    reply_tokens: int
    latency_ms_p50: float | None
    latency_ms_p95: float | None


@dataclass(frozen=True, slots=True)
class Exchange:
    """A user's message and the bot's reply to it (what ``chinwag train seq2seq --corpus
    db`` trains on)."""

    reply_id: int
    prompt: str
    reply: str


class Store(Protocol):
    async def conversation(self, key: str) -> Conversation:
        """The conversation with this key, created on first use."""
        ...

    async def find_conversation(self, key: str) -> Conversation | None:
        """The conversation with this key if it exists (read only)."""
        ...

    async def set_answer_all(self, conversation_id: int, answer_all: bool) -> None: ...

    async def touch_user(self, platform: str, user_id: str, display_name: str,
                         platform_language: str | None = None) -> User:
        """Record or update a user (``platform_language``, when given, replaces the one
        remembered); returns what is stored about them."""
        ...

    async def set_language(self, platform: str, user_id: str, language: str | None) -> None:
        """Store a user's language choice; ``None`` goes back to the platform's."""
        ...

    async def add_user_message(self, message: NewUserMessage) -> Admission:
        """Store a user's message as pending; a platform message stored before is found,
        not stored twice."""
        ...

    async def stored_before(self, conversation_id: int, platform_message_id: str) -> bool:
        """Whether this platform message was stored already (it is delivered again)."""
        ...

    async def add_reply(self, reply: NewReply) -> StoredMessage | None:
        """Store a reply, the platform ids of its parts and its usage, and mark the message
        it answers answered, in one transaction; None, storing nothing, when that message
        is gone (its author sent /forget while the reply was written)."""
        ...

    async def mark_failed(self, message_id: int) -> None: ...

    async def set_reply_draft(self, message_id: int,
                              platform_message_ids: Sequence[str]) -> None:
        """Remember the messages a reply to this user message is showing in so far."""
        ...

    async def pending(self, platform: str, since: datetime,
                      limit: int) -> Sequence[PendingMessage]:
        """Pending user messages of a platform stored since ``since``, oldest first."""
        ...

    async def history(self, conversation_id: int, after_id: int, before_id: int,
                      limit: int) -> Sequence[StoredMessage]:
        """Messages with ``after_id < id < before_id``, newest first."""
        ...

    async def message(self, message_id: int) -> StoredMessage | None: ...

    async def author_exchange(self, conversation_id: int, author_id: str, after_id: int,
                              before_id: int, since: datetime,
                              limit: int) -> Sequence[StoredMessage]:
        """The author's messages since ``since`` and the replies to them, newest first."""
        ...

    async def reset(self, conversation_id: int) -> None:
        """Start a fresh context: messages stored so far, and replies to them stored later,
        are left out of prompts."""
        ...

    async def set_persona(self, conversation_id: int, persona: str | None) -> None: ...

    async def set_model(self, conversation_id: int, model: str | None) -> None:
        """Store the conversation's ``/model`` choice; ``None`` goes back to the default."""
        ...

    async def set_generation(self, conversation_id: int, temperature: float | None,
                             max_reply_tokens: int | None) -> None:
        """Set both values; ``None`` means the global default."""
        ...

    async def forget_user(self, platform: str, user_id: str) -> int:
        """Delete every row about a user; returns how many messages went."""
        ...

    async def set_blocked(self, platform: str, user_id: str, blocked: bool) -> None: ...

    async def stats(self) -> Stats: ...

    async def reply_tokens_on(self, platform: str, user_id: str, day: date) -> int:
        """Tokens generated in replies to a user on one (UTC) day, in every conversation."""
        ...

    async def delete_older_than(self, cutoff: datetime) -> int:
        """Delete messages stored before ``cutoff`` and usage of days before it; returns
        how many messages went."""
        ...

    async def exchanges(self, after_reply_id: int, limit: int) -> Sequence[Exchange]:
        """User messages and the replies to them, over every conversation, in the order
        the replies were stored, from the first reply after ``after_reply_id``."""
        ...
