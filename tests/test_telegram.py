"""The real python-telegram-bot client against a loopback Bot API emulator."""

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from adapters.telegram import TelegramAdapter
from bot.builtin_commands import builtin_commands
from bot.dialogue import DialogueManager
from tests.auxil.generators import ScriptedGenerator
from tests.auxil.telegram_api import BOT, TelegramEmulator


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


@pytest.fixture
async def tg(manager: DialogueManager) -> AsyncIterator[TelegramEmulator]:
    async with TelegramEmulator() as emulator, TelegramAdapter(
        emulator.token, manager, builtin_commands(), api_url=emulator.url, poll_timeout=1
    ):
        yield emulator


async def test_direct_message_round_trip(tg: TelegramEmulator,
                                         generator: ScriptedGenerator) -> None:
    generator.gate = asyncio.Event()
    tg.push_text("hello from telegram", chat=5, user=5)
    await tg.wait_for(lambda: bool(tg.sent("sendChatAction")))  # typing while it thinks
    assert tg.sent("sendChatAction")[0]["action"] == "typing"
    generator.gate.set()
    await tg.wait_for(lambda: tg.final_text(5) == ["hello from telegram"])


async def test_commands_are_registered_at_start(tg: TelegramEmulator) -> None:
    registered = tg.sent("setMyCommands")[0]["commands"]
    assert {c["command"] for c in registered} == {c.name for c in builtin_commands()}


async def test_group_answers_only_when_addressed(tg: TelegramEmulator,
                                                 generator: ScriptedGenerator) -> None:
    tg.push_text("just people talking", chat=-100, user=7, chat_type="supergroup")
    mention = "@chinwag_bot what is up"
    asked = tg.push_text(mention, chat=-100, user=7, chat_type="supergroup",
                         entities=[{"type": "mention", "offset": 0, "length": 12}])
    await tg.wait_for(lambda: tg.final_text(-100) == ["what is up"])
    first = tg.sent()[0]
    assert first["reply_parameters"]["message_id"] == asked  # threaded to the question
    assert len(generator.prompts) == 1


async def test_reply_to_the_bot_continues_the_chain(tg: TelegramEmulator,
                                                    generator: ScriptedGenerator) -> None:
    tg.push_text("@chinwag_bot first", chat=-7, user=3, chat_type="group",
                 entities=[{"type": "mention", "offset": 0, "length": 12}])
    await tg.wait_for(lambda: len(tg.final_text(-7)) == 1)
    bot_message = {"message_id": tg.sent()[0]["_message_id"], "date": 0, "text": "first",
                   "chat": {"id": -7, "type": "group", "title": "g"}, "from": BOT}
    tg.push_text("second", chat=-7, user=3, chat_type="group", reply_to=bot_message)
    await tg.wait_for(lambda: len(tg.final_text(-7)) == 2)
    assert [m.content for m in generator.prompts[-1][1:]] == ["first", "first", "second"]


async def test_commands_for_another_bot_are_ignored(tg: TelegramEmulator) -> None:
    tg.push_text("/help@other_bot", chat=-9, user=4, chat_type="group")
    tg.push_text("/help@chinwag_bot", chat=-9, user=4, chat_type="group")
    await tg.wait_for(lambda: len(tg.final_text(-9)) == 1)
    assert tg.final_text(-9)[0].startswith("Commands:")


async def test_bad_token_is_one_clear_error(manager: DialogueManager, tmp_path: Path) -> None:
    from bot.errors import ConfigError

    async with TelegramEmulator() as emulator:
        with pytest.raises(ConfigError, match="CHINWAG_TELEGRAM_TOKEN"):
            async with TelegramAdapter("999:WRONG", manager, builtin_commands(),
                                       api_url=emulator.url):
                pass


async def test_chinwag_run_talks_to_the_api_it_is_pointed_at(tmp_path: Path) -> None:
    import asyncio.subprocess as aproc
    import os
    import signal
    import sys

    async with TelegramEmulator() as emulator:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
        env.update({"CHINWAG_TELEGRAM_TOKEN": emulator.token, "CHINWAG_GENERATOR": "echo",
                    "CHINWAG_TELEGRAM_API_URL": emulator.url,
                    "CHINWAG_DATA_DIR": str(tmp_path), "NO_PROXY": "127.0.0.1"})
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "run", env=env, stdin=aproc.DEVNULL,
            stdout=aproc.PIPE, stderr=aproc.PIPE, cwd=Path(__file__).parents[1])
        try:
            emulator.push_text("over the wire", chat=11, user=11)
            await emulator.wait_for(lambda: emulator.final_text(11) == ["over the wire"],
                                    timeout=60)
        finally:
            process.send_signal(signal.SIGTERM)
            _out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, err.decode()
        assert emulator.token not in err.decode()  # the token is never logged
