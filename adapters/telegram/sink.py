"""Replies into one Telegram chat (and forum topic): flood control, retries, formatting."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from telegram import Bot, Message, ReplyParameters
from telegram.constants import ChatAction, MessageLimit, ParseMode
from telegram.error import BadRequest, NetworkError, RetryAfter, TelegramError

from adapters.telegram.formatting import has_markup, to_html
from adapters.telegram.normalize import PLATFORM
from adapters.telegram.pacing import ChatPacer
from bot.errors import DeliveryError
from bot.metrics import Metrics

logger = logging.getLogger(__name__)

MAX_ATTEMPTS = 6
BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0)
T = TypeVar("T")


def retry_seconds(exc: RetryAfter) -> float:
    delay = exc.retry_after
    return float(delay if isinstance(delay, int | float) else delay.total_seconds())


class TelegramSink:
    """A ``ReplySink`` for one chat; in groups the first message is threaded to the
    message it answers.

    Required calls (new messages, final texts) are retried through flood control and
    transient faults; optional streaming edits are skipped instead, so they never delay
    the reply. The final text goes out as HTML derived from the model's Markdown; if
    Telegram rejects the entities, the same text is sent plain.
    """

    def __init__(self, bot: Bot, chat_id: int, thread_id: int | None, reply_to: int | None,
                 pacer: ChatPacer, metrics: Metrics) -> None:
        self._bot = bot
        self._chat_id = chat_id
        self._thread_id = thread_id
        self._reply_to = reply_to
        self._pacer = pacer
        self._metrics = metrics
        self._shown: dict[str, tuple[str, bool]] = {}
        """What each message shows now: its text and whether it is formatted."""

    @property
    def max_message_length(self) -> int:
        return int(MessageLimit.MAX_TEXT_LENGTH)

    def fit(self, text: str) -> int:
        limit = self.max_message_length
        if len(text) * 2 <= limit:
            return len(text)  # fits even if every character takes two UTF-16 units
        units = 0
        for index, character in enumerate(text):
            units += 2 if ord(character) > 0xFFFF else 1
            if units > limit:
                return index
        return len(text)

    async def send(self, text: str, *, final: bool = False) -> str:
        reply = ReplyParameters(self._reply_to, allow_sending_without_reply=True) \
            if self._reply_to else None

        def call(body: str, mode: str | None) -> Awaitable[Message]:
            return self._bot.send_message(self._chat_id, body, parse_mode=mode,
                                          message_thread_id=self._thread_id,
                                          reply_parameters=reply)

        sent, formatted = await self._formatted("sendMessage", text, final, call)
        if sent is None:
            raise DeliveryError("sendMessage: Telegram returned no message")
        self._reply_to = None  # continuation messages follow the first part
        message_id = str(sent.message_id)
        self._shown[message_id] = (text, formatted)
        return message_id

    async def edit(self, message_id: str, text: str, *, final: bool = False) -> None:
        if not final and not self._pacer.may_update(self._chat_id):
            logger.debug("telegram:%s: skipped a streaming edit to stay within limits",
                         self._chat_id)
            return
        html = to_html(text)
        if self._shown.get(message_id) == (text, has_markup(html, text)):
            return  # Telegram refuses an edit that changes nothing

        def call(body: str, mode: str | None) -> Awaitable[Message | bool]:
            return self._bot.edit_message_text(body, chat_id=self._chat_id,
                                               message_id=int(message_id), parse_mode=mode)

        _result, formatted = await self._formatted(
            "editMessageText", text, final, call,
            plain_shown=self._shown.get(message_id) == (text, False))
        self._shown[message_id] = (text, formatted)

    async def delete(self, message_id: str) -> None:
        self._shown.pop(message_id, None)
        try:
            await self._call("deleteMessage", True,
                             lambda: self._bot.delete_message(self._chat_id, int(message_id)))
        except BadRequest as exc:
            if "not found" not in str(exc).lower():
                raise DeliveryError(f"deleteMessage: {exc}") from exc

    async def typing(self) -> None:
        try:
            await self._bot.send_chat_action(self._chat_id, ChatAction.TYPING,
                                             message_thread_id=self._thread_id)
        except TelegramError as exc:
            raise DeliveryError(f"sendChatAction: {exc}") from exc

    async def _formatted(self, what: str, text: str, final: bool,
                         call: Callable[[str, str | None], Awaitable[T]], *,
                         plain_shown: bool = False) -> tuple[T | None, bool]:
        """Make the call with the final text formatted, falling back to plain text (no call
        at all if the message already shows it plain)."""
        if final:
            html = to_html(text)
            if has_markup(html, text):
                try:
                    return await self._call(what, final, lambda: call(html, ParseMode.HTML)), True
                except BadRequest as exc:
                    if "can't parse entities" not in str(exc).lower():
                        raise DeliveryError(f"{what}: {exc}") from exc
                    logger.warning("telegram:%s: formatting refused (%s); sending plain text",
                                   self._chat_id, exc)
                    if plain_shown:
                        return None, False
        try:
            return await self._call(what, final, lambda: call(text, None)), False
        except BadRequest as exc:
            raise DeliveryError(f"{what}: {exc}") from exc

    async def _call(self, what: str, required: bool,
                    call: Callable[[], Awaitable[T]]) -> T | None:
        """One API call; a required one waits out flood control and retries transient
        faults, an optional one gives up at once. ``BadRequest`` is left to the caller."""
        required = required or what == "sendMessage"  # the stream needs the message id
        for attempt in range(MAX_ATTEMPTS):
            try:
                result = await call()
                self._pacer.record(self._chat_id)
                return result
            except RetryAfter as exc:
                seconds = retry_seconds(exc)
                self._pacer.hold(self._chat_id, seconds)
                self._metrics.rate_limited(PLATFORM)
                if not required or attempt == MAX_ATTEMPTS - 1:
                    raise DeliveryError(f"{what}: flood control ({seconds} s)") from exc
                logger.info("telegram:%s: flood control, retrying %s in %s s", self._chat_id,
                            what, seconds)
                self._metrics.flood_wait(PLATFORM, seconds)
                await asyncio.sleep(seconds)
            except BadRequest as exc:
                if "message is not modified" in str(exc).lower():
                    return None
                raise
            except NetworkError as exc:  # 5xx, timeouts, connection errors
                if not required or attempt == MAX_ATTEMPTS - 1:
                    raise DeliveryError(f"{what}: {exc}") from exc
                delay = BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)]
                logger.info("telegram:%s: %s failed (%s), retrying in %s s", self._chat_id,
                            what, exc, delay)
                await asyncio.sleep(delay)
            except TelegramError as exc:  # forbidden (blocked by the user), chat migrated
                raise DeliveryError(f"{what}: {exc}") from exc
        raise AssertionError("unreachable")
