"""``SqlStore``: the core's ``Store`` protocol on SQLAlchemy async sessions."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import and_, delete, func, not_, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased
from sqlalchemy.sql.elements import ColumnElement

from bot.errors import StorageError
from bot.metrics import Metrics
from bot.store import (
    Admission,
    Conversation,
    Exchange,
    NewReply,
    NewUserMessage,
    PendingMessage,
    Role,
    State,
    Stats,
    StoredMessage,
    User,
)
from storage.memory import SqlMemoryStore
from storage.models import ConversationRow, MessageRow, PlatformMessageRow, UsageRow, UserRow
from storage.records import as_conversation, as_stored
from storage.retries import retrying, transient
from storage.usage import count_usage, read_stats, reply_tokens_on
from storage.writer_turns import NORMAL, URGENT, WriterTurns

logger = logging.getLogger(__name__)

_NO_WAIT: AbstractAsyncContextManager[None] = nullcontext()
LAST_SEEN_PRECISION = timedelta(minutes=10)


def _not_answering_before(after_id: int) -> ColumnElement[bool]:
    """Leaves out replies stored after a reset that answer a message from before it."""
    return not_(and_(MessageRow.role == Role.ASSISTANT.value,
                     MessageRow.reply_to_id <= after_id))


class SqlStore:
    def __init__(self, engine: AsyncEngine, *, metrics: Metrics | None = None) -> None:
        self._sessions = async_sessionmaker(engine, expire_on_commit=False)
        self._writers = WriterTurns() if engine.dialect.name == "sqlite" else None
        self._metrics = metrics or Metrics()

    @property
    def metrics(self) -> Metrics:
        """Where database retries and failures are counted."""
        return self._metrics

    def memory_store(self) -> SqlMemoryStore:
        """Long-term memory's tables (``storage.memory``), in this store's transactions."""
        return SqlMemoryStore(self._transaction, self._metrics)

    @asynccontextmanager
    async def _transaction(self, *, write: bool = False,
                           urgent: bool = False) -> AsyncIterator[AsyncSession]:
        """One transaction. On SQLite, writers take turns (``storage.writer_turns``);
        readers never wait, thanks to WAL. ``urgent``: storing a message just arrived."""
        turn = self._writers.turn(URGENT if urgent else NORMAL) \
            if write and self._writers is not None else _NO_WAIT
        async with turn:
            try:
                async with self._sessions() as session, session.begin():
                    yield session
            except (SQLAlchemyError, OSError) as exc:
                raise StorageError(f"database error: {exc.__class__.__name__}: {exc}") \
                    from exc
            except Exception as exc:
                if not transient(exc):
                    raise
                raise StorageError(f"database unreachable: {exc.__class__.__name__}") from exc

    @retrying
    async def conversation(self, key: str) -> Conversation:
        async with self._transaction() as session:
            row = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
            if row is not None:
                return as_conversation(row)
        platform, _, rest = key.partition(":")
        chat_id, _, thread_id = rest.partition(":")
        try:
            async with self._transaction(write=True, urgent=True) as session:
                row = ConversationRow(
                    key=key, platform=platform, chat_id=chat_id, thread_id=thread_id or None,
                    reset_after_id=0, answer_all=False,
                )
                session.add(row)
            return as_conversation(row)
        except StorageError as exc:
            if not isinstance(exc.__cause__, IntegrityError):
                raise
        # Created meanwhile by another task.
        async with self._transaction() as session:
            row = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
            assert row is not None
            return as_conversation(row)

    @retrying
    async def find_conversation(self, key: str) -> Conversation | None:
        async with self._transaction() as session:
            row = await session.scalar(select(ConversationRow).where(ConversationRow.key == key))
            return None if row is None else as_conversation(row)

    @retrying
    async def set_answer_all(self, conversation_id: int, answer_all: bool) -> None:
        async with self._transaction(write=True) as session:
            await session.execute(update(ConversationRow)
                                  .where(ConversationRow.id == conversation_id)
                                  .values(answer_all=answer_all))

    @retrying
    async def touch_user(self, platform: str, user_id: str, display_name: str,
                         platform_language: str | None = None) -> User:
        tag = platform_language[:35] if platform_language else None
        # Most messages come from a user seen moments ago under the same name: a read is
        # enough, and the write (one per message otherwise) is saved.
        async with self._transaction() as session:
            known = (await session.execute(
                select(UserRow.blocked, UserRow.display_name, UserRow.last_seen_at,
                       UserRow.language, UserRow.platform_language)
                .where(UserRow.platform == platform, UserRow.user_id == user_id))).first()
        if known is not None and known.display_name == display_name[:255] \
                and tag in (None, known.platform_language) \
                and datetime.now(UTC) - known.last_seen_at < LAST_SEEN_PRECISION:
            return User(bool(known.blocked), known.language, known.platform_language)
        async with self._transaction(write=True, urgent=True) as session:
            row = await session.scalar(
                select(UserRow).where(UserRow.platform == platform, UserRow.user_id == user_id)
            )
            now = datetime.now(UTC)
            if row is None:
                session.add(UserRow(platform=platform, user_id=user_id,
                                    display_name=display_name[:255], blocked=False,
                                    platform_language=tag, last_seen_at=now))
                return User(False, None, tag)
            row.display_name = display_name[:255]
            row.last_seen_at = now
            if tag is not None:
                row.platform_language = tag
            return User(row.blocked, row.language, row.platform_language)

    @retrying
    async def set_language(self, platform: str, user_id: str, language: str | None) -> None:
        async with self._transaction(write=True) as session:
            await session.execute(update(UserRow).where(UserRow.platform == platform,
                                                        UserRow.user_id == user_id)
                                  .values(language=language))

    @retrying
    async def stored_before(self, conversation_id: int, platform_message_id: str) -> bool:
        async with self._transaction() as session:
            found = await session.scalar(select(PlatformMessageRow.message_id).where(
                PlatformMessageRow.conversation_id == conversation_id,
                PlatformMessageRow.platform_message_id == platform_message_id))
        return found is not None

    @retrying
    async def add_user_message(self, message: NewUserMessage) -> Admission:
        try:
            return await self._add_user_message(message)
        except StorageError as exc:
            if not isinstance(exc.__cause__, IntegrityError):
                raise
            # The same platform message, stored by a concurrent delivery: find that one.
            return await self._add_user_message(message)

    async def _add_user_message(self, message: NewUserMessage) -> Admission:
        async with self._transaction(write=True, urgent=True) as session:
            seen = await session.scalar(
                select(MessageRow)
                .join(PlatformMessageRow, PlatformMessageRow.message_id == MessageRow.id)
                .where(
                    PlatformMessageRow.conversation_id == message.conversation_id,
                    PlatformMessageRow.platform_message_id == message.platform_message_id,
                )
            )
            if seen is not None:
                return Admission(as_stored(seen), new=False,
                                 state=State(seen.state or State.ANSWERED))
            reply_to_id = None
            if message.reply_to_platform_id is not None:
                reply_to_id = await session.scalar(
                    select(PlatformMessageRow.message_id).where(
                        PlatformMessageRow.conversation_id == message.conversation_id,
                        PlatformMessageRow.platform_message_id == message.reply_to_platform_id,
                    )
                )
            row = MessageRow(
                conversation_id=message.conversation_id,
                role=Role.USER.value,
                platform=message.platform,
                author_id=message.author_id,
                platform_message_id=message.platform_message_id,
                reply_to_id=reply_to_id,
                text=message.text,
                tokens=message.tokens,
                counted_by=message.counted_by,
                state=State.PENDING.value,
            )
            session.add(row)
            await session.flush()
            session.add(PlatformMessageRow(
                conversation_id=message.conversation_id,
                platform_message_id=message.platform_message_id,
                message_id=row.id,
            ))
        return Admission(as_stored(row), new=True, state=State.PENDING)

    @retrying
    async def add_reply(self, reply: NewReply) -> StoredMessage | None:
        async with self._transaction(write=True) as session:
            marked = await session.execute(
                update(MessageRow)
                .where(MessageRow.id == reply.reply_to_id,
                       MessageRow.state != State.ANSWERED.value)
                .values(state=State.ANSWERED.value))
            if marked.rowcount == 0:  # type: ignore[attr-defined]
                # A retry after a commit whose acknowledgement was lost: keep the first.
                earlier = await session.scalar(select(MessageRow).where(
                    MessageRow.reply_to_id == reply.reply_to_id,
                    MessageRow.role == Role.ASSISTANT.value).limit(1))
                if earlier is not None:
                    logger.info("conversation %s: the reply to %s is already stored",
                                reply.conversation_id, reply.reply_to_id)
                    return as_stored(earlier)
                if await session.get(MessageRow, reply.reply_to_id) is None:
                    # Its asker sent /forget while it was written: keep nothing about them.
                    logger.info("conversation %s: the message %s was deleted meanwhile; "
                                "its reply is not stored", reply.conversation_id,
                                reply.reply_to_id)
                    return None
            row = MessageRow(
                conversation_id=reply.conversation_id,
                role=Role.ASSISTANT.value,
                platform=reply.platform,
                author_id=reply.author_id,
                platform_message_id=reply.platform_message_ids[0]
                if reply.platform_message_ids else None,
                reply_to_id=reply.reply_to_id,
                text=reply.text,
                tokens=reply.tokens,
                counted_by=reply.counted_by,
                generation_ms=reply.generation_ms,
            )
            session.add(row)
            await session.flush()
            for platform_id in dict.fromkeys(reply.platform_message_ids):
                session.add(PlatformMessageRow(
                    conversation_id=reply.conversation_id,
                    platform_message_id=platform_id,
                    message_id=row.id,
                ))
            await count_usage(session, reply)
        return as_stored(row)

    @retrying
    async def history(self, conversation_id: int, after_id: int, before_id: int,
                      limit: int) -> Sequence[StoredMessage]:
        async with self._transaction() as session:
            rows = await session.scalars(
                select(MessageRow)
                .where(MessageRow.conversation_id == conversation_id,
                       MessageRow.id > after_id, MessageRow.id < before_id,
                       _not_answering_before(after_id))
                .order_by(MessageRow.id.desc())
                .limit(limit)
            )
            return [as_stored(row) for row in rows]

    @retrying
    async def message(self, message_id: int) -> StoredMessage | None:
        async with self._transaction() as session:
            row = await session.get(MessageRow, message_id)
            return None if row is None else as_stored(row)

    @retrying
    async def author_exchange(self, conversation_id: int, author_id: str, after_id: int,
                              before_id: int, since: datetime,
                              limit: int) -> Sequence[StoredMessage]:
        # A reply's author_id is the user it answered, so one condition finds both sides.
        async with self._transaction() as session:
            rows = await session.scalars(
                select(MessageRow)
                .where(MessageRow.conversation_id == conversation_id,
                       MessageRow.author_id == author_id,
                       MessageRow.id > after_id, MessageRow.id < before_id,
                       MessageRow.created_at >= since, _not_answering_before(after_id))
                .order_by(MessageRow.id.desc())
                .limit(limit)
            )
            return [as_stored(row) for row in rows]

    @retrying
    async def mark_failed(self, message_id: int) -> None:
        async with self._transaction(write=True) as session:
            await session.execute(update(MessageRow).where(MessageRow.id == message_id)
                                  .values(state=State.FAILED.value))

    @retrying
    async def set_reply_draft(self, message_id: int,
                              platform_message_ids: Sequence[str]) -> None:
        async with self._transaction(write=True) as session:
            await session.execute(update(MessageRow).where(MessageRow.id == message_id)
                                  .values(reply_draft_ids=" ".join(platform_message_ids)))

    @retrying
    async def pending(self, platform: str, since: datetime,
                      limit: int) -> Sequence[PendingMessage]:
        async with self._transaction() as session:
            rows = await session.execute(
                select(MessageRow, ConversationRow, UserRow.display_name)
                .join(ConversationRow, ConversationRow.id == MessageRow.conversation_id)
                .outerjoin(UserRow, and_(UserRow.platform == MessageRow.platform,
                                         UserRow.user_id == MessageRow.author_id))
                .where(MessageRow.platform == platform,
                       MessageRow.state == State.PENDING.value,
                       MessageRow.created_at >= since)
                .order_by(MessageRow.id)
                .limit(limit)
            )
            return [
                PendingMessage(
                    message=as_stored(message), conversation_key=conversation.key,
                    chat_id=conversation.chat_id, thread_id=conversation.thread_id,
                    platform_message_id=message.platform_message_id or "",
                    author_name=name or message.author_id or "",
                )
                for message, conversation, name in rows
            ]

    @retrying
    async def reset(self, conversation_id: int) -> None:
        async with self._transaction(write=True) as session:
            newest = await session.scalar(
                select(func.max(MessageRow.id)).where(MessageRow.conversation_id == conversation_id)
            )
            await session.execute(
                update(ConversationRow)
                .where(ConversationRow.id == conversation_id)
                .values(reset_after_id=newest or 0)
            )

    @retrying
    async def set_persona(self, conversation_id: int, persona: str | None) -> None:
        async with self._transaction(write=True) as session:
            await session.execute(update(ConversationRow)
                                  .where(ConversationRow.id == conversation_id)
                                  .values(persona=persona))

    @retrying
    async def set_model(self, conversation_id: int, model: str | None) -> None:
        async with self._transaction(write=True) as session:
            await session.execute(update(ConversationRow)
                                  .where(ConversationRow.id == conversation_id)
                                  .values(model=model))

    @retrying
    async def set_generation(self, conversation_id: int, temperature: float | None,
                             max_reply_tokens: int | None) -> None:
        async with self._transaction(write=True) as session:
            await session.execute(update(ConversationRow)
                                  .where(ConversationRow.id == conversation_id)
                                  .values(temperature=temperature,
                                          max_reply_tokens=max_reply_tokens))

    @retrying
    async def forget_user(self, platform: str, user_id: str) -> int:
        async with self._transaction(write=True) as session:
            result = await session.execute(
                delete(MessageRow).where(MessageRow.platform == platform,
                                         MessageRow.author_id == user_id)
            )
            await session.execute(delete(UsageRow).where(UsageRow.platform == platform,
                                                         UsageRow.user_id == user_id))
            await session.execute(delete(UserRow).where(UserRow.platform == platform,
                                                        UserRow.user_id == user_id))
            deleted: int = getattr(result, "rowcount", 0) or 0
        logger.info("forgot %s:%s (%s messages)", platform, user_id, deleted)
        return deleted

    @retrying
    async def set_blocked(self, platform: str, user_id: str, blocked: bool) -> None:
        async with self._transaction(write=True) as session:
            row = await session.scalar(
                select(UserRow).where(UserRow.platform == platform, UserRow.user_id == user_id)
            )
            if row is None:
                session.add(UserRow(platform=platform, user_id=user_id, display_name=user_id,
                                    blocked=blocked))
            else:
                row.blocked = blocked

    @retrying
    async def stats(self) -> Stats:
        async with self._transaction() as session:
            return await read_stats(session)

    @retrying
    async def reply_tokens_on(self, platform: str, user_id: str, day: date) -> int:
        async with self._transaction() as session:
            return await reply_tokens_on(session, platform, user_id, day)

    @retrying
    async def delete_older_than(self, cutoff: datetime) -> int:
        async with self._transaction(write=True) as session:
            result = await session.execute(delete(MessageRow)
                                           .where(MessageRow.created_at < cutoff))
            await session.execute(delete(UsageRow).where(UsageRow.day < cutoff.date()))
            deleted: int = getattr(result, "rowcount", 0) or 0
        if deleted:
            logger.info("retention: deleted %s messages stored before %s", deleted,
                        cutoff.isoformat(timespec="seconds"))
        return deleted

    @retrying
    async def exchanges(self, after_reply_id: int, limit: int) -> Sequence[Exchange]:
        question = aliased(MessageRow)
        async with self._transaction() as session:
            rows = await session.execute(
                select(MessageRow.id, question.text, MessageRow.text)
                .join(question, question.id == MessageRow.reply_to_id)
                .where(MessageRow.role == Role.ASSISTANT.value,
                       question.role == Role.USER.value, MessageRow.id > after_reply_id)
                .order_by(MessageRow.id)
                .limit(limit))
            return [Exchange(reply_id, prompt, reply) for reply_id, prompt, reply in rows]
