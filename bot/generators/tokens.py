"""Tokens the way a model sees a chat: counting them with its tokenizer and chat template,
or a documented estimate when no tokenizer is at hand. (Decoding a reply as it streams is
``reply_text.py``.)"""

from __future__ import annotations

import logging
from typing import Any, Protocol

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
