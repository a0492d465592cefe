"""The slot engine (``slot_cache.py``, ``slot_scheduler.py``, ``engine.py``) against the eager
``DynamicCache`` path (``eager_scheduler.py``): the same greedy tokens in every
configuration, the fallback for the models it refuses, slot reuse, the model's window, a
failed start, the CPU cache reserved whole, and on CUDA one host sync per replayed decoding
step."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import mmap
import os
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig, MistralConfig, MistralForCausalLM

from bot.config import BUILTIN_MODEL
from bot.errors import GenerationError
from bot.generators import model_files, reserved_memory
from bot.generators.base import GenerationParams
from bot.generators.eager_scheduler import EagerScheduler
from bot.generators.engine import make_scheduler
from bot.generators.reserved_memory import no_reserve_flag, strict_overcommit
from bot.generators.scheduler import eos_ids
from bot.generators.slot_cache import ATTENTION, SlotCache, refusal, uncaptured_cache
from bot.generators.slot_scheduler import SlotScheduler
from bot.generators.static_scheduler import StaticSlotScheduler
from tests.auxil.schedulers import (
    Reply,
    alone,
    answers,
    generate,
    greedy,
    ids,
    replies,
    running,
    submit,
    tiny,
)
from tests.auxil.waiting import until

pytestmark = pytest.mark.model

CACHE = Path("~/.cache/chinwag").expanduser()
TEXTS = ["Hi", "What is the capital of France?",
         # ~245 tokens: its reply crosses the CPU cache's first length (256).
         "Here is a long story about a lighthouse keeper. " * 24 + "Summarise it."]
PENALISED = GenerationParams(max_new_tokens=20, temperature=0.0, repetition_penalty=1.1)


@pytest.fixture(scope="module")
def builtin() -> tuple[Any, Any]:
    return model_files.load(BUILTIN_MODEL, CACHE, "cpu", torch.float32)


@pytest.fixture(scope="module")
def prompts(builtin: tuple[Any, Any]) -> list[list[int]]:
    return [builtin[0].encode(text) for text in TEXTS]


@pytest.fixture(scope="module")
def reference(builtin: tuple[Any, Any], prompts: list[list[int]]) -> list[list[int]]:
    """The eager path's greedy tokens, each prompt alone."""
    model = builtin[1]
    with running(EagerScheduler(model, eos_ids=eos_ids(model), threads=1)) as eager:
        expected = asyncio.run(alone(eager, prompts, PENALISED))
    assert len({tuple(tokens) for tokens in expected}) == len(prompts)
    return expected


@pytest.fixture(scope="module")
def llama() -> Any:
    return tiny(window=2048)


@pytest.mark.parametrize("options", [{}, {"engine": StaticSlotScheduler}, {"prefill_chunk": 8},
                                     {"reserve": False}],
                         ids=["packed", "static-shapes", "chunked-prefill", "growing-cache"])
async def test_greedy_tokens_match_the_eager_path(
        builtin: tuple[Any, Any], prompts: list[list[int]], reference: list[list[int]],
        options: dict[str, Any]) -> None:
    model = builtin[1]
    settings = dict(options)
    engine = settings.pop("engine", SlotScheduler)
    scheduler = engine(model, eos_ids=eos_ids(model), max_sequences=4, threads=1, **settings)
    log: list[Reply] = []
    with running(scheduler):
        assert await alone(scheduler, prompts, PENALISED) == reference
        together = await replies(scheduler, prompts, PENALISED, log)
    assert [reply.error for reply in together] == [None] * len(prompts)
    assert [reply.tokens for reply in together] == reference
    assert scheduler.max_batch >= 2
    if "prefill_chunk" in options:
        # The short prompt decoded while the long one was prefilled, a chunk per step.
        assert log[:log.index(together[-1])].count(together[0]) >= 2


@pytest.mark.parametrize("make", [
    lambda: tiny(MistralForCausalLM, MistralConfig, sliding_window=16),
    lambda: tiny(window=32, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                             "rope_theta": 10000.0}),
], ids=["sliding-window", "dynamic-rope"])
async def test_a_refused_model_runs_on_the_eager_path_said_once(
        make: Callable[[], Any], caplog: pytest.LogCaptureFixture) -> None:
    model = make()
    reason = refusal(model)
    assert reason is not None and ("sliding-window" in reason or "'dynamic'" in reason)
    prompt = ids(40, 3)  # past the sliding window, and past the window that RoPE rescales
    expected = generate(model, prompt, 16)
    with caplog.at_level(logging.WARNING, logger="bot.generators.engine"):
        scheduler = make_scheduler(model, eos_ids=eos_ids(model), max_sequences=4, threads=1)
    assert type(scheduler) is EagerScheduler
    said = [r for r in caplog.records if r.name == "bot.generators.engine"]
    assert [r.levelno for r in said] == [logging.WARNING]
    assert reason in said[0].getMessage()
    assert model.config._attn_implementation != ATTENTION
    with running(scheduler):
        assert await answers(scheduler, [prompt], greedy(16, 1.0)) == [expected]


@pytest.mark.parametrize("reserve", [True, False], ids=["reserved", "growing"])
async def test_grouped_query_attention_reads_the_kv_heads_as_stored(
        llama: Any, reserve: bool) -> None:
    assert refusal(llama) is None
    # Six at once: where the cache grows, more rows than it starts with (4), and one
    # conversation crosses its first length (256).
    prompts = [ids(n, n) for n in (3, 17, 40, 90, 5, 250)]
    with running(EagerScheduler(llama, eos_ids=[], threads=1)) as eager:
        expected = await alone(eager, prompts, greedy(16))
    scheduler = SlotScheduler(llama, eos_ids=[], max_sequences=8, threads=1, reserve=reserve)
    with running(scheduler):
        assert await answers(scheduler, prompts, greedy(16)) == expected
        assert await alone(scheduler, prompts, greedy(16)) == expected
    assert scheduler._slots.kv_heads == 2  # stored once per kv head, never repeated
    assert scheduler.max_batch == len(prompts)
    reserved = reserve and not strict_overcommit()
    assert scheduler._slots.growable is not reserved
    assert (scheduler._slots.slots, scheduler._slots.length) == \
        ((8, 2048) if reserved else (8, 512))


async def test_a_freed_slot_is_reused_at_once(llama: Any) -> None:
    long, short = greedy(1500), greedy(8)
    c_prompt, e_prompt, h_prompt, a_prompt = ids(12, 1), ids(9, 2), ids(7, 3), ids(11, 5)
    scheduler = SlotScheduler(llama, eos_ids=[], max_sequences=2, prefill_chunk=16, threads=1)
    with running(scheduler):
        expected = await alone(scheduler, [c_prompt, e_prompt, h_prompt], short)
        b_request, b = submit(scheduler, ids(10, 4), long)
        a_request, a = submit(scheduler, a_prompt, long)  # the survivor
        await until(lambda: bool(a.tokens and b.tokens), "two long replies")
        # Freed by cancellation: B's row 0 goes to A (moved), A's row 1 to C.
        b_request.cancelled.set()
        _, c = submit(scheduler, c_prompt, short)
        await until(lambda: c.ended, "C")
        assert not a.ended
        # Freed by a stop (max_new_tokens): D's row goes to E, which waited for it.
        _, d = submit(scheduler, ids(20, 6), short)
        _, e = submit(scheduler, e_prompt, short)
        await until(lambda: e.ended, "E")
        assert not a.ended and len(d.tokens) == 8
        # Freed by a request cancelled while waiting, its long prompt half prefilled into
        # the free row: H gets that row. (A's next token does it, on the scheduler's thread.)
        g_request, g = submit(scheduler, ids(300, 7), long)
        h: list[Reply] = []

        def cancel_g() -> None:
            if g_request.prefilled and not g_request.cancelled.is_set():
                g_request.cancelled.set()
                h.append(submit(scheduler, h_prompt, short)[1])

        a.hook = cancel_g
        await until(lambda: bool(h and h[0].ended), "H")
        assert not a.ended
        a_request.cancelled.set()
        await until(lambda: a.ended, "A")
    assert (b.ended, g.ended, g.tokens) == (True, True, [])
    assert [r.error for r in (a, b, c, d, e, g, h[0])] == [None] * 7
    assert [c.tokens, e.tokens, h[0].tokens] == expected
    assert scheduler.max_batch <= 2 and scheduler._slots.slots == 2
    # The survivor was moved and had neighbours come and go, undisturbed.
    with running(EagerScheduler(llama, eos_ids=[], threads=1)) as eager:
        assert await answers(eager, [a_prompt], greedy(len(a.tokens))) == [a.tokens]


@pytest.fixture(scope="module")
def small() -> Any:
    return tiny(window=64)


async def test_a_prompt_filling_the_window_fails_and_the_next_is_served(small: Any) -> None:
    with running(EagerScheduler(small, eos_ids=[], threads=1)) as eager:
        expected = await answers(eager, [ids(10, 1)], greedy(8))
    with running(SlotScheduler(small, eos_ids=[], threads=1)) as scheduler:
        for length in (64, 90):
            [failed, served] = await replies(scheduler, [ids(length, 2), ids(10, 1)], greedy(8))
            assert isinstance(failed.error, GenerationError) and failed.tokens == []
            assert "too long" in str(failed.error)
            assert (served.error, [served.tokens]) == (None, expected)


async def test_a_reply_reaching_the_window_ends_cleanly(small: Any) -> None:
    prompt = ids(50, 3)
    with running(EagerScheduler(small, eos_ids=[], threads=1)) as eager:
        [unbounded] = await answers(eager, [prompt], greedy(30))
    with running(SlotScheduler(small, eos_ids=[], threads=1)) as scheduler:
        [reply] = await replies(scheduler, [prompt], greedy(30))
        assert await answers(scheduler, [ids(10, 1)], greedy(4))  # still serving
    assert reply.error is None and reply.ended
    assert 64 - 50 <= len(reply.tokens) < 30
    assert reply.tokens == unbounded[:len(reply.tokens)]


async def test_a_reply_ends_within_the_window(small: Any) -> None:
    with running(SlotScheduler(small, eos_ids=[], threads=1)) as scheduler:
        got = await answers(scheduler, [ids(50, 3), ids(63, 4)], greedy(30))
    assert [len(tokens) for tokens in got] == [64 - 50, 64 - 63]


async def test_each_static_step_sees_its_rows_newest_position(llama: Any) -> None:
    scheduler = StaticSlotScheduler(llama, eos_ids=[], max_sequences=2, threads=1)
    narrow: list[tuple[int, int]] = []
    step = scheduler._static_step

    def watched(rows: int, width: int) -> Any:
        if width < max(scheduler._host_lengths) + 1:  # the token it writes is not attended
            narrow.append((width, max(scheduler._host_lengths) + 1))
        return step(rows, width)

    scheduler._static_step = watched  # type: ignore[method-assign]
    with running(scheduler):
        await answers(scheduler, [ids(250, 5)], greedy(16))  # decodes across 256
    assert narrow == []


async def test_stop_gives_the_model_its_attention_back(llama: Any) -> None:
    before = llama.config._attn_implementation
    assert before != ATTENTION  # no earlier scheduler left it installed
    prompt = ids(20, 9)
    expected = generate(llama, prompt, 8)
    scheduler = SlotScheduler(llama, eos_ids=[], threads=1)
    assert llama.config._attn_implementation == ATTENTION
    assert generate(llama, prompt, 8) == expected  # no slot view: plain SDPA
    with running(scheduler):
        assert await answers(scheduler, [prompt], greedy(8, 1.0)) == [expected]
    assert llama.config._attn_implementation == before
    assert generate(llama, prompt, 8) == expected


def test_a_failed_start_raises_and_leaves_no_thread(
        llama: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[threading.Thread] = []

    def fails(self: SlotScheduler) -> None:
        threads.append(threading.current_thread())
        raise RuntimeError("no room for the KV cache")

    monkeypatch.setattr(SlotScheduler, "_prepare", fails)
    before = llama.config._attn_implementation
    assert before != ATTENTION
    scheduler = SlotScheduler(llama, eos_ids=[], threads=1)
    with pytest.raises(GenerationError, match="could not start: RuntimeError: no room"):
        scheduler.start()
    assert len(threads) == 1 and not threads[0].is_alive()
    assert "died" in (scheduler.health() or "")
    with pytest.raises(GenerationError, match="not running"):
        submit(scheduler, ids(5, 1), greedy(4))
    assert llama.config._attn_implementation == before


def resident() -> int:
    """This process's resident memory in bytes (Linux's ``/proc``)."""
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not (Path("/proc/self/statm").exists() and no_reserve_flag())
                    or strict_overcommit(),
                    reason="reads Linux's /proc, and reserves past memory and swap")
def test_a_cpu_cache_reserved_whole_takes_memory_only_as_rows_write() -> None:
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    slots = max(64, 2 * memory // (32 * 2 * 8 * 32769 * 128 * 4))  # twice this machine's
    config = LlamaConfig(hidden_size=1024, num_attention_heads=8, num_key_value_heads=8,
                         head_dim=128, num_hidden_layers=32, max_position_embeddings=32768)
    before = resident()
    cache = SlotCache.reserved(config, slots=slots, length=32768, dtype=torch.float32)
    assert cache is not None and cache.states.shape == (32, 2, slots, 8, 32769, 128)
    assert cache.states.numel() * 4 > 2 * memory
    assert resident() - before < 16 * 2**20
    cache.states[:, :, 5, :, :100] = 1.0  # one row's first 100 positions: 26 MB
    assert 26e6 <= resident() - before < 40e6
    # Never written: zeros, read without taking memory (a layer at a time, so that what
    # ``any`` allocates for its answer stays small: the heap may keep it).
    assert not any(layer[:, 5, :, 100:200].any() or layer[:, slots - 1, :, :300].any()
                   for layer in cache.states)
    assert resident() - before < 40e6
    del cache
    gc.collect()
    assert resident() - before < 16 * 2**20  # unmapped with the tensor


async def test_a_kernel_refusing_the_mapping_s_advice_still_reserves_it(
        llama: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # Linux without transparent huge pages answers MADV_NOHUGEPAGE with EINVAL.
    class Unadvisable(mmap.mmap):
        def madvise(self, *args: Any) -> None:
            raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(reserved_memory.mmap, "mmap", Unadvisable)
    prompt = ids(12, 5)
    expected = generate(llama, prompt, 6)
    scheduler = SlotScheduler(llama, eos_ids=[], max_sequences=2, threads=1)
    with running(scheduler):
        assert await answers(scheduler, [prompt], greedy(6, 1.0)) == [expected]
    assert scheduler._slots.growable is strict_overcommit()


def test_only_a_cpu_cache_is_reserved_and_a_set_length_bounds_the_window(llama: Any) -> None:
    config = llama.config
    # Another device without graphs (MPS; here "meta"): a cache that grows, on that device.
    other = uncaptured_cache(config, torch.float32, torch.device("meta"), slots=8,
                             length=2048)
    assert (other.growable, other.states.device.type) == (True, "meta")
    assert (other.slots, other.length) == (4, 256)
    started = uncaptured_cache(config, torch.float32, "cpu", slots=8, length=2048,
                               start_length=600, reserve=False)
    assert (started.growable, started.length) == (True, 600)
    scheduler = SlotScheduler(llama, eos_ids=[], max_sequences=2, threads=1, cache_length=100)
    with running(scheduler):
        if not scheduler._slots.growable:  # reserved: as long as it was asked, no longer
            assert scheduler.window == 100 and scheduler._slots.length == 100


async def test_where_a_reservation_is_charged_whole_the_cache_grows_instead(
        llama: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reserved_memory, "strict_overcommit", lambda: True)  # overcommit_memory=2
    prompt = ids(12, 6)
    expected = generate(llama, prompt, 6)
    scheduler = SlotScheduler(llama, eos_ids=[], max_sequences=2, threads=1)
    with running(scheduler):
        assert await answers(scheduler, [prompt], greedy(6, 1.0)) == [expected]
    assert scheduler._slots.growable


def test_cuda_engines_forbid_cudnn_attention_until_the_last_one_stops() -> None:
    from bot.generators import static_scheduler

    before = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        for setting in (True, False):
            torch.backends.cuda.enable_cudnn_sdp(setting)
            static_scheduler._forbid_cudnn_attention()  # one engine starts
            static_scheduler._forbid_cudnn_attention()  # a second (another model) too
            assert not torch.backends.cuda.cudnn_sdp_enabled()
            static_scheduler._allow_cudnn_attention()  # the first stops: the second runs
            assert not torch.backends.cuda.cudnn_sdp_enabled()
            static_scheduler._allow_cudnn_attention()
            assert torch.backends.cuda.cudnn_sdp_enabled() is setting
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="CUDA graphs and host syncs need a CUDA GPU")
async def test_cuda_decoding_replays_graphs_with_one_sync_per_step() -> None:
    model = tiny(window=4096).to("cuda", torch.bfloat16)
    scheduler = make_scheduler(model, eos_ids=[], max_sequences=4)
    assert isinstance(scheduler, StaticSlotScheduler)
    held, cudnn = torch.cuda.memory_allocated(), torch.backends.cuda.cudnn_sdp_enabled()
    with running(scheduler):
        started = [submit(scheduler, ids(8 + n, n), greedy(3000, 1.1)) for n in range(3)]
        first = started[0][1]
        await until(lambda: all(len(reply.tokens) >= 8 for _r, reply in started), "warm-up")
        # Steps are counted from before syncs are watched until one step after: a step that
        # synced while watched is among them.
        steps, replays = scheduler.steps, scheduler.graph_replays
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                count = len(first.tokens)
                await until(lambda: len(first.tokens) >= count + 64, "steady decoding")
            finally:
                torch.cuda.set_sync_debug_mode("default")
            # Still recording: a step that checked the mode before it was reset warns when
            # its sync returns (warning filters are the process's, not the thread's; the
            # project's "error" filter would fail that step).
            mark = scheduler.steps
            await until(lambda: scheduler.steps > mark, "one more step")
        steps, replays = scheduler.steps - steps, scheduler.graph_replays - replays
        for request, _reply in started:
            request.cancelled.set()
        await until(lambda: all(reply.ended for _r, reply in started), "the ends")
    # Stopped, it gave the GPU its cache and graphs back at once, and torch its setting.
    # (cuBLAS keeps a workspace per stream in torch's allocator, whoever ran the products.)
    torch._C._cuda_clearCublasWorkspaces()
    assert torch.cuda.memory_allocated() <= held + 2**20
    assert torch.backends.cuda.cudnn_sdp_enabled() == cudnn
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert steps >= 64 and not any(reply.error for _r, reply in started)
    assert 0 < len(syncs) <= steps, [str(w.message) for w in syncs[:3]]
    assert replays >= 0.9 * steps
