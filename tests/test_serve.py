"""The OpenAI-compatible client against real servers: `chinwag serve` (Chinwag's own
generator behind HTTP) and `transformers serve` (Hugging Face's server) with the built-in
model loaded from its cached safetensors folder."""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import openai
import pytest
import pytest_asyncio
from openai.types.chat import ChatCompletionContentPartParam

from adapters.openai_server import OpenAIServer
from bot.builtin_commands import builtin_commands
from bot.config import BUILTIN_MODEL, Settings
from bot.dialogue import DialogueManager
from bot.errors import GenerationError
from bot.generators import ChatMessage, GenerationParams
from bot.generators.echo import EchoGenerator
from bot.generators.huggingface import TransformersGenerator
from bot.generators.openai_compat import OpenAIGenerator, local_counter
from bot.generators.tokens import EstimateCounter, TemplateCounter
from storage.repository import SqlStore
from tests.auxil.factories import dm
from tests.auxil.generators import SickGenerator
from tests.auxil.loopback import wait_until
from tests.auxil.sinks import RecordingSink

CACHE = Path("~/.cache/chinwag").expanduser()
ASK = [ChatMessage("system", "You are a helpful assistant."),
       ChatMessage("user", "What is the capital of France?")]
GREEDY = GenerationParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.1)


async def collect(generator: OpenAIGenerator, params: GenerationParams = GREEDY) -> str:
    return "".join([piece async for piece in generator.stream(ASK, params)])


# `chinwag serve` with the echo generator: the protocol, fast.

@pytest.fixture
async def echo_server() -> AsyncIterator[OpenAIServer]:
    async with EchoGenerator(pieces=4) as generator, OpenAIServer(
        generator, "chinwag-echo", host="127.0.0.1", port=0, api_key="sk-serve",
    ) as server:
        yield server


async def test_chinwag_serve_streams_to_the_client(echo_server: OpenAIServer) -> None:
    async with OpenAIGenerator(echo_server.url, "chinwag-echo", "sk-serve",
                               counter=EstimateCounter()) as client:
        pieces = [p async for p in client.stream(ASK, GREEDY)]
        assert "".join(pieces) == ASK[-1].content and len(pieces) == 4
        stopped = GenerationParams(max_new_tokens=24, temperature=0.0, stop=("France",))
        assert await collect(client, stopped) == "What is the capital of "
        replies = await asyncio.gather(*(collect(client) for _ in range(16)))
        assert replies == [ASK[-1].content] * 16


async def test_chinwag_serve_answers_without_streaming_and_lists_its_model(
        echo_server: OpenAIServer) -> None:
    headers = {"Authorization": "Bearer sk-serve"}
    async with httpx.AsyncClient(base_url=echo_server.url, headers=headers) as http:
        answer = (await http.post("/chat/completions", json={
            "model": "chinwag-echo", "messages": [{"role": "user", "content": "hi there"}],
        })).json()
        assert answer["choices"][0]["message"] == {"role": "assistant", "content": "hi there"}
        assert answer["usage"]["completion_tokens"] == 2
        models = (await http.get("/models")).json()
        assert [m["id"] for m in models["data"]] == ["chinwag-echo"]
        assert (await http.get(echo_server.url.removesuffix("/v1") + "/health")).json() == {
            "status": "ok"}


@pytest.mark.parametrize(("body", "status"), [
    ({"messages": []}, 400),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, 400),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400),
    ({"messages": [{"role": "user", "content": ["just a string"]}]}, 400),
])
async def test_chinwag_serve_refuses_bad_requests_clearly(echo_server: OpenAIServer,
                                                         body: dict[str, object],
                                                         status: int) -> None:
    async with httpx.AsyncClient(base_url=echo_server.url,
                                 headers={"Authorization": "Bearer sk-serve"}) as http:
        response = await http.post("/chat/completions", json=body)
    assert response.status_code == status
    assert response.json()["error"]["message"]


async def test_chinwag_serve_checks_the_api_key(echo_server: OpenAIServer) -> None:
    async with OpenAIGenerator(echo_server.url, "chinwag-echo", "wrong",
                               counter=EstimateCounter()) as client:
        with pytest.raises(GenerationError, match="401"):
            await collect(client)


async def test_chinwag_serve_health_asks_the_generator() -> None:
    async with SickGenerator() as generator, OpenAIServer(
            generator, "chinwag-echo", host="127.0.0.1", port=0) as server, \
            httpx.AsyncClient() as http:
        health = server.url.removesuffix("/v1") + "/health"
        assert (await http.get(health)).status_code == 200
        generator.trouble = "the scheduler has not stepped for 30 s with 3 requests queued"
        response = await http.get(health)
        assert response.status_code == 503
        assert response.json() == {"status": "unavailable", "reason": generator.trouble}
        generator.trouble = None
        assert (await http.get(health)).json() == {"status": "ok"}


async def test_chinwag_serve_takes_content_as_a_list_of_text_parts(
        echo_server: OpenAIServer) -> None:
    async with openai.AsyncOpenAI(base_url=echo_server.url, api_key="sk-serve",
                                  max_retries=0) as oai:
        parts: list[ChatCompletionContentPartParam] = [
            {"type": "text", "text": "first part"}, {"type": "text", "text": "second"}]
        answer = await oai.chat.completions.create(
            model="chinwag-echo", messages=[{"role": "user", "content": parts}])
        assert answer.choices[0].message.content == "first part\nsecond"
        picture: ChatCompletionContentPartParam = {
            "type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
        with pytest.raises(openai.BadRequestError) as refused:
            await oai.chat.completions.create(model="chinwag-echo", messages=[
                {"role": "user", "content": [parts[0], picture]}])
        assert refused.value.status_code == 400
        assert "image_url" in refused.value.message and "text" in refused.value.message


class SmallWindowGenerator(EchoGenerator):
    """Echo with a 50-token window: a 10-word user message is 14 tokens, plus 2 overhead."""

    @property
    def context_window(self) -> int | None:
        return 50


async def test_chinwag_serve_refuses_a_request_beyond_the_context_window() -> None:
    ten_words = "one two three four five six seven eight nine ten"
    async with SmallWindowGenerator() as generator, OpenAIServer(
            generator, "chinwag-echo", host="127.0.0.1", port=0) as server, \
            httpx.AsyncClient(base_url=server.url) as http:
        def body(max_tokens: int, stream: bool = False) -> dict[str, object]:
            return {"model": "chinwag-echo", "max_tokens": max_tokens, "stream": stream,
                    "messages": [{"role": "user", "content": ten_words}]}

        fits = await http.post("/chat/completions", json=body(50 - 16))
        assert fits.status_code == 200 and fits.json()["usage"]["prompt_tokens"] == 16
        for stream in (False, True):
            refused = await http.post("/chat/completions", json=body(50 - 16 + 1, stream))
            assert refused.status_code == 400
            error = refused.json()["error"]
            assert error["code"] == "context_length_exceeded"
            assert "context window of 50" in error["message"]
            assert "16" in error["message"] and "35" in error["message"]


class ThreadNotingGenerator(EchoGenerator):
    """Echo that notes which thread each token count runs on."""

    def __init__(self) -> None:
        super().__init__()
        self.count_threads: set[int] = set()

    def count_tokens(self, role: str, text: str) -> int:
        self.count_threads.add(threading.get_ident())
        return super().count_tokens(role, text)


async def test_chinwag_serve_counts_tokens_off_the_event_loop() -> None:
    async with ThreadNotingGenerator() as generator, OpenAIServer(
            generator, "chinwag-echo", host="127.0.0.1", port=0) as server, \
            OpenAIGenerator(server.url, "chinwag-echo", counter=EstimateCounter()) as client, \
            httpx.AsyncClient(base_url=server.url) as http:
        assert await collect(client) == ASK[-1].content
        answer = await http.post("/chat/completions", json={
            "model": "chinwag-echo", "messages": [{"role": "user", "content": "hi there"}]})
        assert answer.json()["usage"]["prompt_tokens"] == 2 + 6
    assert generator.count_threads
    assert threading.get_ident() not in generator.count_threads


async def test_chinwag_serve_compares_the_api_key_in_constant_time(
        echo_server: OpenAIServer, monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[object] = []
    compare_digest = hmac.compare_digest

    def noting_compare_digest(a: bytes, b: bytes) -> bool:
        compared.append(a)
        return compare_digest(a, b)

    monkeypatch.setattr(hmac, "compare_digest", noting_compare_digest)
    request = {"model": "chinwag-echo", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=echo_server.url) as http:
        for key, status in [(b"Bearer sk-serve", 200), (b"Bearer sk-servf", 401),
                            ("Bearer clé".encode(), 401), (b"Bearer \xff\xfe", 401)]:
            response = await http.post("/chat/completions", json=request,
                                       headers={b"Authorization": key})
            assert response.status_code == status, key
        missing = await http.post("/chat/completions", json=request)
        assert missing.status_code == 401
    assert len(compared) == 5


# The real built-in model behind `chinwag serve`.

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def model() -> AsyncIterator[TransformersGenerator]:
    # One conversation at a time and none queued: a second one is refused as Busy.
    async with TransformersGenerator(BUILTIN_MODEL, CACHE, "cpu", max_sequences=1,
                                     max_queued=0) as generator:
        yield generator


@pytest.mark.model
@pytest.mark.asyncio(loop_scope="module")
async def test_chinwag_serve_gives_the_same_greedy_reply_as_in_process(
        model: TransformersGenerator) -> None:
    direct = "".join([p async for p in model.stream(ASK, GREEDY)])
    async with OpenAIServer(model, "builtin", host="127.0.0.1", port=0) as server, \
            OpenAIGenerator(server.url, "builtin", counter=EstimateCounter()) as client:
        assert await collect(client) == direct
    assert direct.strip()


@pytest.mark.model
@pytest.mark.asyncio(loop_scope="module")
async def test_a_busy_chinwag_serve_answers_429_and_the_client_waits_as_told(
        model: TransformersGenerator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bot.generators.openai_compat")
    holding = asyncio.Event()

    async def hold_the_only_slot() -> None:
        long = GenerationParams(max_new_tokens=4000, temperature=0.0)
        async for _ in model.stream(ASK, long, ignore_eos=True):
            holding.set()

    request = {"model": "builtin", "max_tokens": 8,
               "messages": [{"role": m.role, "content": m.content} for m in ASK]}
    async with OpenAIServer(model, "builtin", host="127.0.0.1", port=0) as server, \
            httpx.AsyncClient(base_url=server.url) as http, \
            OpenAIGenerator(server.url, "builtin", counter=EstimateCounter()) as client:
        holder = asyncio.create_task(hold_the_only_slot())
        try:
            await holding.wait()
            for stream in (False, True):
                response = await http.post("/chat/completions",
                                           json={**request, "stream": stream})
                assert response.status_code == 429, response.text
                assert int(response.headers["Retry-After"]) >= 1
                assert response.headers["Content-Type"].startswith("application/json")
                assert "try again" in response.json()["error"]["message"]
            waiting = asyncio.create_task(collect(client))
            await wait_until(lambda: "answered 429; retrying in 1.0 s" in caplog.text, 30,
                             lambda: caplog.text)
        finally:
            holder.cancel()
            await asyncio.gather(holder, return_exceptions=True)
        reply = await waiting
    direct = "".join([p async for p in model.stream(ASK, GREEDY)])
    assert reply == direct and direct.strip()


@pytest.mark.model
@pytest.mark.asyncio(loop_scope="module")
async def test_chinwag_serve_refuses_max_tokens_beyond_the_models_window(
        model: TransformersGenerator) -> None:
    window = model.context_window
    assert window is not None
    async with OpenAIServer(model, "builtin", host="127.0.0.1", port=0) as server, \
            httpx.AsyncClient(base_url=server.url) as http:
        response = await http.post("/chat/completions", json={
            "model": "builtin", "max_tokens": window,
            "messages": [{"role": "user", "content": "Hi"}]})
    assert response.status_code == 400
    assert f"context window of {window}" in response.json()["error"]["message"]


# `transformers serve`, Hugging Face's own OpenAI-compatible server.

def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def hf_server() -> Iterator[tuple[str, str]]:
    from bot.generators import model_files

    folder = model_files.local_weights(model_files.resolve(BUILTIN_MODEL), CACHE)
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_PROXY": "127.0.0.1,localhost"}
    executable = Path(sys.executable).with_name("transformers")
    process = subprocess.Popen(
        [str(executable), "serve", folder, "--host", "127.0.0.1", "--port", str(port),
         "--device", "cpu"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"transformers serve did not start: "
                                     f"{process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            time.sleep(0.5)
        yield f"{url}/v1", folder
    finally:
        process.terminate()
        process.wait(30)
        assert process.stderr is not None
        process.stderr.close()


@pytest.mark.model
async def test_transformers_serve_answers_through_the_client(
        hf_server: tuple[str, str], store: SqlStore, settings: Settings) -> None:
    url, folder = hf_server
    counter = local_counter(folder)
    assert isinstance(counter, TemplateCounter)  # exact counts from the local tokenizer
    async with OpenAIGenerator(url, folder) as client:
        reply = await collect(client)
        assert "Paris" in reply
        replies = await asyncio.gather(*(collect(client) for _ in range(4)))
        assert all(r.strip() for r in replies)
        # And a whole conversation through the dialogue manager, stored in SQLite.
        async with DialogueManager(store=store, generator=client, settings=settings,
                                   commands=builtin_commands()) as manager:
            sink = RecordingSink()
            await manager.handle(dm("What is the capital of France?"), sink)
            assert sink.texts and "could not finish" not in sink.text
