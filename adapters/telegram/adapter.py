"""The Telegram adapter: long polling with python-telegram-bot's ``Bot``, inside Chinwag's
own event loop (never ``run_polling``, which takes over the loop and the signals).

Chinwag polls for itself rather than through PTB's ``Updater`` so that an update is
acknowledged to Telegram (by the next ``getUpdates`` offset) only after the dialogue manager
has stored its message: a stop at any moment loses nothing, and a redelivered update is
recognised by its message id.

Which updates the offset may pass, and when one whose message could not be stored (the
database is down) is tried again or given up, is ``HeldUpdates``'s business
(``redelivery.py``): one chat whose intake is slow or failing holds up no other, a chat
keeps its order, and nothing is confirmed unstored unless the database is seen to work.

With a webhook configured, Telegram POSTs the updates instead (``webhook.py``), and the
same promise holds: an update is answered 200 only once its message is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from types import TracebackType
from typing import Self

from telegram import Bot, BotCommand, Update
from telegram.error import (
    BadRequest,
    Conflict,
    Forbidden,
    InvalidToken,
    NetworkError,
    RetryAfter,
    TelegramError,
)
from telegram.request import HTTPXRequest

from adapters.telegram.admins import ChatAdmins
from adapters.telegram.normalize import PLATFORM, normalize
from adapters.telegram.pacing import ChatPacer
from adapters.telegram.redelivery import HeldUpdates
from adapters.telegram.sink import TelegramSink, retry_seconds
from adapters.telegram.webhook import WebhookConfig, WebhookListener
from bot.commands import CommandRegistry
from bot.dialogue import DialogueManager
from bot.errors import ConfigError, DeliveryError
from bot.events import IncomingMessage
from bot.i18n import LANGUAGES, SOURCE_LANGUAGE, translator
from bot.intake import OnFailure, Ticket

logger = logging.getLogger(__name__)

ALLOWED_UPDATES = ["message", "edited_message", "channel_post"]
MAX_BACKOFF_S = 60.0
CONNECTIONS = 128
HELD_POLL_S = 1.0
"""While an update is held unconfirmed, Telegram answers at once with it again: fetch at
most this often then, and new updates wait at most this long."""


class TelegramAdapter:
    platform = PLATFORM

    def __init__(self, token: str, manager: DialogueManager, commands: CommandRegistry,
                 api_url: str, poll_timeout: int = 10,
                 clock: Callable[[], float] = time.monotonic,
                 webhook: WebhookConfig | None = None,
                 language: str = SOURCE_LANGUAGE) -> None:
        self._manager = manager
        self._metrics = manager.metrics
        self._commands = commands
        self._language = language
        """``CHINWAG_LANGUAGE``: the command menu's for apps in a language without one."""
        self._poll_timeout = poll_timeout
        self._bot = Bot(token, base_url=f"{api_url.rstrip('/')}/bot",
                        request=HTTPXRequest(connection_pool_size=CONNECTIONS, pool_timeout=30),
                        get_updates_request=HTTPXRequest(connection_pool_size=1))
        self._pacer = ChatPacer(clock)
        self._admins = ChatAdmins(self._bot, clock)
        self._clock = clock
        self._held = HeldUpdates(clock)
        self._poller: asyncio.Task[None] | None = None
        self._webhook = None if webhook is None else WebhookListener(
            webhook, self._bot, self._dispatch, ALLOWED_UPDATES, clock)
        """Updates by webhook (``webhook.py``) instead of polling."""

    @property
    def bot(self) -> Bot:
        return self._bot

    async def __aenter__(self) -> Self:
        try:
            await self._connect(self._register)
            if self._webhook is not None:
                await self._webhook.start()  # listening, 503 until open
            await self._resume()
            if self._webhook is not None:
                # After the resumed messages, so a chat keeps its order; before Telegram
                # is told where to POST, so what it kept meanwhile is taken at once.
                self._webhook.open()
                await self._connect(self._webhook.register)
        except BaseException:
            if self._webhook is not None:
                await self._webhook.close()
            await self._bot.shutdown()  # also when start-up is cancelled while it waits
            raise
        if self._webhook is not None:
            logger.info("telegram: taking updates by webhook as @%s on port %s",
                        self._bot.username, self._webhook.port)
            return self
        self._poller = asyncio.create_task(self._poll(), name="chinwag:telegram:poll")
        logger.info("telegram: polling as @%s", self._bot.username)
        return self

    async def _register(self) -> None:
        """Check the token and register the commands."""
        await self._bot.initialize()
        if self._webhook is None:
            await self._bot.delete_webhook()  # polling and a webhook exclude each other
        await self._register_commands()

    async def _register_commands(self) -> None:
        """The command menu once per language Chinwag speaks (Telegram shows each app the
        list for its language), and in ``CHINWAG_LANGUAGE`` for every other app."""
        for language in (None, *LANGUAGES):
            tr = translator(language or self._language)
            await self._bot.set_my_commands(
                [BotCommand(c.name, tr.gettext(c.description)) for c in self._commands],
                language_code=language)

    async def _connect(self, step: Callable[[], Awaitable[None]]) -> None:
        """Take a start-up step. A network outage (no connection, 5xx, timeouts, flood
        control) is waited out with growing pauses, one warning per try: a bot started
        before its network keeps its place. A refused token is final."""
        delay = 1.0
        while True:
            try:
                await step()
                return
            except (InvalidToken, Forbidden) as exc:
                raise ConfigError("CHINWAG_TELEGRAM_TOKEN was refused by Telegram") from exc
            except RetryAfter as exc:
                seconds = retry_seconds(exc)
                logger.warning("telegram: flood control at start-up; retrying in %s s",
                               seconds)
                self._metrics.rate_limited(PLATFORM)
                self._metrics.flood_wait(PLATFORM, seconds)
                await asyncio.sleep(seconds)
            except BadRequest as exc:  # PTB makes it a NetworkError, yet retrying won't help
                raise DeliveryError(f"the Telegram Bot API refused start-up: {exc}") from exc
            except NetworkError as exc:
                logger.warning("telegram: cannot reach the Bot API (%s); retrying in %s s",
                               exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
            except TelegramError as exc:  # a request refused for good: retrying won't help
                raise DeliveryError(f"the Telegram Bot API refused start-up: {exc}") from exc

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop_receiving()
        if self._webhook is not None:
            await self._webhook.close()
        await self._bot.shutdown()

    async def serve(self) -> None:
        """Until stopped; raises ``ConfigError`` if Telegram revokes the token meanwhile
        (when polling)."""
        if self._webhook is not None:
            await self._webhook.serve()
            return
        assert self._poller is not None
        await asyncio.shield(self._poller)

    async def stop_receiving(self) -> None:
        """Take no more updates, and confirm the ones already stored."""
        if self._webhook is not None:
            self._webhook.stop_receiving()  # updates in intake are still answered
            return
        if self._poller is None:
            return
        poller, self._poller = self._poller, None
        poller.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConfigError):
            await poller
        self._held.settle()
        if self._held.offset is not None:
            with contextlib.suppress(TelegramError):
                # Confirms everything below the offset; what it returns is redelivered later.
                await self._bot.get_updates(offset=self._held.offset, limit=1, timeout=0)

    async def _resume(self) -> None:
        """Answer what a stop left unanswered (accepted but not replied to)."""
        pending = await self._manager.pending(PLATFORM)
        for item in pending:
            chat_id = int(item.chat_id)
            # Private chats have the user's (positive) id.
            self._submit(item.as_incoming(PLATFORM, is_direct=chat_id > 0), chat_id)
        if pending:
            logger.info("telegram: answering %s messages left from before the restart",
                        len(pending))

    async def _poll(self) -> None:
        delay = 1.0
        while True:
            if self._held.holding:
                await self._wait_for_intakes()
            if not self._held.settle():
                return  # shutting down: the rest is redelivered after the restart
            try:
                updates = await self._bot.get_updates(
                    offset=self._held.offset,
                    timeout=0 if self._held.holding else self._poll_timeout,
                    allowed_updates=ALLOWED_UPDATES)
            except (InvalidToken, Forbidden) as exc:
                logger.error("telegram: the token was refused (%s); stopping", exc)
                raise ConfigError("CHINWAG_TELEGRAM_TOKEN was refused by Telegram") from exc
            except RetryAfter as exc:
                seconds = retry_seconds(exc)
                self._metrics.rate_limited(PLATFORM)
                self._metrics.flood_wait(PLATFORM, seconds)
                await asyncio.sleep(seconds)
                continue
            except (NetworkError, Conflict) as exc:
                logger.warning("telegram: cannot get updates (%s); retrying in %s s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)
                continue
            delay = 1.0
            self._receive(updates)

    async def _wait_for_intakes(self) -> None:
        """Until the held updates' intakes end, or ``HELD_POLL_S`` has passed."""
        running = self._held.running()
        if running:
            await asyncio.wait(running, timeout=HELD_POLL_S)
        else:
            await asyncio.sleep(HELD_POLL_S)

    def _receive(self, updates: Sequence[Update]) -> None:
        """Dispatch what is new, and what is due to be tried again, in update order."""
        by_id = {update.update_id: update for update in updates}
        self._held.receive(
            [(update.update_id, update.message.chat.id if update.message else None)
             for update in updates],
            lambda update_id, on_failure: self._dispatch(by_id[update_id], on_failure))

    def _dispatch(self, update: Update, on_failure: OnFailure) -> Ticket | None:
        message = update.message
        if message is None:
            logger.debug("telegram: ignored update %s (not a new message)", update.update_id)
            return None
        try:
            incoming = normalize(message, self._bot.id, self._bot.username)
            if incoming is None:
                return None
            return self._submit(incoming, message.chat.id, on_failure)
        except Exception:
            # The platform's top-level handler: one odd update never stops the others.
            logger.exception("telegram:%s: could not handle update %s", message.chat.id,
                             update.update_id)
            return None

    def _submit(self, incoming: IncomingMessage, chat_id: int,
                on_failure: OnFailure = OnFailure.TELL) -> Ticket:
        thread_id = int(incoming.thread_id) if incoming.thread_id else None
        reply_to = None if incoming.is_direct else int(incoming.message_id)
        sink = TelegramSink(self._bot, chat_id, thread_id, reply_to, self._pacer,
                            self._metrics)
        chat_admin = None if incoming.is_direct else partial(
            self._admins.is_admin, chat_id, int(incoming.author_id))
        return self._manager.submit(incoming, sink, chat_admin=chat_admin,
                                    on_failure=on_failure)
