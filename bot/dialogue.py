"""The dialogue manager: the single async entry point every platform adapter calls.

Messages of one conversation are handled one at a time, in the order they were submitted;
different conversations run concurrently. Per-conversation state lives only while the
conversation has messages waiting, so idle conversations cost nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from types import TracebackType
from typing import Self

from bot.commands import (
    CommandCall,
    CommandContext,
    CommandRegistry,
    may_run,
    parse_arguments,
    parse_call,
)
from bot.config import Settings
from bot.errors import ChinwagError, CommandError, DeliveryError, GenerationError
from bot.events import IncomingMessage, ReplySink
from bot.generators import GenerationParams, Generator
from bot.prompt import Budget, Prompt, build_prompt, history_room
from bot.store import Conversation, NewReply, NewUserMessage, Store, StoredMessage
from bot.streaming import ReplyStream

logger = logging.getLogger(__name__)

HISTORY_PAGE = 64
TYPING_EVERY_S = 4.0
SHUTDOWN_NOTE = "(Interrupted: I am restarting. Please ask again in a moment.)"
EMPTY_NOTE = "Your message was empty: send me some text."
TRUNCATED_NOTE = ("(Your message was too long for my context window, so I read only its "
                  "beginning.)")
FAILED_NOTE = "Sorry, I could not finish this reply ({reason}). Please try again."

_Job = tuple[IncomingMessage, ReplySink, "asyncio.Future[None]"]


class DialogueManager:
    def __init__(self, *, store: Store, generator: Generator, settings: Settings,
                 commands: CommandRegistry, clock: Callable[[], float] = time.monotonic,
                 shutdown_grace: float = 10.0) -> None:
        self._store = store
        self._generator = generator
        self._settings = settings
        self._commands = commands
        self._clock = clock
        self._grace = shutdown_grace
        self._queues: dict[str, deque[_Job]] = {}
        self._workers: dict[str, asyncio.Task[None]] = {}
        self._closing = False

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    @property
    def active_conversations(self) -> int:
        return len(self._workers)

    async def close(self) -> None:
        """Stop taking messages; let running replies finish within the grace period."""
        self._closing = True
        workers = list(self._workers.values())
        if not workers:
            return
        _done, pending = await asyncio.wait(workers, timeout=self._grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def submit(self, message: IncomingMessage, sink: ReplySink) -> asyncio.Future[None]:
        """Queue a message; the future completes when it has been handled.

        Queuing happens before this returns, so submission order is handling order.
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._closing:
            future.set_result(None)
            logger.info("%s: not taking message %s, shutting down", message.conversation_key,
                        message.message_id)
            return future
        key = message.conversation_key
        self._queues.setdefault(key, deque()).append((message, sink, future))
        if key not in self._workers:
            self._workers[key] = asyncio.create_task(self._drain(key), name=f"chinwag:{key}")
        return future

    async def handle(self, message: IncomingMessage, sink: ReplySink) -> None:
        await self.submit(message, sink)

    async def _drain(self, key: str) -> None:
        queue = self._queues[key]
        try:
            while queue:
                message, sink, future = queue.popleft()
                try:
                    await self._process(message, sink)
                except Exception:
                    # The core's top-level handler: one bad message never stops the others.
                    logger.exception("%s: message %s failed", key, message.message_id)
                finally:
                    if not future.done():
                        future.set_result(None)
        finally:
            for _message, _sink, future in queue:
                if not future.done():
                    future.cancel()
            self._workers.pop(key, None)
            self._queues.pop(key, None)

    async def _process(self, message: IncomingMessage, sink: ReplySink) -> None:
        key = message.conversation_key
        text = message.text.strip()
        call = parse_call(text)
        if call is None and not message.addressed_to_bot:
            return
        if await self._store.touch_user(message.platform, message.author_id,
                                        message.author_name):
            logger.info("%s: ignored message %s from blocked user %s", key,
                        message.message_id, message.user_key)
            return
        conversation = await self._store.conversation(key)
        if call is not None:
            await self._run_command(call, message, conversation, sink)
            return
        if not text:
            await self._say(sink, EMPTY_NOTE, key)
            return
        await self._reply(message, text, conversation, sink)

    def _is_admin(self, message: IncomingMessage) -> bool:
        return (self._settings.is_admin(message.user_key) or message.author_is_chat_admin
                or message.platform == "console")

    async def _run_command(self, call: CommandCall, message: IncomingMessage,
                           conversation: Conversation, sink: ReplySink) -> None:
        key = message.conversation_key
        command = self._commands.get(call.name)
        if command is None:
            if message.addressed_to_bot:
                await self._say(sink, f"Unknown command /{call.name}. Send /help for the list.",
                                key)
            return
        is_admin = self._is_admin(message)
        if not may_run(command, message, is_admin):
            logger.info("%s: refused /%s to %s", key, command.name, message.user_key)
            await self._say(sink, f"Sorry, /{command.name} is for admins only.", key)
            return
        try:
            args = parse_arguments(command, call.argument_text)
            answer = await command.handler(CommandContext(
                message=message, args=args, conversation=conversation, is_admin=is_admin,
                store=self._store, settings=self._settings, generator=self._generator,
                registry=self._commands,
            ))
        except CommandError as exc:
            answer = str(exc)
        logger.info("%s: ran /%s for %s", key, command.name, message.user_key)
        await self._say(sink, answer, key)

    async def _say(self, sink: ReplySink, text: str, key: str) -> None:
        stream = ReplyStream(sink, interval=0.0, clock=self._clock, key=key)
        await stream.push(text)
        await stream.finish()

    def _budget(self, conversation: Conversation) -> Budget:
        window = self._settings.context_tokens
        model_window = self._generator.context_window
        if model_window is not None:
            window = min(window, model_window)
        reply = conversation.max_reply_tokens or self._settings.max_reply_tokens
        return Budget(window, min(reply, window // 2), self._generator.prompt_overhead)

    async def _candidates(self, message: IncomingMessage, conversation: Conversation,
                          stored: StoredMessage) -> AsyncIterator[StoredMessage]:
        """Context candidates, newest first, by the conversation's context policy."""
        after = conversation.reset_after_id
        if message.is_direct:
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
            since = message.received_at - timedelta(minutes=self._settings.group_carry_minutes)
            for item in await self._store.author_exchange(
                conversation.id, message.author_id, after, stored.id, since, HISTORY_PAGE
            ):
                yield item

    async def _prompt(self, message: IncomingMessage, text: str, user_tokens: int,
                      conversation: Conversation, stored: StoredMessage) -> Prompt:
        system = conversation.persona or self._settings.system_prompt
        budget = self._budget(conversation)
        system_tokens = self._generator.count_tokens("system", system)
        room = history_room(budget, system_tokens, user_tokens)
        candidates: list[StoredMessage] = []
        gathered = 0
        async for item in self._candidates(message, conversation, stored):
            candidates.append(item)
            gathered += item.tokens
            if gathered > room:
                break
        return build_prompt(system=system, user_text=text, history=candidates, budget=budget,
                            count=self._generator.count_tokens,
                            truncate=self._generator.truncate, user_tokens=user_tokens)

    async def _reply(self, message: IncomingMessage, text: str, conversation: Conversation,
                     sink: ReplySink) -> None:
        key = message.conversation_key
        user_tokens = await asyncio.to_thread(self._generator.count_tokens, "user", text) \
            if len(text) > 4096 else self._generator.count_tokens("user", text)
        stored = await self._store.add_user_message(NewUserMessage(
            conversation_id=conversation.id, platform=message.platform,
            author_id=message.author_id, author_name=message.author_name,
            platform_message_id=message.message_id, text=text, tokens=user_tokens,
            reply_to_platform_id=message.reply_to_message_id,
        ))
        if stored is None:
            logger.info("%s: message %s was handled before; not answering again", key,
                        message.message_id)
            return
        prompt = await self._prompt(message, text, user_tokens, conversation, stored)
        params = GenerationParams(
            max_new_tokens=conversation.max_reply_tokens or self._settings.max_reply_tokens,
            temperature=self._settings.temperature if conversation.temperature is None
            else conversation.temperature,
            top_p=self._settings.top_p,
            repetition_penalty=self._settings.repetition_penalty,
        )
        logger.info("%s: answering %s with %s prompt tokens (%s history messages)", key,
                    message.message_id, prompt.tokens, prompt.history_used)
        stream = ReplyStream(sink, interval=self._settings.edit_interval, clock=self._clock,
                             key=key)
        if prompt.input_truncated:
            await stream.push(TRUNCATED_NOTE + "\n\n")
        reply_parts: list[str] = []
        started = self._clock()
        typing = asyncio.create_task(self._keep_typing(sink))
        try:
            async with asyncio.timeout(self._settings.generation_timeout):
                async for piece in self._generator.stream(prompt.messages, params):
                    if not reply_parts:
                        typing.cancel()
                    reply_parts.append(piece)
                    await stream.push(piece)
        except (GenerationError, TimeoutError) as exc:
            reason = "it took too long" if isinstance(exc, TimeoutError) else str(exc)
            logger.warning("%s: generation for %s failed: %s", key, message.message_id, reason)
            await stream.finish(note=FAILED_NOTE.format(reason=reason))
            return
        except asyncio.CancelledError:
            with contextlib.suppress(ChinwagError, TimeoutError):
                async with asyncio.timeout(5):
                    await stream.finish(note=SHUTDOWN_NOTE)
            raise
        finally:
            typing.cancel()
        elapsed_ms = round((self._clock() - started) * 1000)
        reply_text = "".join(reply_parts)
        try:
            platform_ids = await stream.finish()
        except DeliveryError as exc:
            logger.warning("%s: could not deliver the reply to %s: %s", key,
                           message.message_id, exc)
            platform_ids = stream.message_ids
        await self._store.add_reply(NewReply(
            conversation_id=conversation.id, reply_to_id=stored.id, platform=message.platform,
            author_id=message.author_id, text=reply_text,
            tokens=self._generator.count_tokens("assistant", reply_text),
            prompt_tokens=prompt.tokens, generation_ms=elapsed_ms,
            platform_message_ids=platform_ids,
        ))
        logger.info("%s: answered %s in %s ms", key, message.message_id, elapsed_ms)

    async def _keep_typing(self, sink: ReplySink) -> None:
        while True:
            try:
                await sink.typing()
            except DeliveryError:
                pass
            await asyncio.sleep(TYPING_EVERY_S)
