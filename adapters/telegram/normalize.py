"""Telegram messages as Chinwag's ``IncomingMessage``: a pure function of the update."""

from __future__ import annotations

from telegram import Message, MessageEntity
from telegram.constants import ChatType, MessageEntityType

from bot.events import IncomingMessage
from bot.i18n import N_

PLATFORM = "telegram"

# What a message without text may carry, in the words the user gets back (translated
# for them where the note is made).
_UNREADABLE = (
    ("sticker", N_("sticker")), ("photo", N_("photo")), ("animation", N_("GIF")),
    ("video", N_("video")), ("video_note", N_("video message")),
    ("voice", N_("voice message")), ("audio", N_("audio file")), ("document", N_("file")),
    ("location", N_("location")), ("venue", N_("place")), ("contact", N_("contact")),
    ("poll", N_("poll")), ("dice", N_("dice")), ("game", N_("game")),
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
    # Telegram counts entity offsets in UTF-16 code units, Python in code points: PTB's
    # parse_* methods cut each entity's text out correctly, whatever came before it.
    entities: dict[MessageEntity, str] = message.parse_entities() if message.text \
        else message.parse_caption_entities() if message.caption else {}
    handle = f"@{bot_username}".lower()
    mentions_bot = False
    own_handles: list[MessageEntity] = []
    command: tuple[str, str] | None = None
    for entity, chunk in entities.items():
        if entity.type == MessageEntityType.MENTION and chunk.lower() == handle:
            mentions_bot = True
            own_handles.append(entity)
        elif entity.type == MessageEntityType.TEXT_MENTION and entity.user is not None:
            mentions_bot = mentions_bot or entity.user.id == bot_id
        elif entity.type == MessageEntityType.BOT_COMMAND and entity.offset == 0:
            name, _, target = chunk.partition("@")
            if target and target.lower() != bot_username.lower():
                return None  # /cmd@otherbot
            command = (chunk, name)
    text = _without(text, own_handles)
    if command is not None and text.startswith(command[0]):
        text = command[1] + text[len(command[0]):]  # /cmd@chinwag_bot is /cmd
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
        language=message.from_user.language_code,
    )


def _without(text: str, entities: list[MessageEntity]) -> str:
    """``text`` less the entities' spans (given in UTF-16 code units), each with one space
    next to it, so "hi @bot there" reads "hi there"."""
    if not entities:
        return text
    units = text.encode("utf-16-le", "surrogatepass")
    parts: list[bytes] = []
    cursor = 0
    for entity in sorted(entities, key=lambda e: e.offset):
        start, end = entity.offset * 2, (entity.offset + entity.length) * 2
        if units[end:end + 2] == b" \x00":
            end += 2
        elif start >= 2 and units[start - 2:start] == b" \x00":
            start -= 2
        parts.append(units[cursor:max(start, cursor)])
        cursor = max(end, cursor)
    parts.append(units[cursor:])
    return b"".join(parts).decode("utf-16-le", "surrogatepass")
