"""Answering one stored user message: gather its context, generate, stream, store.

The dialogue manager decides *whether* and *when* to answer; this module does the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from bot.config import Settings
from bot.errors import (
    Busy,
    ChinwagError,
    DeliveryError,
    GenerationError,
    ModelUnavailable,
    StorageError,
)
from bot.events import ReplySink
from bot.generators import GenerationParams, Generator
from bot.generators.base import window_holds_reply
from bot.generators.pool import InUse, ModelPool
from bot.i18n import N_, SOURCE_LANGUAGE, Translator, translator
from bot.metrics import Metrics
from bot.prompt import Budget, Prompt, build_prompt, history_room
from bot.store import Conversation, NewReply, Store, StoredMessage
from bot.streaming import ReplyStream

if TYPE_CHECKING:
    from bot.memory import Memory

logger = logging.getLogger(__name__)

HISTORY_PAGE = 64
TYPING_EVERY_S = 4.0
# Notes are English here, translated for whoever asked (``bot/i18n.py``).
SHUTDOWN_NOTE = N_("(Interrupted: I am restarting. If this is not answered when I am back, "
                   "please ask again.)")
TRUNCATED_NOTE = N_("(Your message was too long for my context window, so I read only its "
                    "beginning.)")
FAILED_NOTE = N_("Sorry, I could not finish this reply ({reason}). Please try again.")
STOPPED_NOTE = N_("(Stopped.)")
TOO_LONG_REASON = N_("it took too long")
UNKNOWN_REASON = N_("the model failed")
NOT_LOADED_REASON = N_("the model could not be loaded")
"""Said where a generator's reason has no translation (one with details in it)."""


@dataclass(frozen=True, slots=True)
class Question:
    """A stored user message to answer, with what its context policy needs."""

    key: str
    platform: str
    author_id: str
    platform_message_id: str
    whole_history: bool
    """The context is the conversation's history (a direct chat, a listening channel),
    not the reply chain."""
    received_at: datetime
    message: StoredMessage
    conversation: Conversation
    language: str = SOURCE_LANGUAGE
    """The asker's language (``bot.i18n``): notes and the default system prompt use it."""
    stop: asyncio.Event = field(default_factory=asyncio.Event, compare=False)
    """Set by ``/stop``: the reply ends where it is."""


async def until_stopped(pieces: AsyncIterator[str],
                        stop: asyncio.Event) -> AsyncGenerator[str, None]:
    """The pieces until ``stop`` is set, which ends the stream at once, even while waiting
    for the next piece. The underlying stream is closed either way, so the generator
    stops working on it."""
    stopped = asyncio.ensure_future(stop.wait())
    waiting: asyncio.Future[str] | None = None
    try:
        while True:
            waiting = asyncio.ensure_future(anext(pieces))
            await asyncio.wait({waiting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not waiting.done():
                return
            try:
                piece = waiting.result()
            except StopAsyncIteration:
                return
            waiting = None
            yield piece
    finally:
        stopped.cancel()
        if waiting is not None and not waiting.done():
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await waiting
        close = getattr(pieces, "aclose", None)
        if close is not None:
            await close()


class Responder:
    def __init__(self, *, store: Store, models: ModelPool, settings: Settings,
                 clock: Callable[[], float], metrics: Metrics | None = None,
                 memory: Memory | None = None) -> None:
        self._store = store
        self._memory = memory
        self._models = models
        self._settings = settings
        self._clock = clock
        self._metrics = metrics or Metrics()

    def _budget(self, conversation: Conversation, generator: Generator) -> Budget:
        window = self._settings.context_tokens
        model_window = generator.context_window
        if model_window is not None:
            window = min(window, model_window)
        reply = conversation.max_reply_tokens or self._settings.max_reply_tokens
        if not window_holds_reply(generator):  # the decoder writes it, not the window
            reply = 0
        return Budget(window, min(reply, window // 2), generator.prompt_overhead)

    async def _counted(self, message: StoredMessage, model: InUse) -> StoredMessage:
        """The message with its tokens as the model in use counts them: a message counted
        by another model (the chat chose this one since) is counted again, off the event
        loop (a window's worth of history takes a tokenizer milliseconds)."""
        if self._models.catalog.counts_alike(message.counted_by, model.entry):
            return message
        tokens = await asyncio.to_thread(model.generator.count_tokens, str(message.role),
                                         message.text)
        return replace(message, tokens=tokens)

    async def _candidates(self, question: Question) -> AsyncIterator[StoredMessage]:
        """Context candidates, newest first, by the conversation's context policy."""
        conversation, stored = question.conversation, question.message
        after = conversation.reset_after_id
        if question.whole_history:
            before = stored.id
            while True:
                page = await self._store.history(conversation.id, after, before, HISTORY_PAGE)
                for item in page:
                    yield item
                if len(page) < HISTORY_PAGE:
                    return
                before = page[-1].id
        elif stored.reply_to_id is not None:
            # A reply continues its chain: walk the reply links upwards.
            next_id: int | None = stored.reply_to_id
            while next_id is not None and next_id > after:
                linked = await self._store.message(next_id)
                if linked is None or linked.conversation_id != conversation.id:
                    return
                yield linked
                next_id = linked.reply_to_id
        else:
            # A fresh mention starts a chain carrying the author's recent exchange.
            since = question.received_at - timedelta(
                minutes=self._settings.group_carry_minutes)
            for item in await self._store.author_exchange(
                conversation.id, question.author_id, after, stored.id, since, HISTORY_PAGE
            ):
                yield item

    async def _prompt(self, question: Question, model: InUse) -> Prompt:
        conversation, generator = question.conversation, model.generator
        stored = await self._counted(question.message, model)
        system = conversation.persona or self._settings.default_system_prompt(
            translator(question.language))
        budget = self._budget(conversation, generator)
        system_tokens = generator.count_tokens("system", system)
        room = history_room(budget, system_tokens, stored.tokens)
        candidates: list[StoredMessage] = []
        gathered = 0
        async for item in self._candidates(question):
            item = await self._counted(item, model)
            candidates.append(item)
            gathered += item.tokens
            if gathered > room:
                break
        prompt = build_prompt(system=system, user_text=stored.text, history=candidates,
                              budget=budget, count=generator.count_tokens,
                              truncate=generator.truncate, user_tokens=stored.tokens)
        if self._memory is None or prompt.history_used == len(candidates) \
                or prompt.input_truncated:
            return prompt
        # The budget dropped older turns: the relevant ones come back as a note.
        oldest = candidates[prompt.history_used - 1].id if prompt.history_used else stored.id
        recollection = await self._memory.recall(
            question.key, conversation, stored, before_id=oldest, room=room,
            count=generator.count_tokens, truncate=generator.truncate)
        if recollection is None:
            return prompt
        with_note = build_prompt(system=f"{system}\n\n{recollection.note}",
                                 user_text=stored.text, history=candidates, budget=budget,
                                 count=generator.count_tokens,
                                 truncate=generator.truncate, user_tokens=stored.tokens)
        return prompt if with_note.input_truncated else with_note

    def _params(self, conversation: Conversation) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=conversation.max_reply_tokens or self._settings.max_reply_tokens,
            temperature=self._settings.temperature if conversation.temperature is None
            else conversation.temperature,
            top_p=self._settings.top_p,
            repetition_penalty=self._settings.repetition_penalty,
        )

    async def answer(self, question: Question, sink: ReplySink, *,
                     arrived: float | None = None) -> None:
        """``arrived``: when the message came (``clock``), from which its latency counts;
        now if not given. Answered by the conversation's model, pinned meanwhile."""
        arrived = self._clock() if arrived is None else arrived
        chosen = question.conversation.model
        # A model that must load first (or wait for room) takes a while: show "typing".
        loading = None if self._models.is_loaded(self._models.catalog.resolve(chosen)) \
            else asyncio.create_task(self._keep_typing(sink))
        async with contextlib.AsyncExitStack() as pinned:
            try:
                model = await pinned.enter_async_context(self._models.use(chosen))
            except ModelUnavailable as exc:
                await self._not_loaded(question, sink, exc)
                return
            except asyncio.CancelledError:
                await self._interrupted(question, sink)
                raise
            finally:
                if loading is not None:
                    loading.cancel()
            await self._answer(question, sink, arrived, model)

    async def _not_loaded(self, question: Question, sink: ReplySink,
                          exc: ModelUnavailable) -> None:
        logger.warning("%s: not answering %s: %s", question.key, question.platform_message_id,
                       exc)
        await self._store.mark_failed(question.message.id)
        tr = translator(question.language)
        stream = ReplyStream(sink, interval=0.0, clock=self._clock, key=question.key)
        await stream.finish(note=tr.gettext(FAILED_NOTE).format(
            reason=tr.gettext(NOT_LOADED_REASON)))
        self._metrics.failed(question.platform, "generation")

    async def _interrupted(self, question: Question, sink: ReplySink) -> None:
        """Shutdown before the reply began: the message stays pending for the restart."""
        stream = ReplyStream(sink, interval=0.0, clock=self._clock, key=question.key)
        with contextlib.suppress(ChinwagError, TimeoutError):
            async with asyncio.timeout(5):
                await stream.finish(note=translator(question.language).gettext(SHUTDOWN_NOTE))

    async def _answer(self, question: Question, sink: ReplySink, arrived: float,
                      model: InUse) -> None:
        key, stored = question.key, question.message
        generator = model.generator
        tr = translator(question.language)
        prompt = await self._prompt(question, model)
        logger.info("%s: answering %s with %s prompt tokens (%s history messages)", key,
                    question.platform_message_id, prompt.tokens, prompt.history_used)
        async def remember_draft(platform_ids: list[str]) -> None:
            try:
                await self._store.set_reply_draft(stored.id, platform_ids)
            except StorageError as exc:  # only a crash would need it; the reply goes on
                logger.warning("%s: could not note where the reply to %s shows: %s", key,
                               question.platform_message_id, exc)

        if stored.reply_draft_ids:
            logger.info("%s: continuing the interrupted reply to %s in messages %s", key,
                        question.platform_message_id, ", ".join(stored.reply_draft_ids))
        stream = ReplyStream(sink, interval=self._settings.edit_interval, clock=self._clock,
                             key=key, continue_in=stored.reply_draft_ids,
                             on_send=remember_draft)
        if prompt.input_truncated:
            await stream.push(tr.gettext(TRUNCATED_NOTE) + "\n\n")
        reply_parts: list[str] = []
        started = self._clock()
        typing = asyncio.create_task(self._keep_typing(sink))
        try:
            async with asyncio.timeout(self._settings.generation_timeout):
                pieces = generator.stream(prompt.messages,
                                                self._params(question.conversation))
                async with contextlib.aclosing(until_stopped(pieces, question.stop)) as text:
                    async for piece in text:
                        first = not reply_parts
                        if first:
                            typing.cancel()
                        reply_parts.append(piece)
                        await stream.push(piece)
                        if first:
                            self._metrics.first_text(question.platform,
                                                     self._clock() - arrived)
        except (GenerationError, TimeoutError) as exc:
            reason = TOO_LONG_REASON if isinstance(exc, TimeoutError) else str(exc)
            logger.warning("%s: generation for %s failed: %s", key,
                           question.platform_message_id, reason)
            await self._store.mark_failed(stored.id)
            await stream.finish(note=tr.gettext(FAILED_NOTE).format(
                reason=_user_reason(reason, tr)))
            if isinstance(exc, Busy):
                self._metrics.refused(question.platform, "busy")
            else:
                self._metrics.failed(question.platform, "timeout"
                                     if isinstance(exc, TimeoutError) else "generation")
            return
        except asyncio.CancelledError:
            # Shutdown: the message stays pending, so a restart can answer it.
            with contextlib.suppress(ChinwagError, TimeoutError):
                async with asyncio.timeout(5):
                    await stream.finish(note=tr.gettext(SHUTDOWN_NOTE))
            raise
        finally:
            typing.cancel()
        elapsed_ms = round((self._clock() - started) * 1000)
        reply_text = "".join(reply_parts)
        try:
            platform_ids = await stream.finish(
                tr.gettext(STOPPED_NOTE) if question.stop.is_set() else "")
        except DeliveryError as exc:
            logger.warning("%s: could not deliver the reply to %s: %s", key,
                           question.platform_message_id, exc)
            platform_ids = stream.message_ids
        reply_tokens = generator.count_tokens("assistant", reply_text)
        await self._store.add_reply(NewReply(
            conversation_id=question.conversation.id, reply_to_id=stored.id,
            platform=question.platform, author_id=question.author_id, text=reply_text,
            tokens=reply_tokens, prompt_tokens=prompt.tokens, generation_ms=elapsed_ms,
            platform_message_ids=platform_ids,
            counted_by=self._models.catalog.recorded(model.entry),
        ))
        if self._memory is not None:
            self._memory.stored()  # the question and its reply, to embed
        self._metrics.answered(question.platform, seconds=self._clock() - arrived,
                               prompt_tokens=prompt.tokens, reply_tokens=reply_tokens)
        logger.info("%s: answered %s in %s ms", key, question.platform_message_id, elapsed_ms)

    async def _keep_typing(self, sink: ReplySink) -> None:
        while True:
            try:
                await sink.typing()
            except DeliveryError:
                pass
            await asyncio.sleep(TYPING_EVERY_S)


def _user_reason(reason: str, tr: Translator) -> str:
    """A generator's reason as the asker reads it: the generators' fixed reasons are marked
    for translation; one with details in it (a server's status) shows as a plain "the
    model failed" in a language that has no text for it (the log keeps the details)."""
    return tr.gettext(reason if tr.translates(reason) else UNKNOWN_REASON)
