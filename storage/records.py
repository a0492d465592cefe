"""Database rows as the core's records (``bot.store``)."""

from __future__ import annotations

from bot.store import Conversation, Role, StoredMessage
from storage.models import ConversationRow, MessageRow


def as_conversation(row: ConversationRow) -> Conversation:
    return Conversation(
        id=row.id,
        key=row.key,
        persona=row.persona,
        temperature=row.temperature,
        max_reply_tokens=row.max_reply_tokens,
        reset_after_id=row.reset_after_id,
        answer_all=row.answer_all,
        model=row.model,
    )


def as_stored(row: MessageRow) -> StoredMessage:
    return StoredMessage(
        id=row.id,
        conversation_id=row.conversation_id,
        role=Role(row.role),
        author_id=row.author_id,
        text=row.text,
        tokens=row.tokens,
        created_at=row.created_at,
        reply_to_id=row.reply_to_id,
        reply_draft_ids=tuple(row.reply_draft_ids.split()) if row.reply_draft_ids else (),
        counted_by=row.counted_by,
    )
