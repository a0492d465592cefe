"""Tokens the way a model sees a chat: counting them with its tokenizer and chat template
(or a documented estimate when no tokenizer is at hand), and decoding a reply as it
streams."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from bot.generators.base import cut_at_stop, held_back

logger = logging.getLogger(__name__)

_PLACEHOLDER = "\u2063CHINWAG-CONTENT\u2063"
# Used when a model (a base model, say) ships without a chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHARS_PER_TOKEN = 4
ESTIMATED_MESSAGE_OVERHEAD = 4


class TokenCounter(Protocol):
    @property
    def prompt_overhead(self) -> int: ...

    def count(self, role: str, text: str) -> int: ...

    def truncate(self, text: str, max_tokens: int) -> str: ...


class TemplateCounter:
    """Exact counts from a Hugging Face tokenizer and its chat template.

    The template is split once into per-role prefix and suffix around the content, so a
    message's count needs one ``encode`` and no template rendering.
    """

    def __init__(self, tokenizer: Any, name: str) -> None:
        if not tokenizer.chat_template:
            logger.warning("model %s has no chat template; using ChatML", name)
            tokenizer.chat_template = CHATML_TEMPLATE
        self.tokenizer = tokenizer
        self._parts: dict[str, tuple[str, str]] = {}
        system = [{"role": "system", "content": "S"}]
        for role in ("system", "user", "assistant"):
            base = [] if role == "system" else system
            before = self._render(base, False) if base else ""
            after = self._render([*base, {"role": role, "content": _PLACEHOLDER}], False)
            piece = after[len(before):] if after.startswith(before) else after
            prefix, found, suffix = piece.partition(_PLACEHOLDER)
            self._parts[role] = (prefix, suffix) if found else ("", "")
        conversation = [*system, {"role": "user", "content": "U"}]
        tail = self._render(conversation, True)[len(self._render(conversation, False)):]
        self._overhead = len(tokenizer.encode(tail, add_special_tokens=False)) + 1

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return str(self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt))

    @property
    def prompt_overhead(self) -> int:
        return self._overhead

    def count(self, role: str, text: str) -> int:
        prefix, suffix = self._parts.get(role, ("", ""))
        return len(self.tokenizer.encode(prefix + text + suffix, add_special_tokens=False))

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if len(ids) <= max_tokens:
            return text
        return str(self.tokenizer.decode(ids[: max(0, max_tokens)]))


class EstimateCounter:
    """About four characters a token plus a few per message: what English text costs with
    common tokenizers. Used when the model's tokenizer is not available locally; keep
    ``CHINWAG_CONTEXT_TOKENS`` a little under the server's window to absorb the error."""

    @property
    def prompt_overhead(self) -> int:
        return 3

    def count(self, role: str, text: str) -> int:
        return -(-len(text) // CHARS_PER_TOKEN) + ESTIMATED_MESSAGE_OVERHEAD

    def truncate(self, text: str, max_tokens: int) -> str:
        return text[: max(0, max_tokens) * CHARS_PER_TOKEN]


class ReplyDecoder:
    """Decodes a reply token by token at a cost that does not grow with its length.

    Decoding the whole reply again after each token costs the square of its length. This
    decodes a short window instead: from the token before the last piece shown, to the
    newest. The window's start is decoded both with and without the new tokens and only
    the difference is new, so a tokenizer that treats the first token of a text
    differently (a leading space dropped) does so on both sides. Tokens that end in part
    of a multi-byte character (byte-fallback pieces of an emoji, say) wait until the
    character is whole. The same algorithm as ``tokenizers``' ``DecodeStream``; written out
    so that ``finish`` can return what is left the way a full decode would.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._window = 0
        """Where the window starts: the first token of the piece shown last."""
        self._read = 0
        """Tokens whose text has been returned."""

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def step(self, token: int) -> str:
        """Add the next token; the text it completes (often one word piece, maybe "")."""
        self._ids.append(token)
        shown = self._decode(self._ids[self._window:self._read])
        text = self._decode(self._ids[self._window:])
        if len(text) <= len(shown) or text.endswith("\ufffd"):
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
