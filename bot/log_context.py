"""What a log line is about: the conversation and message the running task handles.

The dialogue manager binds them at the start of each intake and answer task (every task
has its own copy of the context), so every line logged on the way, by the store, the
streaming or a platform's sink, can carry them as fields (``CHINWAG_LOG_FORMAT=json``)
without each call site passing them.
"""

from __future__ import annotations

from contextvars import ContextVar

conversation: ContextVar[str | None] = ContextVar("chinwag_conversation", default=None)
message_id: ContextVar[str | None] = ContextVar("chinwag_message_id", default=None)


def bind(conversation_key: str, platform_message_id: str | None) -> None:
    """Mark what the running task handles, until it ends or binds another."""
    conversation.set(conversation_key)
    message_id.set(platform_message_id)
