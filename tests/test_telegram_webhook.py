"""Telegram updates by webhook: the real python-telegram-bot client and Chinwag's listener,
with the loopback Bot API emulator POSTing updates as Telegram does (each chat's updates one
at a time, the same update again after a non-2xx answer)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from sqlalchemy.ext.asyncio import AsyncEngine
from telegram.error import Conflict

from adapters.telegram import TelegramAdapter
from adapters.telegram import webhook as telegram_webhook
from adapters.telegram.webhook import SECRET_HEADER, WebhookConfig, WebhookRetries
from bot import app
from bot.builtin_commands import builtin_commands
from bot.config import Settings, load_settings
from bot.dialogue import DialogueManager
from bot.errors import ConfigError, StorageError
from bot.intake import INTAKE_FAILED_NOTE, Intake, OnFailure
from bot.store import NewUserMessage
from storage.repository import SqlStore
from tests.auxil.adapters import WEBHOOK_SECRET, telegram_adapter, telegram_webhook_adapter
from tests.auxil.db import stored_texts
from tests.auxil.generators import ScriptedGenerator
from tests.auxil.loopback import free_port
from tests.auxil.process import serve_until_sigterm
from tests.auxil.telegram_api import NO_ANSWER, TelegramEmulator


@pytest.fixture
async def emulator() -> AsyncIterator[TelegramEmulator]:
    async with TelegramEmulator() as emulator:
        yield emulator


@pytest.fixture
def port() -> int:
    return free_port()


def store_that(store: SqlStore, before: Callable[[NewUserMessage], object]) -> SqlStore:
    """``store``, calling ``before`` with each user message before storing it: it raises
    a database error, or returns an awaitable to wait for first."""

    class Store(SqlStore):
        async def add_user_message(self, message: NewUserMessage):  # type: ignore[no-untyped-def]
            waiting = before(message)
            if waiting is not None:
                await waiting  # type: ignore[misc]
            return await super().add_user_message(message)

    wrapped = Store.__new__(Store)
    wrapped.__dict__.update(store.__dict__)
    return wrapped


def fail_while(condition: Callable[[NewUserMessage], bool]) -> Callable[[NewUserMessage], None]:
    def before(message: NewUserMessage) -> None:
        if condition(message):
            raise StorageError("database error: OperationalError: disk I/O error")
    return before


def statuses(emulator: TelegramEmulator, update_id: int) -> list[int]:
    return [NO_ANSWER if d.lost else d.status for d in emulator.delivered(update_id)]


async def user_texts(engine: AsyncEngine) -> list[str]:
    return [text for role, text in await stored_texts(engine) if role == "user"]


async def post(port: int, body: bytes, secret: str | None = WEBHOOK_SECRET) -> int:
    headers = {"Content-Type": "application/json"}
    if secret is not None:
        headers[SECRET_HEADER] = secret
    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{port}/telegram", data=body, headers=headers) as response:
        return response.status


async def test_messages_are_answered_through_the_webhook(
        emulator: TelegramEmulator, manager: DialogueManager, port: int,
        engine: AsyncEngine) -> None:
    async with telegram_webhook_adapter(emulator, manager, port):
        hook = emulator.webhook
        assert hook is not None and hook.url == f"http://127.0.0.1:{port}/telegram"
        assert hook.secret_token == WEBHOOK_SECRET and hook.max_connections == 40
        assert "message" in hook.allowed_updates
        emulator.push_text("hello by webhook", chat=5, user=5)
        emulator.push_mention("and in a group", chat=-100, user=6)
        await emulator.wait_for(lambda: emulator.final_text(5) == ["hello by webhook"]
                                and emulator.final_text(-100) == ["and in a group"])
        await emulator.wait_for(lambda: emulator.pending_updates == 0)
    assert statuses(emulator, 1) == [200] and statuses(emulator, 2) == [200]
    assert not emulator.sent("getUpdates") and not emulator.sent("deleteWebhook")
    assert sorted(await user_texts(engine)) == ["and in a group", "hello by webhook"]


async def test_requests_without_the_secret_or_an_update_are_refused(
        emulator: TelegramEmulator, manager: DialogueManager, port: int,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    update = {"update_id": 77, "message": emulator.user_message(chat=9, user=9,
                                                                text="sneaked in")}
    body = json.dumps(update).encode()
    async with telegram_webhook_adapter(emulator, manager, port):
        assert await post(port, body, secret=None) == 401
        assert await post(port, body, secret="webhook-secret_012345678X") == 401
        assert await post(port, b'{"update_id": 78, "message": {"text": "PRIVATE') == 400
        assert await post(port, b'[{"update_id": 79}]') == 400
        assert await post(port, b'{"update_id": "80"}') == 400
        # An update that is not a new message needs no storing: answered at once.
        edit = {"update_id": 81, "edited_message": emulator.user_message(
            chat=9, user=9, text="typo fixed", edit_date=1)}
        assert await post(port, json.dumps(edit).encode()) == 200
        # One that cannot be read would fail the same way every time: answered, logged.
        assert await post(port, b'{"update_id": 82, "message": {"chat": 1}}') == 200
        assert await post(port, body) == 200  # and with the secret, it is taken
        await emulator.wait_for(lambda: emulator.final_text(9) == ["sneaked in"])
    assert "PRIVATE" not in caplog.text and WEBHOOK_SECRET not in caplog.text
    assert len([r for r in caplog.records if "without the secret token" in r.message]) == 2
    assert "could not read update 82" in caplog.text
    assert emulator.final_text(9) == ["sneaked in"]  # the edit was not answered


async def test_a_message_that_cannot_be_stored_gets_503_and_is_taken_when_posted_again(
        emulator: TelegramEmulator, store: SqlStore, settings: Settings, port: int,
        engine: AsyncEngine, generator: ScriptedGenerator) -> None:
    tries: list[str] = []

    def down_twice(message: NewUserMessage) -> bool:
        tries.append(message.text)
        return len(tries) <= 2

    async with DialogueManager(store=store_that(store, fail_while(down_twice)),
                               generator=generator, settings=settings,
                               commands=builtin_commands()) as manager, \
            telegram_webhook_adapter(emulator, manager, port):
        emulator.push_text("store me", chat=7, user=7)
        await emulator.wait_for(lambda: emulator.final_text(7) == ["store me"]
                                and not manager.active_conversations)
    assert statuses(emulator, 1) == [503, 503, 200]
    # Telegram waits as polling would before delivering it again (1 s, then 2 s).
    assert [d.retry_after for d in emulator.delivered(1)[:2]] == ["1", "2"]
    assert tries == ["store me"] * 3
    assert await user_texts(engine) == ["store me"]
    assert len(emulator.sent()) == 1 and len(generator.prompts) == 1  # answered once


async def test_an_update_delivered_again_is_not_answered_twice(
        emulator: TelegramEmulator, store: SqlStore, settings: Settings, port: int,
        engine: AsyncEngine, generator: ScriptedGenerator,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="adapters.telegram.webhook")
    gate, tries = asyncio.Event(), []

    def slow(message: NewUserMessage) -> object:
        tries.append(message.text)
        return gate.wait() if message.text == "slow" else None

    async with DialogueManager(store=store_that(store, slow), generator=generator,
                               settings=settings, commands=builtin_commands()) as manager, \
            telegram_webhook_adapter(emulator, manager, port):
        # Our 200 is lost on the way: Telegram POSTs the stored update again.
        emulator.lose_webhook_answers = 1
        emulator.push_text("once", chat=8, user=8)
        await emulator.wait_for(lambda: statuses(emulator, 1) == [NO_ANSWER, 200]
                                and not manager.active_conversations)
        # Telegram gives up waiting for the answer and POSTs again while it is taken.
        emulator.webhook_timeout_s = 0.3
        emulator.push_text("slow", chat=9, user=9)
        await emulator.wait_for(lambda: statuses(emulator, 2).count(NO_ANSWER) >= 2)
        assert tries == ["once", "once", "slow"]  # the second POST shared the first's intake
        assert "update 2 delivered again while it is taken" in caplog.text
        emulator.webhook_timeout_s = 60.0
        gate.set()
        await emulator.wait_for(lambda: emulator.final_text(9) == ["slow"]
                                and statuses(emulator, 2)[-1] == 200
                                and not manager.active_conversations)
    assert emulator.final_text(8) == ["once"] and emulator.final_text(9) == ["slow"]
    assert await user_texts(engine) == ["once", "slow"]
    assert len(generator.prompts) == 2


async def test_a_chat_keeps_its_order_and_holds_up_no_other(
        emulator: TelegramEmulator, store: SqlStore, settings: Settings, port: int,
        engine: AsyncEngine) -> None:
    emulator.webhook_retry_s = 0.2
    tries: list[str] = []

    def first_fails_twice(message: NewUserMessage) -> bool:
        tries.append(message.text)
        return message.text == "first" and tries.count("first") <= 2

    async with DialogueManager(store=store_that(store, fail_while(first_fails_twice)),
                               generator=ScriptedGenerator(), settings=settings,
                               commands=builtin_commands()) as manager, \
            telegram_webhook_adapter(emulator, manager, port):
        for text in ("first", "second", "third"):
            emulator.push_text(text, chat=30, user=30)
        emulator.push_text("other chat", chat=31, user=31)
        await emulator.wait_for(lambda: emulator.final_text(31) == ["other chat"])
        assert emulator.final_text(30) == []  # still waiting for "first" to be stored
        await emulator.wait_for(lambda: emulator.final_text(30) == ["first", "second", "third"]
                                and not manager.active_conversations)
    assert tries.count("first") == 3
    assert [t for t in tries if t != "other chat"] == ["first"] * 3 + ["second", "third"]
    assert [d.update_id for d in emulator.deliveries if d.update_id <= 3] == [1, 1, 1, 2, 3]
    assert [t for t in await user_texts(engine) if t != "other chat"] == [
        "first", "second", "third"]


async def test_stop_receiving_takes_no_more_updates_and_answers_those_in_intake(
        emulator: TelegramEmulator, store: SqlStore, settings: Settings, port: int,
        engine: AsyncEngine) -> None:
    gate, entered = asyncio.Event(), asyncio.Event()

    def slow(message: NewUserMessage) -> object:
        entered.set()
        return gate.wait()

    async with DialogueManager(store=store_that(store, slow), generator=ScriptedGenerator(),
                               settings=settings, commands=builtin_commands(),
                               shutdown_grace=0.5) as manager:
        async with telegram_webhook_adapter(emulator, manager, port) as adapter:
            emulator.push_text("in intake at the stop", chat=12, user=12)
            await asyncio.wait_for(entered.wait(), 10)
            await adapter.stop_receiving()  # as `chinwag run` does at SIGTERM
            emulator.push_text("after the stop", chat=13, user=13)
            await emulator.wait_for(lambda: 503 in statuses(emulator, 2))
            assert emulator.delivered(2)[0].retry_after is not None
            assert statuses(emulator, 1) == []  # still waiting for its intake
            gate.set()
            await emulator.wait_for(lambda: statuses(emulator, 1) == [200])
            await manager.close()
    assert emulator.pending_updates == 1  # Telegram keeps the update that came after
    assert await user_texts(engine) == ["in intake at the stop"]
    # The next start takes it.
    async with DialogueManager(store=store, generator=ScriptedGenerator(), settings=settings,
                               commands=builtin_commands()) as manager, \
            telegram_webhook_adapter(emulator, manager, port):
        await emulator.wait_for(lambda: emulator.final_text(13) == ["after the stop"]
                                and emulator.final_text(12) == ["in intake at the stop"])
    assert emulator.pending_updates == 0


async def test_an_update_whose_body_arrives_after_the_stop_is_not_taken(
        emulator: TelegramEmulator, manager: DialogueManager, port: int,
        engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    reading = asyncio.Event()
    read = web.BaseRequest.read

    async def noted_read(request: web.BaseRequest) -> bytes:
        if request.path == "/telegram":  # the listener's, not the emulator's
            reading.set()
        return await read(request)

    monkeypatch.setattr(web.BaseRequest, "read", noted_read)
    update = {"update_id": 90, "message": emulator.user_message(chat=14, user=14,
                                                                text="slow to arrive")}
    body = json.dumps(update).encode()
    async with telegram_webhook_adapter(emulator, manager, port) as adapter:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # The request's head (with the secret) comes before the stop, its body after.
            writer.write(f"POST /telegram HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         f"Content-Type: application/json\r\n{SECRET_HEADER}: "
                         f"{WEBHOOK_SECRET}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                         + body[:10])
            await writer.drain()
            await asyncio.wait_for(reading.wait(), 10)  # the listener waits for the body
            await adapter.stop_receiving()
            writer.write(body[10:])
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 10)
        finally:
            writer.close()
    assert status_line.split()[1] == b"503"
    assert await user_texts(engine) == []


async def test_an_update_that_cannot_be_stored_is_given_up_once_others_are_stored(
        emulator: TelegramEmulator, store: SqlStore, settings: Settings, port: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(telegram_webhook, "GIVE_UP_S", 0.3)
    emulator.webhook_retry_s = 0.1
    fails = fail_while(lambda message: message.text == "cannot be stored")
    async with DialogueManager(store=store_that(store, fails), generator=ScriptedGenerator(),
                               settings=settings, commands=builtin_commands()) as manager, \
            telegram_webhook_adapter(emulator, manager, port):
        emulator.push_text("cannot be stored", chat=40, user=40)
        await emulator.wait_for(lambda: statuses(emulator, 1).count(503) >= 4)
        assert emulator.final_text(40) == []  # no evidence the database works: kept
        emulator.push_text("fine", chat=41, user=41)
        await emulator.wait_for(lambda: emulator.final_text(40) == [INTAKE_FAILED_NOTE]
                                and statuses(emulator, 1)[-1] == 200)
    assert emulator.final_text(41) == ["fine"] and emulator.pending_updates == 0


def test_webhook_retries_give_up_only_on_evidence() -> None:
    now = [1000.0]
    retries = WebhookRetries(lambda: now[0], crowded_at=3)
    retries.ended(1, Intake.FAILED, stored_before=0)
    now[0] += 3600
    assert retries.on_failure(1) is OnFailure.REDELIVER  # nothing stored since: an outage
    assert retries.retry_after(1) == 1.0
    retries.ended(1, Intake.FAILED, stored_before=0)
    assert retries.retry_after(1) == 2.0
    retries.ended(2, Intake.STORED, stored_before=0)
    assert retries.on_failure(1) is OnFailure.TELL  # overdue, and the database works
    retries.ended(1, Intake.DROPPED, stored_before=0)
    assert retries.failing == 0
    # Crowded: the oldest held update is given up at once, given the evidence.
    for update_id in (10, 11, 12):
        retries.ended(update_id, Intake.FAILED, stored_before=retries.stored)
    assert retries.on_failure(10) is OnFailure.REDELIVER
    retries.ended(13, Intake.STORED, stored_before=0)
    assert retries.on_failure(10) is OnFailure.TELL
    assert retries.on_failure(11) is OnFailure.REDELIVER


async def test_polling_deletes_the_webhook_and_gets_what_it_left(
        emulator: TelegramEmulator, manager: DialogueManager, port: int) -> None:
    async with telegram_webhook_adapter(emulator, manager, port) as adapter:
        with pytest.raises(Conflict):  # getUpdates is refused while a webhook is set
            await adapter.bot.get_updates(timeout=0)
        await adapter.stop_receiving()
        emulator.push_text("sent while switching", chat=20, user=20)
        await emulator.wait_for(lambda: 503 in statuses(emulator, 1))
    async with telegram_adapter(emulator, manager):
        await emulator.wait_for(lambda: emulator.final_text(20) == ["sent while switching"])
    assert emulator.webhook is None and emulator.sent("deleteWebhook")


async def test_chinwag_run_takes_updates_by_webhook_and_never_logs_the_secret(
        emulator: TelegramEmulator, port: int, tmp_path: Path) -> None:
    async def scenario() -> None:
        await emulator.wait_for(lambda: emulator.webhook is not None, timeout=60)
        emulator.push_text("over the webhook", chat=11, user=11)
        await emulator.wait_for(lambda: emulator.final_text(11) == ["over the webhook"],
                                timeout=60)

    log = await serve_until_sigterm({
        "CHINWAG_TELEGRAM_TOKEN": emulator.token, "CHINWAG_TELEGRAM_API_URL": emulator.url,
        "CHINWAG_TELEGRAM_WEBHOOK_URL": f"http://127.0.0.1:{port}/telegram",
        "CHINWAG_TELEGRAM_WEBHOOK_LISTEN": f"127.0.0.1:{port}",
        "CHINWAG_LOG_LEVEL": "DEBUG"}, tmp_path, scenario)
    assert emulator.webhook is not None
    secret = emulator.webhook.secret_token  # generated at start, as none was configured
    assert len(secret) >= 32 and secret not in log and emulator.token not in log
    assert "setWebhook" in log  # the call was logged, its secret blanked
    assert statuses(emulator, 1) == [200]


async def test_a_port_in_use_or_a_refused_url_is_one_clear_error(
        emulator: TelegramEmulator, manager: DialogueManager, port: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        with pytest.raises(ConfigError, match="WEBHOOK_LISTEN: cannot listen on"):
            async with telegram_webhook_adapter(emulator, manager, port):
                pass
    refused = WebhookConfig("http://bot.example.com/telegram", "127.0.0.1", port,
                            WEBHOOK_SECRET)
    assert WEBHOOK_SECRET not in repr(refused)  # nor in what a traceback may show
    with pytest.raises(ConfigError, match="WEBHOOK_URL: Telegram refused the webhook"):
        async with TelegramAdapter(emulator.token, manager, builtin_commands(),
                                   api_url=emulator.url, webhook=refused):
            pass
    with socket.socket() as free:
        free.bind(("127.0.0.1", port))  # the listener was closed when start-up failed


async def test_the_metrics_port_on_the_webhook_port_is_refused_before_start(
        emulator: TelegramEmulator, port: int, tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path / "data", generator="echo",
                             telegram_token=emulator.token, telegram_api_url=emulator.url,
                             telegram_webhook_url=f"http://127.0.0.1:{port}/telegram",
                             telegram_webhook_listen=f"127.0.0.1:{port}", metrics_port=port)
    with pytest.raises(ConfigError, match="CHINWAG_METRICS_PORT must differ"):
        await app.run(settings)
    assert emulator.calls == []  # said before anything started


# Settings.

def test_webhook_settings(tmp_path: Path) -> None:
    polling = load_settings()
    assert polling.telegram_webhook_url == "" and polling.telegram_webhook_secret is None
    assert polling.telegram_webhook_listen == ("0.0.0.0", 8443)
    first = load_settings(telegram_webhook_url="https://bot.example.com/telegram")
    second = load_settings(telegram_webhook_url="https://bot.example.com/telegram")
    assert first.telegram_webhook_secret is not None and second.telegram_webhook_secret
    generated = first.telegram_webhook_secret.get_secret_value()
    assert generated != second.telegram_webhook_secret.get_secret_value()  # one per start
    assert generated in first.secrets()
    given = load_settings(telegram_webhook_url="https://bot.example.com/telegram",
                          telegram_webhook_secret="Fixed_secret-0123456",
                          telegram_webhook_listen="[::]:9000")
    assert given.telegram_webhook_secret is not None
    assert given.telegram_webhook_secret.get_secret_value() == "Fixed_secret-0123456"
    assert given.telegram_webhook_listen == ("::", 9000)
    assert load_settings(telegram_webhook_listen="localhost:80").telegram_webhook_listen \
        == ("localhost", 80)
    # A self-hosted Bot API server (--local) also POSTs to http://.
    assert load_settings(telegram_webhook_url="http://chinwag:8443/telegram",
                         telegram_api_url="http://bot-api:8081").telegram_webhook_url


@pytest.mark.parametrize(("setting", "value", "says"), [
    ("telegram_webhook_listen", "8443", "host:port"),
    ("telegram_webhook_listen", "0.0.0.0:", "host:port"),
    ("telegram_webhook_listen", "0.0.0.0:70000", "host:port"),
    ("telegram_webhook_listen", ":8443", "host:port"),
    ("telegram_webhook_url", "http://bot.example.com/telegram", "https://"),
    ("telegram_webhook_url", "bot.example.com/telegram", "https://"),
    ("telegram_webhook_secret", "has spaces and ünïcode", "characters"),
    ("telegram_webhook_secret", "short_secret", "16 to 256"),  # guessable, and kept in logs
])
def test_bad_webhook_settings_are_one_clear_error(setting: str, value: str,
                                                  says: str) -> None:
    with pytest.raises(ConfigError, match=says) as caught:
        load_settings(**{"telegram_webhook_url": "https://bot.example.com/telegram",
                         setting: value})
    assert "CHINWAG_TELEGRAM_WEBHOOK_" in str(caught.value)
    if setting == "telegram_webhook_secret":
        assert value not in str(caught.value)
