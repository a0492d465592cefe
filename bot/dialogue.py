"""The dialogue manager: the single async entry point every platform adapter calls.

Each message goes through two stages. **Intake** is quick and runs in arrival order per
conversation: what it means is decided in ``bot/intake.py`` (addressing, blocked users,
commands, limits, storing the message). When intake is done the message is *accepted*: it
is safe for an adapter to acknowledge it to its platform. Nothing is sent to the chat
during intake: notes and command answers go out afterwards, so a chat the platform makes
wait (flood control) never delays accepting messages. **Answering** generates replies one
at a time per conversation, in order, while different conversations run concurrently.
Per-conversation state (a *lane*) lives only while a conversation has work in progress, so
idle conversations cost nothing.

Order within a lane: intakes run one after another in submission order; an answer starts
only after the notes queued before its question have been sent (or failed), while a note
queued after a question (``/help`` during a long reply) goes out at once.

A message that cannot be stored (the database is down) is handled as its adapter asks
(``OnFailure``): left for the platform to redeliver (with every message submitted to its
lane before that moment, so the lane keeps its order), kept and tried again in-process, or
answered with a note at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Self

from bot import intake, log_context
from bot.answering import Question, Responder
from bot.commands import CommandRegistry
from bot.config import Settings
from bot.errors import DeliveryError, StorageError
from bot.events import IncomingMessage, ReplySink
from bot.generators import Generator as TextGenerator
from bot.generators.pool import ModelPool
from bot.intake import (
    AdminCheck,
    Checks,
    Decision,
    Intake,
    IntakePolicy,
    OnFailure,
    Ticket,
)
from bot.metrics import Metrics
from bot.ratelimit import RateLimiter
from bot.store import PendingMessage, Store
from bot.streaming import ReplyStream

if TYPE_CHECKING:
    from bot.memory import Memory

logger = logging.getLogger(__name__)

PENDING_LIMIT = 1000
LATE_INTAKE_S = 5.0
"""After the grace period, how much longer intakes may go on (they only store, or give a
message up)."""
OWED_NOTES_S = 5.0
"""How long telling the authors of messages a stop gave up may take, at the end of
``close``."""


@dataclass
class _Answer:
    question: Question
    sink: ReplySink
    ticket: Ticket
    notes_before: int
    """The lane's ``notes_queued`` when it was queued: the answer waits for those."""
    arrived: float
    """When its message was submitted (the manager's clock), for the reply's latency."""


@dataclass
class _Lane:
    """One conversation's work in progress."""

    intakes: set[asyncio.Task[None]] = field(default_factory=set)
    """Every intake not ended yet."""
    tail: asyncio.Task[None] | None = None
    """The newest intake; each waits for the one before it."""
    submitted: int = 0
    """How many messages were submitted to the lane: the newest one's number."""
    redeliver_through: int = 0
    """Intakes numbered up to this (``OnFailure.REDELIVER``) fail untried: one before them
    could not be stored, and the platform delivers them all again, in order."""
    answers: deque[_Answer] = field(default_factory=deque)
    worker: asyncio.Task[None] | None = None
    notes: deque[tuple[str, ReplySink, Ticket]] = field(default_factory=deque)
    """Notes and command answers to send, in order, apart from intake and answering."""
    notifier: asyncio.Task[None] | None = None
    notes_queued: int = 0
    notes_done: int = 0
    """Notes sent or failed; with ``notes_queued``, what orders answers after notes."""
    note_done: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: set[str] = field(default_factory=set)
    """Platform ids of messages queued or being answered (a redelivery must not repeat)."""
    answering: Question | None = None


@dataclass(frozen=True, eq=False)
class _Owed:
    """An author to tell that their message was not stored."""

    key: str
    message_id: str
    sink: ReplySink
    note: str
    """``INTAKE_FAILED_NOTE``, in their language."""


class DialogueManager:
    def __init__(self, *, store: Store, settings: Settings, commands: CommandRegistry,
                 generator: TextGenerator | None = None, models: ModelPool | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 shutdown_grace: float = 10.0, metrics: Metrics | None = None,
                 memory: Memory | None = None) -> None:
        """``models``: the models chats may choose (``bot/generators/pool.py``), or
        ``generator``, the only one; either is loaded and closed by the caller.
        ``memory``: long-term memory (``bot/memory``), when it is on."""
        if models is None:
            if generator is None:
                raise TypeError("DialogueManager needs a generator or models")
            models = ModelPool.serving(generator)
        self._store = store
        self._settings = settings
        self._clock = clock
        self._grace = shutdown_grace
        self._metrics = metrics or Metrics()
        self._responder = Responder(store=store, models=models, settings=settings,
                                    clock=clock, metrics=self._metrics, memory=memory)
        self._lanes: dict[str, _Lane] = {}
        self._limiter = RateLimiter(settings.rate_per_minute, settings.rate_burst, clock)
        self._policy = IntakePolicy(store=store, models=models, settings=settings,
                                    commands=commands, limiter=self._limiter,
                                    closing=lambda: self._closing, memory=memory)
        self._closing = False
        self._stopping = asyncio.Event()
        """Set with ``_closing``: wakes intakes waiting to try the database again."""
        self._closed = False
        self._owed: list[_Owed] = []
        """Authors of messages a stop left unstored, told before ``close`` returns."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    @property
    def metrics(self) -> Metrics:
        """Where the manager counts, and the adapters that feed it count platform events."""
        return self._metrics

    @property
    def active_conversations(self) -> int:
        return len(self._lanes)

    @property
    def rate_limited_users(self) -> int:
        """Users whose message allowance is not full again (the rest are not tracked)."""
        return self._limiter.tracked

    async def close(self) -> None:
        """Stop answering: running replies and notes get the grace period to finish, then
        end with a note. Messages that arrive meanwhile are still stored (as pending, for
        the next start to answer) but not answered, and commands are not run. A message
        kept for another try (``OnFailure.RETRY``) is not tried again; intakes get
        ``LATE_INTAKE_S`` more, and one cut short then is given up. The author of every
        message given up is told before ``close`` returns, while the platform client is
        still open; after it returns, nothing more is taken."""
        if self._closed:
            return
        self._closing = True
        self._stopping.set()
        grace_end = asyncio.get_running_loop().time() + self._grace
        await _wait_all(partial(self._tasks, intakes=True, answering=True), grace_end)
        await _cancel(self._tasks(intakes=False, answering=True))
        await _wait_all(partial(self._tasks, intakes=True, answering=False),
                        grace_end + LATE_INTAKE_S)
        self._closed = True
        await _cancel(self._tasks(intakes=True, answering=False))
        await self._tell_owed()

    def submit(self, message: IncomingMessage, sink: ReplySink, *,
               chat_admin: AdminCheck | None = None,
               on_failure: OnFailure = OnFailure.TELL) -> Ticket:
        """Queue a message. Queuing happens before this returns, so submission order is
        handling order within a conversation."""
        loop = asyncio.get_running_loop()
        ticket = Ticket(loop.create_future(), loop.create_future())
        key = message.conversation_key
        if self._closed:
            logger.info("%s: not taking message %s, shut down", key, message.message_id)
            ticket.accepted.set_result(Intake.CLOSED)
            ticket.done.set_result(None)
            return ticket
        lane = self._lanes.setdefault(key, _Lane())
        lane.submitted += 1
        task = asyncio.create_task(
            self._intake(key, lane, lane.submitted, lane.tail, message, sink, chat_admin,
                         on_failure, ticket),
            name=f"chinwag:intake:{key}")
        # Also when it is cancelled before its first step, which runs no finally.
        task.add_done_callback(partial(self._intake_ended, key, lane, message, sink,
                                       on_failure, ticket))
        lane.tail = task
        lane.intakes.add(task)
        return ticket

    async def handle(self, message: IncomingMessage, sink: ReplySink) -> None:
        await self.submit(message, sink)

    async def pending(self, platform: str) -> Sequence[PendingMessage]:
        """Messages of a platform accepted but not answered (the process stopped first),
        within ``CHINWAG_RESUME_MINUTES``; an adapter resubmits them at start."""
        since = datetime.now(UTC) - timedelta(minutes=self._settings.resume_minutes)
        return await self._store.pending(platform, since, PENDING_LIMIT)

    # Intake.

    async def _intake(self, key: str, lane: _Lane, number: int,
                      previous: asyncio.Task[None] | None, message: IncomingMessage,
                      sink: ReplySink, chat_admin: AdminCheck | None,
                      on_failure: OnFailure, ticket: Ticket) -> None:
        arrived = self._clock()
        log_context.bind(key, message.message_id)
        queued = False
        try:
            if previous is not None:
                await asyncio.wait([previous])
            if on_failure is OnFailure.REDELIVER and number <= lane.redeliver_through:
                logger.info("%s: leaving message %s for the platform to deliver again, "
                            "after the one before it", key, message.message_id)
                decision = Decision(Intake.FAILED)
            else:
                decision = await self._take(key, lane, message, chat_admin, on_failure)
                if decision.intake is Intake.FAILED:
                    lane.redeliver_through = lane.submitted
            _settle(ticket.accepted, decision.intake)
            self._count(message, decision)
            if self._closing:
                if decision.intake in (Intake.DROPPED, Intake.ERROR):
                    # The one note still worth sending while stopping: ``close`` sends it.
                    self._owed.append(_Owed(key, message.message_id, sink,
                                            self._policy.failed_note(message)))
                if decision.question is not None:
                    logger.info("%s: stored %s to answer after the restart", key,
                                message.message_id)
                return
            if decision.question is not None:
                lane.in_flight.add(message.message_id)
                lane.answers.append(_Answer(decision.question, sink, ticket,
                                            lane.notes_queued, arrived))
                queued = True
                if lane.worker is None:
                    lane.worker = asyncio.create_task(self._answer_all(key, lane),
                                                      name=f"chinwag:answer:{key}")
            elif decision.note is not None:
                # Sent apart from intake: the platform may make this chat wait (flood
                # control), and the next message must not wait with it.
                lane.notes.append((decision.note, sink, ticket))
                lane.notes_queued += 1
                queued = True
                if lane.notifier is None:
                    lane.notifier = asyncio.create_task(self._say_all(key, lane),
                                                        name=f"chinwag:notes:{key}")
        finally:
            if not queued:
                _resolve(ticket)

    def _count(self, message: IncomingMessage, decision: Decision) -> None:
        """Count a message whose intake ended, once: one left for the platform to deliver
        again is counted when it is taken."""
        platform = message.platform
        if decision.intake in (Intake.DROPPED, Intake.ERROR):
            if message.addressed_to_bot:  # otherwise unknown: intake failed before it knew
                self._metrics.received(platform)
                self._metrics.failed(platform, "storage" if decision.intake is Intake.DROPPED
                                     else "error")
        elif decision.intake in (Intake.STORED, Intake.TAKEN) and decision.received:
            self._metrics.received(platform)
            if decision.refused is not None:
                self._metrics.refused(platform, decision.refused)

    def _intake_ended(self, key: str, lane: _Lane, message: IncomingMessage,
                      sink: ReplySink, on_failure: OnFailure, ticket: Ticket,
                      task: asyncio.Task[None]) -> None:
        lane.intakes.discard(task)
        if not ticket.accepted.done():
            # Cut short by a stop (perhaps before its first step): not stored.
            if on_failure is OnFailure.REDELIVER:
                _settle(ticket.accepted, Intake.FAILED)
            else:
                logger.warning("%s: stopped before message %s was stored; telling its "
                               "author to send it again", key, message.message_id)
                _settle(ticket.accepted, Intake.DROPPED)
                self._owed.append(_Owed(key, message.message_id, sink,
                                        self._policy.failed_note(message)))
            _resolve(ticket)
        self._drop(key, lane)

    async def _take(self, key: str, lane: _Lane, message: IncomingMessage,
                    chat_admin: AdminCheck | None, on_failure: OnFailure) -> Decision:
        """Decide, trying again as ``on_failure`` says while the database fails."""
        checks = Checks()
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + intake.INTAKE_RETRY_S
        for attempt in itertools.count(1):
            try:
                return await self._policy.decide(message, lane, chat_admin, checks)
            except StorageError as exc:
                self._policy.give_back(message, checks)
                if on_failure is OnFailure.REDELIVER:
                    logger.warning("%s: could not store message %s (%s); leaving it for "
                                   "the platform to deliver again", key, message.message_id,
                                   exc)
                    return Decision(Intake.FAILED)
                delay = intake.retry_delay(attempt)
                if on_failure is OnFailure.RETRY and not self._closing \
                        and loop.time() + delay < give_up_at:
                    logger.warning("%s: could not store message %s (%s); try %s again in "
                                   "%s s", key, message.message_id, exc, attempt, delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
                    if not self._closing:
                        continue
                    # Another try could outlast the stop: tell the author now instead.
                logger.error("%s: could not store message %s (%s); asking its author to "
                             "send it again", key, message.message_id, exc)
                return Decision(Intake.DROPPED, note=self._policy.failed_note(message))
            except Exception:
                # The core's top-level handler: one bad message never stops the others.
                # Not the database: another try would fail the same way, so say so now.
                logger.exception("%s: could not take message %s", key, message.message_id)
                self._policy.give_back(message, checks)
                return Decision(Intake.ERROR, note=self._policy.failed_note(message))
        raise AssertionError("unreachable")

    async def _say_all(self, key: str, lane: _Lane) -> None:
        try:
            while lane.notes:
                text, sink, ticket = lane.notes[0]
                try:
                    await self._say(sink, text, key)
                except DeliveryError as exc:
                    logger.warning("%s: could not deliver a note: %s", key, exc)
                finally:
                    lane.notes.popleft()
                    _resolve(ticket)
                    lane.notes_done += 1
                    lane.note_done.set()
        finally:
            for _text, _sink, ticket in lane.notes:
                _resolve(ticket)
            lane.notes_done += len(lane.notes)
            lane.note_done.set()
            lane.notes.clear()
            lane.notifier = None
            self._drop(key, lane)

    async def _say(self, sink: ReplySink, text: str, key: str) -> None:
        stream = ReplyStream(sink, interval=0.0, clock=self._clock, key=key)
        await stream.push(text)
        await stream.finish()

    async def _tell_owed(self) -> None:
        """Tell the authors of messages a stop left unstored to send them again."""
        owed, self._owed = self._owed, []
        told: set[_Owed] = set()

        async def tell(item: _Owed) -> None:
            try:
                await self._say(item.sink, item.note, item.key)
                told.add(item)
            except DeliveryError as exc:
                logger.error("%s: message %s was not stored, and its author could not be "
                             "told: %s", item.key, item.message_id, exc)

        try:
            async with asyncio.timeout(OWED_NOTES_S):
                await asyncio.gather(*(tell(item) for item in owed))
        except TimeoutError:
            for item in owed:
                if item not in told:
                    logger.error("%s: message %s was not stored, and its author could not "
                                 "be told within %s s", item.key, item.message_id,
                                 OWED_NOTES_S)

    # Answering.

    async def _answer_all(self, key: str, lane: _Lane) -> None:
        try:
            while lane.answers:
                answer = lane.answers[0]
                while lane.notes_done < answer.notes_before:
                    lane.note_done.clear()
                    await lane.note_done.wait()
                question = answer.question
                log_context.bind(key, question.platform_message_id)
                lane.answering = question
                try:
                    await self._responder.answer(question, answer.sink, arrived=answer.arrived)
                except Exception:
                    logger.exception("%s: answering %s failed", key,
                                     question.platform_message_id)
                    self._metrics.failed(question.platform, "error")
                finally:
                    lane.answering = None
                    lane.answers.popleft()
                    lane.in_flight.discard(question.platform_message_id)
                    _resolve(answer.ticket)
        finally:
            for left in lane.answers:
                _resolve(left.ticket)
            lane.answers.clear()
            lane.worker = None
            self._drop(key, lane)

    def _tasks(self, *, intakes: bool, answering: bool) -> list[asyncio.Task[None]]:
        found: list[asyncio.Task[None]] = []
        for lane in self._lanes.values():
            if intakes:
                found.extend(lane.intakes)
            if answering:
                found.extend(task for task in (lane.worker, lane.notifier) if task is not None)
        return found

    def _drop(self, key: str, lane: _Lane) -> None:
        """Forget the lane once nothing of it runs but, perhaps, the caller winding down."""
        current = asyncio.current_task()
        busy = any(task is not None and task is not current and not task.done()
                   for task in (*lane.intakes, lane.worker, lane.notifier))
        if self._lanes.get(key) is lane and not (busy or lane.answers or lane.notes):
            del self._lanes[key]


async def _wait_all(tasks: Callable[[], list[asyncio.Task[None]]], until: float) -> None:
    """Until every task ``tasks()`` names, including those started meanwhile, has ended,
    or the loop's clock reaches ``until``."""
    loop = asyncio.get_running_loop()
    while (running := tasks()) and loop.time() < until:
        await asyncio.wait(running, timeout=until - loop.time())


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _settle(future: asyncio.Future[Intake], value: Intake) -> None:
    if not future.done():  # an adapter that stopped waiting may have cancelled it
        future.set_result(value)


def _resolve(ticket: Ticket) -> None:
    if not ticket.done.done():
        ticket.done.set_result(None)
