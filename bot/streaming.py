"""Streaming a reply into a ``ReplySink``: throttled edits, continuation past the limit."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from bot.errors import DeliveryError
from bot.events import ReplySink
from bot.splitting import split_first

logger = logging.getLogger(__name__)


class ReplyStream:
    """Shows a growing reply: the first piece is sent at once, then the message is edited
    at most once per ``interval`` seconds. When the text outgrows the sink's limit, the
    finished part is edited into its final form and the rest continues in a new message.

    Failed intermediate edits are logged and skipped (the next edit carries the text);
    failures of the final form of a message are raised.

    ``continue_in`` is a message an earlier, interrupted try of this reply left half
    written: the reply is written into it instead of a new one. ``on_first_send`` learns
    the id of the first message sent, so such a message can be found after a crash.
    """

    def __init__(self, sink: ReplySink, *, interval: float, clock: Callable[[], float],
                 key: str = "", continue_in: str | None = None,
                 on_first_send: Callable[[str], Awaitable[None]] | None = None) -> None:
        self._sink = sink
        self._interval = interval
        self._clock = clock
        self._key = key
        self._continued = continue_in
        self._on_first_send = on_first_send
        self._message_ids: list[str] = [continue_in] if continue_in else []
        self._current_id: str | None = continue_in
        self._pending = ""
        self._shown = ""
        self._last_update = float("-inf")
        self._text_parts: list[str] = []

    @property
    def message_ids(self) -> list[str]:
        """Platform ids of every message this reply used, in order."""
        return list(self._message_ids)

    @property
    def text(self) -> str:
        return "".join(self._text_parts)

    async def push(self, piece: str) -> None:
        self._text_parts.append(piece)
        self._pending += piece
        while (room := self._sink.fit(self._pending)) < len(self._pending):
            head, self._pending = split_first(self._pending, room)
            await self._show(head, final=True)
            self._current_id = None
            self._shown = ""
        if self._clock() - self._last_update >= self._interval:
            await self._show(self._pending, final=False)

    async def finish(self, note: str = "") -> list[str]:
        """Deliver the final form of the last message; ``note`` is appended (after a fault)."""
        text = self._pending
        if note:
            text = f"{text}\n\n{note}" if text.strip() else note
            while (room := self._sink.fit(text)) < len(text):
                head, text = split_first(text, room)
                await self._show(head, final=True)
                self._current_id = None
        if not text.strip() and not self._message_ids:
            text = "…"  # the model said nothing; an empty message is refused by platforms
        if text.strip():
            await self._show(text, final=True)
        return self.message_ids

    async def _show(self, text: str, *, final: bool) -> None:
        if not text.strip() or (not final and text == self._shown):
            return
        self._last_update = self._clock()
        try:
            if self._current_id is None:
                self._current_id = await self._sink.send(text, final=final)
                self._message_ids.append(self._current_id)
                if self._on_first_send is not None and len(self._message_ids) == 1:
                    await self._on_first_send(self._current_id)
            else:
                await self._sink.edit(self._current_id, text, final=final)
            self._shown = text
        except DeliveryError as exc:
            if final and self._continued is not None and self._current_id == self._continued:
                # Even its final form cannot go into the half-written message (deleted,
                # too old to edit): start anew. A skipped streaming edit is no such sign.
                logger.info("%s: cannot continue message %s (%s); sending a new one",
                            self._key, self._continued, exc)
                self._continued = self._current_id = None
                self._message_ids.clear()
                await self._show(text, final=final)
                return
            if final:
                raise
            logger.warning("%s: skipped a streaming update: %s", self._key, exc)
