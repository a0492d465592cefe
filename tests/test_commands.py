import asyncio
import logging

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.builtin_commands import builtin_commands
from bot.commands import Access, Argument, Command, parse_arguments, parse_call
from bot.config import Settings
from bot.dialogue import DialogueManager
from bot.errors import CommandError
from bot.i18n import translator
from storage.models import MessageRow, PlatformMessageRow, UsageRow, UserRow
from storage.repository import SqlStore
from tests.auxil.factories import dm, group
from tests.auxil.generators import ScriptedGenerator, wait_running
from tests.auxil.sinks import RecordingSink


async def _noop(_ctx: object) -> str:
    return ""


@pytest.mark.parametrize(("text", "name", "target", "args"), [
    ("/help", "help", None, ""),
    ("  /persona You are a pirate. ", "persona", None, "You are a pirate."),
    ("/reset@chinwag_bot", "reset", "chinwag_bot", ""),
    ("/Settings temperature 0.5", "settings", None, "temperature 0.5"),
])
def test_commands_are_parsed(text: str, name: str, target: str | None, args: str) -> None:
    call = parse_call(text)
    assert call is not None
    assert (call.name, call.addressed_to, call.argument_text) == (name, target, args)


@pytest.mark.parametrize("text", [
    "please reset the chat", "what does /help do?", "/usr/bin/python is broken", "/", "",
    "reset",
])
def test_text_that_merely_contains_a_command_is_not_one(text: str) -> None:
    assert parse_call(text) is None


def test_arguments_are_checked() -> None:
    command = Command("settings", "", _noop, (
        Argument("name", "", choices=("temperature",)), Argument("value", "")))
    en = translator("en")
    assert parse_arguments(command, "TEMPERATURE 0.3", en) == {"name": "temperature",
                                                               "value": "0.3"}
    with pytest.raises(CommandError, match="must be one of temperature"):
        parse_arguments(command, "colour red", en)
    with pytest.raises(CommandError, match="Too many arguments"):
        parse_arguments(command, "temperature 1 2", en)
    needs = Command("block", "", _noop, (Argument("user", "", required=True),))
    with pytest.raises(CommandError, match="needs <user>"):
        parse_arguments(needs, "", en)
    with pytest.raises(CommandError, match="需要"):
        parse_arguments(needs, "", translator("zh"))


def test_registry_defines_each_command_once() -> None:
    registry = builtin_commands()
    assert {c.name for c in registry} == {"help", "reset", "persona", "settings", "stats",
                                          "forget", "block", "unblock", "listen", "stop",
                                          "language", "memory"}
    with pytest.raises(ValueError):
        registry.add(Command("help", "", _noop))


async def test_admin_commands_are_refused_to_others(manager: DialogueManager) -> None:
    for text in ("/stats", "/block u9", "/unblock u9"):
        sink = RecordingSink()
        await manager.handle(dm(text, user="mallory"), sink)
        assert sink.texts == [f"Sorry, {text.split()[0]} is for admins only."]


async def test_admin_from_settings_may_run_them(manager: DialogueManager) -> None:
    sink = RecordingSink()
    await manager.handle(dm("/stats", user="admin1"), sink)
    assert sink.texts[0].startswith("Conversations:")


async def test_display_name_does_not_make_an_admin(manager: DialogueManager) -> None:
    from dataclasses import replace

    sink = RecordingSink()
    await manager.handle(replace(dm("/stats", user="mallory"), author_name="admin1"), sink)
    assert "admins only" in sink.texts[0]


async def test_group_settings_need_an_admin(manager: DialogueManager,
                                            generator: ScriptedGenerator) -> None:
    sink = RecordingSink()
    await manager.handle(group("/persona You are a pirate."), sink)
    assert "admins only" in sink.texts[-1]
    await manager.handle(group("/persona You are a pirate.", chat_admin=True), sink)
    assert sink.texts[-1].startswith("Persona set")
    await manager.handle(group("ahoy", mention=True), sink)
    assert generator.prompts[-1][0].content == "You are a pirate."
    # In a direct chat anyone may set their own persona.
    await manager.handle(dm("/persona Be brief."), sink)
    assert sink.texts[-1].startswith("Persona set")


async def test_settings_change_generation(manager: DialogueManager,
                                          generator: ScriptedGenerator) -> None:
    sink = RecordingSink()
    await manager.handle(dm("/settings temperature 0.2"), sink)
    await manager.handle(dm("/settings max_reply_tokens 64"), sink)
    await manager.handle(dm("/settings temperature hot"), sink)
    assert "must be a number" in sink.texts[-1]
    await manager.handle(dm("hi"), sink)
    assert (generator.params[-1].temperature, generator.params[-1].max_new_tokens) == (0.2, 64)
    await manager.handle(dm("/settings temperature default"), sink)
    await manager.handle(dm("hi again"), sink)
    assert generator.params[-1].temperature == 0.7


async def test_block_stops_answers_and_storage(manager: DialogueManager,
                                               engine: AsyncEngine) -> None:
    sink = RecordingSink()
    await manager.handle(dm("/block telegram:troll", user="admin1"), sink)
    assert sink.texts[-1] == "Blocked telegram:troll: I will ignore their messages."
    troll = RecordingSink()
    await manager.handle(dm("spam", user="troll"), troll)
    assert troll.calls == []
    await manager.handle(dm("/block admin1", user="admin1"), sink)
    assert sink.texts[-1] == "Admins cannot be blocked."
    await manager.handle(dm("/unblock troll", user="admin1"), sink)
    await manager.handle(dm("back", user="troll"), troll)
    assert troll.texts == ["back"]
    async with engine.connect() as connection:
        texts = (await connection.execute(select(MessageRow.text))).scalars().all()
    assert "spam" not in texts


async def test_forget_through_the_manager(manager: DialogueManager,
                                          engine: AsyncEngine) -> None:
    sink = RecordingSink()
    await manager.handle(dm("my secret", user="u5"), sink)
    await manager.handle(dm("/forget", user="u5"), sink)
    assert sink.texts[-1].startswith("Done: I deleted 2 stored messages")
    async with engine.connect() as connection:
        texts = (await connection.execute(select(MessageRow.text))).scalars().all()
    assert texts == []


async def rows_about(engine: AsyncEngine, user: str) -> dict[str, int]:
    async with engine.connect() as connection:
        async def count(statement: object) -> int:
            return int((await connection.execute(statement)).scalar_one())  # type: ignore[call-overload]

        return {
            "messages": await count(select(func.count()).select_from(MessageRow)
                                    .where(MessageRow.author_id == user)),
            "users": await count(select(func.count()).select_from(UserRow)
                                 .where(UserRow.user_id == user)),
            "usage": await count(select(func.count()).select_from(UsageRow)
                                 .where(UsageRow.user_id == user)),
            "links": await count(select(func.count()).select_from(PlatformMessageRow)),
        }


async def test_forget_while_a_reply_streams_ends_it_quietly(
        any_engine: AsyncEngine, generator: ScriptedGenerator, settings: Settings,
        caplog: pytest.LogCaptureFixture) -> None:
    async with DialogueManager(store=SqlStore(any_engine), generator=generator,
                               settings=settings, commands=builtin_commands()) as manager:
        await forget_while_streaming(manager, generator, any_engine, caplog)


async def forget_while_streaming(manager: DialogueManager, generator: ScriptedGenerator,
                                 engine: AsyncEngine,
                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    generator.gate = asyncio.Event()
    sink = RecordingSink()
    asked = manager.submit(dm("my secret question", user="u6"), sink)
    await wait_running(generator)  # the reply to u6 is being generated
    forgetting = manager.submit(dm("/forget", user="u6"), sink)
    await asyncio.wait_for(forgetting.accepted, 5)
    assert (await rows_about(engine, "u6"))["messages"] == 0  # gone while the reply runs
    generator.gate.set()
    await asyncio.wait_for(asyncio.gather(asked, forgetting), 10)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert any(t.startswith("Done: I deleted") for t in sink.texts), sink.texts
    assert await rows_about(engine, "u6") == {"messages": 0, "users": 0, "usage": 0,
                                              "links": 0}
    await manager.handle(dm("hello again", user="u6"), sink)
    assert sink.texts[-1] == "hello again"
    assert (await rows_about(engine, "u6"))["messages"] == 2


async def test_unknown_command_gets_a_hint_in_direct_chats(manager: DialogueManager) -> None:
    sink = RecordingSink()
    await manager.handle(dm("/frobnicate"), sink)
    assert sink.texts == ["Unknown command /frobnicate. Send /help for the list."]
    await manager.handle(group("/frobnicate"), sink)
    assert len(sink.texts) == 1  # not addressed in a group: ignored


_WHO_MAY = {Access.EVERYONE: "", Access.ADMIN: " (admins)",
            Access.ADMIN_IN_GROUPS: " (admins in groups)"}


@pytest.mark.parametrize("message", [dm("/help", user="admin1"), dm("/help", user="mallory"),
                                     group("/help", user="mallory")],
                         ids=["admin", "member", "member-in-group"])
async def test_help_lists_every_command(manager: DialogueManager, message: object) -> None:
    sink = RecordingSink()
    await manager.handle(message, sink)  # type: ignore[arg-type]
    [help_text] = sink.texts
    command_lines = [line for line in help_text.splitlines() if line.startswith("/")]
    expected = [f"{c.usage} — {c.description}{_WHO_MAY[c.access]}" for c in builtin_commands()]
    assert sorted(command_lines) == sorted(expected)
    assert all(c.description for c in builtin_commands())  # each says what it does


async def test_listen_makes_a_group_answer_every_message(manager: DialogueManager,
                                                         generator: ScriptedGenerator) -> None:
    sink = RecordingSink()
    await manager.handle(group("first chatter"), sink)
    await manager.handle(group("/listen on"), sink)  # a member may not
    assert sink.texts == ["Sorry, /listen is for admins only."]
    await manager.handle(group("/listen on", chat_admin=True), sink)
    await manager.handle(group("second chatter", user="u2"), sink)
    await manager.handle(group("third chatter", user="u3"), sink)
    assert sink.texts[-2:] == ["second chatter", "third chatter"]
    # The whole channel is the context now, whoever speaks.
    assert [m.content for m in generator.prompts[-1][1:]] == [
        "second chatter", "second chatter", "third chatter"]
    await manager.handle(group("/listen off", chat_admin=True), sink)
    await manager.handle(group("fourth chatter"), sink)
    assert sink.texts[-1].startswith("From now on I answer here only")
    await manager.handle(dm("/listen on", user="u9"), sink)
    assert sink.texts[-1] == "In a direct chat I answer every message anyway."
