"""Which fetched Telegram updates the ``getUpdates`` offset may pass, and when to try again
those whose message could not be stored. No HTTP here: the adapter fetches and dispatches.

The offset confirms every update below it, so it stops at the oldest update not settled,
while newer ones are dispatched meanwhile: one chat whose intake is slow holds up no other.
An update whose message could not be stored (``Intake.FAILED``) is held unconfirmed, and
Telegram gives it back at every fetch. The rules for those:

* It is tried again after ``RETRY_DELAYS_S`` (growing with its failures), not sooner.
* Within a chat, order is kept: a later update of a chat with a held failure is not
  dispatched before that failure is tried again (the dialogue manager fails the rest of a
  batch in that chat untried when one fails, so they come back together, in order).
* It is given up (tried one last time with ``OnFailure.TELL``: its author is asked to send
  it again, and it is confirmed) only on evidence that the database works and only this
  message fails: some other update's message was *stored* since it was first tried. An
  update that needs no storing (an edit, a group message not addressed to the bot) is no
  such evidence, so during an outage nothing is confirmed unstored. With that evidence it
  is given up once it has failed for ``GIVE_UP_S``, or at once when the updates held from
  the offset on reach ``CROWDED_AT``: ``getUpdates`` returns at most ``UPDATES_LIMIT``
  updates from the offset, so a held update would soon stop every chat.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bot import intake
from bot.intake import Intake, OnFailure, Ticket

GIVE_UP_S = 300.0
UPDATES_LIMIT = 100
"""The most updates one ``getUpdates`` returns."""
CROWDED_AT = UPDATES_LIMIT - 10
"""Updates held from the offset on at which a failing one is given up without waiting
``GIVE_UP_S`` (given evidence that the database works): a margin below
``UPDATES_LIMIT`` so new updates keep arriving meanwhile."""

Dispatch = Callable[[int, OnFailure], Ticket | None]
"""Submits an update's message; None when it needs no intake."""


@dataclass
class _Held:
    """An update fetched but not confirmed yet: the offset has not passed it."""

    chat: int | None
    """Its message's chat; None when it has none to store (an edit, a channel post)."""
    ticket: Ticket | None = None
    """Its intake, while one runs."""
    tried: bool = False
    settled: bool = False
    """The offset may pass it: stored, needed no storing, or given up (author told)."""
    failures: int = 0
    failed_since: float | None = None
    """When its own intake first failed (not one failed untried behind another)."""
    retry_at: float = 0.0
    stored_before: int = 0
    """``HeldUpdates.stored`` when it was first tried: more since is the evidence."""


class HeldUpdates:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._held: dict[int, _Held] = {}
        self.offset: int | None = None
        self.stored = 0
        """Updates whose message was stored since the start: evidence the database works."""

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def running(self) -> list[asyncio.Future[Intake]]:
        """The held updates' intakes that have not ended."""
        return [held.ticket.accepted for held in self._held.values()
                if held.ticket is not None and not held.ticket.accepted.done()]

    def receive(self, updates: Sequence[tuple[int, int | None]], dispatch: Dispatch) -> None:
        """Dispatch, in update order, what is new and what is due to be tried again, as
        ``(update_id, chat)``; ``dispatch`` submits one."""
        now = self._clock()
        for update_id, chat in updates:
            if self.offset is None or update_id >= self.offset:
                self._held.setdefault(update_id, _Held(chat))
        head = self._head()
        crowded = len(self._held) >= CROWDED_AT
        waiting: set[int] = set()
        """Chats with an earlier update not dispatched in this pass."""
        for update_id, _chat in sorted(updates):
            held = self._held.get(update_id)
            if held is None or held.settled or held.ticket is not None:
                continue
            if held.chat is not None and held.chat in waiting:
                continue
            last_try = False
            if held.tried:
                # (Not one that only followed its chat's failure, untried.)
                evidence = self.stored > held.stored_before and held.failed_since is not None
                last_try = evidence and (now - (held.failed_since or now) >= GIVE_UP_S
                                         or (crowded and update_id == head))
                if not last_try and now < held.retry_at:
                    if held.chat is not None:
                        waiting.add(held.chat)
                    continue
            else:
                held.tried = True
                held.stored_before = self.stored
            ticket = dispatch(update_id, OnFailure.TELL if last_try else OnFailure.REDELIVER)
            held.ticket = ticket
            held.settled = ticket is None

    def settle(self) -> bool:
        """Note how the held updates' intakes ended and move the offset past those settled;
        False once the dialogue manager takes no more."""
        now = self._clock()
        for update_id in sorted(self._held):
            held = self._held[update_id]
            if held.ticket is None or not held.ticket.accepted.done():
                continue
            outcome = held.ticket.accepted.result()
            held.ticket = None
            if outcome is Intake.CLOSED:
                return False
            if outcome is Intake.STORED:
                self.stored += 1
            if outcome.acknowledge:
                held.settled = True
                continue
            if self._behind(update_id, held.chat):
                # Failed untried, behind its chat's failure: it goes again right after it.
                held.retry_at = now
                continue
            if held.failed_since is None:
                held.failed_since = now
            held.failures += 1
            held.retry_at = now + intake.retry_delay(held.failures)
        for update_id in sorted(self._held):
            if not self._held[update_id].settled:
                break
            del self._held[update_id]
            self.offset = update_id + 1
        return True

    def _head(self) -> int | None:
        """The oldest update not settled: the one holding the offset."""
        return next((update_id for update_id in sorted(self._held)
                     if not self._held[update_id].settled), None)

    def _behind(self, update_id: int, chat: int | None) -> bool:
        return chat is not None and any(
            other < update_id and held.chat == chat and not held.settled
            for other, held in self._held.items())
