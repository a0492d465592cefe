"""The real discord.py client against a loopback Discord gateway and REST emulator."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.discord import DiscordAdapter
from bot.answering import SHUTDOWN_NOTE
from bot.builtin_commands import builtin_commands
from bot.commands import Access
from bot.config import Settings
from bot.dialogue import DialogueManager
from bot.errors import ConfigError
from storage.repository import SqlStore
from tests.auxil.adapters import discord_adapter
from tests.auxil.discord_api import APP_ID, BOT_ROLE, CHANNEL, GUILD, DiscordEmulator
from tests.auxil.generators import ScriptedGenerator, wait_running
from tests.auxil.process import serve_until_sigterm

ADMIN = 42
MOD = 43


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"admins": (f"discord:{ADMIN}",)})


@pytest.fixture
async def emulator() -> AsyncIterator[DiscordEmulator]:
    async with DiscordEmulator() as emulator:
        emulator.admins.add(str(MOD))
        yield emulator


@pytest.fixture
async def dc(emulator: DiscordEmulator,
             manager: DialogueManager) -> AsyncIterator[DiscordEmulator]:
    async with discord_adapter(emulator, manager):
        yield emulator


async def answered(dc: DiscordEmulator, manager: DialogueManager, channel: str,
                   texts: list[str], timeout: float = 15.0) -> None:  # noqa: ASYNC109
    """Wait until a channel shows these texts and their replies are stored."""
    await dc.wait_for(lambda: dc.channel_texts(channel) == texts
                      and not manager.active_conversations, timeout)


def creates(dc: DiscordEmulator) -> list[dict[str, object]]:
    return [r.body for r in dc.calls("POST", "/messages")]


# Conversations.

async def test_direct_message_round_trip(dc: DiscordEmulator, manager: DialogueManager,
                                         generator: ScriptedGenerator) -> None:
    generator.gate = asyncio.Event()
    asked = dc.post("hello from discord", dm=True, author=5)
    await dc.wait_for(lambda: bool(dc.calls("POST", "/typing")))  # typing while it thinks
    generator.gate.set()
    await answered(dc, manager, dc.dm_channel(5), ["hello from discord"])
    [body] = creates(dc)
    assert str(body["message_reference"]["message_id"]) == asked  # type: ignore[index]


async def test_channel_answers_only_when_mentioned(dc: DiscordEmulator,
                                                   manager: DialogueManager,
                                                   generator: ScriptedGenerator) -> None:
    dc.post("people talking among themselves", author=7)
    asked = dc.post("what is up", author=7, mention=True)
    await answered(dc, manager, CHANNEL, ["what is up"])
    [body] = creates(dc)
    assert str(body["message_reference"]["message_id"]) == asked  # type: ignore[index]
    assert len(generator.prompts) == 1


async def test_mentioning_the_bots_own_role_asks_the_bot(dc: DiscordEmulator,
                                                       manager: DialogueManager,
                                                       generator: ScriptedGenerator) -> None:
    dc.post("<@&700000000000000002> mods, look", author=7,
            mention_roles=["700000000000000002"])  # another role: not for the bot
    dc.post(f"<@&{BOT_ROLE}> what is up", author=7, mention_roles=[BOT_ROLE])
    await answered(dc, manager, CHANNEL, ["what is up"])
    assert [prompt[-1].content for prompt in generator.prompts] == ["what is up"]


async def test_reply_to_the_bot_continues_the_chain(dc: DiscordEmulator,
                                                    manager: DialogueManager,
                                                    generator: ScriptedGenerator) -> None:
    dc.post("first", author=3, mention=True)
    await answered(dc, manager, CHANNEL, ["first"])
    [bot_message] = list(dc.messages)
    dc.post("second", author=3, reply_to=bot_message)
    await answered(dc, manager, CHANNEL, ["first", "second"])
    assert [m.content for m in generator.prompts[-1][1:]] == ["first", "first", "second"]


async def test_a_thread_keeps_its_own_history(dc: DiscordEmulator, manager: DialogueManager,
                                              generator: ScriptedGenerator) -> None:
    thread = dc.add_channel("800000000000000077", thread_of=CHANNEL)
    dc.post("apples in the thread", author=3, channel=thread, mention=True)
    await answered(dc, manager, thread, ["apples in the thread"])
    dc.post("pears in the channel", author=3, mention=True)
    await answered(dc, manager, CHANNEL, ["pears in the channel"])
    dc.post("and now?", author=3, channel=thread, mention=True)
    await answered(dc, manager, thread, ["apples in the thread", "and now?"])
    contents = [m.content for m in generator.prompts[-1][1:]]
    assert contents == ["apples in the thread", "apples in the thread", "and now?"]


async def test_fifty_channels_at_once_each_get_their_own_answer(
        dc: DiscordEmulator, manager: DialogueManager, generator: ScriptedGenerator) -> None:
    generator.gate = asyncio.Event()
    channels = [dc.add_channel(f"81{n:016d}") for n in range(50)]
    for n, channel in enumerate(channels):
        dc.post(f"question {n}", author=100 + n, channel=channel, mention=True)
    await wait_running(generator, 50, timeout=30)  # all generating at once
    generator.gate.set()
    await dc.wait_for(lambda: all(dc.channel_texts(c) == [f"question {n}"]
                                  for n, c in enumerate(channels)), timeout=30)


# Output safety, length and rate limits.

async def test_model_output_pings_nobody(dc: DiscordEmulator, manager: DialogueManager,
                                         generator: ScriptedGenerator) -> None:
    ping = "@everyone @here <@&700000000000000002> <@1> look!"
    generator.reply = lambda _m: ping
    dc.post("say something loud", author=3, mention=True)
    await answered(dc, manager, CHANNEL, [ping])
    bodies = [r.body for r in dc.requests if "/messages" in r.path and r.method in
              {"POST", "PATCH"}]
    for body in bodies:  # nobody may be pinged by any create or edit
        allowed = body["allowed_mentions"]
        assert allowed["parse"] == [] and not allowed.get("replied_user")
        assert not allowed.get("users") and not allowed.get("roles")
    assert bodies


def long_markdown() -> str:
    parts = []
    for n in range(7):
        parts.append(f"Paragraph {n}: " + "words " * 70)
        parts.append("```python\n" + "\n".join(f"value_{n}_{i} = {i}" for i in range(25))
                     + "\n```")
    return "\n\n".join(parts)


async def test_a_long_reply_arrives_whole_with_code_blocks_intact(
        dc: DiscordEmulator, manager: DialogueManager, generator: ScriptedGenerator) -> None:
    text = long_markdown()
    assert len(text) > 5000
    generator.reply = lambda _m: text
    generator.pieces_count = 30
    dc.post("write a lot", author=3, mention=True)
    await dc.wait_for(lambda: len(dc.channel_texts(CHANNEL)) >= 3
                      and not manager.active_conversations, timeout=20)
    messages = dc.channel_texts(CHANNEL)
    assert all(len(m) <= 2000 for m in messages)
    assert re.sub(r"\s", "", "".join(messages)) == re.sub(r"\s", "", text)
    for message in messages:  # every message's fences are balanced: blocks kept whole
        assert message.count("```") % 2 == 0


async def test_rate_limits_during_streaming_still_deliver_the_final_text(
        dc: DiscordEmulator, manager: DialogueManager, generator: ScriptedGenerator) -> None:
    generator.pieces_count = 8
    dc.fail("PATCH", "/messages/", 429, times=2, retry_after=0.3)
    dc.fail("POST", f"/channels/{CHANNEL}/messages", 429, retry_after=0.3)
    text = "a reply streamed in eight pieces while Discord says slow down"
    dc.post(text, author=3, mention=True)
    await answered(dc, manager, CHANNEL, [text])
    assert len([r for r in dc.requests if r.status == 429]) == 3


async def test_server_errors_are_retried(dc: DiscordEmulator,
                                         manager: DialogueManager) -> None:
    dc.fail("POST", f"/channels/{CHANNEL}/messages", 502)
    dc.post("through the storm", author=3, mention=True)
    await answered(dc, manager, CHANNEL, ["through the storm"], timeout=30)
    assert [r.status for r in dc.calls("POST", "/messages")] == [502, 200]


# Slash commands.

async def test_slash_commands_are_synced_with_typed_options(dc: DiscordEmulator) -> None:
    [sync] = dc.calls("PUT", "/commands")
    synced = {c["name"]: c for c in sync.body}  # type: ignore[union-attr]
    assert set(synced) == {c.name for c in builtin_commands()}
    setting = {o["name"]: o for o in synced["settings"]["options"]}
    assert [c["value"] for c in setting["name"]["choices"]] == ["temperature",
                                                                 "max_reply_tokens"]
    assert not setting["name"]["required"]


ADMIN_COMMANDS = [c for c in builtin_commands() if c.access is not Access.EVERYONE]


@pytest.mark.parametrize("command", [c.name for c in ADMIN_COMMANDS])
async def test_admin_commands_are_refused_to_members_ephemerally(
        dc: DiscordEmulator, command: str) -> None:
    options = {"user": "123"} if command in {"block", "unblock"} else {}
    token = dc.interact(command, options, author=7)
    await dc.wait_for(lambda: len(dc.interaction_replies[token]) >= 2)
    callback, answer = dc.interaction_replies[token][:2]
    assert callback["type"] == 5 and callback["data"]["flags"] & 64  # deferred, ephemeral
    assert answer["content"] == f"Sorry, /{command} is for admins only."


@pytest.mark.parametrize("command", [c.name for c in ADMIN_COMMANDS])
async def test_an_admins_name_does_not_make_an_admin(dc: DiscordEmulator,
                                                    command: str) -> None:
    dc.names[7] = str(ADMIN)  # username and global name: the admin's id
    options = {"user": "123"} if command in {"block", "unblock"} else {}
    token = dc.interact(command, options, author=7)
    await dc.wait_for(lambda: len(dc.interaction_replies[token]) >= 2)
    assert dc.interaction_replies[token][1]["content"] == \
        f"Sorry, /{command} is for admins only."


ACCEPTED = {
    "persona": ({"text": "Speak like a pirate."}, "Persona set"),
    "settings": ({"name": "temperature", "value": "0.3"}, "temperature"),
    "listen": ({"mode": "on"}, "From now on I answer every message"),
    "stats": ({}, "Conversations"),
    "block": ({"user": "123"}, "Blocked discord:123"),
    "unblock": ({"user": "123"}, "Unblocked discord:123"),
}


@pytest.mark.parametrize("command", [c.name for c in ADMIN_COMMANDS])
@pytest.mark.parametrize("author", [ADMIN, MOD])
async def test_admin_commands_for_configured_admins_and_server_managers(
        dc: DiscordEmulator, author: int, command: str) -> None:
    options, expected = ACCEPTED[command]
    token = dc.interact(command, options, author=author)
    await dc.wait_for(lambda: len(dc.interaction_replies[token]) >= 2)
    assert expected in dc.interaction_replies[token][1]["content"]


async def test_slash_commands_can_be_registered_per_server(
        emulator: DiscordEmulator, manager: DialogueManager) -> None:
    async with DiscordAdapter(emulator.token, manager, builtin_commands(),
                              api_url=emulator.api_url, gateway_url=emulator.gateway_url,
                              guild_ids=[int(GUILD)]):
        pass
    [sync] = emulator.calls("PUT", "/commands")
    assert sync.path == f"/applications/{APP_ID}/guilds/{GUILD}/commands"
    assert len(sync.body) == len(builtin_commands())  # type: ignore[arg-type]


async def test_reset_clears_the_context_of_that_channel_only(
        dc: DiscordEmulator, manager: DialogueManager, generator: ScriptedGenerator) -> None:
    other = dc.add_channel("800000000000000020")
    dc.post("remember apples", author=3, mention=True)
    dc.post("remember pears", author=3, channel=other, mention=True)
    await answered(dc, manager, CHANNEL, ["remember apples"])
    await answered(dc, manager, other, ["remember pears"])
    token = dc.interact("reset", author=3)
    await dc.wait_for(lambda: len(dc.interaction_replies[token]) >= 2)
    dc.post("what now?", author=3, mention=True)
    await answered(dc, manager, CHANNEL, ["remember apples", "what now?"])
    assert [m.content for m in generator.prompts[-1][1:]] == ["what now?"]
    dc.post("and here?", author=3, channel=other, mention=True)
    await answered(dc, manager, other, ["remember pears", "and here?"])
    assert [m.content for m in generator.prompts[-1][1:]] == [
        "remember pears", "remember pears", "and here?"]


# Other events and the connection.

async def test_other_messages_are_ignored_or_get_a_note(
        dc: DiscordEmulator, manager: DialogueManager,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    dc.post("I am another bot @mention", author=9, mention=True, bot_author=True)
    dc.post("echo of myself", author=0, mention=True, bot_author=True)
    dc.post("", author=3, kind=7)  # a member joined: a system message
    picture = {"id": "1", "filename": "cat.png", "size": 10, "url": "http://x/cat.png",
               "proxy_url": "http://x/cat.png"}
    dc.post("", author=3, dm=True, attachments=[picture])
    edited = dc.post("typo", author=3, mention=True)
    await answered(dc, manager, CHANNEL, ["typo"])
    original = next(e[2] for e in dc._events if e[2].get("id") == edited)
    dc.dispatch("MESSAGE_UPDATE", {**original, "content": "fixed typo",
                                   "edited_timestamp": original["timestamp"]})
    dc.dispatch("MESSAGE_DELETE", {"id": edited, "channel_id": CHANNEL, "guild_id": GUILD})
    dc.post("still here?", author=3, dm=True)
    await answered(dc, manager, dc.dm_channel(3), [
        "I can only read text for now, so I cannot see that attachment.", "still here?"])
    assert dc.channel_texts(CHANNEL) == ["typo"]  # edits and deletions are not answered
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_dropped_gateway_resumes_without_losing_a_message(
        dc: DiscordEmulator, manager: DialogueManager) -> None:
    dc.post("before the drop", author=3, mention=True)
    await answered(dc, manager, CHANNEL, ["before the drop"])
    await dc.drop_connection()
    dc.post("during the drop", author=3, mention=True)  # delivered on RESUME
    await answered(dc, manager, CHANNEL, ["before the drop", "during the drop"], timeout=30)
    assert dc.resumed == 1 and dc.identified == 1
    await dc.wait_for(lambda: dc.heartbeats >= 2)  # the session stays alive on heartbeats


async def test_bad_token_is_one_clear_error(emulator: DiscordEmulator,
                                            manager: DialogueManager) -> None:
    emulator.token = "the-right-one"
    with pytest.raises(ConfigError, match="CHINWAG_DISCORD_TOKEN"):
        async with DiscordAdapter("wrong", manager, builtin_commands(),
                                  api_url=emulator.api_url, gateway_url=emulator.gateway_url):
            pass


async def test_a_refused_message_content_intent_is_one_clear_error(
        emulator: DiscordEmulator, manager: DialogueManager) -> None:
    emulator.refuse_message_content = True
    with pytest.raises(ConfigError, match="message content intent"):
        async with discord_adapter(emulator, manager):
            pass


def discord_env(emulator: DiscordEmulator) -> dict[str, str]:
    return {"CHINWAG_DISCORD_TOKEN": emulator.token,
            "CHINWAG_DISCORD_API_URL": emulator.api_url,
            "CHINWAG_DISCORD_GATEWAY_URL": emulator.gateway_url}


async def test_chinwag_run_serves_discord(emulator: DiscordEmulator, tmp_path: Path) -> None:
    async def scenario() -> None:
        await emulator.ready(timeout=60)
        emulator.post("over the wire", author=11, dm=True)
        await emulator.wait_for(
            lambda: emulator.channel_texts(emulator.dm_channel(11)) == ["over the wire"],
            timeout=60)

    log = await serve_until_sigterm(discord_env(emulator), tmp_path, scenario)
    assert emulator.token not in log  # the token is never logged


async def test_an_admin_can_make_a_channel_answer_every_message(
        dc: DiscordEmulator, manager: DialogueManager) -> None:
    dc.post("nobody asked me", author=3)
    token = dc.interact("listen", {"mode": "on"}, author=MOD)
    await dc.wait_for(lambda: len(dc.interaction_replies[token]) >= 2)
    assert dc.interaction_replies[token][1]["content"].startswith("From now on I answer every")
    dc.post("now everyone is answered", author=3)
    await answered(dc, manager, CHANNEL, ["now everyone is answered"])


async def test_a_restart_answers_what_the_stop_left_and_nothing_twice(
        emulator: DiscordEmulator, store: SqlStore, settings: Settings) -> None:
    first = ScriptedGenerator()
    dm = emulator.dm_channel(15)
    async with DialogueManager(store=store, generator=first, settings=settings,
                               commands=builtin_commands(), shutdown_grace=1.0) as manager:
        async with discord_adapter(emulator, manager) as adapter:
            emulator.post("one", author=15, dm=True)
            await answered(emulator, manager, dm, ["one"])
            first.hang = True
            emulator.post("two", author=15, dm=True)
            await wait_running(first)
            # Stop the way `chinwag run` does on SIGTERM; Discord keeps sending meanwhile.
            await adapter.stop_receiving()
            emulator.post("three", author=15, dm=True)
            closing = asyncio.create_task(manager.close())
            await asyncio.sleep(0.2)
            emulator.post("four", author=15, dm=True)  # during the grace period
            await closing
    assert emulator.channel_texts(dm) == ["one", SHUTDOWN_NOTE]
    second = ScriptedGenerator()
    async with DialogueManager(store=store, generator=second, settings=settings,
                               commands=builtin_commands()) as manager, \
            discord_adapter(emulator, manager):
        # "two" is written into the message its interrupted try left, not under it.
        await answered(emulator, manager, dm, ["one", "two", "three", "four"])
    assert [m[-1].content for m in second.prompts] == ["two", "three", "four"]


async def test_a_shorter_answer_after_a_restart_deletes_what_the_cut_reply_left(
        emulator: DiscordEmulator, store: SqlStore, settings: Settings) -> None:
    long = " ".join(f"w{n}" for n in range(1000))  # three messages' worth
    first = ScriptedGenerator(hang_after_pieces=2)
    first.reply = lambda _messages: long
    dm = emulator.dm_channel(16)
    async with DialogueManager(store=store, generator=first, settings=settings,
                               commands=builtin_commands(), shutdown_grace=0.2) as manager:
        async with discord_adapter(emulator, manager) as adapter:
            emulator.post("a long story", author=16, dm=True)
            await emulator.wait_for(lambda: len(emulator.channel_texts(dm)) == 2)
            await adapter.stop_receiving()
            await manager.close()
    left = [i for i, m in emulator.messages.items() if m["channel_id"] == dm]
    assert emulator.channel_texts(dm)[-1].endswith(SHUTDOWN_NOTE)
    second = ScriptedGenerator()
    second.reply = lambda _messages: "short now"
    async with DialogueManager(store=store, generator=second, settings=settings,
                               commands=builtin_commands()) as manager, \
            discord_adapter(emulator, manager):
        await answered(emulator, manager, dm, ["short now"])
    assert [i for i, m in emulator.messages.items() if m["channel_id"] == dm] == left[:1]
    assert [r.path for r in emulator.calls("DELETE", "/messages/")] == \
        [f"/channels/{dm}/messages/{left[1]}"]


async def test_chinwag_run_serves_telegram_and_discord_together(
        emulator: DiscordEmulator, tmp_path: Path) -> None:
    from tests.auxil.telegram_api import TelegramEmulator

    async with TelegramEmulator() as telegram:
        async def scenario() -> None:
            await emulator.ready(timeout=60)
            emulator.post("hello discord", author=11, dm=True)
            telegram.push_text("hello telegram", chat=11, user=11)
            await emulator.wait_for(
                lambda: emulator.channel_texts(emulator.dm_channel(11)) == ["hello discord"]
                and telegram.final_text(11) == ["hello telegram"], timeout=60)

        log = await serve_until_sigterm({**discord_env(emulator),
                                         "CHINWAG_TELEGRAM_TOKEN": telegram.token,
                                         "CHINWAG_TELEGRAM_API_URL": telegram.url},
                                        tmp_path, scenario)
        assert emulator.token not in log and telegram.token not in log
