"""Start-up against a platform that is not there yet: the real python-telegram-bot and
discord.py clients retry a network outage with backoff (one log line per attempt) and then
serve; a refused token is one clear error at once, never retried."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from adapters.discord import DiscordAdapter
from adapters.telegram import TelegramAdapter
from bot.builtin_commands import builtin_commands
from bot.dialogue import DialogueManager
from bot.errors import ConfigError
from tests.auxil.discord_api import DROP as DISCORD_DROP
from tests.auxil.discord_api import DiscordEmulator
from tests.auxil.loopback import wait_until
from tests.auxil.process import start_run
from tests.auxil.telegram_api import DROP, TelegramEmulator


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def retries(caplog: pytest.LogCaptureFixture, platform: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith(f"adapters.{platform}")
            and "retrying in" in r.getMessage()]


async def until(predicate: Callable[[], bool], what: str) -> None:
    await wait_until(predicate, 20, lambda: what)


# Telegram.

async def test_telegram_waits_for_an_api_that_comes_up_late(
        manager: DialogueManager, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    emulator = TelegramEmulator(port=free_port())
    adapter = TelegramAdapter(emulator.token, manager, builtin_commands(),
                              api_url=f"http://127.0.0.1:{emulator.port}", poll_timeout=1)
    entering = asyncio.create_task(adapter.__aenter__())
    # Nothing listens yet: the connection is refused, and that is said once.
    await until(lambda: len(retries(caplog, "telegram")) == 1, "no retry logged")
    assert not entering.done()
    async with emulator:
        await asyncio.wait_for(entering, 20)
        try:
            emulator.push_text("are you there?", chat=5, user=5)
            await emulator.wait_for(lambda: emulator.final_text(5) == ["are you there?"])
        finally:
            await adapter.__aexit__(None, None, None)
    logged = retries(caplog, "telegram")
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING


async def test_telegram_start_retries_bad_gateways_and_dropped_connections(
        manager: DialogueManager, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with TelegramEmulator() as emulator:
        emulator.fail("getMe", 502, "Bad Gateway")
        emulator.fail("getMe", DROP, "")
        emulator.fail("setMyCommands", 502, "Bad Gateway")
        async with TelegramAdapter(emulator.token, manager, builtin_commands(),
                                   api_url=emulator.url, poll_timeout=1):
            emulator.push_text("hello", chat=5, user=5)
            await emulator.wait_for(lambda: emulator.final_text(5) == ["hello"])
        assert len(emulator.failed("getMe")) == 2
        assert len(emulator.failed("setMyCommands")) == 1
        # The menu once per language (and the default one), each once, after the retry.
        assert sorted(str(c.get("language_code")) for c in
                      emulator.sent("setMyCommands")) == ["None", "en", "zh"]
    # One line per failed attempt, each saying when the next one comes; growing waits.
    delays = [float(r.getMessage().split("retrying in ")[1].split()[0])
              for r in retries(caplog, "telegram")]
    assert delays == [1.0, 2.0, 4.0]


async def test_telegram_refused_token_fails_at_once(
        manager: DialogueManager, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with TelegramEmulator() as emulator:
        started = time.monotonic()
        with pytest.raises(ConfigError, match="CHINWAG_TELEGRAM_TOKEN"):
            async with TelegramAdapter("999:WRONG", manager, builtin_commands(),
                                       api_url=emulator.url):
                pass
        assert time.monotonic() - started < 5
        assert [(c.method, c.status) for c in emulator.calls] == [("getMe", 401)]
    assert not retries(caplog, "telegram")


# Discord.

async def test_discord_waits_for_an_api_that_comes_up_late(
        manager: DialogueManager, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    emulator = DiscordEmulator(port=free_port())
    base = f"http://127.0.0.1:{emulator.port}"
    adapter = DiscordAdapter(emulator.token, manager, builtin_commands(),
                             api_url=f"{base}/api/v10", gateway_url=f"ws://127.0.0.1:"
                             f"{emulator.port}/gateway")
    entering = asyncio.create_task(adapter.__aenter__())
    await until(lambda: len(retries(caplog, "discord")) == 1, "no retry logged")
    assert not entering.done()
    async with emulator:
        await asyncio.wait_for(entering, 30)
        try:
            emulator.post("are you there?", dm=True, author=5)
            channel = emulator.dm_channel(5)
            await emulator.wait_for(
                lambda: emulator.channel_texts(channel) == ["are you there?"])
        finally:
            await adapter.__aexit__(None, None, None)
    logged = retries(caplog, "discord")
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING


async def test_discord_start_retries_dropped_connections(
        manager: DialogueManager, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with DiscordEmulator() as emulator:
        emulator.fail("GET", "/users/@me", DISCORD_DROP, times=2)
        async with DiscordAdapter(emulator.token, manager, builtin_commands(),
                                  api_url=emulator.api_url,
                                  gateway_url=emulator.gateway_url):
            emulator.post("hello", dm=True, author=5)
            channel = emulator.dm_channel(5)
            await emulator.wait_for(lambda: emulator.channel_texts(channel) == ["hello"])
        assert [r.status for r in emulator.calls("GET", "/users/@me")] == [DISCORD_DROP] * 2 \
            + [200]
    # aiohttp may itself retry a GET on a connection dropped at once; each failure that
    # reaches Chinwag is one line, with growing waits.
    delays = [float(r.getMessage().split("retrying in ")[1].split()[0])
              for r in retries(caplog, "discord")]
    assert delays and delays == [2.0 ** n for n in range(len(delays))]


async def test_discord_refused_token_fails_at_once(
        manager: DialogueManager, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    async with DiscordEmulator() as emulator:
        started = time.monotonic()
        with pytest.raises(ConfigError, match="CHINWAG_DISCORD_TOKEN"):
            async with DiscordAdapter("wrong", manager, builtin_commands(),
                                      api_url=emulator.api_url,
                                      gateway_url=emulator.gateway_url):
                pass
        assert time.monotonic() - started < 5
        assert [(r.path, r.status) for r in emulator.requests] == [("/users/@me", 401)]
    assert not retries(caplog, "discord")


# `chinwag run`.

async def test_a_stop_signal_during_a_start_up_outage_stops_at_once(tmp_path: Path) -> None:
    port = free_port()  # nothing listens: start-up keeps retrying
    process = await start_run({"CHINWAG_TELEGRAM_TOKEN": "123:SECRET-TOKEN",
                               "CHINWAG_TELEGRAM_API_URL": f"http://127.0.0.1:{port}"},
                              tmp_path)
    log = tmp_path / "run-0.log"
    try:
        await wait_until(lambda: "retrying in" in log.read_text(), 60,
                         lambda: log.read_text())
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 10)
    assert code == 0, log.read_text()
    assert "Traceback" not in log.read_text()
