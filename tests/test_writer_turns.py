"""SQLite writers' turns: one at a time, urgent ones first, cancellation never wedges."""

import asyncio

from storage.writer_turns import NORMAL, URGENT, WriterTurns


async def test_one_at_a_time_and_urgent_waiters_go_first() -> None:
    turns = WriterTurns()
    order: list[str] = []
    holding = 0

    async def write(name: str, priority: int) -> None:
        nonlocal holding
        async with turns.turn(priority):
            holding += 1
            assert holding == 1
            order.append(name)
            await asyncio.sleep(0.01)
            holding -= 1

    first = asyncio.create_task(write("first", NORMAL))
    await asyncio.sleep(0)
    others = [asyncio.create_task(write(f"reply{n}", NORMAL)) for n in range(3)]
    await asyncio.sleep(0)
    urgent = asyncio.create_task(write("new message", URGENT))
    await asyncio.gather(first, *others, urgent)
    assert order == ["first", "new message", "reply0", "reply1", "reply2"]


async def test_a_cancelled_waiter_does_not_wedge_the_turns() -> None:
    turns = WriterTurns()
    release = asyncio.Event()

    async def hold() -> None:
        async with turns.turn():
            await release.wait()

    async def wait_turn() -> None:
        async with turns.turn():
            pass

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0)
    cancelled = asyncio.create_task(wait_turn())
    granted_then_cancelled = asyncio.create_task(wait_turn())
    await asyncio.sleep(0)
    cancelled.cancel()
    release.set()
    await asyncio.sleep(0)  # the turn is handed to the next waiter...
    granted_then_cancelled.cancel()  # ...which is cancelled before it runs
    await asyncio.gather(holder, cancelled, granted_then_cancelled, return_exceptions=True)
    await asyncio.wait_for(wait_turn(), 1)  # still usable
