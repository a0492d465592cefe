"""Finished conversations kept for their next turn (``prefix_cache.py`` and the slot
engine's use of it): a follow-up computes only what is new and replies as a full prefill
would; the budget holds; a cancelled reply is kept too; long prompts reuse past a chunk."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from bot.config import BUILTIN_MODEL
from bot.generators import model_files
from bot.generators.prefix_cache import MIN_REUSE, REMEMBERED, PrefixCache, Served
from bot.generators.slot_scheduler import SlotScheduler
from tests.auxil.schedulers import answers, greedy, running, submit
from tests.auxil.waiting import until

pytestmark = pytest.mark.model

MB = 1 << 20
CACHE = Path("~/.cache/chinwag").expanduser()


@pytest.fixture(scope="module")
def builtin() -> tuple[Any, Any]:
    """The built-in model in fp32 (a tiny random model's greedy tokens hardly depend on its
    keys and values: a reply from wrong ones would pass)."""
    return model_files.load(BUILTIN_MODEL, CACHE, "cpu", torch.float32)


@pytest.fixture(scope="module")
def llama(builtin: tuple[Any, Any]) -> Any:
    return builtin[1]


def ids(text: str, builtin: tuple[Any, Any]) -> list[int]:
    return list(builtin[0].encode(text))


def engine(model: Any, budget: int = 64 * MB, **options: Any) -> SlotScheduler:
    return SlotScheduler(model, eos_ids=[], max_sequences=4, threads=1,
                         prefix_cache_bytes=budget, **options)


async def test_a_follow_up_reuses_its_conversation_and_replies_as_a_full_prefill(
        llama: Any, builtin: tuple[Any, Any]) -> None:
    first = ids("The lighthouse keeper counted the ships that passed his rock each night, "
                "and wrote their names in a book. Name one of the ships.", builtin)
    with running(engine(llama)) as cached:
        [reply] = await answers(cached, [first], greedy(12))
        await until(lambda: len(cached.prefixes) == 1, "the reply parked")
        follow_up = [*first, *reply, *ids(" And what did he write about the weather?",
                                          builtin)]
        assert cached.prefixes.reused_tokens == 0
        [again] = await answers(cached, [follow_up], greedy(12))
        # Its prompt and reply but the last token (never fed): all reused.
        assert cached.prefixes.reused_tokens == len(first) + len(reply) - 1
        # The follow-up, parked in turn, replaced the turn it extends. (Parked just after its
        # end is told: a test's reply hears of it at once, on the scheduler's thread.)
        whole = [*follow_up, *again]
        await until(lambda: cached.prefixes.match(whole, len(whole))[0] == len(whole) - 1,
                    "the follow-up parked")
        assert len(cached.prefixes) == 1
        await until(lambda: cached.stats().prompt_tokens_reused
                    == cached.prefixes.reused_tokens, "the step's figures")
    with running(engine(llama, budget=0)) as fresh:
        assert await answers(fresh, [follow_up], greedy(12)) == [again]
        assert fresh.prefixes.reused_tokens == 0 and len(fresh.prefixes) == 0


async def test_a_long_follow_up_reuses_past_the_prefill_chunk(
        llama: Any, builtin: tuple[Any, Any]) -> None:
    first = ids("A story about a baker. " * 8 + "What did the baker bake?", builtin)
    with running(engine(llama, prefill_chunk=16)) as cached:
        [reply] = await answers(cached, [first], greedy(8))
        await until(lambda: len(cached.prefixes) == 1, "the reply parked")
        # New tokens over several chunks of 16.
        follow_up = [*first, *reply, *ids(" Tell me more about the bread, the oven and the "
                                          "town where the baker lived, please." * 2, builtin)]
        assert len(follow_up) - len(first) - len(reply) > 32
        [again] = await answers(cached, [follow_up], greedy(8))
        assert cached.prefixes.reused_tokens == len(first) + len(reply) - 1
    with running(engine(llama, budget=0, prefill_chunk=16)) as fresh:
        assert await answers(fresh, [follow_up], greedy(8)) == [again]


async def test_a_cancelled_reply_is_kept_and_a_different_conversation_computes_all(
        llama: Any, builtin: tuple[Any, Any]) -> None:
    first = ids("Write a long poem about the sea and its many moods, please.", builtin)
    with running(engine(llama)) as cached:
        request, reply = submit(cached, first, greedy(500))
        await until(lambda: len(reply.tokens) >= 5, "a few tokens")
        request.cancelled.set()
        await until(lambda: reply.ended, "the cancelled reply's end")
        await until(lambda: len(cached.prefixes) == 1, "the cancelled reply parked")
        other = ids("What is the capital of France? Answer in one word.", builtin)
        assert other[0] != first[0]
        await answers(cached, [other], greedy(4))
        assert cached.prefixes.reused_tokens == 0
        kept = len(first) + len(reply.tokens) - 1
        await answers(cached, [[*first, *reply.tokens, *ids(" Thanks!", builtin)]],
                      greedy(4))
        assert cached.prefixes.reused_tokens == kept


def states(tokens: int) -> torch.Tensor:
    """A row's keys and values for ``tokens`` positions: 1 KiB a token."""
    return torch.randn(2, 2, 2, tokens, 32, dtype=torch.float32)


def test_the_budget_evicts_the_least_recently_used() -> None:
    cache = PrefixCache(100 * 1024)
    a, b, c = ([seed] * 40 for seed in (1, 2, 3))
    cache.park(a, states(40))
    cache.park(b, states(40))
    assert cache.match([*a, 9], 40)[0] == 40  # a is now the most recently used
    cache.park(c, states(40))  # 120 KiB asked of 100: b goes
    assert cache.bytes == 80 * 1024 and len(cache) == 2
    assert cache.match([*b, 9], 40) == (0, None)
    assert cache.match([*a, 9], 40)[0] == 40
    assert cache.match([*c, 9], 40)[0] == 40

    cache.park(list(range(200)), states(200))  # larger than the whole budget: not kept
    assert len(cache) == 2 and cache.bytes == 80 * 1024
    cache.park([4] * (MIN_REUSE - 1), states(MIN_REUSE - 1))  # too short to be worth it
    assert len(cache) == 2


def test_matching_finds_the_longest_shared_start_within_the_limit() -> None:
    cache = PrefixCache(1 << 30)
    stored = list(range(100))
    cache.park(stored, states(100))
    cache.park([*range(30), 500, 501, *range(32, 60)], states(60))
    assert cache.match([*range(64), 7, 7], 1000)[0] == 64
    assert cache.match([*range(100), 5], 50)[0] == 50  # capped at the limit
    assert cache.match([*range(MIN_REUSE - 1), 999], 1000) == (0, None)  # too little
    assert cache.match([*range(30), 500, 501, 32, 33], 1000)[0] == 34
    length, entry = cache.match([*range(77), 1], 1000)
    assert length == 77 and entry is not None
    target = torch.zeros(2, 2, 2, 77, 32)
    cache.restore(entry, 77, target)
    assert torch.equal(target, entry.states[:, :, :, :77])
    # A turn that extends a kept conversation replaces it.
    cache.park([*range(120)], states(120))
    assert len(cache) == 2
    assert cache.match([*range(110)], 1000)[0] == 110


def test_a_pool_remembers_what_each_worker_served() -> None:
    served = Served()
    served.remember(list(range(40)))
    served.remember([7] * (MIN_REUSE - 1))  # too short to be kept anywhere
    assert served.longest([*range(30), 99]) == 30
    assert served.longest(list(range(40))) == 39  # its last token is always computed
    assert served.longest([7] * 40) == 0
    assert served.longest([*range(MIN_REUSE - 1), 99]) == 0
    assert served.longest([]) == 0
    for seed in range(REMEMBERED):  # the oldest is forgotten
        served.remember([1000 + seed] * 20)
    assert served.longest([*range(30), 99]) == 0
    assert served.longest([1000 + REMEMBERED - 1] * 30) == 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory needs CUDA")
def test_on_cuda_conversations_are_parked_in_pinned_host_memory() -> None:
    cache = PrefixCache(1 << 30, pinned=True)
    device = torch.device("cuda")
    row = torch.randn(4, 2, 3, 300, 64, device=device)
    cache.park(list(range(200)), row[:, :, :, :200])
    length, entry = cache.match([*range(150), 7], 1000)
    assert length == 150 and entry is not None
    assert entry.states.device.type == "cpu" and entry.states.is_pinned()
    target = torch.zeros(4, 2, 3, 150, 64, device=device)
    cache.restore(entry, 150, target)
    row[:, :, :, :200] = 0  # the row is reused meanwhile: the parked copy is its own
    assert torch.equal(target.cpu(), entry.states[:, :, :, :150])
    torch.cuda.synchronize()
    assert target.abs().sum() > 0


async def test_the_bot_keeps_at_most_an_eighth_of_the_memory_available(
        caplog: pytest.LogCaptureFixture) -> None:
    from bot.generators.host_memory import free_memory
    from bot.generators.huggingface import PREFIX_SHARE, TransformersGenerator

    asked = 1 << 30  # MiB: a petabyte
    with caplog.at_level(logging.INFO, logger="bot.generators.huggingface"):
        async with TransformersGenerator(BUILTIN_MODEL, CACHE, "cpu", workers=1,
                                         prefix_cache_mb=asked) as model:
            scheduler = model.scheduler
            assert isinstance(scheduler, SlotScheduler)
            budget = scheduler.prefixes.budget
            available = free_memory()
    assert 0 < budget < asked << 20
    assert budget < 2 * available * PREFIX_SHARE
    assert f"CHINWAG_PREFIX_CACHE_MB={asked}: {budget >> 20} MiB kept at most" in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory needs CUDA")
def test_on_cuda_part_of_a_conversation_just_parked_is_restored_as_parked() -> None:
    """A partial match restores a slice of the parked copy that is not contiguous: torch's
    copy makes it contiguous on the host first, which must not read the pinned copy before
    the device has filled it (the device is kept busy here, as a large step would)."""
    cache = PrefixCache(1 << 30, pinned=True)
    device = torch.device("cuda")
    row = torch.randn(4, 2, 3, 300, 64, device=device)
    expected = row[:, :, :, :150].cpu()
    torch.cuda._sleep(2_000_000_000)  # type: ignore[no-untyped-call]  # about a second first
    cache.park(list(range(200)), row[:, :, :, :200])
    length, entry = cache.match([*range(150), 7], 1000)
    assert length == 150 and entry is not None
    target = torch.zeros(4, 2, 3, 150, 64, device=device)
    cache.restore(entry, 150, target)
    assert torch.equal(target.cpu(), expected)


def test_a_pool_weighs_a_kept_conversation_against_load() -> None:
    from types import SimpleNamespace

    from bot.generators.prefix_cache import LOAD_TOKENS, keeper

    system = list(range(100, 130))  # a system prompt every conversation starts with
    conversation = [*system, *range(500, 500 + 2 * LOAD_TOKENS)]
    busy = SimpleNamespace(served=Served(), load=1, rows=8)
    idle = SimpleNamespace(served=Served(), load=0, rows=8)
    busy.served.remember(conversation)
    idle.served.remember([*system, 1, 2, 3])
    # A new conversation: both keep only the system prompt; the idle worker takes it.
    assert keeper([busy, idle], [*system, 7, 8, 9]) is idle
    # This conversation's next turn: what the busy worker keeps outweighs one request.
    assert keeper([busy, idle], [*conversation, 4, 5]) is busy
    # Not two requests' worth, though.
    busy.load = 3
    assert keeper([busy, idle], [*conversation, 4, 5]) is idle
    # Equals: the least loaded.
    idle.load, busy.load = 2, 1
    assert keeper([idle, busy], [*system, 7]) is busy
    # A keeper with no free row loses to any worker with one: a row costs a whole reply.
    busy.load, busy.rows, idle.load = 1, 1, 0
    assert keeper([busy, idle], [*conversation, 4, 5]) is idle
    idle.load = idle.rows = 1  # none has a free row: what it keeps decides again
    assert keeper([busy, idle], [*conversation, 4, 5]) is busy
