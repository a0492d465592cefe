"""The OpenAI-compatible generator against a loopback server with injected faults."""

from __future__ import annotations

import asyncio
import itertools
import socket
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from bot.builtin_commands import builtin_commands
from bot.config import Settings, load_settings
from bot.dialogue import DialogueManager
from bot.errors import ConfigError, GenerationError
from bot.generators import ChatMessage, GenerationParams
from bot.generators.openai_compat import MAX_ATTEMPTS, OpenAIGenerator, local_counter
from bot.generators.tokens import EstimateCounter
from storage.repository import SqlStore
from tests.auxil.factories import dm
from tests.auxil.openai_api import FakeOpenAI
from tests.auxil.sinks import RecordingSink

PARAMS = GenerationParams(max_new_tokens=64, temperature=0.2, top_p=0.9)
ASK = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi?")]


@pytest.fixture
async def server() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key="sk-test") as server:
        yield server


@pytest.fixture
async def client(server: FakeOpenAI) -> AsyncIterator[OpenAIGenerator]:
    async with OpenAIGenerator(server.url, "served-model", "sk-test",
                               counter=EstimateCounter(), chunk_timeout=1.0) as generator:
        yield generator


async def collect(generator: OpenAIGenerator, params: GenerationParams = PARAMS,
                  messages: Sequence[ChatMessage] = ASK) -> str:
    return "".join([piece async for piece in generator.stream(messages, params)])


async def test_streams_the_reply_and_sends_the_conversation(server: FakeOpenAI,
                                                           client: OpenAIGenerator) -> None:
    pieces = [p async for p in client.stream(ASK, PARAMS)]
    assert "".join(pieces) == server.reply and len(pieces) > 3  # streamed, not at once
    [request] = server.requests
    assert request["model"] == "served-model" and request["stream"] is True
    assert request["messages"] == [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": "Hi?"}]
    assert (request["max_tokens"], request["temperature"], request["top_p"]) == (64, 0.2, 0.9)
    assert request["_auth"] == "Bearer sk-test"


def gaps(server: FakeOpenAI) -> list[float]:
    """Seconds between one request's arrival and the next."""
    return [later - earlier for earlier, later in itertools.pairwise(server.arrivals)]


async def test_server_errors_are_retried_with_backoff(server: FakeOpenAI,
                                                      client: OpenAIGenerator) -> None:
    server.then(status=500)
    server.then(status=503)
    server.then(status=429, retry_after=0.1)
    assert await collect(client) == server.reply
    assert len(server.requests) == 4
    first, second, hinted = gaps(server)
    # Without a hint the client pauses, and pauses longer each time ...
    assert first >= 0.25 and second >= 1.5 * first
    # ... and a Retry-After shorter than the backoff is taken at its word,
    assert 0.1 <= hinted < second
    # as is one longer than the first backoff (0.5 s).
    server.then(status=429, retry_after=1.2)
    assert await collect(client) == server.reply
    assert gaps(server)[-1] >= 1.2


async def test_an_error_event_before_the_first_token_is_retried(
        server: FakeOpenAI, client: OpenAIGenerator) -> None:
    server.then(error_after=0, detail="the server is busy")
    server.then(error_after=0, detail="the server is busy")
    assert await collect(client) == server.reply
    assert len(server.requests) == 3
    assert all(gap >= 0.25 for gap in gaps(server))  # spaced out, not a hot loop


async def test_a_server_that_keeps_failing_inside_the_stream_gives_a_clear_error(
        server: FakeOpenAI, client: OpenAIGenerator) -> None:
    for _ in range(MAX_ATTEMPTS):
        server.then(error_after=0, detail="overloaded")
    with pytest.raises(GenerationError, match="overloaded"):
        await collect(client)
    assert len(server.requests) == MAX_ATTEMPTS


async def test_an_error_event_after_the_first_token_is_an_error_not_a_retry(
        server: FakeOpenAI, client: OpenAIGenerator) -> None:
    server.then(error_after=2, detail="the model crashed")
    with pytest.raises(GenerationError, match="the model crashed"):
        await collect(client)
    assert len(server.requests) == 1  # the user saw part of it: no second answer


async def test_a_stream_cut_while_text_is_held_back_starts_again_clean(
        server: FakeOpenAI, client: OpenAIGenerator) -> None:
    # "Hello" could be the start of the stop string, so it is held back, not shown; when
    # the stream is then cut, the retry must not put the held-back text twice.
    params = GenerationParams(max_new_tokens=64, temperature=0.0, stop=("Hello!",))
    server.then(cut_after=1)
    assert await collect(client, params) == server.reply
    assert len(server.requests) == 2


async def test_a_server_that_stays_busy_gives_a_clear_error(server: FakeOpenAI,
                                                            client: OpenAIGenerator) -> None:
    for _ in range(4):
        server.then(status=429, retry_after=0.05)
    with pytest.raises(GenerationError, match="busy"):
        await collect(client)


async def test_a_bad_request_is_not_retried(server: FakeOpenAI,
                                            client: OpenAIGenerator) -> None:
    server.then(status=400)
    with pytest.raises(GenerationError, match="answered 400"):
        await collect(client)
    assert len(server.requests) == 1


async def test_a_stream_cut_mid_reply_is_an_error_not_a_retry(
        server: FakeOpenAI, client: OpenAIGenerator) -> None:
    server.then(cut_after=2)
    with pytest.raises(GenerationError, match="cut the reply short"):
        await collect(client)
    assert len(server.requests) == 1  # the user saw part of it: no second answer


async def test_a_stream_cut_before_the_first_token_is_retried(
        server: FakeOpenAI, client: OpenAIGenerator) -> None:
    server.then(cut_after=0)
    assert await collect(client) == server.reply


async def test_a_hanging_server_times_out(server: FakeOpenAI,
                                          client: OpenAIGenerator) -> None:
    server.then(hang=5.0)
    with pytest.raises(GenerationError, match="stopped answering"):
        await collect(client)


async def test_an_unreachable_server_is_a_clear_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with OpenAIGenerator(f"http://127.0.0.1:{port}/v1", "m",
                               counter=EstimateCounter()) as generator:
        with pytest.raises(GenerationError, match="cannot reach the model server"):
            await collect(generator)


async def test_stop_strings_end_the_reply(server: FakeOpenAI,
                                          client: OpenAIGenerator) -> None:
    params = GenerationParams(max_new_tokens=64, temperature=0.0, stop=("model",))
    assert await collect(client, params) == "Hello from the "
    assert server.requests[0]["stop"] == ["model"]


async def test_many_conversations_share_one_pooled_client(server: FakeOpenAI,
                                                          client: OpenAIGenerator) -> None:
    server.reply = "a longer reply " * 20
    replies = await asyncio.gather(*(collect(client) for _ in range(32)))
    assert replies == [server.reply] * 32
    assert server.max_running > 1  # streamed side by side, not one after another


def test_token_counts_fall_back_to_a_documented_estimate(tmp_path: Path) -> None:
    counter = local_counter(str(tmp_path / "no-such-model"))
    assert isinstance(counter, EstimateCounter)
    assert counter.count("user", "x" * 400) == 100 + 4
    assert counter.truncate("abcdefgh", 1) == "abcd"


def test_the_openai_generator_needs_a_model_name(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CHINWAG_MODEL"):
        load_settings(data_dir=tmp_path, generator="openai")


async def test_a_failed_stream_through_the_manager_keeps_the_message(
        server: FakeOpenAI, client: OpenAIGenerator, store: SqlStore,
        settings: Settings) -> None:
    async with DialogueManager(store=store, generator=client, settings=settings,
                               commands=builtin_commands()) as manager:
        server.then(cut_after=2)
        sink = RecordingSink()
        await manager.handle(dm("first question"), sink)
        assert "cut the reply short" in sink.texts[-1]
        await manager.handle(dm("second question"), sink)
        assert sink.texts[-1] == server.reply
        # The failed exchange left only the question; the reply that was cut is not stored.
        contents = [m["content"] for m in server.requests[-1]["messages"]]
        assert contents == [settings.system_prompt, "first question", "second question"]


async def test_a_server_that_refuses_repetition_penalty_gets_requests_without_it(
        server: FakeOpenAI, client: OpenAIGenerator) -> None:
    params = GenerationParams(max_new_tokens=16, temperature=0.0, repetition_penalty=1.1)
    server.then(status=422, detail="Unexpected fields in the request: {'repetition_penalty'}")
    assert await collect(client, params) == server.reply
    assert await collect(client, params) == server.reply
    sent = ["repetition_penalty" in r for r in server.requests]
    assert sent == [True, False, False]  # learnt once, remembered
