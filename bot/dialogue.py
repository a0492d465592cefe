"""The dialogue manager: the single async entry point every platform adapter calls.

Each message goes through two stages. **Intake** is quick and runs in arrival order per
conversation: addressing, blocked users, commands, and storing the message. When intake is
done the message is *accepted*: it is safe for an adapter to acknowledge it to its platform.
Nothing is sent to the chat during intake: notes and command answers go out afterwards, in
order, so a chat the platform makes wait (flood control) never delays accepting messages.
**Answering** generates replies one at a time per conversation, in order, while different
conversations run concurrently. Per-conversation state lives only while a conversation has
work in progress, so idle conversations cost nothing.

A message that cannot be stored (the database is down) is handled as its adapter asks
(``OnFailure``): left for the platform to redeliver, kept and tried again in-process, or
answered with a note at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self

from bot.answering import Question, Responder
from bot.commands import (
    CommandCall,
    CommandContext,
    CommandRegistry,
    may_run,
    needs_admin,
    parse_arguments,
    parse_call,
)
from bot.config import Settings
from bot.errors import CommandError, DeliveryError, StorageError
from bot.events import IncomingMessage, ReplySink
from bot.generators import Generator as TextGenerator
from bot.ratelimit import RateLimiter
from bot.store import Conversation, NewUserMessage, PendingMessage, State, Store
from bot.streaming import ReplyStream

logger = logging.getLogger(__name__)

EMPTY_NOTE = "Your message was empty: send me some text."
UNSUPPORTED_NOTE = "I can only read text for now, so I cannot see that {what}."
INTAKE_FAILED_NOTE = "Sorry, I could not take your message just now. Please send it again."
PENDING_LIMIT = 1000
INTAKE_RETRY_S = 300.0
"""How long ``OnFailure.RETRY`` keeps a message it could not store before telling its
author (each try already includes the store's own retries of about 11 s)."""
INTAKE_RETRY_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Waits between those tries; the last one repeats."""
LATE_INTAKE_S = 5.0
RATE_LIMITED_NOTE = ("You are sending messages faster than I can answer. Please wait "
                     "{wait} and send that again.")
QUOTA_NOTE = ("You have used today's allowance of {quota} reply tokens. It renews at "
              "midnight UTC, in {wait}.")

AdminCheck = Callable[[], Awaitable[bool]]
"""Asks the platform whether the author administers the chat; called only when a command
needs to know."""


class Intake(enum.Enum):
    """How a message's intake ended: what its adapter may tell the platform."""

    TAKEN = "taken"
    """Stored (or needs no storing): acknowledge it."""
    FAILED = "failed"
    """Could not be stored: leave it for the platform to redeliver. (With
    ``OnFailure.TELL`` or ``RETRY`` its author has been told to send it again.)"""
    CLOSED = "closed"
    """Not taken, shutting down: leave it for the platform to redeliver after the restart."""


class OnFailure(enum.Enum):
    """What to do with a message whose intake fails because the database does."""

    TELL = "tell"
    """Tell its author at once to send it again (the console; a last redelivery)."""
    REDELIVER = "redeliver"
    """Say nothing: the platform delivers it again unless it is acknowledged (Telegram)."""
    RETRY = "retry"
    """Keep it and try again for ``INTAKE_RETRY_S``, then tell its author (Discord, which
    never redelivers)."""


@dataclass(eq=False)
class Ticket:
    """What ``submit`` hands back. Await it for the message to be fully handled."""

    accepted: asyncio.Future[Intake]
    """Settled as soon as intake ends (before any note is sent)."""
    done: asyncio.Future[None]

    def __await__(self) -> Generator[Any, None, None]:
        return self.done.__await__()


@dataclass
class _Lane:
    """One conversation's work in progress."""

    intake: asyncio.Task[None] | None = None
    """The newest intake; each waits for the one before it."""
    answers: deque[tuple[Question, ReplySink, Ticket]] = field(default_factory=deque)
    worker: asyncio.Task[None] | None = None
    notes: deque[tuple[str, ReplySink, Ticket]] = field(default_factory=deque)
    """Notes and command answers to send, in order, apart from intake and answering."""
    notifier: asyncio.Task[None] | None = None
    in_flight: set[str] = field(default_factory=set)
    """Platform ids of messages queued or being answered (a redelivery must not repeat)."""
    answering: Question | None = None


class DialogueManager:
    def __init__(self, *, store: Store, generator: TextGenerator, settings: Settings,
                 commands: CommandRegistry, clock: Callable[[], float] = time.monotonic,
                 shutdown_grace: float = 10.0) -> None:
        self._store = store
        self._generator = generator
        self._settings = settings
        self._commands = commands
        self._clock = clock
        self._grace = shutdown_grace
        self._responder = Responder(store=store, generator=generator, settings=settings,
                                    clock=clock)
        self._lanes: dict[str, _Lane] = {}
        self._limiter = RateLimiter(settings.rate_per_minute, settings.rate_burst, clock)
        self._closing = False
        self._stopping = asyncio.Event()
        """Set with ``_closing``: wakes intakes waiting to try the database again."""
        self._closed = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    @property
    def active_conversations(self) -> int:
        return len(self._lanes)

    @property
    def rate_limited_users(self) -> int:
        """Users whose message allowance is not full again (the rest are not tracked)."""
        return self._limiter.tracked

    async def close(self) -> None:
        """Stop answering: running replies get the grace period to finish, then end with a
        note. Messages that arrive meanwhile are still stored (as pending, for the next start
        to answer) but not answered, and commands are not run; after ``close`` returns,
        nothing more is taken."""
        if self._closed:
            return
        self._closing = True
        self._stopping.set()
        tasks = [task for lane in self._lanes.values()
                 for task in (lane.intake, lane.worker, lane.notifier) if task is not None]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=self._grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        # Intakes that started during the grace period only store; let them finish.
        late = [lane.intake for lane in self._lanes.values() if lane.intake is not None]
        if late:
            await asyncio.wait(late, timeout=LATE_INTAKE_S)
        self._closed = True

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
        lane.intake = asyncio.create_task(
            self._intake(key, lane, lane.intake, message, sink, chat_admin, on_failure,
                         ticket),
            name=f"chinwag:intake:{key}")
        return ticket

    async def handle(self, message: IncomingMessage, sink: ReplySink) -> None:
        await self.submit(message, sink)

    async def pending(self, platform: str) -> Sequence[PendingMessage]:
        """Messages of a platform accepted but not answered (the process stopped first),
        within ``CHINWAG_RESUME_MINUTES``; an adapter resubmits them at start."""
        since = datetime.now(UTC) - timedelta(minutes=self._settings.resume_minutes)
        return await self._store.pending(platform, since, PENDING_LIMIT)

    # Intake.

    async def _intake(self, key: str, lane: _Lane, previous: asyncio.Task[None] | None,
                      message: IncomingMessage, sink: ReplySink, chat_admin: AdminCheck | None,
                      on_failure: OnFailure, ticket: Ticket) -> None:
        queued = False
        try:
            if previous is not None:
                await asyncio.wait([previous])
            intake, outcome = await self._take(key, lane, message, chat_admin, on_failure)
            _settle(ticket.accepted, intake)
            if self._closing:
                if intake is Intake.FAILED and isinstance(outcome, str):
                    # Dropped: the one note still worth sending while stopping (``close``
                    # waits for late intakes, not for the notes they would queue).
                    await self._say(sink, outcome, key)
                if isinstance(outcome, Question):
                    logger.info("%s: stored %s to answer after the restart", key,
                                message.message_id)
                return
            if isinstance(outcome, Question):
                lane.in_flight.add(message.message_id)
                lane.answers.append((outcome, sink, ticket))
                queued = True
                if lane.worker is None:
                    lane.worker = asyncio.create_task(self._answer_all(key, lane),
                                                      name=f"chinwag:answer:{key}")
            elif outcome is not None:
                # Sent apart from intake: the platform may make this chat wait (flood
                # control), and the next message must not wait with it.
                lane.notes.append((outcome, sink, ticket))
                queued = True
                if lane.notifier is None:
                    lane.notifier = asyncio.create_task(self._say_all(key, lane),
                                                        name=f"chinwag:notes:{key}")
        except DeliveryError as exc:
            logger.warning("%s: could not deliver a note for %s: %s", key, message.message_id,
                           exc)
        finally:
            _settle(ticket.accepted, Intake.FAILED)
            if not queued:
                _resolve(ticket)
            self._drop(key, lane)

    async def _take(self, key: str, lane: _Lane, message: IncomingMessage,
                    chat_admin: AdminCheck | None, on_failure: OnFailure
                    ) -> tuple[Intake, Question | str | None]:
        """Decide, trying again as ``on_failure`` says while the database fails."""
        checks = _Checks()
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + INTAKE_RETRY_S
        for attempt in itertools.count(1):
            try:
                return Intake.TAKEN, await self._decide(key, lane, message, chat_admin, checks)
            except StorageError as exc:
                delay = INTAKE_RETRY_DELAYS_S[min(attempt, len(INTAKE_RETRY_DELAYS_S)) - 1]
                if on_failure is OnFailure.REDELIVER:
                    logger.warning("%s: could not store message %s (%s); leaving it for "
                                   "the platform to deliver again", key, message.message_id,
                                   exc)
                    return Intake.FAILED, None
                if on_failure is OnFailure.RETRY and not self._closing \
                        and loop.time() + delay < give_up_at:
                    logger.warning("%s: could not store message %s (%s); try %s again in "
                                   "%s s", key, message.message_id, exc, attempt, delay)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), delay)
                    continue
                logger.error("%s: could not store message %s (%s); asking its author to "
                             "send it again", key, message.message_id, exc)
                return Intake.FAILED, INTAKE_FAILED_NOTE
            except Exception:
                # The core's top-level handler: one bad message never stops the others.
                # Not the database: another try would fail the same way, so say so now.
                logger.exception("%s: could not take message %s", key, message.message_id)
                return Intake.TAKEN, INTAKE_FAILED_NOTE
        raise AssertionError("unreachable")

    async def _decide(self, key: str, lane: _Lane, message: IncomingMessage,
                      chat_admin: AdminCheck | None, checks: _Checks) -> Question | str | None:
        """What to do with a message: answer it, say something, or nothing."""
        text = message.text.strip()
        call = parse_call(text)
        if call is None and not message.addressed_to_bot:
            listening = await self._store.find_conversation(key)
            if listening is None or not listening.answer_all:
                return None
        if await self._store.touch_user(message.platform, message.author_id,
                                        message.author_name):
            logger.info("%s: ignored message %s from blocked user %s", key,
                        message.message_id, message.user_key)
            return None
        conversation = await self._store.conversation(key)
        if call is not None:
            if self._closing:
                logger.info("%s: not running /%s while stopping", key, call.name)
                return None
            return await self._run_command(call, message, conversation, chat_admin, lane)
        if not text:
            if message.unsupported:
                return UNSUPPORTED_NOTE.format(what=message.unsupported)
            return EMPTY_NOTE
        if message.message_id in lane.in_flight:
            logger.info("%s: message %s is being answered already", key, message.message_id)
            return None
        if not self._known_admin(message) and not checks.within_limits:
            refusal = await self._over_limit(key, message)
            if refusal is not None and chat_admin is not None and await chat_admin():
                # A chat's administrators are exempt. Asked only when the limit would
                # refuse, so the platform is asked about the few who send that much.
                refusal = None
            if refusal is not None:
                return refusal or None
            # A try again after a database failure must not spend the allowance twice.
            checks.within_limits = True
        tokens = await asyncio.to_thread(self._generator.count_tokens, "user", text) \
            if len(text) > 4096 else self._generator.count_tokens("user", text)
        admission = await self._store.add_user_message(NewUserMessage(
            conversation_id=conversation.id, platform=message.platform,
            author_id=message.author_id, author_name=message.author_name,
            platform_message_id=message.message_id, text=text, tokens=tokens,
            reply_to_platform_id=message.reply_to_message_id,
        ))
        if admission.state is not State.PENDING:
            logger.info("%s: message %s was handled before (%s); not answering again", key,
                        message.message_id, admission.state)
            return None
        if not admission.new:
            logger.info("%s: answering message %s left pending", key, message.message_id)
        return Question(key=key, platform=message.platform, author_id=message.author_id,
                        platform_message_id=message.message_id,
                        whole_history=message.is_direct or conversation.answer_all,
                        received_at=message.received_at, message=admission.message,
                        conversation=conversation)

    def _known_admin(self, message: IncomingMessage) -> bool:
        return (self._settings.is_admin(message.user_key) or message.author_is_chat_admin
                or message.platform == "console")

    async def _over_limit(self, key: str, message: IncomingMessage) -> str | None:
        """A note (or ``""``: refuse silently) when the author is over a limit."""
        refusal = self._limiter.take(message.user_key)
        if refusal is not None:
            logger.info("%s: message %s from %s is over the rate limit", key,
                        message.message_id, message.user_key)
            return RATE_LIMITED_NOTE.format(wait=_duration(refusal.retry_after)) \
                if refusal.tell else ""
        quota = self._settings.daily_tokens
        if quota:
            now = datetime.now(UTC)
            used = await self._store.reply_tokens_on(message.platform, message.author_id,
                                                     now.date())
            if used >= quota:
                logger.info("%s: %s is over the daily quota (%s of %s tokens)", key,
                            message.user_key, used, quota)
                midnight = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(),
                                            tzinfo=UTC)
                return QUOTA_NOTE.format(quota=quota,
                                         wait=_duration((midnight - now).total_seconds()))
        return None

    async def _run_command(self, call: CommandCall, message: IncomingMessage,
                           conversation: Conversation, chat_admin: AdminCheck | None,
                           lane: _Lane) -> str | None:
        key = message.conversation_key
        command = self._commands.get(call.name)
        if command is None:
            if message.addressed_to_bot:
                return f"Unknown command /{call.name}. Send /help for the list."
            return None
        is_admin = self._known_admin(message)
        if not is_admin and chat_admin is not None and needs_admin(command, message):
            is_admin = await chat_admin()
        if not may_run(command, message, is_admin):
            logger.info("%s: refused /%s to %s", key, command.name, message.user_key)
            return f"Sorry, /{command.name} is for admins only."
        def stop_reply() -> bool:
            running = lane.answering
            if running is None or not (is_admin or running.author_id == message.author_id):
                return False
            running.stop.set()
            return True

        try:
            args = parse_arguments(command, call.argument_text)
            answer = await command.handler(CommandContext(
                message=message, args=args, conversation=conversation, is_admin=is_admin,
                store=self._store, settings=self._settings, generator=self._generator,
                registry=self._commands, stop_reply=stop_reply,
            ))
        except CommandError as exc:
            answer = str(exc)
        logger.info("%s: ran /%s for %s", key, command.name, message.user_key)
        return answer

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
        finally:
            for _text, _sink, ticket in lane.notes:
                ticket.done.cancel()
            lane.notes.clear()
            lane.notifier = None
            self._drop(key, lane)

    async def _say(self, sink: ReplySink, text: str, key: str) -> None:
        stream = ReplyStream(sink, interval=0.0, clock=self._clock, key=key)
        await stream.push(text)
        await stream.finish()

    # Answering.

    async def _answer_all(self, key: str, lane: _Lane) -> None:
        try:
            while lane.answers:
                question, sink, ticket = lane.answers[0]
                lane.answering = question
                try:
                    await self._responder.answer(question, sink)
                except Exception:
                    logger.exception("%s: answering %s failed", key,
                                     question.platform_message_id)
                finally:
                    lane.answering = None
                    lane.answers.popleft()
                    lane.in_flight.discard(question.platform_message_id)
                    _resolve(ticket)
        finally:
            for _question, _sink, ticket in lane.answers:
                ticket.done.cancel()
            lane.answers.clear()
            lane.worker = None
            self._drop(key, lane)

    def _drop(self, key: str, lane: _Lane) -> None:
        """Forget the lane once nothing of it runs but, perhaps, the caller winding down."""
        current = asyncio.current_task()
        busy = any(task is not None and task is not current and not task.done()
                   for task in (lane.intake, lane.worker, lane.notifier))
        if self._lanes.get(key) is lane and not (busy or lane.answers or lane.notes):
            del self._lanes[key]


@dataclass
class _Checks:
    """What one message's intake has checked already, kept across its tries."""

    within_limits: bool = False


def _duration(seconds: float) -> str:
    seconds = max(1, round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    if minutes < 90:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


def _settle(future: asyncio.Future[Intake], value: Intake) -> None:
    if not future.done():  # an adapter that stopped waiting may have cancelled it
        future.set_result(value)


def _resolve(ticket: Ticket) -> None:
    if not ticket.done.done():
        ticket.done.set_result(None)
