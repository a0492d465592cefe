"""Answering one stored user message: gather its context, generate, stream, store.

The dialogue manager decides *whether* and *when* to answer; this module does the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from bot.config import Settings
from bot.errors import ChinwagError, DeliveryError, GenerationError, StorageError
from bot.events import ReplySink
from bot.generators import GenerationParams, Generator
from bot.prompt import Budget, Prompt, build_prompt, history_room
from bot.store import Conversation, NewReply, Store, StoredMessage
from bot.streaming import ReplyStream

logger = logging.getLogger(__name__)

HISTORY_PAGE = 64
TYPING_EVERY_S = 4.0
SHUTDOWN_NOTE = ("(Interrupted: I am restarting. If this is not answered when I am back, "
                 "please ask again.)")
TRUNCATED_NOTE = ("(Your message was too long for my context window, so I read only its "
                  "beginning.)")
FAILED_NOTE = "Sorry, I could not finish this reply ({reason}). Please try again."
STOPPED_NOTE = "(Stopped.)"


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
    def __init__(self, *, store: Store, generator: Generator, settings: Settings,
                 clock: Callable[[], float]) -> None:
        self._store = store
        self._generator = generator
        self._settings = settings
        self._clock = clock

    def _budget(self, conversation: Conversation) -> Budget:
        window = self._settings.context_tokens
        model_window = self._generator.context_window
        if model_window is not None:
            window = min(window, model_window)
        reply = conversation.max_reply_tokens or self._settings.max_reply_tokens
        return Budget(window, min(reply, window // 2), self._generator.prompt_overhead)

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

    async def _prompt(self, question: Question) -> Prompt:
        conversation, stored = question.conversation, question.message
        system = conversation.persona or self._settings.system_prompt
        budget = self._budget(conversation)
        system_tokens = self._generator.count_tokens("system", system)
        room = history_room(budget, system_tokens, stored.tokens)
        candidates: list[StoredMessage] = []
        gathered = 0
        async for item in self._candidates(question):
            candidates.append(item)
            gathered += item.tokens
            if gathered > room:
                break
        return build_prompt(system=system, user_text=stored.text, history=candidates,
                            budget=budget, count=self._generator.count_tokens,
                            truncate=self._generator.truncate, user_tokens=stored.tokens)

    def _params(self, conversation: Conversation) -> GenerationParams:
        return GenerationParams(
            max_new_tokens=conversation.max_reply_tokens or self._settings.max_reply_tokens,
            temperature=self._settings.temperature if conversation.temperature is None
            else conversation.temperature,
            top_p=self._settings.top_p,
            repetition_penalty=self._settings.repetition_penalty,
        )

    async def answer(self, question: Question, sink: ReplySink) -> None:
        key, stored = question.key, question.message
        prompt = await self._prompt(question)
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
            await stream.push(TRUNCATED_NOTE + "\n\n")
        reply_parts: list[str] = []
        started = self._clock()
        typing = asyncio.create_task(self._keep_typing(sink))
        try:
            async with asyncio.timeout(self._settings.generation_timeout):
                pieces = self._generator.stream(prompt.messages,
                                                self._params(question.conversation))
                async with contextlib.aclosing(until_stopped(pieces, question.stop)) as text:
                    async for piece in text:
                        if not reply_parts:
                            typing.cancel()
                        reply_parts.append(piece)
                        await stream.push(piece)
        except (GenerationError, TimeoutError) as exc:
            reason = "it took too long" if isinstance(exc, TimeoutError) else str(exc)
            logger.warning("%s: generation for %s failed: %s", key,
                           question.platform_message_id, reason)
            await self._store.mark_failed(stored.id)
            await stream.finish(note=FAILED_NOTE.format(reason=reason))
            return
        except asyncio.CancelledError:
            # Shutdown: the message stays pending, so a restart can answer it.
            with contextlib.suppress(ChinwagError, TimeoutError):
                async with asyncio.timeout(5):
                    await stream.finish(note=SHUTDOWN_NOTE)
            raise
        finally:
            typing.cancel()
        elapsed_ms = round((self._clock() - started) * 1000)
        reply_text = "".join(reply_parts)
        try:
            platform_ids = await stream.finish(STOPPED_NOTE if question.stop.is_set() else "")
        except DeliveryError as exc:
            logger.warning("%s: could not deliver the reply to %s: %s", key,
                           question.platform_message_id, exc)
            platform_ids = stream.message_ids
        await self._store.add_reply(NewReply(
            conversation_id=question.conversation.id, reply_to_id=stored.id,
            platform=question.platform, author_id=question.author_id, text=reply_text,
            tokens=self._generator.count_tokens("assistant", reply_text),
            prompt_tokens=prompt.tokens, generation_ms=elapsed_ms,
            platform_message_ids=platform_ids,
        ))
        logger.info("%s: answered %s in %s ms", key, question.platform_message_id, elapsed_ms)

    async def _keep_typing(self, sink: ReplySink) -> None:
        while True:
            try:
                await sink.typing()
            except DeliveryError:
                pass
            await asyncio.sleep(TYPING_EVERY_S)
