"""Worker processes with the real built-in model: overload answers ``Busy`` without harming
a worker, a killed worker is noticed at once and replaced, and a start that cannot finish
fails cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import queue
import signal
import struct
import termios
import time
from collections.abc import AsyncIterator
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from bot.config import BUILTIN_MODEL
from bot.errors import Busy, GenerationError, ModelUnavailable
from bot.generators import ChatMessage, GenerationParams, model_files
from bot.generators.huggingface import TransformersGenerator
from bot.generators.scheduler import Request
from bot.generators.workers import RESTART_BACKOFF_S, WorkerPool
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
    # Liveness: the other worker answers while this one's replacement loads the model.
    assert pooled.health() is None
    assert all(worker.load == 0 for worker in pool._workers)
    await until(lambda: all(w.ready for w in pool._workers), "the restart",
                within=RESTART_TIMEOUT_S)
    assert victim not in pool._workers and len(pool._workers) == 2
    # Both workers answer again: three requests at once fill the pool.
    replies = await asyncio.wait_for(asyncio.gather(
        *(whole(pooled, f"Say hello number {n}.", 8) for n in range(3))), timeout=120)
    assert all(text.strip() for text in replies)


async def test_a_conversations_next_turn_goes_to_the_worker_that_keeps_it() -> None:
    async with TransformersGenerator(BUILTIN_MODEL, CACHE, "cpu", workers=2,
                                     max_sequences=1, max_queued=0,
                                     prefix_cache_mb=64) as generator:
        pool = pool_of(generator)
        first, second = pool._workers
        # A long reply holds the first worker, so the conversation goes to the second.
        long = generator.stream(ask("Count from one to a thousand."), tokens(2000),
                                ignore_eos=True)
        await anext(long)
        assert (first.load, second.load) == (1, 0)
        question = "What is the capital of France? Say it in a sentence."
        reply = await whole(generator, question, 12)
        await long.aclose()  # stopped: the first worker is idle again
        await until(lambda: first.load == 0, "the long reply's end")
        # Both idle: the least loaded would be the first; the second keeps the conversation.
        turn = generator.stream([*ask(question), ChatMessage("assistant", reply),
                                 ChatMessage("user", "And of Italy?")], tokens(4))
        await anext(turn)
        assert (first.load, second.load) == (0, 1)
        await turn.aclose()
        await until(lambda: pool.stats().prompt_tokens_reused > 0,
                    "the second worker's report of what it reused", within=10)


async def test_a_kept_conversation_is_not_queued_behind_a_reply_while_a_row_is_free() -> None:
    """Waiting for a row costs a whole reply, not ``LOAD_TOKENS`` of prefill: a next turn
    must not queue on its keeper while another worker has a free row."""
    async with TransformersGenerator(BUILTIN_MODEL, CACHE, "cpu", workers=2,
                                     max_sequences=1, max_queued=2,
                                     prefix_cache_mb=64) as generator:
        pool = pool_of(generator)
        first, second = pool._workers
        question = "Add these up: " + " + ".join(str(n) for n in range(100, 250))
        reply = await whole(generator, question, 4)  # both idle: the first worker keeps it
        assert first.served.longest(generator.prompt_ids(ask(question))) > 300
        long = generator.stream(ask("Count from one to a thousand."), tokens(2000),
                                ignore_eos=True)
        await anext(long)  # a new conversation: equals, so the first worker's one row
        assert (first.load, second.load) == (1, 0)
        turn = generator.stream([*ask(question), ChatMessage("assistant", reply),
                                 ChatMessage("user", "And the average?")], tokens(4))
        started = asyncio.create_task(anext(turn))
        try:
            await until(lambda: first.load + second.load == 2, "the next turn submitted")
            assert (first.load, second.load) == (1, 1), \
                "queued behind a 2000-token reply while the second worker's row was free"
        finally:
            started.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await started
            await long.aclose()
            await turn.aclose()


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


@pytest.mark.asyncio(loop_scope="module")
async def test_a_worker_killed_while_it_reloads_is_restarted_after_a_backoff(
        pooled: TransformersGenerator) -> None:
    pool = pool_of(pooled)
    first = pool._workers[0]
    os.kill(first.process.pid, signal.SIGKILL)
    await until(lambda: pool._workers[0] is not first, "a replacement")
    second = pool._workers[0]
    os.kill(second.process.pid, signal.SIGKILL)  # the OOM killer, while it loads the model
    killed_at = time.monotonic()
    # Not given up for good ("dying while loading would only happen again"): a crash is not
    # a load error. Started again, after a wait.
    await until(lambda: pool._workers[0] is not second, "a third start", within=30)
    third = pool._workers[0]
    assert third.started - killed_at >= RESTART_BACKOFF_S[0] - 0.05
    assert pooled.health() is None  # worker 1 serves meanwhile
    await until(lambda: third.ready, "the third start to load", within=RESTART_TIMEOUT_S)
    assert [piece async for piece in pooled.stream(ask("Hi."), tokens(4))]


def prompt() -> list[int]:
    tokenizer, _config = model_files.load_tokenizer(BUILTIN_MODEL, CACHE)
    return list(tokenizer.apply_chat_template(
        [{"role": "user", "content": "Count from one to a thousand."}],
        add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def request(ids: list[int], count: int) -> tuple[Request, queue.SimpleQueue[Any]]:
    items: queue.SimpleQueue[Any] = queue.SimpleQueue()
    return Request(ids, tokens(count), items.put, ignore_eos=True), items


async def until_end(items: queue.SimpleQueue[Any], within: float) -> list[Any]:
    """Every item a request gets, up to its end (``None`` or an exception)."""
    got: list[Any] = []
    while not got or not (got[-1] is None or isinstance(got[-1], BaseException)):
        got.append(await asyncio.to_thread(items.get, timeout=within))
    return got


def unread_bytes(pool: WorkerPool, index: int) -> int:
    buffer = fcntl.ioctl(pool._workers[index].results.fileno(), termios.FIONREAD,
                         struct.pack("i", 0))
    return int(struct.unpack("i", buffer)[0])


@pytest.mark.asyncio(loop_scope="module")
async def test_what_a_worker_sent_before_it_died_is_delivered() -> None:
    ids = prompt()
    # No heartbeats in this test, so the bytes in the pipe are exactly the tokens sent.
    pool = WorkerPool(BUILTIN_MODEL, CACHE, 1, heartbeat=3600)
    await asyncio.to_thread(pool.start)
    try:
        whole, items = request(ids, 6)
        pool.submit(whole)
        expected = await until_end(items, 60)  # greedy: the same six tokens again below
        assert len(expected) == 7 and expected[-1] is None
        again, items = request(ids, 6)
        worker = pool._workers[0]
        sent = sum(4 + len(ForkingPickler.dumps((1, item))) for item in expected)
        pool.submit(again)
        with pool._lock:  # before its first token: the parent's reader falls behind
            await until(lambda: unread_bytes(pool, 0) == sent, "the whole reply in the pipe")
            os.kill(worker.process.pid, signal.SIGKILL)  # then it is killed
            assert wait([worker.process.sentinel], timeout=10)
        # Its reply had been sent whole: it arrives whole, not cut off by the death.
        assert await until_end(items, 10) == expected
    finally:
        await asyncio.to_thread(pool.stop)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_worker_that_stops_answering_with_work_is_unhealthy_then_replaced() -> None:
    ids = prompt()
    pool = WorkerPool(BUILTIN_MODEL, CACHE, 2, max_sequences=2, max_queued=0,
                      stall_after=1.0, kill_after=4.0)
    await asyncio.to_thread(pool.start)
    try:
        assert pool.health() is None
        stuck, items = request(ids, 2000)
        pool.submit(stuck)
        await asyncio.to_thread(items.get, timeout=60)
        [hung] = [w for w in pool._workers if w.load]
        os.kill(hung.process.pid, signal.SIGSTOP)  # alive, holding its request, silent
        await until(lambda: "has not answered" in (pool.health() or ""), "unhealthy",
                    within=10)
        for _ in range(2):  # new requests go to the worker that answers
            pool.submit(request(ids, 1)[0])
        assert hung.load == 1
        # After kill_after its stream ends clearly and the worker is started again.
        ended = await until_end(items, 30)
        assert isinstance(ended[-1], GenerationError)
        assert "stopped answering" in str(ended[-1])
        await until(lambda: all(w.ready for w in pool._workers) and hung not in pool._workers,
                    "the replacement", within=RESTART_TIMEOUT_S)
        await until(lambda: pool.health() is None, "healthy again")
    finally:
        if hung.process.is_alive():
            os.kill(hung.process.pid, signal.SIGCONT)
        await asyncio.to_thread(pool.stop)


def linked_model(folder: Path) -> Path:
    """The built-in model as a folder of links, so that it can vanish after the start."""
    converted = Path(model_files.local_weights(model_files.resolve(BUILTIN_MODEL), CACHE))
    folder.mkdir()
    for file in converted.iterdir():
        (folder / file.name).symlink_to(file)
    return folder


def unlink_all(folder: Path) -> None:
    for link in folder.iterdir():
        link.unlink()


@pytest.mark.asyncio(loop_scope="module")
async def test_a_load_that_keeps_failing_is_given_up_with_its_reason_and_no_process(
        tmp_path: Path) -> None:
    folder = linked_model(tmp_path / "model")
    pool = WorkerPool(str(folder), CACHE, 1)
    await asyncio.to_thread(pool.start)
    try:
        first = pool._workers[0]
        unlink_all(folder)  # the model vanishes
        os.kill(first.process.pid, signal.SIGKILL)
        await until(lambda: pool._workers[0].failed is not None, "the pool to give up",
                    within=RESTART_TIMEOUT_S)
        last = pool._workers[0]
        assert last is not first
        health = pool.health() or ""
        # The load's own error, not "exited with code 0 while loading".
        assert "no worker can serve" in health and "cannot load model" in health, health
        assert last.results.closed and not last.process.is_alive()
        assert last.process.exitcode == 0
        with pytest.raises(Busy):
            pool.ensure_room()
    finally:
        await asyncio.to_thread(pool.stop)
