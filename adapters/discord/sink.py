"""Replies on Discord: into a channel (as a reply to the question), or to a slash command.

discord.py's own rate limiter waits out 429s before and during each call, so these sinks
make one call per update and leave the pacing to it and to the stream's edit interval.
"""

from __future__ import annotations

import logging

import discord

from bot.errors import DeliveryError

logger = logging.getLogger(__name__)

MAX_LENGTH = 2000
NO_PINGS = discord.AllowedMentions.none()
"""Model output never notifies anyone: no @everyone, @here, role or user pings."""


class _DiscordLength:
    """Discord's message limit, counted in characters."""

    @property
    def max_message_length(self) -> int:
        return MAX_LENGTH

    def fit(self, text: str) -> int:
        return min(len(text), MAX_LENGTH)


class ChannelSink(_DiscordLength):
    def __init__(self, channel: discord.abc.Messageable,
                 reply_to: discord.Message | discord.PartialMessage | None, key: str) -> None:
        self._channel = channel
        self._reply_to = reply_to
        self._key = key
        self._sent: dict[str, discord.Message] = {}
        self._shown: dict[str, str] = {}

    async def send(self, text: str, *, final: bool = False) -> str:
        reference = self._reply_to.to_reference(fail_if_not_exists=False) \
            if self._reply_to is not None else None
        try:
            if reference is None:
                message = await self._channel.send(text, allowed_mentions=NO_PINGS)
            else:
                message = await self._channel.send(text, allowed_mentions=NO_PINGS,
                                                   reference=reference, mention_author=False)
        except discord.HTTPException as exc:
            raise DeliveryError(f"send: {exc}") from exc
        self._reply_to = None  # continuation messages follow the first part
        self._sent[str(message.id)] = message
        self._shown[str(message.id)] = text
        return str(message.id)

    async def edit(self, message_id: str, text: str, *, final: bool = False) -> None:
        if self._shown.get(message_id) == text:
            return  # Markdown needs no final conversion on Discord: nothing to change
        # A message this sink did not send: one an interrupted try of the reply left.
        target = self._sent.get(message_id) or self._partial(message_id)
        try:
            await target.edit(content=text, allowed_mentions=NO_PINGS)
        except discord.HTTPException as exc:
            raise DeliveryError(f"edit: {exc}") from exc
        self._shown[message_id] = text

    async def delete(self, message_id: str) -> None:
        target = self._sent.pop(message_id, None) or self._partial(message_id, "delete")
        self._shown.pop(message_id, None)
        try:
            await target.delete()
        except discord.NotFound:
            pass
        except discord.HTTPException as exc:
            raise DeliveryError(f"delete: {exc}") from exc

    def _partial(self, message_id: str, what: str = "edit") -> discord.PartialMessage:
        make = getattr(self._channel, "get_partial_message", None)
        if make is None or not message_id.isdigit():
            raise DeliveryError(f"{what}: message {message_id} is not in this channel")
        partial: discord.PartialMessage = make(int(message_id))
        return partial

    async def typing(self) -> None:
        try:
            await self._channel.typing()
        except discord.HTTPException as exc:
            raise DeliveryError(f"typing: {exc}") from exc


ORIGINAL = "original"


class InteractionSink(_DiscordLength):
    """Answers a slash command: the deferred ("thinking…") response is edited into the
    answer, longer answers continue as follow-ups; all of it is visible only to the caller."""

    def __init__(self, interaction: discord.Interaction) -> None:
        self._interaction = interaction
        self._answered = False
        self._shown: dict[str, str] = {}

    async def send(self, text: str, *, final: bool = False) -> str:
        try:
            if not self._answered:
                await self._interaction.edit_original_response(content=text,
                                                               allowed_mentions=NO_PINGS)
                self._answered = True
                self._shown[ORIGINAL] = text
                return ORIGINAL
            message = await self._interaction.followup.send(
                text, ephemeral=True, allowed_mentions=NO_PINGS, wait=True)
        except discord.HTTPException as exc:
            raise DeliveryError(f"interaction response: {exc}") from exc
        self._shown[str(message.id)] = text
        return str(message.id)

    async def edit(self, message_id: str, text: str, *, final: bool = False) -> None:
        if self._shown.get(message_id) == text:
            return
        try:
            if message_id == ORIGINAL:
                await self._interaction.edit_original_response(content=text,
                                                               allowed_mentions=NO_PINGS)
            else:
                await self._interaction.followup.edit_message(int(message_id), content=text,
                                                              allowed_mentions=NO_PINGS)
        except discord.HTTPException as exc:
            raise DeliveryError(f"interaction edit: {exc}") from exc
        # Only now: after a failed edit the old text still shows, and the same edit must
        # not be skipped as done.
        self._shown[message_id] = text

    async def delete(self, message_id: str) -> None:
        self._shown.pop(message_id, None)
        try:
            if message_id == ORIGINAL:
                await self._interaction.delete_original_response()
            else:
                await self._interaction.followup.delete_message(int(message_id))
        except discord.NotFound:
            pass
        except discord.HTTPException as exc:
            raise DeliveryError(f"interaction delete: {exc}") from exc

    async def typing(self) -> None:
        return None  # the deferred response already shows "thinking…"
