"""Which Telegram updates the offset may pass and when a failed one goes again, without
HTTP: fetched batches in, dispatches and offsets out."""

from __future__ import annotations

import asyncio

import pytest

from adapters.telegram import redelivery
from adapters.telegram.redelivery import CROWDED_AT, HeldUpdates
from bot.intake import Intake, OnFailure, Ticket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Dispatcher:
    """Records dispatches; each gets a ticket the test settles."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, OnFailure]] = []
        self.tickets: dict[int, Ticket] = {}

    def __call__(self, update_id: int, on_failure: OnFailure) -> Ticket:
        loop = asyncio.get_running_loop()
        self.calls.append((update_id, on_failure))
        ticket = self.tickets[update_id] = Ticket(loop.create_future(), loop.create_future())
        return ticket

    def end(self, update_id: int, intake: Intake) -> None:
        self.tickets.pop(update_id).accepted.set_result(intake)

    def dispatched(self) -> list[int]:
        ids = [update_id for update_id, _ in self.calls]
        self.calls.clear()
        return ids


async def test_a_chat_waits_behind_its_failed_update_and_others_do_not() -> None:
    clock, send = Clock(), Dispatcher()
    held = HeldUpdates(clock)
    held.receive([(1, 10), (2, 20)], send)
    assert send.dispatched() == [1, 2]
    send.end(1, Intake.FAILED)
    send.end(2, Intake.STORED)
    assert held.settle() and held.offset is None  # update 1 holds the offset
    clock.now += 0.5  # before its next try: chat 10's new update waits, chat 20's goes
    held.receive([(1, 10), (2, 20), (3, 10), (4, 20)], send)
    assert send.dispatched() == [4]
    clock.now += 0.6
    held.receive([(1, 10), (2, 20), (3, 10), (4, 20)], send)
    assert send.dispatched() == [1, 3]  # in order, together
    for update_id in (1, 3, 4):
        send.end(update_id, Intake.STORED)
    held.settle()
    assert held.offset == 5 and not held.holding


async def test_an_update_needing_no_storing_is_no_evidence_and_a_stored_one_is(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redelivery, "GIVE_UP_S", 10.0)
    clock, send = Clock(), Dispatcher()
    held = HeldUpdates(clock)
    held.receive([(1, 10), (2, 20)], send)
    assert send.dispatched() == [1, 2]
    send.end(1, Intake.FAILED)
    send.end(2, Intake.TAKEN)  # an unaddressed group message: nothing stored
    held.settle()
    clock.now += 60
    held.receive([(1, 10), (2, 20)], send)
    assert send.calls == [(1, OnFailure.REDELIVER)]  # not given up
    send.calls.clear()
    send.end(1, Intake.FAILED)
    held.receive([(1, 10), (2, 20), (3, 30)], send)  # before 1's next try
    assert send.dispatched() == [3]
    send.end(3, Intake.STORED)  # the database works for others
    held.settle()
    clock.now += 60
    held.receive([(1, 10), (2, 20), (3, 30)], send)
    assert send.calls == [(1, OnFailure.TELL)]  # one last try, its author told if it fails
    send.end(1, Intake.DROPPED)
    held.settle()
    assert held.offset == 4


async def test_a_crowded_window_gives_the_oldest_failure_up_at_once() -> None:
    clock, send = Clock(), Dispatcher()
    held = HeldUpdates(clock)
    batch = [(1, 1)] + [(n, 1000 + n) for n in range(2, CROWDED_AT + 1)]
    held.receive(batch, send)
    send.end(1, Intake.FAILED)
    for update_id, _chat in batch[1:]:
        send.end(update_id, Intake.STORED)
    held.settle()
    send.calls.clear()
    held.receive(batch, send)  # well before GIVE_UP_S
    assert send.calls == [(1, OnFailure.TELL)]
    send.end(1, Intake.DROPPED)
    held.settle()
    assert held.offset == CROWDED_AT + 1
