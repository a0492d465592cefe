from datetime import UTC, datetime, timedelta

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.config import Settings
from bot.errors import StorageError
from bot.retention import RetentionSweeper
from bot.store import NewReply, NewUserMessage, Role, State, StoredMessage, User
from storage.engine import create_engine
from storage.migrate import head_revision, upgrade
from storage.models import Base, MessageRow, PlatformMessageRow, UsageRow, UserRow
from storage.repository import SqlStore


def user_message(conversation_id: int, platform_id: str, text: str = "hello", *,
                 author: str = "u1", reply_to: str | None = None) -> NewUserMessage:
    return NewUserMessage(conversation_id=conversation_id, platform="telegram", author_id=author,
                          author_name="User", platform_message_id=platform_id, text=text,
                          tokens=len(text.split()), reply_to_platform_id=reply_to)


async def added(store: SqlStore, message: NewUserMessage) -> StoredMessage:
    return (await store.add_user_message(message)).message


def reply(conversation_id: int, to: int, ids: list[str], text: str = "hi there", *,
          author: str = "u1") -> NewReply:
    return NewReply(conversation_id=conversation_id, reply_to_id=to, platform="telegram",
                    author_id=author, text=text, tokens=2, prompt_tokens=10,
                    generation_ms=120, platform_message_ids=ids)


@pytest.fixture
def engine(any_engine: AsyncEngine) -> AsyncEngine:
    """Every storage test runs on a SQLite file and on a real PostgreSQL server."""
    return any_engine


async def test_migrations_match_the_models(engine: AsyncEngine) -> None:
    def diff(connection: Connection) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))

    async with engine.connect() as connection:
        assert await connection.run_sync(diff) == []
    assert await upgrade(engine) == head_revision()  # running it again is a no-op


async def test_sqlite_runs_in_wal_with_foreign_keys(settings: Settings) -> None:
    engine = create_engine(settings.database_url)
    async with engine.connect() as connection:
        assert (await connection.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
        assert (await connection.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
    await engine.dispose()


async def test_conversation_is_created_once(store: SqlStore) -> None:
    first = await store.conversation("telegram:42:7")
    again = await store.conversation("telegram:42:7")
    assert first == again and first.reset_after_id == 0


async def test_a_platform_message_is_stored_once_and_its_state_kept(
        store: SqlStore) -> None:
    conversation = await store.conversation("telegram:1")
    first = await store.add_user_message(user_message(conversation.id, "p1"))
    again = await store.add_user_message(user_message(conversation.id, "p1"))
    assert (first.new, first.state) == (True, State.PENDING)
    assert (again.new, again.state, again.message.id) == (False, State.PENDING, first.message.id)
    await store.add_reply(reply(conversation.id, first.message.id, ["b1"]))
    assert (await store.add_user_message(user_message(conversation.id, "p1"))).state \
        is State.ANSWERED
    failed = await added(store, user_message(conversation.id, "p2"))
    await store.mark_failed(failed.id)
    assert (await store.add_user_message(user_message(conversation.id, "p2"))).state \
        is State.FAILED


async def test_pending_lists_unanswered_messages_within_the_window(store: SqlStore) -> None:
    await store.touch_user("telegram", "u1", "Ada")
    conversation = await store.conversation("telegram:-5:77")
    answered = await added(store, user_message(conversation.id, "p1", "answered"))
    await store.add_reply(reply(conversation.id, answered.id, ["b1"]))
    waiting = await added(store, user_message(conversation.id, "p2", "waiting"))
    elsewhere = await store.conversation("discord:1")
    await added(store, NewUserMessage(conversation_id=elsewhere.id, platform="discord",
                                      author_id="u1", author_name="Ada",
                                      platform_message_id="d1", text="other platform",
                                      tokens=2, reply_to_platform_id=None))
    since = datetime.now(UTC) - timedelta(minutes=5)
    [pending] = await store.pending("telegram", since, 10)
    assert pending.message.id == waiting.id and pending.message.reply_draft_ids == ()
    # Where its reply was showing when it was cut short: every part, in order.
    await store.set_reply_draft(waiting.id, ["901", "1234567890123456789", "903"])
    [pending] = await store.pending("telegram", since, 10)
    assert pending.message.reply_draft_ids == ("901", "1234567890123456789", "903")
    assert (pending.chat_id, pending.thread_id, pending.platform_message_id,
            pending.author_name) == ("-5", "77", "p2", "Ada")
    assert await store.pending("telegram", datetime.now(UTC) + timedelta(minutes=1), 10) == []


async def test_replies_stored_after_a_reset_to_older_messages_stay_out(
        store: SqlStore) -> None:
    conversation = await store.conversation("telegram:1")
    before = await added(store, user_message(conversation.id, "p1", "before"))
    await store.reset(conversation.id)
    await store.add_reply(reply(conversation.id, before.id, ["b1"], "late answer"))
    after = await added(store, user_message(conversation.id, "p2", "after"))
    conversation = await store.conversation("telegram:1")
    assert await store.history(conversation.id, conversation.reset_after_id, 10**9, 10) \
        == [after]


async def test_reply_links_and_usage(store: SqlStore, engine: AsyncEngine) -> None:
    conversation = await store.conversation("telegram:1")
    question = await added(store, user_message(conversation.id, "p1"))
    answer = await store.add_reply(reply(conversation.id, question.id, ["b1", "b2"]))
    assert answer.reply_to_id == question.id and answer.role is Role.ASSISTANT
    # A user replying to the second part of a long reply is linked to the reply.
    follow_up = await added(store, user_message(conversation.id, "p2", reply_to="b2"))
    assert follow_up is not None and follow_up.reply_to_id == answer.id
    async with engine.connect() as connection:
        usage = (await connection.execute(select(UsageRow))).one()
    assert (usage.messages, usage.prompt_tokens, usage.reply_tokens) == (1, 10, 2)


async def test_history_pages_newest_first_and_respects_reset(store: SqlStore) -> None:
    conversation = await store.conversation("telegram:1")
    ids = []
    for n in range(10):
        stored = await added(store, user_message(conversation.id, f"p{n}", f"t{n}"))
        assert stored is not None
        ids.append(stored.id)
    page = await store.history(conversation.id, 0, ids[-1], 4)
    assert [m.text for m in page] == ["t8", "t7", "t6", "t5"]
    await store.reset(conversation.id)
    conversation = await store.conversation("telegram:1")
    assert conversation.reset_after_id == ids[-1]
    assert await store.history(conversation.id, conversation.reset_after_id, 10**9, 10) == []


async def test_author_exchange_finds_both_sides_within_the_window(store: SqlStore) -> None:
    conversation = await store.conversation("telegram:g")
    mine = await added(store, user_message(conversation.id, "p1", "mine"))
    other = await added(store, user_message(conversation.id, "p2", "theirs",
                                                      author="u2"))
    assert mine is not None and other is not None
    await store.add_reply(reply(conversation.id, mine.id, ["b1"], "to mine"))
    await store.add_reply(reply(conversation.id, other.id, ["b2"], "to theirs", author="u2"))
    since = datetime.now(UTC) - timedelta(minutes=5)
    found = await store.author_exchange(conversation.id, "u1", 0, 10**9, since, 10)
    assert [m.text for m in found] == ["to mine", "mine"]
    later = datetime.now(UTC) + timedelta(minutes=1)
    assert await store.author_exchange(conversation.id, "u1", 0, 10**9, later, 10) == []


async def test_forget_deletes_every_row_about_the_user(store: SqlStore,
                                                       engine: AsyncEngine) -> None:
    conversation = await store.conversation("telegram:1")
    mine = await added(store, user_message(conversation.id, "p1", "secret"))
    theirs = await added(store, user_message(conversation.id, "p2", "hi", author="u2"))
    assert mine is not None and theirs is not None
    await store.touch_user("telegram", "u1", "One")
    await store.touch_user("telegram", "u2", "Two")
    await store.add_reply(reply(conversation.id, mine.id, ["b1"], "about your secret"))
    assert await store.forget_user("telegram", "u1") == 2
    async with engine.connect() as connection:
        texts = (await connection.execute(select(MessageRow.text))).scalars().all()
        users = (await connection.execute(select(UserRow.user_id))).scalars().all()
        usage = (await connection.execute(select(func.count()).select_from(UsageRow))).scalar()
        links = (await connection.execute(
            select(PlatformMessageRow.platform_message_id))).scalars().all()
    assert texts == ["hi"]
    assert users == ["u2"]
    assert usage == 0
    assert links == ["p2"]


async def test_a_deleted_messages_id_is_never_given_again(store: SqlStore) -> None:
    """Ids order a conversation (a /reset hides every id up to the newest): a /forget of
    the newest messages must not let the next ones take their ids, below the reset."""
    conversation = await store.conversation("telegram:1")
    await added(store, user_message(conversation.id, "p1", "old", author="u1"))
    newest = await added(store, user_message(conversation.id, "p2", "mine", author="u2"))
    await store.reset(conversation.id)
    await store.forget_user("telegram", "u2")
    after = await added(store, user_message(conversation.id, "p3", "after the reset"))
    assert after.id > newest.id
    conversation = await store.conversation("telegram:1")
    context = await store.history(conversation.id, conversation.reset_after_id, 10**9, 10)
    assert [m.text for m in context] == ["after the reset"]


async def test_block_and_stats(store: SqlStore) -> None:
    assert (await store.touch_user("telegram", "u1", "One")).blocked is False
    await store.set_blocked("telegram", "u1", True)
    assert (await store.touch_user("telegram", "u1", "One")).blocked is True
    await store.set_blocked("telegram", "u1", False)
    assert (await store.touch_user("telegram", "u1", "One")).blocked is False
    conversation = await store.conversation("telegram:1")
    question = await added(store, user_message(conversation.id, "p1"))
    await store.add_reply(reply(conversation.id, question.id, ["b1"]))
    stats = await store.stats()
    assert (stats.conversations, stats.users, stats.user_messages, stats.replies) == (1, 1, 1, 1)
    assert stats.latency_ms_p50 == 120.0


async def test_a_reply_stored_again_is_kept_once(store: SqlStore,
                                                 engine: AsyncEngine) -> None:
    """A retry after a lost commit acknowledgement runs the whole write again."""
    conversation = await store.conversation("telegram:1")
    question = await added(store, user_message(conversation.id, "p1"))
    first = await store.add_reply(reply(conversation.id, question.id, ["b1"]))
    again = await store.add_reply(reply(conversation.id, question.id, ["b1"]))
    assert again.id == first.id
    async with engine.connect() as connection:
        replies = (await connection.execute(select(func.count()).select_from(MessageRow)
                                            .where(MessageRow.role == "assistant"))).scalar()
        links = (await connection.execute(
            select(func.count()).select_from(PlatformMessageRow))).scalar()
        usage = (await connection.execute(select(UsageRow))).one()
    assert (replies, links, usage.messages, usage.reply_tokens) == (1, 2, 1, 2)


async def test_a_turns_reply_writes_are_one_transaction(store: SqlStore,
                                                        engine: AsyncEngine) -> None:
    conversation = await store.conversation("telegram:1")
    first = await added(store, user_message(conversation.id, "p1"))
    second = await added(store, user_message(conversation.id, "p2"))
    # The reply's platform id clashes with a stored one, so its last write fails...
    with pytest.raises(StorageError):
        await store.add_reply(reply(conversation.id, second.id, ["p1"]))
    # ...and none of that turn's writes stayed: no reply, no usage, still pending.
    assert [m.text for m in await store.history(conversation.id, 0, 10**9, 10)] == \
        ["hello", "hello"]
    async with engine.connect() as connection:
        assert (await connection.execute(
            select(func.count()).select_from(UsageRow))).scalar() == 0
        state = (await connection.execute(
            select(MessageRow.state).where(MessageRow.id == second.id))).scalar()
    assert state == State.PENDING.value
    assert first.id != second.id


async def test_retention_deletes_old_messages_and_usage(store: SqlStore,
                                                        engine: AsyncEngine) -> None:
    conversation = await store.conversation("telegram:1")
    old = await added(store, user_message(conversation.id, "p1", "old news"))
    await store.add_reply(reply(conversation.id, old.id, ["b1"], "old answer"))
    new = await added(store, user_message(conversation.id, "p2", "fresh"))
    await store.add_reply(reply(conversation.id, new.id, ["b2"], "fresh answer"))
    long_ago = datetime.now(UTC) - timedelta(days=40)
    async with engine.begin() as connection:
        await connection.execute(update(MessageRow).where(MessageRow.id <= old.id + 1)
                                 .values(created_at=long_ago))
        await connection.execute(insert(UsageRow).values(
            platform="telegram", user_id="u1", conversation_id=conversation.id,
            day=long_ago.date(), messages=1, prompt_tokens=5, reply_tokens=7))
    sweeper = RetentionSweeper(store, 30)
    assert await sweeper.sweep() == 2
    async with engine.connect() as connection:
        texts = (await connection.execute(select(MessageRow.text)
                                          .order_by(MessageRow.id))).scalars().all()
        days = (await connection.execute(select(UsageRow.day))).scalars().all()
        links = (await connection.execute(
            select(PlatformMessageRow.platform_message_id)
            .order_by(PlatformMessageRow.id))).scalars().all()
    assert texts == ["fresh", "fresh answer"]
    assert days == [datetime.now(UTC).date()]
    assert links == ["p2", "b2"]
    assert await RetentionSweeper(store, None).sweep() == 0  # unset keeps everything


async def test_reply_tokens_of_a_day_count_every_conversation(store: SqlStore) -> None:
    today = datetime.now(UTC).date()
    for key in ("telegram:1", "telegram:2"):
        conversation = await store.conversation(key)
        question = await added(store, user_message(conversation.id, "p1"))
        await store.add_reply(reply(conversation.id, question.id, ["b1"]))
    assert await store.reply_tokens_on("telegram", "u1", today) == 4
    assert await store.reply_tokens_on("telegram", "u2", today) == 0
    assert await store.reply_tokens_on("telegram", "u1", today - timedelta(days=1)) == 0


async def test_a_users_language_is_kept_until_forgotten(store: SqlStore) -> None:
    assert await store.touch_user("discord", "d1", "Dee") == User(False, None, None)
    # A slash command's locale is remembered; a message that carries none keeps it.
    assert await store.touch_user("discord", "d1", "Dee", "zh-TW") == User(False, None, "zh-TW")
    assert await store.touch_user("discord", "d1", "Dee") == User(False, None, "zh-TW")
    assert await store.touch_user("discord", "d1", "Dee", "en-US") == User(False, None, "en-US")
    await store.set_language("discord", "d1", "zh")
    assert await store.touch_user("discord", "d1", "Dee") == User(False, "zh", "en-US")
    assert (await store.touch_user("discord", "d2", "Other")).language is None  # per user
    await store.set_language("discord", "d1", None)
    assert (await store.touch_user("discord", "d1", "Dee")).language is None
    await store.set_language("discord", "d1", "zh")
    await store.forget_user("discord", "d1")
    assert await store.touch_user("discord", "d1", "Dee") == User(False, None, None)
