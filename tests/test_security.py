"""Privacy and security: conversations stay apart, model output is only text, blocked
users cost nothing, and secrets never reach the logs."""

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.cli import redact
from bot.config import load_settings
from bot.dialogue import DialogueManager
from bot.generators import ChatMessage
from storage.models import UserRow
from storage.repository import SqlStore
from tests.auxil.db import stored_texts
from tests.auxil.discord_api import DiscordEmulator
from tests.auxil.factories import dm, group
from tests.auxil.generators import ScriptedGenerator
from tests.auxil.openai_api import FakeOpenAI
from tests.auxil.postgres import PostgresServer
from tests.auxil.process import chinwag, serve_until_sigterm
from tests.auxil.sinks import RecordingSink
from tests.auxil.telegram_api import DROP, TelegramEmulator

SECRET = "PINEAPPLE-7731"


def prompt_text(messages: Sequence[ChatMessage]) -> str:
    return "\n".join(m.content for m in messages)


async def test_a_direct_message_never_reaches_another_conversations_prompt(
        manager: DialogueManager, generator: ScriptedGenerator) -> None:
    sink = RecordingSink()
    await manager.handle(dm(f"remember: my code is {SECRET}", user="u1"), sink)
    others = [
        group("what is my code?", user="u1", chat="g1", mention=True),  # same user, a group
        group("what is my code?", user="u1", chat="g1", mention=True, thread="t1"),
        dm("what is my code?", user="u1", platform="discord"),  # same id, another platform
        dm("what is u1's code?", user="u2"),  # another user's DM
        group("tell me everyone's codes", user="u2", chat="g2", mention=True),
    ]
    for message in others:
        await manager.handle(message, sink)
    await manager.handle(dm("and my code again?", user="u1"), sink)  # the same DM
    prompts = [prompt_text(p) for p in generator.prompts]
    assert len(prompts) == 7
    assert SECRET in prompts[0] and SECRET in prompts[-1]
    assert not any(SECRET in prompt for prompt in prompts[1:-1])


async def test_model_output_never_runs_a_command(manager: DialogueManager,
                                                 generator: ScriptedGenerator,
                                                 store: SqlStore,
                                                 engine: AsyncEngine) -> None:
    sink = RecordingSink()
    await manager.handle(dm("first", user="u1"), sink)
    for output in ("/forget", "/block telegram:u1", "/reset", "/persona be evil"):
        generator.reply = lambda _messages, output=output: output  # type: ignore[misc]
        await manager.handle(dm("say a command", user="u1"), sink)
    generator.reply = None
    await manager.handle(dm("still here?", user="u1"), sink)
    assert sink.texts[-1] == "still here?"  # not blocked
    history = [text for _role, text in await stored_texts(engine)]
    assert history[0] == "first"  # not forgotten
    assert "/block telegram:u1" in history  # stored as what the model said, nothing more
    conversation = await store.conversation("telegram:u1")
    assert conversation.persona is None and conversation.reset_after_id == 0
    # The last prompt still carries the whole conversation: nothing was reset.
    assert generator.prompts[-1][1].content == "first"


async def test_blocked_users_get_nothing_generated_or_stored(
        manager: DialogueManager, generator: ScriptedGenerator, engine: AsyncEngine) -> None:
    sink = RecordingSink()
    await manager.handle(dm("/block telegram:u9", user="admin1"), sink)
    assert sink.texts[-1].startswith("Blocked telegram:u9")
    before = len(generator.prompts)
    blocked = RecordingSink()
    await manager.handle(dm("hello?", user="u9"), blocked)
    await manager.handle(group("hello group", user="u9", chat="g1", mention=True), blocked)
    await manager.handle(dm("/help", user="u9"), blocked)
    assert blocked.texts == [] and len(generator.prompts) == before
    assert not any("hello" in text for _role, text in await stored_texts(engine))
    async with engine.connect() as connection:
        row = (await connection.execute(
            select(UserRow.blocked, UserRow.display_name)
            .where(UserRow.user_id == "u9"))).one()
    assert row == (True, "User u9")  # the attempt: who, and when (last_seen_at)


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_secrets_never_reach_the_logs(tmp_path: Path, log_format: str) -> None:
    model_key = "sk-test-MODEL-KEY-0123456789"
    async with TelegramEmulator() as telegram, DiscordEmulator() as discord, \
            FakeOpenAI(echo=True, api_key=model_key) as model:
        # Faults make every layer log: retries, a refused model call, flood control.
        telegram.fail("getMe", DROP, "")  # a start-up outage, retried and logged
        telegram.fail("getUpdates", DROP, "")
        telegram.fail("sendMessage", 502, "Bad Gateway")
        telegram.fail("sendMessage", 429, "Too Many Requests: retry after 1", retry_after=1)
        model.then(status=500, detail="boom")

        async def scenario() -> None:
            await discord.ready(timeout=60)
            telegram.push_text("hello telegram", chat=11, user=11)
            discord.post("hello discord", author=11, dm=True)
            await telegram.wait_for(
                lambda: telegram.final_text(11) == ["hello telegram"]
                and discord.channel_texts(discord.dm_channel(11)) == ["hello discord"],
                timeout=60)

        log = await serve_until_sigterm({
            "CHINWAG_TELEGRAM_TOKEN": telegram.token, "CHINWAG_TELEGRAM_API_URL": telegram.url,
            "CHINWAG_DISCORD_TOKEN": discord.token, "CHINWAG_DISCORD_API_URL": discord.api_url,
            "CHINWAG_DISCORD_GATEWAY_URL": discord.gateway_url,
            "CHINWAG_GENERATOR": "openai", "CHINWAG_OPENAI_BASE_URL": model.url,
            "CHINWAG_OPENAI_API_KEY": model_key, "CHINWAG_MODEL": "fake",
            "CHINWAG_LOG_LEVEL": "DEBUG", "CHINWAG_LOG_FORMAT": log_format,
        }, tmp_path, scenario)
        # Errors printed on the way out are blanked too: the API, given a URL with the
        # token in it, refuses. (The emulator must be up and answering, in this loop: start-up
        # waits out an API it cannot reach, as any network outage.)
        failed = await asyncio.to_thread(
            chinwag, "run", env={"CHINWAG_TELEGRAM_TOKEN": telegram.token,
                                 "CHINWAG_TELEGRAM_API_URL": f"{telegram.url}/bot{telegram.token}",
                                 "CHINWAG_GENERATOR": "echo",
                                 "CHINWAG_LOG_FORMAT": log_format,
                                 "CHINWAG_DATA_DIR": str(tmp_path)}, timeout=60)
    assert "answered" in log  # the log is there, at DEBUG
    assert "retrying in" in log  # and the network errors, with the URLs they quote
    for secret in (telegram.token, discord.token, model_key):
        assert secret not in log
    assert failed.returncode != 0
    assert telegram.token not in failed.stdout + failed.stderr
    if log_format == "json":
        assert_json_lines_about_messages(log)


def assert_json_lines_about_messages(log: str) -> None:
    """Every line is one JSON object; lines about a message name it and its conversation."""
    lines = [json.loads(line) for line in log.splitlines() if line.strip()]
    assert all({"asctime", "level", "logger", "message"} <= line.keys() for line in lines)
    about = {(line["conversation"], line["message_id"]) for line in lines
             if "conversation" in line}
    platforms = {key.split(":")[0] for key, message in about if message}
    assert platforms == {"telegram", "discord"}, about
    assert any(key == "telegram:11" for key, _message in about)
    # The core's lines that name the conversation in their text carry it as a field too.
    named = [line for line in lines if line["logger"].startswith("bot.")
             and line["message"].startswith("telegram:11:")]
    assert named and all(line.get("conversation") == "telegram:11" for line in named), named


DB_PASSWORD = "pg-P@ss/w0rd:SECRET-42"
"""Characters a URL must escape, so it is written one way and meant another."""


def password_forms() -> list[str]:
    return [DB_PASSWORD, quote(DB_PASSWORD, safe=""), "SECRET-42"]


def test_the_database_password_is_blanked_however_it_is_written() -> None:
    url = f"postgresql+asyncpg://chinwag:{quote(DB_PASSWORD, safe='')}@db.example:5432/bot"
    settings = load_settings(database_url=url)
    # An error that names the database URL as it was given: no form of the password shows.
    shown = redact(f"cannot reach the database at {url}", settings.secrets())
    assert not any(form in shown for form in password_forms()), shown


async def test_database_password_never_reaches_the_logs(
        tmp_path: Path, postgres_server: PostgresServer) -> None:
    # The test server trusts every local connection, so any password is accepted.
    database = postgres_server.create_database().rsplit("/", 1)[1]
    root = f"postgresql+asyncpg://chinwag:{quote(DB_PASSWORD, safe='')}@127.0.0.1"
    url = f"{root}:{postgres_server.port}/{database}"
    async with TelegramEmulator() as telegram:
        telegram.fail("getMe", DROP, "")  # a start-up outage, retried and logged
        telegram.fail("getUpdates", DROP, "")
        telegram.fail("sendMessage", 502, "Bad Gateway")

        async def scenario() -> None:
            telegram.push_text("hello postgres", chat=12, user=12)
            await telegram.wait_for(lambda: telegram.final_text(12) == ["hello postgres"],
                                    timeout=60)

        log = await serve_until_sigterm({
            "CHINWAG_TELEGRAM_TOKEN": telegram.token, "CHINWAG_TELEGRAM_API_URL": telegram.url,
            "CHINWAG_DATABASE_URL": url, "CHINWAG_LOG_LEVEL": "DEBUG",
        }, tmp_path, scenario)
    assert "answered" in log and "postgresql" in log  # at DEBUG, the database was named
    # Failures on the way in: a database that does not exist, a server that is not there.
    failures = [chinwag("-v", "db", "upgrade", env={"CHINWAG_DATABASE_URL": bad}, timeout=60)
                for bad in (f"{root}:{postgres_server.port}/no_such_database",
                            f"{root}:1/{database}")]
    assert all(failed.returncode != 0 for failed in failures)
    for output in [log, *(f.stdout + f.stderr for f in failures)]:
        assert not any(form in output for form in password_forms()), output
