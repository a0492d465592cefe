"""The OpenAI-compatible client against real servers: `chinwag serve` (Chinwag's own
generator behind HTTP) and `transformers serve` (Hugging Face's server) with the built-in
model loaded from its cached safetensors folder."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
import pytest_asyncio

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
from tests.auxil.sinks import RecordingSink

CACHE = Path("~/.cache/chinwag").expanduser()
ASK = [ChatMessage("system", "You are a helpful assistant."),
       ChatMessage("user", "What is the capital of France?")]
GREEDY = GenerationParams(max_new_tokens=24, temperature=0.0, repetition_penalty=1.1)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


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


# The real built-in model behind `chinwag serve`.

@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def model() -> AsyncIterator[TransformersGenerator]:
    async with TransformersGenerator(BUILTIN_MODEL, CACHE, "cpu") as generator:
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
