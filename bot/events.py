"""Normalized incoming messages and the reply-sink protocol every adapter implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable


def conversation_key(platform: str, chat_id: str, thread_id: str | None = None) -> str:
    """``platform:chat[:thread]`` — the one name of a conversation across the code base."""
    key = f"{platform}:{chat_id}"
    return f"{key}:{thread_id}" if thread_id else key


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    """One message from any platform, as the dialogue manager sees it.

    Adapters build it in a pure ``normalize`` step; the core never sees platform objects.
    """

    platform: str
    chat_id: str
    author_id: str
    author_name: str
    message_id: str
    text: str
    is_direct: bool
    """A one-to-one chat (DM, the console): every message is addressed to the bot."""
    mentions_bot: bool = False
    reply_to_message_id: str | None = None
    reply_to_bot: bool = False
    thread_id: str | None = None
    author_is_chat_admin: bool = False
    """The platform says this author administers the chat (a Telegram group admin, a Discord
    member with Manage Server)."""
    unsupported: str | None = None
    """What the message carried that Chinwag cannot read ("sticker", "photo"), if anything:
    an English text marked for translation."""
    received_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    language: str | None = None
    """The language the author's app is set to, as the platform gives it (Telegram's
    ``language_code`` "zh-hans", Discord's interaction locale "zh-CN"), if it says."""

    @property
    def conversation_key(self) -> str:
        return conversation_key(self.platform, self.chat_id, self.thread_id)

    @property
    def user_key(self) -> str:
        """``platform:user_id``, the form admin lists are written in."""
        return f"{self.platform}:{self.author_id}"

    @property
    def addressed_to_bot(self) -> bool:
        return self.is_direct or self.mentions_bot or self.reply_to_bot


@runtime_checkable
class ReplySink(Protocol):
    """Where a reply to one incoming message goes. Each adapter implements it.

    ``send`` and ``edit`` take plain text. ``final`` is true for the last version of a
    message, so an adapter can apply platform formatting once, at the end, and fall back to
    plain text if the platform rejects it. Platform failures are raised as ``DeliveryError``.
    """

    @property
    def max_message_length(self) -> int: ...

    def fit(self, text: str) -> int:
        """How many leading characters of ``text`` fit in one message (platforms count
        length their own way: Telegram in UTF-16 code units)."""
        ...

    async def send(self, text: str, *, final: bool = False) -> str:
        """Send a new message; returns its platform message id."""
        ...

    async def edit(self, message_id: str, text: str, *, final: bool = False) -> None:
        """Replace the text of a message this sink sent."""
        ...

    async def delete(self, message_id: str) -> None:
        """Delete a message this sink (or an earlier try of the same reply) sent; one that
        is already gone counts as deleted."""
        ...

    async def typing(self) -> None:
        """Show a typing indicator (best effort)."""
        ...
