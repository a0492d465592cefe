"""Telegram messages as Chinwag's ``IncomingMessage``: a pure function of the update."""

from __future__ import annotations

from telegram import Message
from telegram.constants import ChatType, MessageEntityType

from bot.events import IncomingMessage

PLATFORM = "telegram"

# What a message without text may carry, in the words the user gets back.
_UNREADABLE = (
    ("sticker", "sticker"), ("photo", "photo"), ("animation", "GIF"), ("video", "video"),
    ("video_note", "video message"), ("voice", "voice message"), ("audio", "audio file"),
    ("document", "file"), ("location", "location"), ("venue", "place"),
    ("contact", "contact"), ("poll", "poll"), ("dice", "dice"), ("game", "game"),
)


def unreadable_kind(message: Message) -> str | None:
    for attribute, words in _UNREADABLE:
        if getattr(message, attribute, None):
            return words
    return None


def normalize(message: Message, bot_id: int, bot_username: str) -> IncomingMessage | None:
    """A Telegram message as Chinwag sees it; ``None`` when it is not for us to handle
    (a service message, a command aimed at another bot, no human author)."""
    if message.from_user is None or message.from_user.is_bot:
        return None  # channel posts, other bots
    text = message.text or message.caption
    unsupported = None
    if text is None:
        unsupported = unreadable_kind(message)
        if unsupported is None:
            return None  # service messages: members joining, pins, topic changes…
        text = ""
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
        unsupported=unsupported,
    )
