"""A ReplySink that records what a platform would have shown."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from bot.errors import DeliveryError


@dataclass
class Call:
    kind: str  # "send", "edit", "delete" or "typing"
    message_id: str | None
    text: str | None
    final: bool


@dataclass
class RecordingSink:
    limit: int = 4096
    fail_edits: bool = False
    fail_unknown_edits: bool = False
    """Refuse an edit of a message this sink never sent, as a platform does for a deleted
    one (otherwise such an edit fails the test)."""
    prefix: str = "bot"
    calls: list[Call] = field(default_factory=list)
    messages: dict[str, str] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def max_message_length(self) -> int:
        return self.limit

    def fit(self, text: str) -> int:
        return min(len(text), self.limit)

    async def send(self, text: str, *, final: bool = False) -> str:
        assert len(text) <= self.limit, f"sent {len(text)} characters over the limit"
        assert text.strip(), "sent an empty message"
        message_id = f"{self.prefix}-{next(self._ids)}"
        self.calls.append(Call("send", message_id, text, final))
        self.messages[message_id] = text
        return message_id

    async def edit(self, message_id: str, text: str, *, final: bool = False) -> None:
        if self.fail_unknown_edits and message_id not in self.messages:
            raise DeliveryError("message to edit not found")
        assert message_id in self.messages, "edited a message it never sent"
        assert len(text) <= self.limit
        if self.fail_edits and not final:
            raise DeliveryError("edit refused")
        self.calls.append(Call("edit", message_id, text, final))
        self.messages[message_id] = text

    async def delete(self, message_id: str) -> None:
        if self.fail_unknown_edits and message_id not in self.messages:
            return  # already gone: platforms' sinks count that as deleted
        assert message_id in self.messages, "deleted a message it never sent"
        self.calls.append(Call("delete", message_id, None, True))
        del self.messages[message_id]

    async def typing(self) -> None:
        self.calls.append(Call("typing", None, None, False))

    @property
    def texts(self) -> list[str]:
        """The final text of each message, in the order they were sent."""
        return list(self.messages.values())

    @property
    def text(self) -> str:
        return "\n".join(self.texts)
