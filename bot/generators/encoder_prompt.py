"""What an encoder–decoder model reads: the conversation rendered for its encoder, counted
the same way, and cut from the oldest end to fit the encoder's input.

A model whose tokenizer has a chat template gets its template (counted by
``TemplateCounter``, as a decoder-only model's is). Otherwise it gets the *plain
rendering*: the system prompt on the first line, one line per turn labelled with its
speaker, and a last ``Bot:`` for the model to answer after::

    You are a helpful assistant.
    User: What is the capital of France?
    Bot: Paris.
    User: And of Italy?
    Bot:

tokenized with whatever the tokenizer adds around a text (T5's ``</s>``, BART's ``<s>`` …
``</s>``). A message counts as its line (``User: …`` and its line end), and
``prompt_overhead`` is the closing ``Bot:`` with those special tokens, so the counts add up
to the prompt's length: exactly where the tokenizer splits words at white space (T5's,
BART's and Marian's do), within the prompt budget's safety margin otherwise.

A prompt longer than the encoder's input (``input_limit``) loses its oldest turns first;
the system prompt and the newest message are kept. If those two alone are still too long,
the prompt's first tokens are cut. The dialogue's budget and ``chinwag serve``'s window check
already keep prompts within the limit by these counts, so this is the backstop for counts
that fall short of the rendering (a chat template's, a tokenizer that splits otherwise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from bot.generators.base import ChatMessage
from bot.generators.tokens import TemplateCounter, TokenCounter

DEFAULT_INPUT_TOKENS = 512
"""The encoder's input for a model that names no limit: T5's relative positions have none,
and 512 is what T5 and Flan-T5 were trained on."""
NO_LIMIT = 1_000_000
"""A tokenizer's ``model_max_length`` at or above this is transformers' "unknown" (1e30)."""
LABELS = {"system": "", "user": "User: ", "assistant": "Bot: "}
ANSWER_CUE = "Bot:"


def input_limit(config: Any, tokenizer: Any) -> int:
    """The most tokens the encoder reads: the smallest of the model's position table (learned
    positions end there) and the tokenizer's ``model_max_length`` when it names one, else
    ``DEFAULT_INPUT_TOKENS``."""
    limits = []
    for name in ("max_encoder_position_embeddings", "max_source_positions",
                 "max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    named = getattr(tokenizer, "model_max_length", None)
    if isinstance(named, int) and 0 < named < NO_LIMIT:
        limits.append(named)
    return min(limits) if limits else DEFAULT_INPUT_TOKENS


def plain_line(role: str, text: str) -> str:
    """One message in the plain rendering."""
    return f"{LABELS.get(role, role.capitalize() + ': ')}{text}\n"


class PlainCounter:
    """Counts and renders the plain rendering (a ``TokenCounter``)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._overhead = len(self._encode(ANSWER_CUE, special=True))

    def _encode(self, text: str, *, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    @staticmethod
    def render(messages: Sequence[ChatMessage]) -> str:
        return "".join(plain_line(m.role, m.content) for m in messages) + ANSWER_CUE

    def ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        return self._encode(self.render(messages), special=True)

    @property
    def prompt_overhead(self) -> int:
        return self._overhead

    def count(self, role: str, text: str) -> int:
        return len(self._encode(plain_line(role, text), special=False))

    def truncate(self, text: str, max_tokens: int) -> str:
        ids = self._encode(text, special=False)
        if len(ids) <= max_tokens:
            return text
        return str(self.tokenizer.decode(ids[: max(0, max_tokens)]))


class EncoderPrompt:
    """Renders a conversation for the encoder, counts it the same way, and fits it.

    Blocking (a tokenizer call or a few): called off the event loop, like the decoder-only
    ``prompt_ids``."""

    def __init__(self, tokenizer: Any, config: Any, name: str) -> None:
        self.limit = input_limit(config, tokenizer)
        self._render: Callable[[Sequence[ChatMessage]], list[int]]
        if getattr(tokenizer, "chat_template", None):
            self.counter: TokenCounter = TemplateCounter(tokenizer, name)
            self.rendering = "its chat template"
            self._render = lambda messages: list(tokenizer.apply_chat_template(
                [{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        else:
            plain = PlainCounter(tokenizer)
            self.counter = plain
            self.rendering = "the plain rendering"
            self._render = plain.ids

    def ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        """The prompt's token ids, at most ``limit`` of them."""
        ids = self._render(messages)
        if len(ids) <= self.limit:
            return ids
        kept = list(messages)
        first = 1 if len(kept) > 1 and kept[0].role == "system" else 0
        # The counts say about how many of the oldest turns must go; the rendering checks.
        counts = [self.counter.count(m.role, m.content) for m in kept]
        excess, drop = len(ids) - self.limit, 0
        while excess > 0 and first + drop < len(kept) - 1:
            excess -= counts[first + drop]
            drop += 1
        while True:
            ids = self._render([*kept[:first], *kept[first + drop:]])
            if len(ids) <= self.limit or first + drop >= len(kept) - 1:
                break
            drop += 1
        return ids[len(ids) - self.limit:] if len(ids) > self.limit else ids
