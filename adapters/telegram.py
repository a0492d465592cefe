"""The Telegram adapter on python-telegram-bot: direct messages, groups and forum topics.

Runs inside Chinwag's own event loop (``async with``; never ``run_polling``, which takes
over the loop and the signals).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Self, TypeVar

from telegram import Bot, BotCommand, Message, ReplyParameters, Update
from telegram.constants import ChatAction, ChatType, MessageEntityType, MessageLimit
from telegram.error import InvalidToken, RetryAfter, TelegramError
from telegram.ext import ApplicationBuilder, ContextTypes, MessageHandler, filters

from bot.commands import CommandRegistry
from bot.dialogue import DialogueManager
from bot.errors import ConfigError, DeliveryError
from bot.events import IncomingMessage

logger = logging.getLogger(__name__)

PLATFORM = "telegram"
MAX_RETRIES = 3
T = TypeVar("T")


def normalize(message: Message, bot_id: int, bot_username: str) -> IncomingMessage | None:
    """A Telegram message as Chinwag sees it; ``None`` when it is not for us to handle
    (no text, a command aimed at another bot, no author)."""
    text = message.text or message.caption
    if text is None or message.from_user is None:
        return None
    handle = f"@{bot_username}".lower()
    mentions_bot = False
    for entity in message.entities or message.caption_entities or ():
        chunk = text[entity.offset:entity.offset + entity.length]
        if entity.type == MessageEntityType.MENTION and chunk.lower() == handle:
            mentions_bot = True
        elif entity.type == MessageEntityType.TEXT_MENTION and entity.user is not None:
            mentions_bot = mentions_bot or entity.user.id == bot_id
        elif entity.type == MessageEntityType.BOT_COMMAND and entity.offset == 0:
            command, _, target = chunk.partition("@")
            if target and target.lower() != bot_username.lower():
                return None  # /cmd@otherbot
            if target:
                text = command + text[entity.length:]
    if mentions_bot:
        text = " ".join(part for part in text.split(" ") if part.lower() != handle)
    reply = message.reply_to_message
    is_topic = bool(message.is_topic_message and message.message_thread_id)
    return IncomingMessage(
        platform=PLATFORM,
        chat_id=str(message.chat.id),
        thread_id=str(message.message_thread_id) if is_topic else None,
        author_id=str(message.from_user.id),
        author_name=message.from_user.full_name,
        message_id=str(message.message_id),
        text=text,
        is_direct=message.chat.type == ChatType.PRIVATE,
        mentions_bot=mentions_bot,
        reply_to_message_id=str(reply.message_id) if reply else None,
        reply_to_bot=bool(reply and reply.from_user and reply.from_user.id == bot_id),
    )


class TelegramSink:
    """Replies in one chat (and topic); in groups, threaded to the message it answers."""

    def __init__(self, bot: Bot, chat_id: int, thread_id: int | None,
                 reply_to: int | None) -> None:
        self._bot = bot
        self._chat_id = chat_id
        self._thread_id = thread_id
        self._reply_to = reply_to

    @property
    def max_message_length(self) -> int:
        return int(MessageLimit.MAX_TEXT_LENGTH)

    async def _call(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        for attempt in range(MAX_RETRIES + 1):
            try:
                return await call()
            except RetryAfter as exc:
                if attempt == MAX_RETRIES:
                    raise DeliveryError(f"{what}: flood control") from exc
                delay = exc.retry_after
                seconds = delay if isinstance(delay, int | float) else delay.total_seconds()
                logger.info("telegram:%s: flood control, retrying %s in %s s", self._chat_id,
                            what, seconds)
                await asyncio.sleep(seconds)
            except TelegramError as exc:
                raise DeliveryError(f"{what}: {exc}") from exc
        raise AssertionError("unreachable")

    async def send(self, text: str, *, final: bool = False) -> str:
        reply = ReplyParameters(self._reply_to, allow_sending_without_reply=True) \
            if self._reply_to else None
        sent = await self._call("sendMessage", lambda: self._bot.send_message(
            self._chat_id, text, message_thread_id=self._thread_id, reply_parameters=reply))
        self._reply_to = None  # continuation messages follow the first part
        return str(sent.message_id)

    async def edit(self, message_id: str, text: str, *, final: bool = False) -> None:
        await self._call("editMessageText", lambda: self._bot.edit_message_text(
            text, chat_id=self._chat_id, message_id=int(message_id)))

    async def typing(self) -> None:
        await self._call("sendChatAction", lambda: self._bot.send_chat_action(
            self._chat_id, ChatAction.TYPING, message_thread_id=self._thread_id))


class TelegramAdapter:
    def __init__(self, token: str, manager: DialogueManager, commands: CommandRegistry,
                 api_url: str, poll_timeout: int = 10) -> None:
        self._manager = manager
        self._commands = commands
        self._poll_timeout = poll_timeout
        self._app = (ApplicationBuilder().token(token).base_url(f"{api_url.rstrip('/')}/bot")
                     .concurrent_updates(True).build())
        self._app.add_handler(MessageHandler(filters.TEXT | filters.CAPTION, self._on_message))

    async def __aenter__(self) -> Self:
        try:
            await self._app.initialize()
        except TelegramError as exc:
            await self._app.bot.shutdown()  # the HTTP clients were opened before getMe failed
            if isinstance(exc, InvalidToken):
                raise ConfigError("CHINWAG_TELEGRAM_TOKEN was refused by Telegram") from exc
            raise DeliveryError(f"cannot reach the Telegram Bot API: {exc}") from exc
        await self._app.bot.set_my_commands(
            [BotCommand(c.name, c.description) for c in self._commands])
        await self._app.start()
        assert self._app.updater is not None
        await self._app.updater.start_polling(timeout=self._poll_timeout,
                                              allowed_updates=[Update.MESSAGE])
        logger.info("telegram: polling as @%s", self._app.bot.username)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        assert self._app.updater is not None
        if self._app.updater.running:
            await self._app.updater.stop()
        if self._app.running:
            await self._app.stop()
        await self._app.shutdown()

    async def _on_message(self, update: Update, context: ContextTypes.DEFAULT_TYPE) -> None:
        message = update.effective_message
        if message is None:
            return
        bot = self._app.bot
        incoming = normalize(message, bot.id, bot.username)
        if incoming is None:
            return
        sink = TelegramSink(bot, message.chat.id,
                            message.message_thread_id if incoming.thread_id else None,
                            None if incoming.is_direct else message.message_id)
        # submit() queues before its first await, so updates keep their order per chat.
        await self._manager.handle(incoming, sink)
