"""Discord messages as Chinwag's ``IncomingMessage``: a pure function of the event."""

from __future__ import annotations

import re

import discord

from bot.events import IncomingMessage
from bot.i18n import N_

PLATFORM = "discord"
_ANSWERED_TYPES = {discord.MessageType.default, discord.MessageType.reply}


def is_direct(channel: object) -> bool:
    return isinstance(channel, discord.DMChannel | discord.GroupChannel)


def normalize(message: discord.Message, bot_id: int) -> IncomingMessage | None:
    """``None`` for what is not ours to handle: bots (itself included), system messages."""
    if message.author.bot or message.type not in _ANSWERED_TYPES:
        return None
    # The bot's own role counts: clients offer it next to the bot when people type its name.
    own_roles = [role.id for role in message.role_mentions
                 if role.tags is not None and role.tags.bot_id == bot_id]
    mentions_bot = bool(own_roles) or any(user.id == bot_id for user in message.mentions)
    text = message.content
    if mentions_bot:
        text = re.sub(rf"<@!?{bot_id}>", " ", text)
        for role_id in own_roles:
            text = text.replace(f"<@&{role_id}>", " ")
        text = text.strip()
    unsupported = None
    if not text.strip() and (message.attachments or message.stickers or message.embeds):
        unsupported = N_("sticker") if message.stickers else N_("attachment")
    reference = message.reference
    resolved = reference.resolved if reference is not None else None
    reply_to_bot = isinstance(resolved, discord.Message) and resolved.author.id == bot_id
    author = message.author
    # A member with Manage Server administers the server; a DM has no such thing.
    chat_admin = isinstance(author, discord.Member) and author.guild_permissions.manage_guild
    return IncomingMessage(
        platform=PLATFORM,
        chat_id=str(message.channel.id),  # a thread has its own id: its own conversation
        author_id=str(author.id),
        author_name=author.display_name,
        message_id=str(message.id),
        text=text,
        is_direct=is_direct(message.channel),
        mentions_bot=mentions_bot,
        reply_to_message_id=str(reference.message_id) if reference and reference.message_id
        else None,
        reply_to_bot=reply_to_bot,
        author_is_chat_admin=chat_admin,
        unsupported=unsupported,
    )
