"""Worker processes with the real built-in model: overload answers ``Busy`` without harming
a worker, a killed worker is noticed at once and replaced, and a start that cannot finish
fails cleanly."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from bot.config import BUILTIN_MODEL
from bot.errors import Busy, GenerationError, ModelUnavailable
from bot.generators import ChatMessage, GenerationParams
from bot.generators.huggingface import TransformersGenerator
from bot.generators.workers import WorkerPool
from tests.auxil.waiting import until

pytestmark = pytest.mark.model

CACHE = Path("~/.cache/chinwag").expanduser()
RESTART_TIMEOUT_S = 180.0


def ask(question: str) -> list[ChatMessage]:
    return [ChatMessage("system", "You are a helpful assistant."),
            ChatMessage("user", question)]


def tokens(count: int) -> GenerationParams:
    return GenerationParams(max_new_tokens=count, temperature=0.0)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pooled() -> AsyncIterator[TransformersGenerator]:
    # Two workers taking one sequence each, plus one queued: the pool takes three.
    async with TransformersGenerator(BUILTIN_MODEL, CACHE, "cpu", workers=2,
                                     max_sequences=1, max_queued=1) as generator:
        yield generator


def pool_of(generator: TransformersGenerator) -> WorkerPool:
    pool = generator.scheduler
    assert isinstance(pool, WorkerPool)
    return pool


async def whole(generator: TransformersGenerator, question: str, count: int) -> str:
    return "".join([piece async for piece in generator.stream(
        ask(question), tokens(count), ignore_eos=True)])


@pytest.mark.asyncio(loop_scope="module")
async def test_beyond_the_pools_limits_the_answer_is_busy_and_no_worker_dies(
        pooled: TransformersGenerator) -> None:
    pool = pool_of(pooled)
    pids = [worker.process.pid for worker in pool._workers]
    replies = [asyncio.create_task(whole(pooled, f"Tell me about number {n}.", 60))
               for n in range(3)]
    await until(lambda: sum(w.load for w in pool._workers) == 3, "three admitted")
    with pytest.raises(Busy, match="try again shortly"):
        await anext(pooled.stream(ask("One more?"), tokens(4)))
    # Each admitted request is answered: none was handed to a worker that could not take
    # it (its scheduler would refuse it and, before, the worker died with its streams).
    done = await asyncio.wait_for(asyncio.gather(*replies), timeout=120)
    assert all(text.strip() for text in done)
    assert [worker.process.pid for worker in pool._workers] == pids
    assert all(worker.process.is_alive() for worker in pool._workers)
    await until(lambda: all(w.load == 0 for w in pool._workers), "loads back to 0")
    assert pooled.health() is None


@pytest.mark.asyncio(loop_scope="module")
async def test_a_killed_worker_ends_its_streams_at_once_and_is_replaced(
        pooled: TransformersGenerator) -> None:
    pool = pool_of(pooled)
    assert pooled.health() is None
    stream = pooled.stream(ask("Count from one to a thousand."), tokens(2000), ignore_eos=True)
    for _ in range(3):
        await anext(stream)
    [victim] = [worker for worker in pool._workers if worker.load]
    loop = asyncio.get_running_loop()
    killed_at = loop.time()
    os.kill(victim.process.pid, signal.SIGKILL)  # as the OOM killer does

    async def drain() -> None:
        async for _piece in stream:
            pass

    with pytest.raises(GenerationError, match="worker process died"):
        await asyncio.wait_for(drain(), timeout=30)
    assert loop.time() - killed_at < 1.0
    assert pooled.health() is not None  # the replacement is still loading the model
    assert all(worker.load == 0 for worker in pool._workers)
    await until(lambda: pooled.health() is None, "the restart", within=RESTART_TIMEOUT_S)
    assert victim not in pool._workers and len(pool._workers) == 2
    # Both workers answer again: three requests at once fill the pool.
    replies = await asyncio.wait_for(asyncio.gather(
        *(whole(pooled, f"Say hello number {n}.", 8) for n in range(3))), timeout=120)
    assert all(text.strip() for text in replies)


def test_a_start_that_times_out_raises_model_unavailable_and_leaves_no_process() -> None:
    pool = WorkerPool(BUILTIN_MODEL, CACHE, 2, ready_timeout=0.2)
    with pytest.raises(ModelUnavailable, match="did not load the model within"):
        pool.start()
    assert pool._workers and not any(w.process.is_alive() for w in pool._workers)


def test_a_worker_that_cannot_load_the_model_fails_the_start(tmp_path: Path) -> None:
    pool = WorkerPool(str(tmp_path / "no-such-model"), CACHE, 1)
    with pytest.raises(ModelUnavailable, match="worker 0: cannot load model"):
        pool.start()
    assert not any(w.process.is_alive() for w in pool._workers)
