"""Intake policy: what to do with one message, and what its intake tells the adapter.

The dialogue manager (``bot/dialogue.py``) decides *when* a message is taken (in order per
conversation, tried again while the database fails); this module decides *what* taking it
means: addressing, blocked users, commands, rate limits and the daily quota, and storing
the message as pending. It sends nothing: what it has to say comes back as a note.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from bot.answering import Question
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
from bot.errors import CommandError
from bot.events import IncomingMessage
from bot.generators.pool import ModelPool
from bot.i18n import N_, Language, Translator, choose, load_all, translator
from bot.ratelimit import RateLimiter
from bot.store import Conversation, NewUserMessage, State, Store

if TYPE_CHECKING:
    from bot.memory import Memory

logger = logging.getLogger(__name__)

# Notes are English here, translated for whoever they go to (``bot/i18n.py``).
EMPTY_NOTE = N_("Your message was empty: send me some text.")
UNSUPPORTED_NOTE = N_("I can only read text for now, so I cannot see that {what}.")
INTAKE_FAILED_NOTE = N_("Sorry, I could not take your message just now. Please send it again.")
RATE_LIMITED_NOTE = N_("You are sending messages faster than I can answer. Please wait "
                       "{wait} and send that again.")
QUOTA_NOTE = N_("You have used today's allowance of {quota} reply tokens. It renews at "
                "midnight UTC, in {wait}.")
UNKNOWN_COMMAND_NOTE = N_("Unknown command /{command}. Send /help for the list.")
ADMINS_ONLY_NOTE = N_("Sorry, /{command} is for admins only.")
INTAKE_RETRY_S = 300.0
"""How long ``OnFailure.RETRY`` keeps a message it could not store before telling its
author (each try already includes the store's own retries of about 11 s)."""
RETRY_DELAYS_S = (1.0, 2.0, 5.0, 10.0, 30.0)
"""Waits before a message that could not be stored is tried again, whether kept
in-process (``OnFailure.RETRY``) or delivered again by its platform; the last repeats."""

AdminCheck = Callable[[], Awaitable[bool]]
"""Asks the platform whether the author administers the chat; called only when a command
or the rate limit needs to know."""


def retry_delay(failures: int) -> float:
    """The wait after the ``failures``-th failure (1 for the first)."""
    return RETRY_DELAYS_S[min(max(failures, 1), len(RETRY_DELAYS_S)) - 1]


class Intake(enum.Enum):
    """How a message's intake ended: what its adapter may tell the platform."""

    STORED = "stored"
    """Stored to be answered (or found stored before): acknowledge it. The database works."""
    TAKEN = "taken"
    """Handled with no message to store (not addressed, a command, a note, over a limit):
    acknowledge it."""
    ERROR = "error"
    """Failed for a reason other than the database: its author was told, and another try
    would fail the same way, so acknowledge it."""
    DROPPED = "dropped"
    """Could not be stored and given up (``OnFailure.TELL``, ``RETRY`` run out, or a stop
    cut it short): its author was told to send it again, so acknowledge it."""
    FAILED = "failed"
    """Not stored (``OnFailure.REDELIVER``): the database failed for it, or for the
    message before it in its conversation. Leave it for the platform to deliver again."""
    CLOSED = "closed"
    """Not taken, shutting down: leave it for the platform to redeliver after the restart."""

    @property
    def acknowledge(self) -> bool:
        """Whether the platform may be told the message arrived."""
        return self not in (Intake.FAILED, Intake.CLOSED)


class OnFailure(enum.Enum):
    """What to do with a message whose intake fails because the database does."""

    TELL = "tell"
    """Tell its author at once to send it again (the console; a last redelivery)."""
    REDELIVER = "redeliver"
    """Say nothing: the platform delivers it again unless it is acknowledged (Telegram).
    The messages submitted to its conversation before that moment fail with it, untried,
    so a conversation keeps its order when they come again."""
    RETRY = "retry"
    """Keep it and try again for ``INTAKE_RETRY_S``, then tell its author (Discord, which
    never redelivers). When the manager stops, it is not tried again: its author is told."""


@dataclass(eq=False)
class Ticket:
    """What ``submit`` hands back. Await it for the message to be fully handled."""

    accepted: asyncio.Future[Intake]
    """Settled as soon as intake ends (before any note is sent)."""
    done: asyncio.Future[None]
    """Resolved once its answer or note is sent (or given up); never cancelled, so an
    adapter awaiting it is not cancelled by a stop it did not ask for."""

    def __await__(self) -> Generator[Any, None, None]:
        return self.done.__await__()


@dataclass(frozen=True, slots=True)
class Decision:
    """What intake made of a message."""

    intake: Intake
    question: Question | None = None
    """Stored and to be answered."""
    note: str | None = None
    """To send to the chat (a command's answer, a refusal, an apology)."""
    received: bool = True
    """A message for the bot, new to it (counted as received): not one in a group that
    is not addressed to it, nor one it has seen before."""
    refused: str | None = None
    """Why it is not answered on purpose, if it is not (``bot.metrics.REFUSALS``)."""


@dataclass(frozen=True, slots=True)
class Refused:
    """The author is over a limit."""

    reason: str
    """``rate_limit`` or ``quota``."""
    note: str | None
    """What to tell them; None to refuse silently (a flood gets one note, not one each)."""


@dataclass
class Checks:
    """What one message's intake has done already, kept across its tries."""

    spent_allowance: bool = False
    """A message of the author's rate allowance was spent on it: given back if it is not
    stored, so a message delivered or tried again is counted once."""


class LaneView(Protocol):
    """What intake reads of its conversation's work in progress."""

    @property
    def in_flight(self) -> set[str]: ...
    @property
    def answering(self) -> Question | None: ...


class IntakePolicy:
    def __init__(self, *, store: Store, models: ModelPool, settings: Settings,
                 commands: CommandRegistry, limiter: RateLimiter,
                 closing: Callable[[], bool], memory: Memory | None = None) -> None:
        self._store = store
        self._memory = memory
        self._models = models
        self._settings = settings
        self._commands = commands
        self._limiter = limiter
        self._closing = closing
        load_all()

    def failed_note(self, message: IncomingMessage) -> str:
        """``INTAKE_FAILED_NOTE`` in the author's language as far as it is known without the
        database (which failed): the platform's, else ``CHINWAG_LANGUAGE``."""
        language = choose(None, message.language, self._settings.language)
        return translator(language.code).gettext(INTAKE_FAILED_NOTE)

    async def decide(self, message: IncomingMessage, lane: LaneView,
                     chat_admin: AdminCheck | None, checks: Checks) -> Decision:
        """What to do with a message: answer it, say something, or nothing. Raises
        ``StorageError`` when the database fails."""
        key = message.conversation_key
        text = message.text.strip()
        call = parse_call(text)
        if call is None and not message.addressed_to_bot:
            listening = await self._store.find_conversation(key)
            if listening is None or not listening.answer_all:
                return Decision(Intake.TAKEN, received=False)
        user = await self._store.touch_user(message.platform, message.author_id,
                                            message.author_name, message.language)
        if user.blocked:
            logger.info("%s: ignored message %s from blocked user %s", key,
                        message.message_id, message.user_key)
            return Decision(Intake.TAKEN, refused="blocked")
        language = choose(user.language, message.language or user.platform_language,
                          self._settings.language)
        tr = translator(language.code)
        conversation = await self._store.conversation(key)
        if call is not None:
            if self._closing():
                logger.info("%s: not running /%s while stopping", key, call.name)
                return Decision(Intake.TAKEN)
            return Decision(Intake.TAKEN, note=await self._run_command(
                call, message, conversation, chat_admin, lane, language))
        if not text:
            if message.unsupported:
                return Decision(Intake.TAKEN, note=tr.gettext(UNSUPPORTED_NOTE).format(
                    what=tr.gettext(message.unsupported)))
            return Decision(Intake.TAKEN, note=tr.gettext(EMPTY_NOTE))
        if message.message_id in lane.in_flight:
            logger.info("%s: message %s is being answered already", key, message.message_id)
            return Decision(Intake.TAKEN, received=False)
        if not self._known_admin(message):
            refused = await self._over_limit(key, message, checks, tr)
            if refused is not None and chat_admin is not None and await chat_admin():
                # A chat's administrators are exempt. Asked only when the limit would
                # refuse, so the platform is asked about the few who send that much.
                refused = None
            if refused is not None and await self._store.stored_before(conversation.id,
                                                                       message.message_id):
                # Delivered again (the platform did not learn that it arrived): it was
                # taken within the limits the first time. Asked only when they would refuse.
                refused = None
            if refused is not None:
                return Decision(Intake.TAKEN, note=refused.note, refused=refused.reason)
        # Counted with the chat's model if it is loaded (nothing is loaded for intake);
        # answering counts again what another model counted.
        async with self._models.counting(conversation.model) as counter:
            tokens = await counter.count("user", text)
        admission = await self._store.add_user_message(NewUserMessage(
            conversation_id=conversation.id, platform=message.platform,
            author_id=message.author_id, author_name=message.author_name,
            platform_message_id=message.message_id, text=text, tokens=tokens,
            reply_to_platform_id=message.reply_to_message_id, counted_by=counter.counted_by,
        ))
        if not admission.new:
            self.give_back(message, checks)  # spent when it was first taken
        if admission.state is not State.PENDING:
            logger.info("%s: message %s was handled before (%s); not answering again", key,
                        message.message_id, admission.state)
            return Decision(Intake.STORED, received=False)
        if not admission.new:
            logger.info("%s: answering message %s left pending", key, message.message_id)
        return Decision(Intake.STORED, question=Question(
            key=key, platform=message.platform, author_id=message.author_id,
            platform_message_id=message.message_id,
            whole_history=message.is_direct or conversation.answer_all,
            received_at=message.received_at, message=admission.message,
            conversation=conversation, language=language.code))

    def give_back(self, message: IncomingMessage, checks: Checks) -> None:
        """The message was not stored after all: what it spent of the allowance is the
        author's again (the platform delivers it again, or they are asked to resend)."""
        if checks.spent_allowance:
            self._limiter.give_back(message.user_key)
            checks.spent_allowance = False

    def _known_admin(self, message: IncomingMessage) -> bool:
        return (self._settings.is_admin(message.user_key) or message.author_is_chat_admin
                or message.platform == "console")

    async def _over_limit(self, key: str, message: IncomingMessage, checks: Checks,
                          tr: Translator) -> Refused | None:
        if not checks.spent_allowance:  # a try again must not spend it twice
            refusal = self._limiter.take(message.user_key)
            if refusal is not None:
                logger.info("%s: message %s from %s is over the rate limit", key,
                            message.message_id, message.user_key)
                return Refused("rate_limit", tr.gettext(RATE_LIMITED_NOTE).format(
                    wait=_duration(refusal.retry_after, tr)) if refusal.tell else None)
            checks.spent_allowance = self._limiter.enabled
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
                return Refused("quota", tr.gettext(QUOTA_NOTE).format(
                    quota=quota, wait=_duration((midnight - now).total_seconds(), tr)))
        return None

    async def _run_command(self, call: CommandCall, message: IncomingMessage,
                           conversation: Conversation, chat_admin: AdminCheck | None,
                           lane: LaneView, language: Language) -> str | None:
        key = message.conversation_key
        tr = translator(language.code)
        command = self._commands.get(call.name)
        if command is None:
            if message.addressed_to_bot:
                return tr.gettext(UNKNOWN_COMMAND_NOTE).format(command=call.name)
            return None
        is_admin = self._known_admin(message)
        if not is_admin and chat_admin is not None and needs_admin(command, message):
            is_admin = await chat_admin()
        if not may_run(command, message, is_admin):
            logger.info("%s: refused /%s to %s", key, command.name, message.user_key)
            return tr.gettext(ADMINS_ONLY_NOTE).format(command=command.name)

        def stop_reply() -> bool:
            running = lane.answering
            if running is None or not (is_admin or running.author_id == message.author_id):
                return False
            running.stop.set()
            return True

        try:
            args = parse_arguments(command, call.argument_text, tr)
            async with self._models.counting(conversation.model) as counter:
                answer = await command.handler(CommandContext(
                    message=message, args=args, conversation=conversation,
                    is_admin=is_admin, store=self._store, settings=self._settings,
                    tokens=counter.tokens, registry=self._commands, language=language,
                    tr=tr, stop_reply=stop_reply, memory=self._memory, models=self._models,
                ))
        except CommandError as exc:
            answer = str(exc)
        logger.info("%s: ran /%s for %s", key, command.name, message.user_key)
        return answer


def _duration(seconds: float, tr: Translator) -> str:
    seconds = max(1, round(seconds))
    if seconds < 90:
        return tr.gettext("{seconds} s").format(seconds=seconds)
    minutes = round(seconds / 60)
    if minutes < 90:
        return tr.gettext("{minutes} min").format(minutes=minutes)
    return tr.gettext("{hours} h {minutes} min").format(hours=minutes // 60,
                                                       minutes=minutes % 60)
