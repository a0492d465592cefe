"""Per-user rate limits: a burst allowance that refills, a daily reply-token quota, admins
exempt, one clear note per burst, and memory that holds only recent users."""

import re
from collections.abc import AsyncIterator

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from bot.builtin_commands import builtin_commands
from bot.config import Settings
from bot.dialogue import DialogueManager
from bot.ratelimit import RateLimiter
from storage.repository import SqlStore
from tests.auxil.db import stored_texts
from tests.auxil.factories import dm, group
from tests.auxil.generators import ScriptedGenerator
from tests.auxil.sinks import RecordingSink


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_refills_at_the_rate() -> None:
    clock = Clock()
    limiter = RateLimiter(per_minute=6, burst=3, clock=clock)
    assert [limiter.take("u") for _ in range(3)] == [None, None, None]
    refused = limiter.take("u")
    assert refused is not None and refused.tell and refused.retry_after == pytest.approx(10)
    again = limiter.take("u")
    assert again is not None and not again.tell  # one note per burst, not one per message
    clock.now += 10
    assert limiter.take("u") is None
    assert limiter.take("other") is None  # users do not share a bucket


def test_memory_holds_only_users_whose_allowance_is_not_full() -> None:
    clock = Clock()
    limiter = RateLimiter(per_minute=60, burst=5, clock=clock)
    for n in range(10_000):
        limiter.take(f"user{n}")
        clock.now += 0.0001
    assert limiter.tracked == 10_000
    clock.now += 5.0  # every bucket has refilled: none needs remembering
    limiter.take("late")
    assert limiter.tracked == 1


def test_a_message_given_back_can_be_spent_again() -> None:
    clock = Clock()
    limiter = RateLimiter(per_minute=1, burst=2, clock=clock)
    assert limiter.take("u") is None and limiter.take("u") is None
    limiter.give_back("u")  # the second was not stored after all
    assert limiter.take("u") is None
    assert limiter.take("u") is not None
    limiter.give_back("u")
    limiter.give_back("u")
    limiter.give_back("u")  # never more than the burst
    assert [limiter.take("u") is None for _ in range(3)] == [True, True, False]
    limiter.give_back("someone else")  # not tracked: full already, nothing to do
    assert limiter.tracked == 1


def test_zero_turns_the_limit_off() -> None:
    limiter = RateLimiter(per_minute=0, burst=10)
    assert all(limiter.take("u") is None for _ in range(1000))
    assert limiter.tracked == 0


@pytest.fixture
async def limited(store: SqlStore, settings: Settings) -> AsyncIterator[DialogueManager]:
    strict = settings.model_copy(update={"rate_per_minute": 1.0, "rate_burst": 2,
                                         "daily_tokens": 0})
    async with DialogueManager(store=store, generator=ScriptedGenerator(), settings=strict,
                               commands=builtin_commands()) as manager:
        yield manager


async def test_a_user_over_the_limit_is_told_once_and_nothing_is_stored(
        limited: DialogueManager, engine: AsyncEngine) -> None:
    sink = RecordingSink()
    for n in range(5):
        await limited.handle(dm(f"message {n}"), sink)
    assert sink.texts[:2] == ["message 0", "message 1"]
    assert len(sink.texts) == 3
    assert sink.texts[2].startswith("You are sending messages faster than I can answer.")
    assert re.search(r"wait (59|60) s ", sink.texts[2])
    assert [t for role, t in await stored_texts(engine) if role == "user"] == \
        ["message 0", "message 1"]
    # Commands are not messages to answer: they still work.
    await limited.handle(dm("/help"), sink)
    assert "/reset" in sink.texts[-1]


async def test_admins_are_exempt(limited: DialogueManager) -> None:
    sink = RecordingSink()
    for n in range(5):
        await limited.handle(dm(f"admin {n}", user="admin1"), sink)
    for n in range(5):
        await limited.handle(group(f"chat admin {n}", user="mod", mention=True,
                                   chat_admin=True), sink)
    assert len(sink.texts) == 10
    assert not any("faster" in text for text in sink.texts)


async def test_daily_quota_is_counted_from_stored_usage(store: SqlStore,
                                                        settings: Settings) -> None:
    used_by_one = ScriptedGenerator().count_tokens("assistant", "one two three")
    quota = settings.model_copy(update={"daily_tokens": used_by_one + 1})
    sink = RecordingSink()
    async with DialogueManager(store=store, generator=ScriptedGenerator(), settings=quota,
                               commands=builtin_commands()) as manager:
        await manager.handle(dm("one two three"), sink)
        await manager.handle(dm("four five six"), sink)
        await manager.handle(dm("seven"), sink)
        await manager.handle(dm("an admin has no quota", user="admin1"), sink)
    # A restart does not reset the count: it is read from the database.
    async with DialogueManager(store=store, generator=ScriptedGenerator(), settings=quota,
                               commands=builtin_commands()) as manager:
        await manager.handle(dm("eight"), sink)
        await manager.handle(dm("other user", user="u2"), sink)
    assert sink.texts[:2] == ["one two three", "four five six"]
    assert sink.texts[2].startswith(
        f"You have used today's allowance of {used_by_one + 1} reply tokens.")
    assert "midnight UTC" in sink.texts[2]
    assert sink.texts[3] == "an admin has no quota"
    assert sink.texts[4].startswith("You have used today's allowance")
    assert sink.texts[5] == "other user"
