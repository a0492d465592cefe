"""Streaming a reply into a ``ReplySink``: throttled edits, continuation past the limit."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence

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

    ``continue_in`` are the messages an earlier, interrupted try of this reply left half
    written, in order: the reply is written into them instead of new ones, and those it no
    longer needs are deleted at the end. ``on_send`` learns the ids of every message the
    reply shows in each time a new one is sent, so they can be found after a crash.
    """

    def __init__(self, sink: ReplySink, *, interval: float, clock: Callable[[], float],
                 key: str = "", continue_in: Sequence[str] = (),
                 on_send: Callable[[list[str]], Awaitable[None]] | None = None) -> None:
        self._sink = sink
        self._interval = interval
        self._clock = clock
        self._key = key
        self._on_send = on_send
        self._continued = set(continue_in)
        self._leftover = list(continue_in)  # the earlier try's messages not reached yet
        self._unwanted: list[str] = []  # the earlier try's messages to delete at the end
        self._message_ids: list[str] = []  # those this reply has written into
        self._current_id: str | None = None
        self._next_message()
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
            self._next_message()
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
                self._next_message()
        if not text.strip() and not self._message_ids:
            text = "…"  # the model said nothing; an empty message is refused by platforms
        if text.strip():
            await self._show(text, final=True)
        elif self._current_id is not None and self._current_id not in self._message_ids:
            self._unwanted.append(self._current_id)
        await self._delete_unwanted()
        return self.message_ids

    def _next_message(self) -> None:
        """Move on to the next message: one the earlier try left, or a new one (None)."""
        self._current_id = self._leftover.pop(0) if self._leftover else None
        self._shown = ""

    async def _show(self, text: str, *, final: bool) -> None:
        if not text.strip() or (not final and text == self._shown):
            return
        self._last_update = self._clock()
        try:
            if self._current_id is None:
                self._current_id = await self._sink.send(text, final=final)
                self._message_ids.append(self._current_id)
                if self._on_send is not None:
                    await self._on_send(self.message_ids)
            else:
                await self._sink.edit(self._current_id, text, final=final)
                if self._current_id not in self._message_ids:
                    self._message_ids.append(self._current_id)
            self._shown = text
        except DeliveryError as exc:
            if final and self._current_id in self._continued:
                # Even its final form cannot go into the half-written message (deleted,
                # too old to edit): go on in new messages, so the parts keep their order,
                # and delete what the earlier try left. A skipped streaming edit is no such
                # sign.
                logger.info("%s: cannot continue in message %s (%s); sending a new one",
                            self._key, self._current_id, exc)
                if self._current_id in self._message_ids:
                    self._message_ids.remove(self._current_id)
                self._unwanted += [self._current_id, *self._leftover]
                self._leftover = []
                self._current_id = None
                await self._show(text, final=final)
                return
            if final:
                raise
            logger.warning("%s: skipped a streaming update: %s", self._key, exc)

    async def _delete_unwanted(self) -> None:
        unwanted = [*self._unwanted, *self._leftover]  # leftovers: the earlier try got further
        self._unwanted, self._leftover = [], []
        for message_id in dict.fromkeys(unwanted):
            if message_id in self._message_ids:
                continue
            try:
                await self._sink.delete(message_id)
            except DeliveryError as exc:
                logger.warning("%s: could not delete message %s an earlier try left: %s",
                               self._key, message_id, exc)
