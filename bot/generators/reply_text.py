"""A reply's text as it streams: token ids decoded one at a time, at a cost per token that
does not grow with the reply, cut at stop strings.

The streamed pieces join to exactly what ``tokenizer.decode(ids, skip_special_tokens=True)``
gives for the whole reply, with one documented exception: a run of more than
``MAX_PENDING`` tokens in a row that never makes a whole character (broken bytes) is shown
as it decodes then, so that the cost per token stays bounded.
"""

from __future__ import annotations

import asyncio
import re
import weakref
from collections.abc import AsyncGenerator, Sequence
from typing import Any

from bot.generators.base import cut_at_stop, held_back

MAX_PENDING = 64
"""Most tokens held back waiting for text: far beyond one character (at most four bytes,
or a run of byte-fallback pieces of a few emoji), small enough that decoding the window
stays cheap."""

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
_special: weakref.WeakKeyDictionary[Any, frozenset[int]] = weakref.WeakKeyDictionary()


def special_ids(tokenizer: Any) -> frozenset[int]:
    """The ids ``decode(..., skip_special_tokens=True)`` leaves out (computed once per
    tokenizer)."""
    found = _special.get(tokenizer)
    if found is None:
        added = getattr(tokenizer, "added_tokens_decoder", {})
        found = frozenset([*tokenizer.all_special_ids,
                           *(i for i, token in added.items() if getattr(token, "special", False))])
        _special[tokenizer] = found
    return found


class ReplyDecoder:
    """Decodes a reply token by token at a cost that does not grow with its length.

    Decoding the whole reply again after each token costs the square of its length. This
    decodes a short window instead: from the token before the last piece shown, to the
    newest. The window's start is decoded both with and without the new tokens and only
    the difference is new, so a tokenizer that treats the first token of a text
    differently (a leading space dropped) does so on both sides. The same algorithm as
    ``tokenizers``' ``DecodeStream``, plus:

    - special tokens (``<|endoftext|>`` with ``ignore_eos``) are dropped as they come, as
      the full decode drops them, so a run of them does not widen the window;
    - tokens that end in part of a character (byte pieces of an emoji) wait until it is
      whole, and a run of byte-fallback pieces (``<0xE6>``) waits until it ends, because
      such a run decodes as a whole: one invalid byte in it turns all of it into U+FFFD;
    - after ``MAX_PENDING`` tokens without new text, what they decode to is shown anyway,
      which bounds the window (the one case where the stream may differ from the full
      decode: a model writing that many broken bytes in a row).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._special = special_ids(tokenizer)
        self._ids: list[int] = []
        self._window = 0
        """Where the window starts: the first token of the piece shown last."""
        self._read = 0
        """Tokens whose text has been returned."""

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def _byte_piece(self, token: int) -> bool:
        piece = self._tokenizer.convert_ids_to_tokens(token)
        return isinstance(piece, str) and _BYTE_PIECE.fullmatch(piece) is not None

    @property
    def window(self) -> int:
        """Tokens the next step decodes (what its cost grows with)."""
        return len(self._ids) - self._window

    def step(self, token: int) -> str:
        """Add the next token; the text it completes (often one word piece, maybe "")."""
        if token in self._special:
            return ""
        self._ids.append(token)
        forced = len(self._ids) - self._read >= MAX_PENDING
        if self._byte_piece(token) and not forced:
            return ""  # the run of bytes may still turn out invalid
        shown = self._decode(self._ids[self._window:self._read])
        text = self._decode(self._ids[self._window:])
        if (len(text) <= len(shown) or text.endswith("\ufffd")) and not forced:
            return ""  # nothing yet, or half of a character: wait for the rest
        self._window, self._read = self._read, len(self._ids)
        return text[len(shown):]

    def finish(self) -> str:
        """What is left at the end of the reply: bytes that never made a whole character
        decode as the full decode shows them (U+FFFD)."""
        if self._read == len(self._ids):
            return ""
        shown = self._decode(self._ids[self._window:self._read])
        text = self._decode(self._ids[self._window:])
        self._window = self._read = len(self._ids)
        return text[len(shown):]


class ReplyText:
    """A reply's text as it streams: decoded token by token, cut at the first stop string,
    and with what may still become one held back. Only the text not shown yet is looked
    at, so each token costs the same however long the reply grows."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self._decoder = ReplyDecoder(tokenizer)
        self._stop = stop
        self._pending = ""
        self.stopped = False
        """A stop string was reached: the reply is over."""

    def add(self, token: int) -> str:
        """The next token; the text now safe to show (maybe "")."""
        return self._show(self._decoder.step(token), last=False)

    def end(self) -> str:
        """The reply is over: whatever is left to show."""
        return self._show(self._decoder.finish(), last=True)

    def _show(self, text: str, *, last: bool) -> str:
        if self.stopped:
            return ""
        pending, self.stopped = cut_at_stop(self._pending + text, self._stop)
        hold = 0 if self.stopped or last else held_back(pending, self._stop)
        ready, self._pending = pending[:len(pending) - hold], pending[len(pending) - hold:]
        return ready


async def stream_reply(reply: ReplyText,
                       tokens: asyncio.Queue[int | BaseException | None]
                       ) -> AsyncGenerator[str, None]:
    """The reply's text as a model thread fills ``tokens``: token ids, then ``None`` when
    the reply is over, or an exception to raise here. Ends early at a stop string."""
    while not reply.stopped:
        item = await tokens.get()
        if isinstance(item, BaseException):
            raise item
        piece = reply.end() if item is None else reply.add(item)
        if piece:
            yield piece
        if item is None:
            return
