"""Running short of memory (``host_memory.py``, ``SlotCache.release``,
``SlotScheduler._relieve``): what is left is read from Linux and from the process's cgroups;
a reserved KV cache gives back the memory no row keeps; short of memory, the slot engine
drops its parked conversations, gives back what no row keeps and holds new prompts; on the
next step, if memory is critical, it ends the conversations holding the most (and none
where they hold too little to matter), a step at most every other step, and the others go
on as if nothing happened."""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaConfig

from bot.errors import GenerationError
from bot.generators.host_memory import CRITICAL_BYTES, FLOOR_BYTES, HostMemory, MemoryGuard
from bot.generators.reserved_memory import no_reserve_flag, strict_overcommit
from bot.generators.slot_cache import SlotCache
from bot.generators.slot_scheduler import SlotScheduler
from tests.auxil.schedulers import Reply, alone, greedy, ids, running, submit, tiny
from tests.auxil.waiting import until

MIB = 2**20
LINUX_RESERVES = Path("/proc/self/statm").exists() and bool(no_reserve_flag()) \
    and not strict_overcommit()


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


MEMINFO = "MemTotal:       16777216 kB\nMemFree:  1 kB\nMemAvailable:    4194304 kB\n"


def test_memory_left_is_the_least_of_the_machine_s_and_the_cgroup_s(tmp_path: Path) -> None:
    v2 = write(tmp_path / "v2", {
        "proc/meminfo": MEMINFO, "proc/self/cgroup": "0::/bot.slice/chinwag\n",
        "sys/fs/cgroup/bot.slice/chinwag/memory.max": f"{1024 * MIB}\n",
        "sys/fs/cgroup/bot.slice/chinwag/memory.current": f"{768 * MIB}\n",
        # The file cache the kernel drops first does not count as used.
        "sys/fs/cgroup/bot.slice/chinwag/memory.stat":
            f"anon {400 * MIB}\nactive_file 7\ninactive_file {256 * MIB}\n"})
    assert HostMemory(v2)() == 512 * MIB
    unlimited = write(tmp_path / "v2max", {
        "proc/meminfo": MEMINFO, "proc/self/cgroup": "0::/\n",
        "sys/fs/cgroup/memory.max": "max\n", "sys/fs/cgroup/memory.current": "1\n",
        "sys/fs/cgroup/memory.stat": "inactive_file 0\n"})
    assert HostMemory(unlimited)() == 4096 * MIB
    # cgroup v1 inside a container: the cgroup's own folder is mounted as the hierarchy's
    # root, so the path /proc names is not there.
    container = write(tmp_path / "v1", {
        "proc/meminfo": MEMINFO,
        "proc/self/cgroup": "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": f"{2048 * MIB}\n",
        "sys/fs/cgroup/memory/memory.usage_in_bytes": f"{1536 * MIB}\n",
        "sys/fs/cgroup/memory/memory.stat":
            f"inactive_file 1\ntotal_inactive_file {512 * MIB}\n"})
    assert HostMemory(container)() == 1024 * MIB
    tight = write(tmp_path / "tight", {"proc/meminfo": MEMINFO.replace("4194304", "1024")})
    assert HostMemory(tight)() == MIB  # no cgroup file: the machine's alone
    assert HostMemory(tmp_path / "elsewhere")() is None  # not Linux: unknown
    # A systemd slice limits the service's parent: the tightest of the chain counts.
    nested = write(tmp_path / "nested", {
        "proc/meminfo": MEMINFO, "proc/self/cgroup": "0::/bots.slice/chinwag.service\n",
        "sys/fs/cgroup/bots.slice/memory.max": f"{3072 * MIB}\n",
        "sys/fs/cgroup/bots.slice/memory.current": f"{2048 * MIB}\n",
        "sys/fs/cgroup/bots.slice/memory.stat": "inactive_file 0\n",
        "sys/fs/cgroup/bots.slice/chinwag.service/memory.max": "max\n",
        "sys/fs/cgroup/bots.slice/chinwag.service/memory.current": "5\n",
        "sys/fs/cgroup/bots.slice/chinwag.service/memory.stat": "inactive_file 0\n"})
    assert HostMemory(nested)() == 1024 * MIB
    # Files an emulation (gVisor's, say) writes otherwise are no answer, not a failure.
    odd = write(tmp_path / "odd", {
        "proc/meminfo": "MemAvailable:\n", "proc/self/cgroup": "\nnonsense\n0::/\n",
        "sys/fs/cgroup/memory.max": "2048\n", "sys/fs/cgroup/memory.current": "\n",
        "sys/fs/cgroup/memory.stat": "inactive_file\n"})
    assert HostMemory(odd)() is None
    broken_stat = write(tmp_path / "stat", {
        "proc/meminfo": MEMINFO, "proc/self/cgroup": "0::/\n",
        "sys/fs/cgroup/memory.max": f"{1024 * MIB}\n",
        "sys/fs/cgroup/memory.current": f"{512 * MIB}\n",
        "sys/fs/cgroup/memory.stat": "inactive_file x\n"})
    assert HostMemory(broken_stat)() == 512 * MIB


def test_the_guard_asks_replies_for_memory_only_when_critical_a_step_later() -> None:
    left: list[int | None] = [300 * MIB]
    guard = MemoryGuard.for_steps(10 * MIB, lambda: left[0])
    assert (guard.floor, guard.critical, guard.step) == \
        (FLOOR_BYTES + 20 * MIB, CRITICAL_BYTES + 20 * MIB, 10 * MIB)
    assert not guard.short() and guard.left == 300 * MIB and guard.cut_due() == 0
    left[0] = 200 * MIB  # short, not critical: nothing asked of the replies
    assert [guard.short(), guard.cut_due(), guard.short(), guard.cut_due()] == [True, 0] * 2
    left[0] = 50 * MIB
    assert guard.short() and guard.cut_due() == guard.critical + guard.step - 50 * MIB
    # Then a step passes before more is asked; so on a shortage's first step, too.
    assert [guard.short(), guard.cut_due(), guard.short()] == [True, 0, True]
    assert guard.cut_due() > 0
    left[0] = 300 * MIB
    assert not guard.short()
    left[0] = 50 * MIB
    assert [guard.short(), guard.cut_due()] == [True, 0]
    left[0] = 300 * MIB  # enough again, if for a step: the next shortage starts anew
    assert not guard.short()
    left[0] = 50 * MIB
    assert [guard.short(), guard.cut_due(), guard.short()] == [True, 0, True]
    left[0] = 100 * MIB  # read again when asked: what was given back is seen
    assert guard.cut_due() == 0
    left[0] = None
    assert not guard.short() and guard.cut_due() == 0
    if Path("/proc/meminfo").exists():
        assert (HostMemory()() or 0) > 0


def resident() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not LINUX_RESERVES, reason="reads Linux's /proc; needs a reservation")
def test_a_reserved_cache_gives_back_what_no_row_keeps() -> None:
    config = LlamaConfig(hidden_size=1024, num_attention_heads=8, num_key_value_heads=8,
                         head_dim=128, num_hidden_layers=32, max_position_embeddings=4096)
    cache = SlotCache.reserved(config, slots=8, length=4096, dtype=torch.float32)
    assert cache is not None and cache.releasable
    row = 32 * 2 * 8 * 512  # bytes a position of a row takes, over layers, keys and values
    values = torch.randn(32, 2, 4, 8, 100, 128)
    before = resident()
    cache.states[:, :, :4, :, :100] = values  # rows 0-3, 100 positions each: 105 MB
    written = resident() - before
    assert 4 * 100 * row <= written < 4 * 100 * row + 16 * MIB
    cache.release({0: 100, 1: 50, 3: 100})  # row 2 whole, row 1 past 50
    given = written - (resident() - before)
    assert 150 * row - 4 * MIB <= given <= 150 * row + 4 * MIB
    kept = cache.states[:, :, :4, :, :100]
    assert torch.equal(kept[:, :, 0], values[:, :, 0])
    assert torch.equal(kept[:, :, 1, :, :50], values[:, :, 1, :, :50])
    assert torch.equal(kept[:, :, 3], values[:, :, 3])
    assert not kept[:, :, 2, :, 8:].any()  # (a row's first page may share one with another)
    cache.states[:, :, 2, :, :100] = values[:, :, 2]  # written again: taken again
    assert torch.equal(cache.states[:, :, 2, :, :100], values[:, :, 2])
    grown = SlotCache(config, slots=2, length=64, device="cpu", dtype=torch.float32,
                      growable=True)
    assert not grown.releasable
    grown.release({})  # nothing to give back: nothing done
    del cache


class Memory:
    """A stand-in for what the machine has left: plenty, until a test says otherwise."""

    def __init__(self) -> None:
        self.left: Callable[[], int] = lambda: 1 << 40

    def __call__(self) -> int:
        return self.left()


def held(scheduler: SlotScheduler) -> int:
    """The bytes the scheduler's rows hold: the batch's and those part prefilled."""
    tokens = sum(scheduler._host_lengths) + sum(r.prefilled for r in scheduler._waiting)
    return tokens * scheduler._slots.bytes_per_token()


def squeeze(scheduler: SlotScheduler, memory: Memory, below: int) -> None:
    """From now on the machine has ``below`` bytes less than the critical level left, less
    whatever the rows write from here on (and more as they give memory back)."""
    assert scheduler._guard is not None
    budget = scheduler._guard.critical - below + held(scheduler)
    memory.left = lambda: budget - held(scheduler)


@pytest.fixture(scope="module")
def llama() -> Any:
    return tiny(window=2048)


def engine(model: Any, memory: Memory | None = None) -> SlotScheduler:
    return SlotScheduler(model, eos_ids=[], max_sequences=4, threads=1, prefill_chunk=16,
                         prefix_cache_bytes=16 * MIB, memory=memory)


RESERVES = pytest.mark.skipif(strict_overcommit(),
                              reason="only a reserved cache gives memory back")


@RESERVES
async def test_critical_memory_ends_the_reply_holding_most_and_the_others_go_on(
        llama: Any, caplog: pytest.LogCaptureFixture) -> None:
    long, middle, brief = ids(300, 1), ids(60, 2), ids(20, 3)
    with running(engine(llama)) as plain:
        expected = await alone(plain, [middle, brief], greedy(40))
    earlier = [ids(30, 4), ids(30, 5)]
    memory = Memory()
    scheduler = engine(llama, memory)
    with running(scheduler):
        assert scheduler._guard is not None and scheduler._guard.floor > FLOOR_BYTES
        await alone(scheduler, earlier, greedy(4))
        await until(lambda: len(scheduler.prefixes) == 2, "both parked")
        got = [submit(scheduler, prompt, greedy(40))[1] for prompt in (long, middle, brief)]
        pressed: list[bool] = []

        def press() -> None:  # once all three run: critical by half the longest's memory
            if not pressed and all(len(reply.tokens) >= 5 for reply in got):
                pressed.append(True)
                longest = max(scheduler._host_lengths) * scheduler._slots.bytes_per_token()
                squeeze(scheduler, memory, longest // 2)

        idle: list[bool] = []

        def look() -> None:  # the first token after the cut, in the same step
            press()
            if got[0].ended and not idle:
                # The last row, but its first head (whose first page it may share with the
                # row before it).
                idle.append(bool(scheduler._slots.states[:, :, 2, 1:].any()))

        for reply in got:
            reply.hook = look
        with caplog.at_level(logging.WARNING, "bot.generators.host_memory"):
            await until(lambda: all(reply.ended for reply in got), "the replies", within=60)
        # Parked conversations were dropped, and none is parked while memory is short.
        assert len(scheduler.prefixes) == 0
    cut, *rest = got
    assert isinstance(cut.error, GenerationError) and "short of memory" in str(cut.error)
    assert 5 <= len(cut.tokens) < 40
    assert [reply.error for reply in rest] == [None, None]
    assert [reply.tokens for reply in rest] == expected  # undisturbed
    assert idle == [False]  # the cut reply's memory went back to the system at once
    said = [r.getMessage() for r in caplog.records if "memory is short" in r.getMessage()]
    # The first step short gave back only what no row keeps; the next one cut.
    assert [message[-24:] for message in said] == ["; conversations ended: 0",
                                                   "; conversations ended: 1"]


@RESERVES
async def test_memory_short_elsewhere_cuts_no_reply_and_new_prompts_wait(
        llama: Any, caplog: pytest.LogCaptureFixture) -> None:
    first, second, later = ids(60, 2), ids(20, 3), ids(30, 6)
    with running(engine(llama)) as plain:
        expected = await alone(plain, [first, second, later], greedy(30))
    memory = Memory()
    scheduler = engine(llama, memory)
    log: list[Reply] = []
    with running(scheduler):
        got = [submit(scheduler, prompt, greedy(30), log)[1] for prompt in (first, second)]
        await until(lambda: all(len(reply.tokens) >= 3 for reply in got), "both running")
        # Far below the critical level, and the replies could not give back enough.
        memory.left = lambda: 0
        with caplog.at_level(logging.WARNING, "bot.generators.host_memory"):
            got.append(submit(scheduler, later, greedy(30), log)[1])
            await until(lambda: all(reply.ended for reply in got), "the replies", within=60)
        assert len(scheduler.prefixes) == 0  # none parked while short
        # The rows left idle gave their memory back (the later prompt took row 0).
        assert not scheduler._slots.states[:, :, 1:].any()
    assert [reply.error for reply in got] == [None] * 3
    assert [reply.tokens for reply in got] == expected
    # The later prompt waited for the batch to finish.
    assert log.index(got[2]) > max(len(log) - 1 - log[::-1].index(reply) for reply in got[:2])
    said = [r.getMessage() for r in caplog.records if "memory is short" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith("; conversations ended: 0")
    assert "new prompts wait while replies run" in said[0]


@RESERVES
async def test_a_long_prompt_part_prefilled_keeps_its_row_when_replies_are_cut(
        llama: Any) -> None:
    long, middle, brief, following = ids(400, 1), ids(60, 2), ids(30, 3), ids(300, 7)
    with running(engine(llama)) as plain:
        expected = await alone(plain, [middle, brief, following], greedy(30))
    memory = Memory()
    scheduler = engine(llama, memory)
    with running(scheduler):
        got = [submit(scheduler, prompt, greedy(200 if prompt is long else 30))[1]
               for prompt in (long, middle, brief)]
        await until(lambda: all(len(reply.tokens) >= 2 for reply in got), "joined")
        request, after = submit(scheduler, following, greedy(30))
        pressed: list[int] = []

        def press() -> None:  # while the following prompt is part prefilled, in a row
            if not pressed and request.prefilled >= 64 and request.row >= 0:
                pressed.append(request.row)
                longest = max(scheduler._host_lengths) * scheduler._slots.bytes_per_token()
                squeeze(scheduler, memory, longest // 2)

        for reply in got:
            reply.hook = press
        await until(lambda: all(reply.ended for reply in [*got, after]), "all", within=120)
    assert pressed == [3]  # above the batch's rows, which moved when the long one was cut
    assert isinstance(got[0].error, GenerationError)
    assert [got[1].tokens, got[2].tokens, after.tokens] == expected
    assert [reply.error for reply in (got[1], got[2], after)] == [None] * 3


@RESERVES
async def test_critical_memory_ends_a_conversation_a_step_at_most_every_other_step(
        llama: Any) -> None:
    memory = Memory()
    scheduler = engine(llama, memory)
    cut_at: list[int] = []
    with running(scheduler):
        assert scheduler._guard is not None
        critical = scheduler._guard.critical
        got = [submit(scheduler, ids(60 + 10 * n, n), greedy(300))[1] for n in range(4)]
        await until(lambda: all(len(reply.tokens) >= 2 for reply in got), "all running")
        pressed = scheduler.steps
        # Just below the critical level from now on: each row holds more than a step's
        # writes, so one ended at a time covers what is missing.
        memory.left = lambda: critical - 1
        for reply in got:
            reply.ends = lambda: cut_at.append(scheduler.steps)
        await until(lambda: all(reply.ended for reply in got), "all ended", within=60)
    assert all(isinstance(reply.error, GenerationError) for reply in got)
    cut_at.sort()
    assert len(cut_at) == 4 and cut_at[0] >= pressed + 1  # not on the first short step
    assert all(later - earlier >= 2 for earlier, later in itertools.pairwise(cut_at))


@RESERVES
async def test_memory_critical_every_other_step_ends_nothing(llama: Any) -> None:
    memory = Memory()
    scheduler = engine(llama, memory)
    with running(engine(llama)) as plain:
        expected = await alone(plain, [ids(60, 1), ids(70, 2)], greedy(40))
    with running(scheduler):
        assert scheduler._guard is not None
        critical = scheduler._guard.critical
        got = [submit(scheduler, prompt, greedy(40))[1] for prompt in (ids(60, 1), ids(70, 2))]
        reads = iter(range(10**6))
        memory.left = lambda: critical - 1 if next(reads) % 2 else 1 << 40
        await until(lambda: all(reply.ended for reply in got), "both ended", within=60)
    assert [reply.error for reply in got] == [None, None]
    assert [reply.tokens for reply in got] == expected


@RESERVES
async def test_a_long_prompt_part_prefilled_holding_most_is_ended_first(llama: Any) -> None:
    brief, huge = ids(20, 2), ids(1200, 1)
    with running(engine(llama)) as plain:
        [expected] = await alone(plain, [brief], greedy(150))
    memory = Memory()
    scheduler = engine(llama, memory)
    with running(scheduler):
        # (150 tokens: fewer than the prompt gives back, so the reply never brings memory
        # back down to critical.)
        _, running_reply = submit(scheduler, brief, greedy(150))
        await until(lambda: len(running_reply.tokens) >= 2, "the brief reply running")
        request, prompt_reply = submit(scheduler, huge, greedy(30))
        pressed: list[bool] = []

        def press() -> None:  # more missing than the running reply holds, not the prompt
            if not pressed and request.prefilled >= 300:
                pressed.append(True)
                per_token = scheduler._slots.bytes_per_token()
                squeeze(scheduler, memory, (max(scheduler._host_lengths) + 50) * per_token)

        running_reply.hook = press
        await until(lambda: running_reply.ended and prompt_reply.ended, "both", within=60)
    assert isinstance(prompt_reply.error, GenerationError) and prompt_reply.tokens == []
    assert (running_reply.error, running_reply.tokens) == (None, expected)


@RESERVES
async def test_no_prompt_joins_on_the_step_that_ended_conversations(llama: Any) -> None:
    reads: list[int] = []
    memory = Memory()
    scheduler = engine(llama, memory)
    with running(scheduler):
        guard = scheduler._guard
        assert guard is not None
        _, cut = submit(scheduler, ids(60, 1), greedy(300))
        await until(lambda: len(cut.tokens) >= 2, "a reply running")
        memory.left = lambda: guard.floor - 1  # short, not critical: a new prompt waits
        # (shorter than a prefill chunk: it would join, first token and all, in one step)
        request, later = submit(scheduler, ids(10, 2), greedy(4))
        await until(lambda: request in scheduler._waiting and guard.strained >= 2, "held")

        def low() -> int:
            reads.append(1)
            return guard.critical - 1

        marks: dict[str, int] = {}
        cut.ends = lambda: marks.setdefault("cut", len(reads))
        later.hook = lambda: marks.setdefault("joined", len(reads))
        memory.left = low
        await until(lambda: cut.ended and later.ended, "both", within=60)
    # (Memory stays critical: the later reply may be cut in turn, once it has joined.)
    assert isinstance(cut.error, GenerationError) and later.tokens
    assert marks["joined"] > marks["cut"]  # a step later, having read memory again
