"""The real python-telegram-bot client against a loopback Bot API emulator."""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from adapters.telegram import TelegramAdapter, redelivery
from adapters.telegram import adapter as telegram_polling
from bot import intake
from bot.answering import SHUTDOWN_NOTE
from bot.builtin_commands import builtin_commands
from bot.commands import Access
from bot.config import Settings
from bot.dialogue import DialogueManager
from bot.errors import ConfigError, DeliveryError, StorageError
from bot.generators import ChatMessage
from bot.intake import INTAKE_FAILED_NOTE
from bot.store import NewUserMessage
from storage.repository import SqlStore
from tests.auxil.adapters import telegram_adapter
from tests.auxil.db import stored_texts
from tests.auxil.generators import ScriptedGenerator
from tests.auxil.process import serve_until_sigterm
from tests.auxil.telegram_api import DROP, Fault, TelegramEmulator

ADMIN = 42
GROUP = -100


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"admins": (f"telegram:{ADMIN}",)})


@pytest.fixture
async def emulator() -> AsyncIterator[TelegramEmulator]:
    async with TelegramEmulator() as emulator:
        yield emulator


@pytest.fixture
async def tg(emulator: TelegramEmulator,
             manager: DialogueManager) -> AsyncIterator[TelegramEmulator]:
    async with telegram_adapter(emulator, manager):
        yield emulator


# Conversations.

async def test_direct_message_round_trip(tg: TelegramEmulator,
                                         generator: ScriptedGenerator) -> None:
    generator.gate = asyncio.Event()
    tg.push_text("hello from telegram", chat=5, user=5)
    await tg.wait_for(lambda: bool(tg.sent("sendChatAction")))  # typing while it thinks
    assert tg.sent("sendChatAction")[0]["action"] == "typing"
    generator.gate.set()
    await tg.wait_for(lambda: tg.final_text(5) == ["hello from telegram"])
    assert "reply_parameters" not in tg.sent()[0]  # a DM reply is not threaded


async def test_commands_are_registered_at_start(tg: TelegramEmulator) -> None:
    registered = tg.sent("setMyCommands")[0]["commands"]
    assert {c["command"] for c in registered} == {c.name for c in builtin_commands()}


async def test_group_answers_only_when_addressed(tg: TelegramEmulator,
                                                 generator: ScriptedGenerator) -> None:
    tg.push_text("just people talking", chat=GROUP, user=7, chat_type="supergroup")
    asked = tg.push_mention("what is up", chat=GROUP, user=7)
    await tg.wait_for(lambda: tg.final_text(GROUP) == ["what is up"])
    assert tg.sent()[0]["reply_parameters"]["message_id"] == asked  # threaded to the question
    assert len(generator.prompts) == 1


async def answered(tg: TelegramEmulator, manager: DialogueManager, chat: int,
                   texts: list[str]) -> None:
    """Wait until a chat shows these texts and their replies are stored."""
    await tg.wait_for(lambda: tg.final_text(chat) == texts and not manager.active_conversations)


async def test_reply_to_the_bot_continues_the_chain(tg: TelegramEmulator,
                                                    manager: DialogueManager,
                                                    generator: ScriptedGenerator) -> None:
    tg.push_mention("first", chat=-7, user=3, chat_type="group")
    await answered(tg, manager, -7, ["first"])
    bot_message = tg.bot_message(tg.sent()[0]["_message_id"], -7, "group")
    tg.push_text("second", chat=-7, user=3, chat_type="group", reply_to=bot_message)
    await answered(tg, manager, -7, ["first", "second"])
    assert [m.content for m in generator.prompts[-1][1:]] == ["first", "first", "second"]


async def test_forum_topics_keep_separate_histories(tg: TelegramEmulator,
                                                    manager: DialogueManager,
                                                    generator: ScriptedGenerator) -> None:
    texts = ["apples in topic one", "pears in topic two", "and now?"]
    for n, (text, topic) in enumerate(zip(texts, [11, 22, 11], strict=True)):
        tg.push_mention(text, chat=GROUP, user=3, thread=topic)
        await answered(tg, manager, GROUP, texts[:n + 1])
    contents = [m.content for m in generator.prompts[-1][1:]]
    assert contents == ["apples in topic one", "apples in topic one", "and now?"]
    threads = [int(call["message_thread_id"]) for call in tg.sent()]
    assert threads == [11, 22, 11]  # each answer goes to its own topic


async def test_fifty_chats_at_once_each_get_their_own_answer(
        tg: TelegramEmulator, generator: ScriptedGenerator) -> None:
    generator.gate = asyncio.Event()
    for chat in range(1, 51):
        tg.push_text(f"question from chat {chat}", chat=chat, user=chat)
    await tg.wait_for(lambda: generator.running == 50, timeout=30)  # all generating at once
    generator.gate.set()
    await tg.wait_for(lambda: all(tg.final_text(c) == [f"question from chat {c}"]
                                  for c in range(1, 51)), timeout=30)


# Commands.

async def test_commands_with_and_without_the_bot_name(tg: TelegramEmulator,
                                                      manager: DialogueManager) -> None:
    tg.push_text("/help@other_bot", chat=-9, user=4, chat_type="group")
    tg.push_text("/help@chinwag_bot", chat=-9, user=4, chat_type="group")
    tg.push_text("/help", chat=-9, user=4, chat_type="group")
    # All three confirmed and nothing left to send: whatever was to be said, was.
    await tg.wait_for(lambda: tg.pending_updates == 0 and manager.active_conversations == 0
                      and len(tg.final_text(-9)) >= 2)
    assert len(tg.final_text(-9)) == 2
    assert all(text.startswith("Commands:") for text in tg.final_text(-9))


ADMIN_COMMANDS = [c for c in builtin_commands() if c.access is not Access.EVERYONE]


@pytest.mark.parametrize("command", [c.name for c in ADMIN_COMMANDS])
async def test_admin_commands_are_refused_to_members(tg: TelegramEmulator,
                                                     command: str) -> None:
    tg.admins[GROUP] = {8}
    tg.push_text(f"/{command} something", chat=GROUP, user=7, chat_type="supergroup")
    await tg.wait_for(lambda: len(tg.final_text(GROUP)) == 1)
    assert tg.final_text(GROUP) == [f"Sorry, /{command} is for admins only."]


@pytest.mark.parametrize("command", [c.name for c in ADMIN_COMMANDS])
async def test_an_admins_name_does_not_make_an_admin(tg: TelegramEmulator,
                                                    command: str) -> None:
    # Same first name, last name and username as the admin, in a private chat and a group.
    spoof = {"id": 666, "is_bot": False, "first_name": "admin", "last_name": str(ADMIN),
             "username": str(ADMIN)}
    # In a private chat a user may steer their own conversation (persona, settings).
    places = [(GROUP, "supergroup")] + [(666, "private")] * (
        next(c for c in ADMIN_COMMANDS if c.name == command).access is Access.ADMIN)
    for chat, chat_type in places:
        message = tg.user_message(chat=chat, user=666, chat_type=chat_type,
                                  text=f"/{command} 42")
        message["from"] = spoof
        message["entities"] = [{"type": "bot_command", "offset": 0,
                                "length": len(command) + 1}]
        tg.push_message(message)
        await tg.wait_for(lambda chat=chat: len(tg.final_text(chat)) == 1)  # type: ignore[misc]
        assert tg.final_text(chat) == [f"Sorry, /{command} is for admins only."]


async def test_admin_commands_for_configured_and_chat_admins(tg: TelegramEmulator) -> None:
    tg.admins[GROUP] = {8}
    tg.push_text("/persona Speak like a pirate.", chat=GROUP, user=ADMIN, chat_type="supergroup")
    await tg.wait_for(lambda: len(tg.final_text(GROUP)) == 1)
    tg.push_text("/stats", chat=GROUP, user=8, chat_type="supergroup")
    tg.push_text("/persona", chat=GROUP, user=8, chat_type="supergroup")
    await tg.wait_for(lambda: len(tg.final_text(GROUP)) == 3)
    first, stats, persona = tg.final_text(GROUP)
    assert first.startswith("Persona set")
    assert "Users" in stats or "users" in stats
    assert persona == "Persona: Speak like a pirate."
    # The configured admin needed no lookup; the chat admin's two commands needed one.
    assert len(tg.sent("getChatAdministrators")) == 1


# Streaming, formatting and faults.

def long_markdown() -> str:
    parts = []
    for n in range(12):
        parts.append(f"## Part {n}\n\nSome **bold** prose about item {n}. " + "word " * 80)
        parts.append("```python\n" + "\n".join(f"value_{n}_{i} = {i} * 2  # <{i}>"
                                                for i in range(30)) + "\n```")
    return "\n\n".join(parts)


async def test_a_long_reply_arrives_whole_with_code_blocks_intact(
        tg: TelegramEmulator, generator: ScriptedGenerator) -> None:
    text = long_markdown()
    assert len(text) > 10_000
    generator.reply = lambda _m: text
    generator.pieces_count = 40
    tg.push_text("write a lot", chat=5, user=5)
    await tg.wait_for(lambda: len(tg.final_text(5)) >= 3 and not tg.failed("sendMessage")
                      and _all_final(tg, 5, text), timeout=20)
    messages = tg.chat_messages(5)
    code_blocks = re.findall(r"```python\n(.*?)\n```", text, re.DOTALL)
    shown_blocks = [m["text"][e["offset"]:e["offset"] + e["length"]]
                    for m in messages for e in m["entities"] if e["type"] == "pre"]
    assert shown_blocks == code_blocks  # every block whole, in one message, in order
    assert all(len(m["text"]) <= 4096 for m in messages)
    assert all(any(e["type"] == "b" for e in m["entities"]) for m in messages)
    assert not [c for c in tg.calls if c.status != 200]


def _all_final(tg: TelegramEmulator, chat: int, text: str) -> bool:
    visible = re.sub(r"```\w*|## |\*\*|\s", "", text)
    return re.sub(r"\s", "", "".join(tg.final_text(chat))) == visible


async def test_flood_control_during_streaming_still_delivers_the_final_text(
        tg: TelegramEmulator, generator: ScriptedGenerator) -> None:
    generator.pieces_count = 8
    tg.fail("editMessageText", 429, "Too Many Requests: retry after 1", times=3, retry_after=1)
    tg.fail("sendMessage", 429, "Too Many Requests: retry after 1", retry_after=1)
    text = "a reply that is streamed in eight pieces while Telegram says slow down"
    tg.push_text(text, chat=6, user=6)
    await tg.wait_for(lambda: tg.final_text(6) == [text], timeout=15)
    assert len(tg.failed("editMessageText")) == 3 and len(tg.failed("sendMessage")) == 1


async def test_server_errors_are_retried_with_backoff(tg: TelegramEmulator) -> None:
    tg.fail("sendMessage", 502, "Bad Gateway", times=2)
    tg.fail("getUpdates", 500, "Internal Server Error", times=2)
    tg.push_text("through the storm", chat=8, user=8)
    await tg.wait_for(lambda: tg.final_text(8) == ["through the storm"], timeout=20)
    assert len(tg.final_text(8)) == 1
    # Each failure waits longer than the one before (0.5 s, then 1 s for a message;
    # 1 s, then 2 s for updates), rather than hammering the failing server.
    # (Lower bounds only: a loaded machine stretches waits, it never shortens them.)
    for method, status, waits in (("sendMessage", 502, (0.5, 1.0)),
                                  ("getUpdates", 500, (1.0, 2.0))):
        calls = [c for c in tg.calls if c.method == method][:3]
        assert [c.status for c in calls] == [status, status, 200]
        gaps = (calls[1].at - calls[0].at, calls[2].at - calls[1].at)
        assert all(gap >= 0.95 * wait for gap, wait in zip(gaps, waits, strict=True)), gaps


async def test_bursts_of_429_5xx_and_dropped_connections_lose_nothing(
        tg: TelegramEmulator, manager: DialogueManager, engine: AsyncEngine) -> None:
    tg.fail("getUpdates", DROP, "", times=2)
    tg.fail("sendMessage", 429, "Too Many Requests: retry after 1", times=3, retry_after=1)
    tg.fail("sendMessage", DROP, "", times=3)
    tg.fail("sendMessage", 502, "Bad Gateway", times=3)
    tg.fail("editMessageText", DROP, "", times=3)
    texts = {chat: f"message in the storm to chat {chat}" for chat in range(30, 40)}
    for chat, text in texts.items():
        tg.push_text(text, chat=chat, user=chat)
    await tg.wait_for(lambda: all(tg.final_text(c) == [t] for c, t in texts.items())
                      and not manager.active_conversations, timeout=60)
    assert len(tg.failed("sendMessage")) == 9 and len(tg.failed("getUpdates")) == 2
    stored = await stored_texts(engine)
    assert sorted(t for role, t in stored if role == "user") == sorted(texts.values())
    assert sorted(t for role, t in stored if role == "assistant") == sorted(texts.values())


async def test_slow_answers_hold_up_nobody_else(tg: TelegramEmulator, manager: DialogueManager,
                                               generator: ScriptedGenerator) -> None:
    tg.delay["sendMessage"] = 0.5
    slow_started, slow_gate = asyncio.Event(), asyncio.Event()
    echo = generator.stream

    async def stream(messages: Sequence[ChatMessage], params: object):  # type: ignore[no-untyped-def]
        if messages[-1].content == "a slow one":
            slow_started.set()
            await slow_gate.wait()
        async for piece in echo(messages, params):  # type: ignore[arg-type]
            yield piece

    generator.stream = stream  # type: ignore[method-assign]
    tg.push_text("a slow one", chat=1, user=1)
    await asyncio.wait_for(slow_started.wait(), 10)
    for chat in range(2, 11):
        tg.push_text(f"hello {chat}", chat=chat, user=chat)
    # Every fast chat gets its own answer while the slow one is still generating.
    await tg.wait_for(lambda: all(tg.final_text(c) == [f"hello {c}"] for c in range(2, 11)),
                      timeout=20)
    assert not slow_gate.is_set() and tg.final_text(1) == []
    slow_gate.set()
    await answered(tg, manager, 1, ["a slow one"])


async def test_a_chat_under_flood_control_holds_up_no_other_chat(
        emulator: TelegramEmulator, store: SqlStore, settings: Settings) -> None:
    # Chat 1 is told to wait 30 s at every call; its command answers are retried meanwhile.
    emulator.chat_faults[1] = Fault(429, "Too Many Requests: retry after 30", retry_after=30)
    async with DialogueManager(store=store, generator=ScriptedGenerator(), settings=settings,
                               commands=builtin_commands(), shutdown_grace=0.1) as manager, \
            telegram_adapter(emulator, manager):
        emulator.push_text("/help", chat=1, user=1)
        emulator.push_text("/help", chat=1, user=1)
        await emulator.wait_for(lambda: len(emulator.failed("sendMessage")) == 1)
        emulator.push_text("anyone there?", chat=2, user=2)
        await emulator.wait_for(lambda: emulator.final_text(2) == ["anyone there?"],
                                timeout=5)
        # Both updates of chat 1 were confirmed too: they are stored, only not yet answered.
        await emulator.wait_for(lambda: max(emulator.offsets) == 4)


async def test_markdown_is_sent_as_telegram_formatting(tg: TelegramEmulator,
                                                       generator: ScriptedGenerator) -> None:
    generator.reply = lambda _m: ("Use **bold**, `x < y & z`, and a [link](https://e.org/?a=1&b=2)."
                                  " <script>alert(1)</script>")
    tg.push_text("format please", chat=9, user=9)
    await tg.wait_for(lambda: bool(tg.chat_messages(9)) and tg.chat_messages(9)[0]["entities"])
    [message] = tg.chat_messages(9)
    assert message["text"] == ("Use bold, x < y & z, and a link. <script>alert(1)</script>")
    assert {e["type"] for e in message["entities"]} == {"b", "code", "a"}


async def test_an_entity_parse_error_falls_back_to_plain_text(
        tg: TelegramEmulator, manager: DialogueManager, generator: ScriptedGenerator,
        caplog: pytest.LogCaptureFixture) -> None:
    generator.reply = lambda _m: "Some **bold** claim"
    for method in ("sendMessage", "editMessageText"):
        tg.fail(method, 400, "Bad Request: can't parse entities: Unsupported start tag",
                html_only=True)
    tg.push_text("hi", chat=10, user=10)
    await tg.wait_for(lambda: "formatting refused" in caplog.text)
    await answered(tg, manager, 10, ["Some **bold** claim"])
    assert not tg.chat_messages(10)[0]["entities"]
    assert len(tg.failed("editMessageText")) == 1  # the formatted try, then plain text


async def test_group_streaming_edits_stay_within_the_chat_limit(
        tg: TelegramEmulator, generator: ScriptedGenerator) -> None:
    generator.pieces_count = 30
    text = " ".join(f"w{n}" for n in range(60))

    async def slowly(messages: Sequence[ChatMessage], params: object):  # type: ignore[no-untyped-def]
        for start in range(0, len(text), 10):
            await asyncio.sleep(0.05)
            yield text[start:start + 10]

    generator.stream = slowly  # type: ignore[method-assign]
    tg.push_mention("stream to the group", chat=GROUP, user=3)
    tg.push_text("stream to me", chat=12, user=12)
    await tg.wait_for(lambda: tg.final_text(GROUP) == [text] and tg.final_text(12) == [text],
                      timeout=20)
    group_edits = [c for c in tg.sent("editMessageText") if int(c["chat_id"]) == GROUP]
    dm_edits = [c for c in tg.sent("editMessageText") if int(c["chat_id"]) == 12]
    assert len(group_edits) == 1  # only the final text: the group's budget is kept
    assert len(dm_edits) > 5  # a private chat streams freely


# Other updates.

async def test_other_updates_are_ignored_or_get_a_note(
        tg: TelegramEmulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    sticker = {"file_id": "s", "file_unique_id": "s", "type": "regular", "width": 1,
               "height": 1, "is_animated": False, "is_video": False}
    tg.push_message(tg.user_message(chat=13, user=13, sticker=sticker))
    tg.push_message(tg.user_message(chat=GROUP, user=3, chat_type="supergroup",
                                    photo=[{"file_id": "p", "file_unique_id": "p",
                                            "width": 1, "height": 1}]))
    tg.push_message(tg.user_message(chat=GROUP, user=3, chat_type="supergroup",
                                    new_chat_members=[{"id": 5, "is_bot": False,
                                                       "first_name": "new"}]))
    tg.push_message(tg.user_message(chat=13, user=13, text="edited", edit_date=1),
                    kind="edited_message")
    channel = {"message_id": 1, "date": 0, "text": "news",
               "chat": {"id": -200, "type": "channel", "title": "c"}}
    tg.push_message(channel, kind="channel_post")
    tg.push_text("still here?", chat=13, user=13)
    await tg.wait_for(lambda: tg.final_text(13) == [
        "I can only read text for now, so I cannot see that sticker.", "still here?"])
    assert tg.final_text(GROUP) == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


# Life cycle.

async def test_an_update_is_acknowledged_only_after_its_message_is_stored(
        emulator: TelegramEmulator, store: SqlStore, settings: Settings) -> None:
    gate, entered = asyncio.Event(), asyncio.Event()

    class SlowStore(SqlStore):
        async def add_user_message(self, message: NewUserMessage):  # type: ignore[no-untyped-def]
            entered.set()
            await gate.wait()
            return await super().add_user_message(message)

    slow = SlowStore.__new__(SlowStore)
    slow.__dict__.update(store.__dict__)
    async with DialogueManager(store=slow, generator=ScriptedGenerator(), settings=settings,
                               commands=builtin_commands()) as manager, \
            telegram_adapter(emulator, manager):
        emulator.push_text("store me first", chat=14, user=14)
        await asyncio.wait_for(entered.wait(), 10)
        polls = len(emulator.sent("getUpdates"))  # the poller goes on meanwhile...
        await emulator.wait_for(lambda: len(emulator.sent("getUpdates")) >= polls + 2)
        assert max(emulator.offsets) <= 1  # ...but update 1 is not confirmed while not stored
        gate.set()
        await emulator.wait_for(lambda: emulator.final_text(14) == ["store me first"])
        await emulator.wait_for(lambda: max(emulator.offsets) == 2)


async def test_an_update_that_cannot_be_stored_is_fetched_again_and_blocks_nobody(
        emulator: TelegramEmulator, store: SqlStore, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intake, "RETRY_DELAYS_S", (0.2,))
    monkeypatch.setattr(redelivery, "GIVE_UP_S", 2.0)
    tries: list[str] = []

    class PickyStore(SqlStore):
        async def add_user_message(self, message: NewUserMessage):  # type: ignore[no-untyped-def]
            if message.text == "cannot be stored":
                tries.append(message.platform_message_id)
                raise StorageError("database error: DataError: invalid byte sequence")
            return await super().add_user_message(message)

    picky = PickyStore.__new__(PickyStore)
    picky.__dict__.update(store.__dict__)
    async with DialogueManager(store=picky, generator=ScriptedGenerator(), settings=settings,
                               commands=builtin_commands()) as manager, \
            telegram_adapter(emulator, manager):
        emulator.push_text("cannot be stored", chat=18, user=18)
        emulator.push_text("fine", chat=19, user=19)
        # The other chat is answered while update 1 is tried again and not confirmed.
        await emulator.wait_for(lambda: emulator.final_text(19) == ["fine"] and len(tries) >= 2)
        assert max(emulator.offsets) <= 1 and emulator.final_text(18) == []
        # Other updates are stored, so the database works: in the end the message is given
        # up, its author told, and both updates confirmed.
        await emulator.wait_for(lambda: emulator.final_text(18) == [INTAKE_FAILED_NOTE]
                                and max(emulator.offsets) == 3)
    assert len(set(tries)) == 1 and emulator.final_text(19) == ["fine"]


def failing_store(store: SqlStore, fails: Callable[[NewUserMessage], bool]) -> SqlStore:
    """``store``, except that storing a user message ``fails`` picks raises as a database
    error does."""

    class Failing(SqlStore):
        async def add_user_message(self, message: NewUserMessage):  # type: ignore[no-untyped-def]
            if fails(message):
                raise StorageError("database error: OperationalError: disk I/O error")
            return await super().add_user_message(message)

    failing = Failing.__new__(Failing)
    failing.__dict__.update(store.__dict__)
    return failing


async def test_a_chat_keeps_its_order_when_a_message_could_not_be_stored(
        emulator: TelegramEmulator, store: SqlStore, settings: Settings, engine: AsyncEngine,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telegram_polling, "HELD_POLL_S", 0.2)
    monkeypatch.setattr(intake, "RETRY_DELAYS_S", (0.2,))
    tries: list[str] = []

    def fails(message: NewUserMessage) -> bool:
        tries.append(message.text)
        return message.text == "first" and tries.count("first") <= 2

    async with DialogueManager(store=failing_store(store, fails),
                               generator=ScriptedGenerator(), settings=settings,
                               commands=builtin_commands()) as manager, \
            telegram_adapter(emulator, manager):
        # "second" comes in the same batch: it fails with "first", untried.
        emulator.push_text("first", chat=30, user=30)
        emulator.push_text("second", chat=30, user=30)
        await emulator.wait_for(lambda: tries == ["first"])
        # "third" comes while "first" waits to be tried again: it waits behind it.
        emulator.push_text("third", chat=30, user=30)
        await answered(emulator, manager, 30, ["first", "second", "third"])
    assert tries == ["first", "first", "first", "second", "third"]
    assert [text for role, text in await stored_texts(engine) if role == "user"] == [
        "first", "second", "third"]


async def test_a_message_delivered_again_spends_the_rate_allowance_once(
        emulator: TelegramEmulator, store: SqlStore, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(intake, "RETRY_DELAYS_S", (0.2,))
    strict = settings.model_copy(update={"rate_per_minute": 1.0, "rate_burst": 2})
    tries: list[str] = []

    def fails(message: NewUserMessage) -> bool:
        tries.append(message.text)
        return len(tries) <= 3

    async with DialogueManager(store=failing_store(store, fails),
                               generator=ScriptedGenerator(), settings=strict,
                               commands=builtin_commands()) as manager, \
            telegram_adapter(emulator, manager):
        emulator.push_text("only one message", chat=31, user=31)
        await answered(emulator, manager, 31, ["only one message"])
        emulator.push_text("and a second", chat=31, user=31)  # within the burst of two
        await answered(emulator, manager, 31, ["only one message", "and a second"])
    assert tries == ["only one message"] * 4 + ["and a second"]


async def test_an_update_that_needs_no_storing_is_no_sign_the_database_works(
        emulator: TelegramEmulator, store: SqlStore, settings: Settings,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telegram_polling, "HELD_POLL_S", 0.2)
    monkeypatch.setattr(intake, "RETRY_DELAYS_S", (0.2,))
    monkeypatch.setattr(redelivery, "GIVE_UP_S", 0.5)
    tries: list[str] = []

    def fails(message: NewUserMessage) -> bool:
        tries.append(message.text)
        return True  # the database is down

    async with DialogueManager(store=failing_store(store, fails),
                               generator=ScriptedGenerator(), settings=settings,
                               commands=builtin_commands()) as manager, \
            telegram_adapter(emulator, manager):
        emulator.push_text("during the outage", chat=32, user=32)
        emulator.push_message(emulator.user_message(chat=33, user=33, text="typo fixed",
                                                    edit_date=1), kind="edited_message")
        emulator.push_text("people talking", chat=GROUP, user=3, chat_type="supergroup")
        # Tried again and again for longer than GIVE_UP_S (each wait is at least 0.2 s).
        await emulator.wait_for(lambda: len(tries) >= 5)
        assert max(emulator.offsets) <= 1  # nothing confirmed while nothing is stored
        assert emulator.sent() == []  # and nobody told: Telegram delivers it again


async def test_one_update_that_cannot_be_stored_does_not_stop_the_next_hundred(
        emulator: TelegramEmulator, store: SqlStore, settings: Settings) -> None:
    # getUpdates returns at most 100 updates from the offset: one held for GIVE_UP_S
    # (300 s) would stop every chat once 99 more came. The others are stored, so the
    # database works: it is given up at once, its author told.
    fail = failing_store(store, lambda message: message.text == "cannot be stored")
    async with DialogueManager(store=fail, generator=ScriptedGenerator(), settings=settings,
                               commands=builtin_commands()) as manager, \
            telegram_adapter(emulator, manager):
        emulator.push_text("cannot be stored", chat=1000, user=1000)
        for chat in range(1, 121):
            emulator.push_text(f"hi {chat}", chat=chat, user=chat)
        await emulator.wait_for(lambda: all(emulator.final_text(c) == [f"hi {c}"]
                                            for c in range(1, 121)), timeout=30)
        await emulator.wait_for(lambda: emulator.final_text(1000) == [INTAKE_FAILED_NOTE]
                                and max(emulator.offsets) == 122)


async def test_a_failing_update_is_tried_again_with_backoff_while_other_chats_talk(
        emulator: TelegramEmulator, store: SqlStore, settings: Settings) -> None:
    tried_at: list[float] = []

    def fails(message: NewUserMessage) -> bool:
        if message.text != "cannot be stored":
            return False
        tried_at.append(time.monotonic())
        return True

    async with DialogueManager(store=failing_store(store, fails),
                               generator=ScriptedGenerator(), settings=settings,
                               commands=builtin_commands()) as manager, \
            telegram_adapter(emulator, manager):
        emulator.push_text("cannot be stored", chat=40, user=40)
        chat = 41
        while len(tried_at) < 3:  # every new update comes while it waits for its next try
            emulator.push_text(f"chatter {chat}", chat=chat, user=chat)
            await emulator.wait_for(lambda chat=chat: emulator.final_text(chat)  # type: ignore[misc]
                                    == [f"chatter {chat}"])
            chat += 1
    gaps = [later - earlier for earlier, later in itertools.pairwise(tried_at)]
    # (Lower bounds only: a loaded machine stretches waits, it never shortens them.)
    assert all(gap >= 0.95 * wait for gap, wait in zip(gaps, intake.RETRY_DELAYS_S,
                                                        strict=False)), gaps
    assert chat > 42  # other chats were answered meanwhile


async def test_a_command_answer_goes_out_before_the_reply_to_the_next_message(
        emulator: TelegramEmulator, store: SqlStore, settings: Settings) -> None:
    emulator.fail("sendMessage", 429, "Too Many Requests: retry after 1", retry_after=1)
    async with DialogueManager(store=store, generator=ScriptedGenerator(), settings=settings,
                               commands=builtin_commands()) as manager, \
            telegram_adapter(emulator, manager):
        emulator.push_text("/reset", chat=34, user=34)
        emulator.push_text("hi", chat=34, user=34)
        await emulator.wait_for(lambda: len(emulator.final_text(34)) == 2
                                and not manager.active_conversations)
    assert len(emulator.failed("sendMessage")) == 1
    cleared, reply = emulator.final_text(34)
    assert cleared.startswith("Context cleared") and reply == "hi"


async def test_a_restart_mid_conversation_neither_loses_nor_duplicates(
        emulator: TelegramEmulator, store: SqlStore, settings: Settings,
        engine: AsyncEngine) -> None:
    first = ScriptedGenerator()
    async with DialogueManager(store=store, generator=first, settings=settings,
                               commands=builtin_commands(), shutdown_grace=0.2) as manager:
        async with telegram_adapter(emulator, manager) as adapter:
            one = emulator.user_message(chat=15, user=15, text="one")
            emulator.push_message(one)
            # The text shows before the reply is stored: wait for the lane to go idle too,
            # or "one" still counts as running below.
            await emulator.wait_for(lambda: emulator.final_text(15) == ["one"]
                                    and not manager.active_conversations)
            first.hang = True
            emulator.push_text("two", chat=15, user=15)
            await emulator.wait_for(lambda: len(first.prompts) == 2 and first.running == 1)
            # Stop the way `chinwag run` does on SIGTERM.
            await adapter.stop_receiving()
            emulator.push_text("three", chat=15, user=15)  # arrives while it is down
            await manager.close()
    assert emulator.final_text(15) == ["one", SHUTDOWN_NOTE]
    # Telegram redelivers "one" as if its confirmation had been lost: it is not answered again.
    emulator.push_message(one)
    emulator.calls.clear()
    second = ScriptedGenerator()
    async with DialogueManager(store=store, generator=second, settings=settings,
                               commands=builtin_commands()) as manager, \
            telegram_adapter(emulator, manager):
        await emulator.wait_for(lambda: emulator.final_text(15) == ["one", "two", "three"]
                                and manager.active_conversations == 0)
    assert [m[-1].content for m in second.prompts] == ["two", "three"]
    # "two" went into the message its interrupted try left; only "three" is new.
    assert emulator.final_text(15) == ["one", "two", "three"]
    rows = await stored_texts(engine)
    assert sorted(rows) == sorted([("user", "one"), ("assistant", "one"), ("user", "two"),
                                   ("assistant", "two"), ("user", "three"),
                                   ("assistant", "three")])  # each once


async def test_a_long_reply_cut_short_is_finished_in_its_own_messages(
        emulator: TelegramEmulator, store: SqlStore, settings: Settings) -> None:
    long = " ".join(f"word{n}" for n in range(1400))  # three messages' worth
    first = ScriptedGenerator(hang_after_pieces=2)
    first.reply = lambda _messages: long
    async with DialogueManager(store=store, generator=first, settings=settings,
                               commands=builtin_commands(), shutdown_grace=0.2) as manager:
        async with telegram_adapter(emulator, manager) as adapter:
            for chat in (16, 17):
                emulator.push_text(f"a long story for chat {chat}", chat=chat, user=chat)
            # Two thirds written: the first message finished, the second half-way.
            await emulator.wait_for(lambda: all(len(emulator.final_text(c)) == 2
                                                for c in (16, 17)))
            await adapter.stop_receiving()
            await manager.close()
    def ids(chat: int) -> list[int]:
        return sorted(n for n, m in emulator.messages.items() if m["chat"] == chat)

    before = {chat: ids(chat) for chat in (16, 17)}
    assert all(emulator.final_text(c)[-1].endswith(SHUTDOWN_NOTE) for c in (16, 17))
    # After the restart chat 16 gets the same story again, chat 17 a short one.
    second = ScriptedGenerator()
    second.reply = lambda messages: long if "16" in messages[-1].content else "short now"
    async with DialogueManager(store=store, generator=second, settings=settings,
                               commands=builtin_commands()) as manager, \
            telegram_adapter(emulator, manager):
        await emulator.wait_for(lambda: len(second.prompts) == 2
                                and not manager.active_conversations)
    # The story went on in the messages it had, then in one new one: nothing shown twice.
    shown = emulator.final_text(16)
    assert len(shown) == 3 and " ".join(shown).split() == long.split()
    assert ids(16)[:2] == before[16]
    # The short answer took the first message; the second one was deleted.
    assert emulator.final_text(17) == ["short now"]
    assert ids(17) == before[17][:1]
    assert [c.params["message_id"] for c in emulator.calls if c.method == "deleteMessage"] \
        == [str(before[17][1])]


async def test_bad_token_is_one_clear_error(manager: DialogueManager,
                                            emulator: TelegramEmulator) -> None:
    with pytest.raises(ConfigError, match="CHINWAG_TELEGRAM_TOKEN"):
        async with TelegramAdapter("999:WRONG", manager, builtin_commands(),
                                   api_url=emulator.url):
            pass


async def test_a_request_refused_at_start_up_is_one_clear_error_not_retried(
        manager: DialogueManager, emulator: TelegramEmulator) -> None:
    # python-telegram-bot's BadRequest is a NetworkError: it used to be retried forever.
    emulator.fail("setMyCommands", 400, "Bad Request: command description is too long")
    with pytest.raises(DeliveryError, match="description is too long"):
        async with asyncio.timeout(20), telegram_adapter(emulator, manager):
            pass
    assert len([c for c in emulator.calls if c.method == "setMyCommands"]) == 1


async def test_a_token_revoked_while_running_stops_the_adapter(
        emulator: TelegramEmulator, manager: DialogueManager) -> None:
    async with telegram_adapter(emulator, manager) as adapter:
        emulator.token = "revoked"
        with pytest.raises(ConfigError, match="refused"):
            await asyncio.wait_for(adapter.serve(), 10)


async def test_chinwag_run_talks_to_the_api_it_is_pointed_at(
        emulator: TelegramEmulator, tmp_path: Path) -> None:
    async def scenario() -> None:
        emulator.push_text("over the wire", chat=11, user=11)
        await emulator.wait_for(lambda: emulator.final_text(11) == ["over the wire"],
                                timeout=60)

    log = await serve_until_sigterm({"CHINWAG_TELEGRAM_TOKEN": emulator.token,
                                     "CHINWAG_TELEGRAM_API_URL": emulator.url},
                                    tmp_path, scenario)
    assert emulator.token not in log  # the token is never logged
    assert emulator.offsets[-1] == 2  # what was stored was confirmed before exiting


async def test_emoji_heavy_replies_are_split_by_telegram_length(
        tg: TelegramEmulator, generator: ScriptedGenerator) -> None:
    # Telegram counts UTF-16 units: 3,000 emoji are 6,000 units, over one message.
    text = "🙂" * 3000 + " done"
    generator.reply = lambda _m: text
    tg.push_text("smile", chat=16, user=16)
    await tg.wait_for(lambda: "".join(tg.final_text(16)) == text, timeout=15)
    assert len(tg.final_text(16)) == 2
    assert not [c for c in tg.calls if c.status != 200]
