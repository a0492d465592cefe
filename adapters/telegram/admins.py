"""Who administers each Telegram group: asked of Telegram when an admin command, or a
message over the rate limit, needs it; cached briefly so a burst costs one call."""

from __future__ import annotations

import logging
from collections.abc import Callable

from telegram import Bot
from telegram.error import TelegramError

logger = logging.getLogger(__name__)

CACHE_S = 60.0
MAX_CHATS = 1024


class ChatAdmins:
    def __init__(self, bot: Bot, clock: Callable[[], float]) -> None:
        self._bot = bot
        self._clock = clock
        self._cache: dict[int, tuple[float, frozenset[int]]] = {}

    async def is_admin(self, chat_id: int, user_id: int) -> bool:
        cached = self._cache.get(chat_id)
        if cached is None or self._clock() - cached[0] > CACHE_S:
            try:
                members = await self._bot.get_chat_administrators(chat_id)
            except TelegramError as exc:
                # Refusing is the safe answer (the command is for admins; the limit holds).
                logger.warning("telegram:%s: could not ask for the chat's administrators: %s",
                               chat_id, exc)
                return False
            cached = (self._clock(), frozenset(member.user.id for member in members))
            self._cache.pop(chat_id, None)
            self._cache[chat_id] = cached
            while len(self._cache) > MAX_CHATS:
                del self._cache[next(iter(self._cache))]  # the least recently asked
        return user_id in cached[1]
