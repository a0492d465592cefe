"""Markdown → Telegram HTML, and per-chat pacing: pure parts of the Telegram adapter."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.telegram.formatting import has_markup, to_html
from adapters.telegram.pacing import GROUP_BUDGET, ChatPacer
from tests.auxil.telegram_api import _TelegramHtml


def shown(markdown: str) -> tuple[str, list[str]]:
    text, entities = _TelegramHtml().parse(to_html(markdown))
    return text, [e["type"] for e in entities]


@pytest.mark.parametrize(("markdown", "text", "types"), [
    ("**bold** and *italic* and _also_", "bold and italic and also", ["b", "i", "i"]),
    ("`a < b && c`", "a < b && c", ["code"]),
    ("~~gone~~ [site](https://example.org/?q=1&r=2)", "gone site", ["s", "a"]),
    ("# Heading\n- one\n* two", "Heading\n• one\n• two", ["b"]),
    ("> quoted\n> lines\nafter", "quoted\nlines\nafter", ["blockquote"]),
    ("```py\nif a<b: print('**x**')\n```", "if a<b: print('**x**')", ["code", "pre"]),
    ("2*3*4 = 24, snake_case_name, a * b", "2*3*4 = 24, snake_case_name, a * b", []),
    ("**unclosed bold and `unclosed code", "**unclosed bold and `unclosed code", []),
    ("<script>alert('x')</script> & &amp;", "<script>alert('x')</script> & &amp;", []),
    ("```\nunclosed fence\nstill code", "unclosed fence\nstill code", ["pre"]),
])
def test_markdown_becomes_telegram_entities(markdown: str, text: str,
                                            types: list[str]) -> None:
    assert shown(markdown) == (text, types)


def test_plain_text_needs_no_formatting() -> None:
    text = "Just words, 3 < 4 & 5 > 2."
    assert not has_markup(to_html(text), text)
    assert has_markup(to_html("**yes**"), "**yes**")


_TOKENS = ["a", "b", "word", " ", "\n", "*", "**", "_", "`", "```", "```py", "~~", "#", "> ",
           "- ", "[", "]", "(", ")", "(https://x.y/?a=1&b=2)", "<", ">", "&", "&amp;", "<b>"]
_markdownish = st.lists(st.sampled_from(_TOKENS), max_size=60).map("".join)


def _bare(text: str) -> str:
    return re.sub(r"[\s*_`~#>\[\]()•-]", "", text)


def _is_subsequence(small: str, big: str) -> bool:
    letters = iter(big)
    return all(letter in letters for letter in small)


@settings(max_examples=400, deadline=None)
@given(_markdownish | st.text(max_size=200))
def test_any_text_renders_to_html_telegram_accepts(markdown: str) -> None:
    text, _types = shown(markdown)  # Telegram's parser accepts it: no markup error, ever
    # Formatting only takes markup away (and link targets); it never invents or reorders text.
    assert _is_subsequence(_bare(text), _bare(markdown))


def test_pacer_keeps_group_edits_within_budget() -> None:
    now = [0.0]
    pacer = ChatPacer(lambda: now[0])
    allowed = 0
    for _ in range(600):  # one optional update offered every 0.1 s for a minute
        now[0] += 0.1
        if pacer.may_update(-5):
            pacer.record(-5)
            allowed += 1
    assert 0 < allowed < GROUP_BUDGET  # room is left for required messages
    assert all(pacer.may_update(7) for _ in range(10))  # private chats are not paced


def test_pacer_respects_flood_control_and_forgets_idle_chats() -> None:
    now = [0.0]
    pacer = ChatPacer(lambda: now[0])
    pacer.hold(7, 5.0)
    assert not pacer.may_update(7)
    now[0] += 5.1
    assert pacer.may_update(7)
    for chat in range(-1, -600, -1):
        pacer.record(chat)
    now[0] += 120
    for _ in range(256):
        pacer.record(-1)
    assert pacer.tracked_chats == 1


@pytest.mark.parametrize(("markdown", "text", "types"), [
    ("***x***", "x", ["i", "b"]),
    ("**bold *italic***", "bold italic", ["b", "i"]),
    ("___x___", "x", ["i", "b"]),
    ("~~~\ncode **x**\n~~~\nafter", "code **x**\nafter", ["pre"]),
    ("~~~python\nprint(1)\n~~~", "print(1)", ["code", "pre"]),
    # A fence line with info text inside a block is content; only a bare fence closes.
    ("```\na\n```py\nb\n```\nafter", "a\n```py\nb\nafter", ["pre"]),
    ("````\na\n```\nb\n````", "a\n```\nb", ["pre"]),
    ("~~~\na\n```\nb\n~~~", "a\n```\nb", ["pre"]),
    # Up to three spaces of indent, relative to the list item the fence is in.
    ("   ```\ncode\n   ```", "code", ["pre"]),
    ("1. Run:\n    ```sh\n    ls -l\n    ```", "1. Run:\nls -l", ["code", "pre"]),
])
def test_fences_follow_commonmark(markdown: str, text: str, types: list[str]) -> None:
    assert shown(markdown) == (text, types)


def test_link_url_with_parentheses_keeps_its_last_character() -> None:
    url = "https://en.wikipedia.org/wiki/Python_(programming_language)"
    text, entities = _TelegramHtml().parse(to_html(f"See [Python]({url}) now."))
    assert text == "See Python now."
    assert [(e["type"], e.get("href")) for e in entities] == [("a", url)]
