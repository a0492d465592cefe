"""The splitter and the Telegram formatting agree on which text is code."""

from __future__ import annotations

import re

from hypothesis import example, given, settings
from hypothesis import strategies as st

from adapters.telegram.formatting import to_html
from bot.splitting import open_fence_at_end
from tests.auxil.telegram_api import _TelegramHtml

_PIECES = ["a", "b", "word", " ", "  ", "   ", "    ", "\t", "\n", "\n", "\n", "\r",
           "```", "````", "~~~", "~~~~", "```py", "~~~ x y", "``` `x`", "`", "~",
           "- ", "* ", "1. ", "**", "_", "#", "> "]
_markdownish = st.lists(st.sampled_from(_PIECES), max_size=50).map("".join)


def _squeezed(text: str) -> str:
    return re.sub(r"\s", "", text)


def code_by_splitter(text: str) -> str:
    """The lines the splitter keeps a block open around: after an open fence and before
    its end."""
    lines = text.split("\n")
    code: list[str] = []
    for number, line in enumerate(lines):
        before = open_fence_at_end("\n".join(lines[:number])) if number else None
        after = open_fence_at_end("\n".join(lines[:number + 1]))
        if before is not None and after is not None:
            code.append(line)
    return "\n".join(code)


def code_by_formatter(text: str) -> str:
    """What Telegram shows as code blocks of the formatted text."""
    shown, entities = _TelegramHtml().parse(to_html(text))
    return "\n".join(shown[e["offset"]:e["offset"] + e["length"]]
                     for e in entities if e["type"] == "pre")


@settings(max_examples=500, deadline=None)
@given(_markdownish)
@example("~~~\nx\n~~~")
@example("```\na\n```py\nb\n```\nc")
@example("````\na\n```\nb\n````\nc")
@example("    ```\nnot code")
@example("- item\n    ```\n    code\n    ```\nafter")
def test_splitter_and_formatter_agree_on_what_is_code(text: str) -> None:
    # Whitespace aside: a block's own indentation is not shown as code.
    assert _squeezed(code_by_splitter(text)) == _squeezed(code_by_formatter(text))
