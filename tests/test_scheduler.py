"""Continuous batching with the real built-in model: streaming, identical greedy output
alone and batched, cancellation, the queue limit, chunked prefill."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import torch

from bot.config import BUILTIN_MODEL
from bot.errors import Busy, GenerationError
from bot.generators import ChatMessage, GenerationParams, model_files
from bot.generators.eager_scheduler import EagerScheduler
from bot.generators.huggingface import TransformersGenerator
from bot.generators.scheduler import Request, eos_ids
from bot.generators.workers import WorkerPool
from tests.auxil.waiting import until

pytestmark = pytest.mark.model

CACHE = Path("~/.cache/chinwag").expanduser()
QUESTIONS = ["What is the capital of France?", "Name three colours.",
             "Write a haiku about the sea.", "What is two plus two?",
             "Tell me a fun fact about cats."]


def ask(question: str) -> list[ChatMessage]:
    return [ChatMessage("system", "You are a helpful assistant."),
            ChatMessage("user", question)]


def greedy(tokens: int = 24) -> GenerationParams:
    return GenerationParams(max_new_tokens=tokens, temperature=0.0, repetition_penalty=1.1)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def model() -> AsyncIterator[TransformersGenerator]:
    # fp32: greedy output alone and batched is identical there (bf16 rounds per batch size).
    async with TransformersGenerator(BUILTIN_MODEL, CACHE, "cpu", dtype="float32",
                                     max_sequences=8, max_queued=2,
                                     prefill_chunk=128) as generator:
        yield generator


async def reply(model: TransformersGenerator, question: str,
                params: GenerationParams | None = None, delay: float = 0.0) -> list[str]:
    await asyncio.sleep(delay)
    return [piece async for piece in model.stream(ask(question), params or greedy())]


@pytest.mark.asyncio(loop_scope="module")
async def test_greedy_output_is_the_same_alone_and_batched(
        model: TransformersGenerator) -> None:
    alone = ["".join(await reply(model, q)) for q in QUESTIONS]
    # All five at once, arriving at different moments, one of them sampling meanwhile.
    sampled = GenerationParams(max_new_tokens=24, temperature=0.9, top_p=0.9)
    together = await asyncio.gather(
        *(reply(model, q, delay=0.05 * n) for n, q in enumerate(QUESTIONS)),
        reply(model, "Say something random.", sampled))
    assert ["".join(pieces) for pieces in together[:5]] == alone
    assert all(len(pieces) > 3 for pieces in together[:5])  # streamed, piece by piece
    assert model.scheduler is not None and model.scheduler.max_batch >= 4


@pytest.mark.asyncio(loop_scope="module")
async def test_a_cancelled_request_frees_its_slot(model: TransformersGenerator) -> None:
    scheduler = model.scheduler
    assert scheduler is not None
    stream = model.stream(ask("Count from one to two hundred."), greedy(300))
    pieces = [await anext(stream) for _ in range(3)]
    assert pieces
    await stream.aclose()  # the user is gone: /stop, a deleted chat, shutdown
    for _ in range(200):
        if not scheduler._rows and scheduler._count == 0:
            break
        await asyncio.sleep(0.01)
    assert not scheduler._rows and scheduler._count == 0


@pytest.mark.asyncio(loop_scope="module")
async def test_beyond_the_queue_limit_the_answer_is_busy_at_once(
        model: TransformersGenerator) -> None:
    scheduler = model.scheduler
    assert scheduler is not None
    gate = asyncio.Event()

    async def held(question: str) -> None:
        async for _piece in model.stream(ask(question), greedy(200)):
            await gate.wait()
            break

    # 8 generating + 2 queued fill it; the next is refused without waiting.
    tasks = [asyncio.create_task(held(f"Question {n}?")) for n in range(10)]
    for _ in range(500):
        if scheduler._count == 10:
            break
        await asyncio.sleep(0.01)
    assert scheduler._count == 10
    with pytest.raises(Busy, match="try again shortly"):
        await anext(model.stream(ask("One more?"), greedy()))
    gate.set()
    await asyncio.gather(*tasks)


@pytest.mark.asyncio(loop_scope="module")
async def test_a_long_prompt_does_not_stall_the_others(model: TransformersGenerator) -> None:
    short_pieces: list[float] = []
    long_first: list[float] = []
    loop = asyncio.get_running_loop()

    async def short() -> None:
        async for _piece in model.stream(ask("Name the planets."), greedy(60)):
            short_pieces.append(loop.time())

    async def long() -> None:
        essay = "Here is a long story about a lighthouse keeper. " * 150  # ~1,500 tokens
        async for _piece in model.stream(ask(essay + "Summarise it."), greedy(4)):
            long_first.append(loop.time())
            break

    first = asyncio.create_task(short())
    for _ in range(2000):
        if short_pieces:
            break
        await asyncio.sleep(0.005)
    await asyncio.gather(first, long())
    # The long prompt was prefilled in chunks between decoding steps: the short reply kept
    # streaming meanwhile instead of waiting for the whole prefill.
    during = [t for t in short_pieces if t < long_first[0]]
    assert len(during) >= 5, (len(during), len(short_pieces))


@pytest.mark.asyncio(loop_scope="module")
async def test_worker_processes_give_the_same_greedy_replies(
        model: TransformersGenerator) -> None:
    alone = ["".join(await reply(model, q)) for q in QUESTIONS[:4]]
    async with TransformersGenerator(BUILTIN_MODEL, CACHE, "cpu", dtype="float32",
                                     workers=2) as pooled:
        together = await asyncio.gather(*(reply(pooled, q) for q in QUESTIONS[:4]))
        assert ["".join(pieces) for pieces in together] == alone
        # A cancelled stream is forwarded to its worker, which frees the slot.
        stream = pooled.stream(ask("Count from one to two hundred."), greedy(300))
        await anext(stream)
        await stream.aclose()
        pool = pooled.scheduler
        assert isinstance(pool, WorkerPool)
        await until(lambda: not pool._where, "the cancelled request to end", within=3)
        assert all(worker.load == 0 for worker in pool._workers)


class _RunsOutOfMemory:
    """The model, except that its next forward pass fails as CUDA does when memory runs out."""

    def __init__(self, model: object) -> None:
        self._model = model
        self.failed = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._model, name)

    def __call__(self, *args: object, **kwargs: object) -> object:
        if not self.failed:
            import torch

            self.failed = True
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self._model(*args, **kwargs)  # type: ignore[operator]


@pytest.mark.asyncio(loop_scope="module")
async def test_out_of_memory_fails_the_batch_clearly_and_the_next_request_works(
        model: TransformersGenerator) -> None:
    from bot.errors import GenerationError

    scheduler = model.scheduler
    assert scheduler is not None and hasattr(scheduler, "_model")
    real = scheduler._model  # type: ignore[union-attr]
    faulty = _RunsOutOfMemory(real)
    scheduler._model = faulty  # type: ignore[union-attr]
    try:
        with pytest.raises(GenerationError, match="ran out of memory"):
            async for _piece in model.stream(ask(QUESTIONS[0]), greedy(8)):
                pass
    finally:
        scheduler._model = real  # type: ignore[union-attr]
    assert faulty.failed
    pieces = [piece async for piece in model.stream(ask(QUESTIONS[3]), greedy(8))]
    assert "".join(pieces).strip()
    # The last piece reaches the stream before the scheduler thread drops the finished row.
    for _ in range(500):
        if not scheduler._rows and scheduler._count == 0:  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.01)
    assert not scheduler._rows and scheduler._count == 0  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def spare() -> Any:
    """The built-in model once more, for a test's own scheduler: while the module's
    generator serves its model, the slot engine has that model to itself (on the CPU its
    layers run fused, for the engine only)."""
    return model_files.load(BUILTIN_MODEL, CACHE, "cpu", torch.float32)[1]


def own_scheduler(spare: Any, **limits: float) -> EagerScheduler:
    """A second scheduler (the eager one), so the module's one stays sound."""
    scheduler = EagerScheduler(spare, eos_ids=eos_ids(spare), **limits)  # type: ignore[arg-type]
    scheduler.start()
    return scheduler


@pytest.mark.asyncio(loop_scope="module")
async def test_a_scheduler_whose_thread_died_is_unhealthy_and_ends_its_requests(
        model: TransformersGenerator, spare: Any) -> None:
    assert model.health() is None
    scheduler = own_scheduler(spare)
    assert scheduler.health() is None
    prompt = model.prompt_ids(ask(QUESTIONS[0]))

    def broken(item: object) -> None:  # an emit that fails, as one on a closed loop does
        raise RuntimeError("Event loop is closed")

    outcomes: list[object] = []
    scheduler.submit(Request(prompt, greedy(8), broken))
    scheduler.submit(Request(prompt, greedy(8), outcomes.append))
    await until(lambda: scheduler._thread is not None and not scheduler._thread.is_alive(),
                "the thread to end", within=30)
    assert "died" in (scheduler.health() or "")
    # The request that shared its batch is told instead of waiting forever.
    assert isinstance(outcomes[-1], GenerationError)
    with pytest.raises(GenerationError, match="not running"):
        scheduler.submit(Request(prompt, greedy(8), outcomes.append))


@pytest.mark.asyncio(loop_scope="module")
async def test_a_scheduler_that_stops_stepping_with_work_is_unhealthy_until_it_steps(
        model: TransformersGenerator, spare: Any) -> None:
    scheduler = own_scheduler(spare, stall_after=0.3)
    release, stuck = threading.Event(), threading.Event()

    def slow(item: object) -> None:  # holds the scheduler thread, as a hung step would
        stuck.set()
        release.wait()

    scheduler.submit(Request(model.prompt_ids(ask(QUESTIONS[1])), greedy(4), slow))
    try:
        await until(stuck.is_set, "the first token", within=30)
        await until(lambda: scheduler.health() is not None, "unhealthy", within=10)
        assert "not stepped" in (scheduler.health() or "")
    finally:
        release.set()
    await until(lambda: scheduler._count == 0, "the request to finish", within=30)
    assert scheduler.health() is None
    scheduler.stop()
    assert scheduler.health() is not None
