"""Database tables (SQLAlchemy 2 declarative). Schema changes go through Alembic migrations."""

from __future__ import annotations

from datetime import UTC, date, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    PrimaryKeyConstraint,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncAttrs
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite drops the zone otherwise)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(AsyncAttrs, DeclarativeBase):
    pass


class ConversationRow(Base):
    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(255), unique=True)
    platform: Mapped[str] = mapped_column(String(32))
    chat_id: Mapped[str] = mapped_column(String(128))
    thread_id: Mapped[str | None] = mapped_column(String(128))
    persona: Mapped[str | None] = mapped_column(Text)
    temperature: Mapped[float | None] = mapped_column(Float)
    max_reply_tokens: Mapped[int | None] = mapped_column(Integer)
    reset_after_id: Mapped[int] = mapped_column(BigInteger, default=0)
    answer_all: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    model: Mapped[str | None] = mapped_column(String(32))
    """Chosen with ``/model``; NULL is the default model."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class UserRow(Base):
    __tablename__ = "users"
    __table_args__ = (UniqueConstraint("platform", "user_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[str] = mapped_column(String(128))
    display_name: Mapped[str] = mapped_column(String(255))
    blocked: Mapped[bool] = mapped_column(Boolean, default=False)
    language: Mapped[str | None] = mapped_column(String(16))
    """Chosen with ``/language``; NULL follows the platform's."""
    platform_language: Mapped[str | None] = mapped_column(String(35))
    """The language tag the platform gave last (BCP 47 tags fit in 35 characters)."""
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class MessageRow(Base):
    __tablename__ = "messages"
    __table_args__ = (
        # The hot path: the newest messages of one conversation.
        Index("ix_messages_conversation_id_id", "conversation_id", "id"),
        Index("ix_messages_author", "platform", "author_id"),
        # Finding what is still to answer after a restart.
        Index("ix_messages_pending", "platform", "state"),
        Index("ix_messages_created_at", "created_at"),
        # Ids order a conversation, so a deleted newest message's id is never given again.
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE")
    )
    role: Mapped[str] = mapped_column(String(16))
    platform: Mapped[str] = mapped_column(String(32))
    author_id: Mapped[str | None] = mapped_column(String(128))
    """For a user message its author; for a reply, the user it answers."""
    platform_message_id: Mapped[str | None] = mapped_column(String(128))
    reply_to_id: Mapped[int | None] = mapped_column(
        ForeignKey("messages.id", ondelete="SET NULL"), index=True
    )
    text: Mapped[str] = mapped_column(Text)
    tokens: Mapped[int] = mapped_column(Integer)
    counted_by: Mapped[str | None] = mapped_column(String(32))
    """The model whose tokenizer counted ``tokens``; NULL is the default model."""
    state: Mapped[str | None] = mapped_column(String(16))
    """``bot.store.State`` of a user message; ``None`` for replies."""
    reply_draft_ids: Mapped[str | None] = mapped_column(Text)
    """Platform ids, space-separated, of the messages an unfinished reply to this user
    message was showing in."""
    generation_ms: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class PlatformMessageRow(Base):
    """Every platform message id we stored or sent, so replies and duplicates can be found.

    A long reply is several platform messages; a user may reply to any of them.
    """

    __tablename__ = "platform_messages"
    __table_args__ = (UniqueConstraint("conversation_id", "platform_message_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE")
    )
    platform_message_id: Mapped[str] = mapped_column(String(128))
    message_id: Mapped[int] = mapped_column(
        ForeignKey("messages.id", ondelete="CASCADE"), index=True
    )


class UsageRow(Base):
    """Per user, conversation and day: what they cost."""

    __tablename__ = "usage"
    __table_args__ = (UniqueConstraint("platform", "user_id", "conversation_id", "day"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    platform: Mapped[str] = mapped_column(String(32))
    user_id: Mapped[str] = mapped_column(String(128))
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE")
    )
    day: Mapped[date] = mapped_column(Date)
    messages: Mapped[int] = mapped_column(Integer, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    reply_tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class EmbeddingRow(Base):
    """A message's embedding for long-term memory (``bot/memory``): float32 bytes of a unit
    vector, deleted with its message."""

    __tablename__ = "message_embeddings"
    __table_args__ = (
        # A conversation's embeddings of one model, in id order: what a search reads.
        Index("ix_message_embeddings_conversation", "conversation_id", "model", "message_id"),
    )

    message_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        ForeignKey("messages.id", ondelete="CASCADE"), primary_key=True)
    conversation_id: Mapped[int] = mapped_column(
        ForeignKey("conversations.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(255))
    dimension: Mapped[int] = mapped_column(Integer)
    vector: Mapped[bytes] = mapped_column(LargeBinary)


class RecallRow(Base):
    """A turn long-term memory brought back into the prompt for a message (``/memory``)."""

    __tablename__ = "memory_recalls"
    __table_args__ = (PrimaryKeyConstraint("message_id", "recalled_id"),)

    message_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        ForeignKey("messages.id", ondelete="CASCADE"))
    recalled_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    similarity: Mapped[float] = mapped_column(Float)
