"""Prometheus metrics, /health and /ready: real traffic through the Telegram and Discord
emulators (and the built-in model's scheduler), then scraped over HTTP and parsed as
Prometheus parses them."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from adapters import metrics_server
from adapters.metrics_server import MetricsServer
from bot import intake
from bot.builtin_commands import builtin_commands
from bot.config import BUILTIN_MODEL, Settings
from bot.dialogue import DialogueManager
from bot.errors import Busy, GenerationError, StorageError
from bot.generators import ChatMessage, GenerationParams
from bot.generators.huggingface import TransformersGenerator
from bot.generators.scheduler import BatchScheduler, Request
from bot.metrics import Metrics
from bot.probes import Probes
from storage import retries
from storage.engine import create_engine
from storage.migrate import upgrade
from storage.models import MessageRow
from storage.repository import SqlStore
from tests.auxil.adapters import discord_adapter, telegram_adapter, telegram_webhook_adapter
from tests.auxil.discord_api import CHANNEL, DiscordEmulator
from tests.auxil.generators import ScriptedGenerator, SickGenerator
from tests.auxil.loopback import free_port
from tests.auxil.process import ROOT, start_run
from tests.auxil.telegram_api import TelegramEmulator
from tests.auxil.waiting import until
from tests.test_storage_faults import sqlite_write_lock

CACHE = Path("~/.cache/chinwag").expanduser()
GROUP = -100


# Scraping, as Prometheus does.

@dataclass(frozen=True)
class Scrape:
    samples: list[Sample]

    def value(self, name: str, **labels: str) -> float:
        """The one sample of this name whose labels include these."""
        [found] = [s.value for s in self.samples if s.name == name
                   and all(s.labels.get(k) == v for k, v in labels.items())]
        return found

    def names(self) -> set[str]:
        return {s.name for s in self.samples}


async def scrape(url: str) -> Scrape:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    families = text_string_to_metric_families(response.text)
    return Scrape([sample for family in families for sample in family.samples])


async def probe(url: str, path: str) -> tuple[int, dict[str, str]]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{url}{path}")
    return response.status_code, response.json()


# The bot on both platforms, counting into one Metrics served on a free port.

@dataclass
class Bot:
    tg: TelegramEmulator
    dc: DiscordEmulator
    manager: DialogueManager
    url: str

    async def settled(self) -> None:
        await until(lambda: not self.manager.active_conversations, "every message handled")


@pytest.fixture
async def bot(engine: AsyncEngine, generator: ScriptedGenerator,
              settings: Settings) -> AsyncIterator[Bot]:
    metrics = Metrics(platforms=("telegram", "discord"))
    probes = Probes(("telegram", "discord"))
    store = SqlStore(engine, metrics=metrics)
    async with MetricsServer(metrics, probes, host="127.0.0.1", port=0) as server, \
            TelegramEmulator() as tg, DiscordEmulator() as dc, \
            DialogueManager(store=store, generator=generator, settings=settings,
                            commands=builtin_commands(), metrics=metrics) as manager:
        probes.loaded(generator)
        metrics.watch(generator, model="echo")
        async with telegram_adapter(tg, manager), discord_adapter(dc, manager):
            yield Bot(tg, dc, manager, server.url)


def prompt_tokens(generator: ScriptedGenerator, prompts: Sequence[list[ChatMessage]]) -> int:
    return sum(generator.prompt_overhead + sum(generator.count_tokens(m.role, m.content)
                                               for m in prompt) for prompt in prompts)


async def reply_tokens(engine: AsyncEngine, platform: str) -> int:
    async with engine.connect() as connection:
        total = await connection.scalar(select(func.sum(MessageRow.tokens)).where(
            MessageRow.role == "assistant", MessageRow.platform == platform))
    return int(total or 0)


async def test_messages_through_both_platforms_are_counted(
        bot: Bot, generator: ScriptedGenerator, engine: AsyncEngine) -> None:
    telegram_texts = {"hello from the first chat", "and from the second",
                      "what is up in the group"}
    bot.tg.push_text("hello from the first chat", chat=1, user=1)
    bot.tg.push_text("and from the second", chat=2, user=2)
    bot.tg.push_text("people talking among themselves", chat=GROUP, user=3,
                     chat_type="supergroup")  # not for the bot: not counted
    bot.tg.push_mention("what is up in the group", chat=GROUP, user=3)
    bot.dc.post("hello from discord", dm=True, author=5)
    bot.dc.post("a mention in a channel", author=6, mention=True)
    await bot.tg.wait_for(lambda: bot.tg.final_text(1) == ["hello from the first chat"]
                          and bot.tg.final_text(2) == ["and from the second"]
                          and bot.tg.final_text(GROUP) == ["what is up in the group"])
    await bot.dc.wait_for(lambda: bot.dc.channel_texts(CHANNEL) == ["a mention in a channel"]
                          and bot.dc.channel_texts(bot.dc.dm_channel(5))
                          == ["hello from discord"])
    await bot.settled()
    telegram_prompts = [p for p in generator.prompts if p[-1].content in telegram_texts]
    metrics = await scrape(bot.url)
    for platform, count in (("telegram", 3), ("discord", 2)):
        assert metrics.value("chinwag_messages_received_total", platform=platform) == count
        assert metrics.value("chinwag_messages_answered_total", platform=platform) == count
        assert metrics.value("chinwag_reply_latency_seconds_count", platform=platform) == count
        assert metrics.value("chinwag_first_text_seconds_count", platform=platform) == count
        assert metrics.value("chinwag_reply_latency_seconds_sum", platform=platform) > 0
        assert metrics.value("chinwag_reply_tokens_total", platform=platform) \
            == await reply_tokens(engine, platform)
        for reason in ("rate_limit", "quota", "blocked", "busy"):
            assert metrics.value("chinwag_messages_refused_total", platform=platform,
                                 reason=reason) == 0
    assert len(telegram_prompts) == 3
    assert metrics.value("chinwag_prompt_tokens_total", platform="telegram") \
        == prompt_tokens(generator, telegram_prompts)
    # The first text shows before the whole answer is done.
    assert metrics.value("chinwag_first_text_seconds_sum", platform="telegram") \
        <= metrics.value("chinwag_reply_latency_seconds_sum", platform="telegram")
    assert metrics.value("chinwag_build_info", version="0.1.0", model="echo",
                         generator="echo", device="none") == 1
    # The echo generator has no scheduler: no scheduler metrics at all.
    assert not any(name.startswith("chinwag_scheduler") for name in metrics.names())


@pytest.fixture
def limited(settings: Settings) -> Settings:
    return settings.model_copy(update={"rate_per_minute": 0.01, "rate_burst": 2,
                                       "daily_tokens": 30})


async def test_refusals_and_failures_are_counted_by_reason(
        limited: Settings, engine: AsyncEngine, generator: ScriptedGenerator) -> None:
    def reply(messages: Sequence[ChatMessage]) -> str:
        text = messages[-1].content
        if text == "crash":
            raise GenerationError("the model crashed")
        if text == "crowd":
            raise Busy("too many conversations at once; try again shortly")
        return text

    generator.reply = reply
    metrics = Metrics(platforms=("telegram",))
    store = SqlStore(engine, metrics=metrics)
    await store.touch_user("telegram", "77", "user77")
    await store.set_blocked("telegram", "77", True)
    async with MetricsServer(metrics, Probes(), host="127.0.0.1", port=0) as server, \
            TelegramEmulator() as tg, \
            DialogueManager(store=store, generator=generator, settings=limited,
                            commands=builtin_commands(), metrics=metrics) as manager, \
            telegram_adapter(tg, manager):
        # Over the rate limit: the burst of 2 is answered, the 3rd told, the 4th not.
        for n in range(4):
            tg.push_text(f"burst {n}", chat=10, user=10)
        tg.push_text("/help", chat=10, user=10)  # commands are not limited: shows the end
        # Over the quota of 30 reply tokens a day: the first answer spends it.
        long = " ".join(["word"] * 30)
        tg.push_text(long, chat=11, user=11)
        await tg.wait_for(lambda: tg.final_text(11) == [long])
        await until(lambda: not manager.active_conversations, "the answer stored")
        tg.push_text("one more", chat=11, user=11)
        tg.push_text("from a blocked user", chat=77, user=77)
        tg.push_text("crash", chat=12, user=12)
        tg.push_text("crowd", chat=13, user=13)
        await tg.wait_for(lambda: len(tg.final_text(10)) == 4 and len(tg.final_text(11)) == 2
                          and tg.final_text(12) and tg.final_text(13))
        await until(lambda: not manager.active_conversations, "every message handled")
        scraped = await scrape(server.url)
    assert tg.final_text(77) == []

    def refused(reason: str) -> float:
        return scraped.value("chinwag_messages_refused_total", platform="telegram",
                             reason=reason)

    def failed(reason: str) -> float:
        return scraped.value("chinwag_messages_failed_total", platform="telegram",
                             reason=reason)

    assert (refused("rate_limit"), refused("quota"), refused("blocked"), refused("busy")) \
        == (2, 1, 1, 1)
    assert (failed("generation"), failed("timeout"), failed("storage"), failed("error")) \
        == (1, 0, 0, 0)
    # 4 + /help + 2 + 1 + 1 + 1; answered: two of the burst and the first of the quota.
    assert scraped.value("chinwag_messages_received_total", platform="telegram") == 10
    assert scraped.value("chinwag_messages_answered_total", platform="telegram") == 3


async def test_a_message_delivered_again_after_its_answer_is_counted_once_and_not_refused(
        limited: Settings, engine: AsyncEngine, generator: ScriptedGenerator) -> None:
    metrics = Metrics(platforms=("telegram",))
    long = " ".join(["word"] * 30)  # its answer spends the day's quota of 30 tokens
    async with TelegramEmulator() as tg, \
            DialogueManager(store=SqlStore(engine, metrics=metrics), generator=generator,
                            settings=limited, commands=builtin_commands(),
                            metrics=metrics) as manager, \
            telegram_webhook_adapter(tg, manager, free_port()):
        first = {"update_id": 1000, "message": tg.user_message(chat=11, user=11, text=long)}
        second = {"update_id": 2000, "message": tg.user_message(chat=12, user=12, text="one")}
        for update in (first, second):
            tg.push_update(dict(update))
        await tg.wait_for(lambda: tg.final_text(11) == [long] and tg.final_text(12) == ["one"]
                          and tg.pending_updates == 0)
        await until(lambda: not manager.active_conversations, "the answers stored")
        # Telegram lost our 200s: it delivers both again, after they were answered.
        for update in (first, second):
            tg.push_update(dict(update))
        await tg.wait_for(lambda: tg.pending_updates == 0)
        await until(lambda: not manager.active_conversations, "the deliveries taken")
        # The allowance (a burst of 2) was spent once on "one": "two" is within it.
        tg.push_text("two", chat=12, user=12)
        await tg.wait_for(lambda: tg.final_text(12) == ["one", "two"])
        await until(lambda: not manager.active_conversations, "the answer stored")
    assert [len(tg.delivered(u)) for u in (1000, 2000)] == [2, 2]
    assert tg.final_text(11) == [long]  # not told it is over the quota
    assert total(metrics, "chinwag_messages_received_total") == 3
    assert total(metrics, "chinwag_messages_refused_total") == 0
    assert total(metrics, "chinwag_messages_answered_total") == 3


async def test_429s_and_flood_control_waits_are_counted_per_platform(bot: Bot) -> None:
    bot.tg.fail("sendMessage", 429, "Too Many Requests: retry after 1", retry_after=1)
    bot.dc.fail("POST", f"/channels/{CHANNEL}/messages", 429, retry_after=0.3)
    bot.tg.push_text("through flood control", chat=4, user=4)
    bot.dc.post("through the rate limit", author=7, mention=True)
    await bot.tg.wait_for(lambda: bot.tg.final_text(4) == ["through flood control"])
    await bot.dc.wait_for(lambda: bot.dc.channel_texts(CHANNEL) == ["through the rate limit"])
    await bot.settled()
    assert len(bot.tg.failed("sendMessage")) == 1
    assert [r.status for r in bot.dc.requests].count(429) == 1
    metrics = await scrape(bot.url)
    for platform, seconds in (("telegram", 1.0), ("discord", 0.3)):
        assert metrics.value("chinwag_platform_429_responses_total", platform=platform) == 1
        assert metrics.value("chinwag_flood_waits_total", platform=platform) == 1
        assert metrics.value("chinwag_flood_wait_seconds_total",
                             platform=platform) == pytest.approx(seconds)


async def test_database_retries_and_failures_are_counted(
        settings: Settings, generator: ScriptedGenerator,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # A store that gives up on a locked SQLite file after one quick retry.
    monkeypatch.setattr(retries, "RETRY_DELAYS_S", (0.05,))
    monkeypatch.setattr(intake, "RETRY_DELAYS_S", (0.2,))
    engine = create_engine(settings.database_url, sqlite_busy_timeout_ms=20)
    await upgrade(engine)
    metrics = Metrics(platforms=("telegram",))
    store = SqlStore(engine, metrics=metrics)
    path = settings.database_url.split(":///", 1)[1]
    try:
        async with MetricsServer(metrics, Probes(), host="127.0.0.1", port=0) as server, \
                TelegramEmulator() as tg, \
                DialogueManager(store=store, generator=generator, settings=settings,
                                commands=builtin_commands(), metrics=metrics) as manager, \
                telegram_adapter(tg, manager):
            with sqlite_write_lock(path):
                tg.push_text("while the database is locked", chat=21, user=21)
                # Not stored: left for Telegram to deliver again, and tried again.
                await until(lambda: total(metrics, "chinwag_database_failures_total") >= 2,
                            "a few tries")
                during = await scrape(server.url)
            await tg.wait_for(lambda: tg.final_text(21) == ["while the database is locked"])
            await until(lambda: not manager.active_conversations, "the answer stored")
            after = await scrape(server.url)
    finally:
        await engine.dispose()
    failures = sum(s.value for s in during.samples
                   if s.name == "chinwag_database_failures_total")
    retried = sum(s.value for s in during.samples if s.name == "chinwag_database_retries_total")
    # Each call was tried twice, then failed (one may be between its tries now).
    assert failures >= 2 and failures <= retried <= failures + 1
    assert during.value("chinwag_messages_received_total", platform="telegram") == 0
    # Delivered again and again, taken once.
    assert after.value("chinwag_messages_received_total", platform="telegram") == 1
    assert after.value("chinwag_messages_answered_total", platform="telegram") == 1


def total(metrics: Metrics, name: str) -> float:
    """A metric's samples of that name, summed over their labels (read in-process)."""
    return sum(sample.value for family in metrics.registry.collect()
               for sample in family.samples if sample.name == name)


async def test_a_store_call_that_fails_for_good_is_counted_by_operation(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retries, "RETRY_DELAYS_S", (0.05, 0.05))
    engine = create_engine(settings.database_url, sqlite_busy_timeout_ms=20)
    await upgrade(engine)
    metrics = Metrics()
    store = SqlStore(engine, metrics=metrics)
    conversation = await store.conversation("telegram:1")
    path = settings.database_url.split(":///", 1)[1]
    try:
        async with MetricsServer(metrics, Probes(), host="127.0.0.1", port=0) as server:
            with sqlite_write_lock(path), pytest.raises(StorageError):
                await store.set_persona(conversation.id, "a pirate")
            scraped = await scrape(server.url)
    finally:
        await engine.dispose()
    assert scraped.value("chinwag_database_retries_total", operation="set_persona") == 2
    assert scraped.value("chinwag_database_failures_total", operation="set_persona") == 1


# /health and /ready.

async def test_ready_once_loaded_and_connected_and_healthy_until_it_stops() -> None:
    probes = Probes(("telegram", "discord"))
    generator = SickGenerator()
    async with MetricsServer(Metrics(), probes, host="127.0.0.1", port=0) as server:
        # Loading the model: sound, but not ready.
        assert await probe(server.url, "/health") == (200, {"status": "ok"})
        assert await probe(server.url, "/ready") == (
            503, {"status": "unavailable", "reason": "the model is loading"})
        probes.loaded(generator)
        assert (await probe(server.url, "/ready"))[1]["reason"] \
            == "connecting to telegram, discord"
        probes.connected("telegram")
        assert (await probe(server.url, "/ready"))[1]["reason"] == "connecting to discord"
        probes.connected("discord")
        assert await probe(server.url, "/ready") == (200, {"status": "ok"})
        generator.trouble = "the scheduler has not stepped for 12 s with work queued"
        for path in ("/health", "/ready"):
            assert await probe(server.url, path) == (
                503, {"status": "unavailable", "reason": generator.trouble})
        generator.trouble = None
        probes.stopping()
        assert await probe(server.url, "/health") == (200, {"status": "ok"})
        assert (await probe(server.url, "/ready"))[1]["reason"] == "shutting down"
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{server.url}/nothing")).status_code == 404


async def test_health_says_when_the_event_loop_is_stuck(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics_server, "LOOP_DEADLINE_S", 0.3)
    answers: list[httpx.Response] = []
    async with MetricsServer(Metrics(), Probes(), host="127.0.0.1", port=0) as server:

        def ask() -> None:
            answers.append(httpx.get(f"{server.url}/health", timeout=10))

        asking = threading.Thread(target=ask)
        asking.start()
        # The loop is stuck (as a blocking call on it would make it) until /health answers.
        deadline = time.monotonic() + 10
        while not answers and time.monotonic() < deadline:
            time.sleep(0.01)  # noqa: ASYNC251 (blocking the loop is the point)
        asking.join()
        [answer] = answers
        assert answer.status_code == 503
        assert answer.json()["reason"] == "the event loop has not responded for 0.3 s"
        assert await probe(server.url, "/health") == (200, {"status": "ok"})


# The built-in model's scheduler.

@pytest.mark.model
async def test_the_schedulers_work_is_measured_and_a_stall_is_unhealthy() -> None:
    metrics, probes = Metrics(), Probes()
    async with TransformersGenerator(BUILTIN_MODEL, CACHE, "cpu", max_sequences=4,
                                     stall_after=0.5, prefix_cache_mb=64) as model, \
            MetricsServer(metrics, probes, host="127.0.0.1", port=0) as server:
        probes.loaded(model)
        metrics.watch(model, model=BUILTIN_MODEL)
        scheduler = model.scheduler
        assert isinstance(scheduler, BatchScheduler)
        prompt = model.prompt_ids([ChatMessage("user", "Count from one to twenty.")])
        params = GenerationParams(max_new_tokens=12, temperature=0.0)
        release, stuck = threading.Event(), threading.Event()

        def slow(item: object) -> None:
            # Holds the thread at the third token, as a hung step would: the first step
            # (prefill, then a decoding step) is done and the request is in the batch.
            if len(requests[0].generated) == 3:
                stuck.set()
                release.wait(30)

        requests = [Request(prompt, params, slow, ignore_eos=True)]
        scheduler.submit(requests[0])
        try:
            await until(stuck.is_set, "the first request to decode", within=60)
            # Two more wait for a place while the batch is stuck.
            requests += [Request(prompt, params, lambda item: None, ignore_eos=True)
                         for _ in range(2)]
            for request in requests[1:]:
                scheduler.submit(request)
            await until(lambda: scheduler.health() is not None, "the stall", within=10)
            status, body = await probe(server.url, "/health")
            assert status == 503 and "has not stepped" in body["reason"]
            assert (await probe(server.url, "/ready"))[0] == 503
            stalled = await scrape(server.url)
            assert stalled.value("chinwag_scheduler_active_sequences") == 1
            assert stalled.value("chinwag_scheduler_queue_depth") == 2
        finally:
            release.set()
        await until(lambda: all(r.done for r in requests), "every request to end", within=60)
        await until(lambda: scheduler.health() is None, "healthy again")
        assert await probe(server.url, "/health") == (200, {"status": "ok"})
        # The same prompt again, now that the others have ended: its keys and values are
        # kept (all but its last token, whose logits are computed).
        again = Request(prompt, GenerationParams(max_new_tokens=1, temperature=0.0),
                        lambda item: None)
        scheduler.submit(again)
        await until(lambda: again.done, "the repeated prompt")
        done = await scrape(server.url)
    assert done.value("chinwag_scheduler_prompt_tokens_reused_total") == len(prompt) - 1
    generated = sum(len(r.generated) for r in requests)
    assert generated == 3 * 12
    assert done.value("chinwag_scheduler_tokens_total") == generated + 1
    assert done.value("chinwag_scheduler_queue_depth") == 0
    assert done.value("chinwag_scheduler_active_sequences") == 0
    assert done.value("chinwag_scheduler_tokens_per_second") > 0
    steps = done.value("chinwag_scheduler_step_seconds_count")
    assert steps >= 12 and done.value("chinwag_scheduler_step_seconds_bucket", le="+Inf") \
        == steps
    assert done.value("chinwag_scheduler_step_seconds_sum") > 0.5  # the stuck step counted
    assert done.value("chinwag_build_info", device="cpu", generator="transformers",
                      model=BUILTIN_MODEL) == 1


# The processes: `chinwag run` and `chinwag serve`.

async def get(url: str) -> httpx.Response | None:
    """The answer, or None while nothing listens there yet."""
    async with httpx.AsyncClient() as http:
        try:
            return await http.get(url, timeout=5)
        except httpx.TransportError:
            return None


async def answer_of(url: str, within: float = 60.0) -> httpx.Response:
    answers: list[httpx.Response] = []

    async def answered() -> bool:
        response = await get(url)
        if response is not None:
            answers.append(response)
        return bool(answers)

    deadline = asyncio.get_running_loop().time() + within
    while not await answered():
        assert asyncio.get_running_loop().time() < deadline, f"nothing answers at {url}"
        await asyncio.sleep(0.1)
    return answers[-1]


async def test_chinwag_run_is_ready_once_telegram_connects_and_counts_its_messages(
        tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    async with TelegramEmulator() as tg:
        tg.fail("getMe", 502, "Bad Gateway", times=3)  # reached after 1 + 2 + 4 s
        process = await start_run({"CHINWAG_TELEGRAM_TOKEN": tg.token,
                                   "CHINWAG_TELEGRAM_API_URL": tg.url,
                                   "CHINWAG_METRICS_PORT": str(port)}, tmp_path)
        try:
            await tg.wait_for(lambda: bool(tg.failed("getMe")), timeout=60)
            # The metrics server started before anything else: it answers by now.
            ready = await answer_of(f"{url}/ready")
            assert ready.status_code == 503
            assert ready.json()["reason"] == "connecting to telegram"
            assert (await answer_of(f"{url}/health")).status_code == 200
            await until(lambda: bool(tg.sent("setMyCommands")), "connected", within=30)
            await until(lambda: len(tg.offsets) > 0, "polling", within=30)
            assert (await answer_of(f"{url}/ready")).status_code == 200
            tg.push_text("hello over the process", chat=3, user=3)
            await tg.wait_for(lambda: tg.final_text(3) == ["hello over the process"], 30)
            metrics = await scrape(url)
            assert metrics.value("chinwag_messages_received_total", platform="telegram") == 1
            assert metrics.value("chinwag_messages_answered_total", platform="telegram") == 1
            assert metrics.value("chinwag_build_info", generator="echo") == 1
        finally:
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 30) == 0
    assert await get(f"{url}/health") is None  # closed with the process


async def serve_process(env: dict[str, str], tmp_path: Path) -> asyncio.subprocess.Process:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CHINWAG_")}
    clean.update({"HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost",
                  "CHINWAG_DATA_DIR": str(tmp_path), **env})
    log = _log(tmp_path / "serve.log")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bot", "serve", env=clean, stdin=asyncio.subprocess.DEVNULL,
            stdout=log, stderr=log, cwd=ROOT)
    finally:
        log.close()


def _log(path: Path) -> IO[bytes]:
    return open(path, "wb")


async def complete(serve_url: str, text: str) -> str:
    async with httpx.AsyncClient(timeout=120) as http:
        response = await http.post(f"{serve_url}/v1/chat/completions", json={
            "model": "any", "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": text}]})
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


async def test_chinwag_serve_exposes_what_applies_to_its_generator(tmp_path: Path) -> None:
    serve_port, port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    process = await serve_process({"CHINWAG_GENERATOR": "echo", "CHINWAG_MODEL": "echo",
                                   "CHINWAG_SERVE_PORT": str(serve_port),
                                   "CHINWAG_METRICS_PORT": str(port)}, tmp_path)
    try:
        assert await complete_when_up(f"http://127.0.0.1:{serve_port}", "hi there") \
            == "hi there"
        assert (await answer_of(f"{url}/ready")).status_code == 200
        metrics = await scrape(url)
        assert metrics.value("chinwag_build_info", generator="echo", device="none") == 1
        assert not any(name.startswith("chinwag_scheduler") for name in metrics.names())
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0


async def complete_when_up(serve_url: str, text: str, within: float = 120.0) -> str:
    await answer_of(f"{serve_url}/health", within)
    return await complete(serve_url, text)


@pytest.mark.model
async def test_chinwag_serve_shows_its_worker_processes_scheduler(tmp_path: Path) -> None:
    serve_port, port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    process = await serve_process({"CHINWAG_GENERATOR": "transformers", "CHINWAG_DEVICE": "cpu",
                                   "CHINWAG_MODEL_CACHE_DIR": str(CACHE),
                                   "CHINWAG_WORKERS": "2",
                                   "CHINWAG_SERVE_PORT": str(serve_port),
                                   "CHINWAG_METRICS_PORT": str(port)}, tmp_path)
    try:
        loading = await answer_of(f"{url}/ready", 60)  # up before the model
        assert loading.status_code == 503, loading.text
        replies = await asyncio.gather(*(complete_when_up(
            f"http://127.0.0.1:{serve_port}", f"Name a colour, please ({n}).")
            for n in range(4)))
        assert all(replies)
        # Each worker reports its scheduler in its heartbeat, once a second: the parent
        # shows what they did once both have said it.
        metrics = await scrape(url)
        deadline = asyncio.get_running_loop().time() + 10
        while asyncio.get_running_loop().time() < deadline and not (
                metrics.value("chinwag_scheduler_tokens_total") >= 4
                and metrics.value("chinwag_scheduler_active_sequences") == 0):
            await asyncio.sleep(0.2)
            metrics = await scrape(url)
        assert 4 <= metrics.value("chinwag_scheduler_tokens_total") <= 4 * 8
        assert metrics.value("chinwag_scheduler_active_sequences") == 0
        assert metrics.value("chinwag_scheduler_queue_depth") == 0
        assert metrics.value("chinwag_scheduler_step_seconds_count") >= 1
        assert metrics.value("chinwag_build_info", device="cpu") == 1
        assert (await answer_of(f"{url}/ready")).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 60) == 0
