"""Factories for normalized messages."""

from __future__ import annotations

import itertools

from bot.events import IncomingMessage

_ids = itertools.count(1)


def dm(text: str, *, user: str = "u1", chat: str | None = None, platform: str = "telegram",
       message_id: str | None = None) -> IncomingMessage:
    return IncomingMessage(
        platform=platform, chat_id=chat or user, author_id=user, author_name=f"User {user}",
        message_id=message_id or f"m{next(_ids)}", text=text, is_direct=True,
    )


def group(text: str, *, user: str = "u1", chat: str = "g1", mention: bool = False,
          reply_to: str | None = None, reply_to_bot: bool = False, thread: str | None = None,
          platform: str = "telegram", chat_admin: bool = False,
          message_id: str | None = None) -> IncomingMessage:
    return IncomingMessage(
        platform=platform, chat_id=chat, author_id=user, author_name=f"User {user}",
        message_id=message_id or f"m{next(_ids)}", text=text, is_direct=False,
        mentions_bot=mention, reply_to_message_id=reply_to, reply_to_bot=reply_to_bot,
        thread_id=thread, author_is_chat_admin=chat_admin,
    )
