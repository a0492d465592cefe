import re

from hypothesis import given, settings
from hypothesis import strategies as st

from bot.splitting import split_text

FENCE = re.compile(r"^ {0,3}```", re.MULTILINE)


def normalized(text: str) -> str:
    """Text without whitespace and fence lines, which a split may add or move."""
    return re.sub(r"\s+", "", re.sub(r"(?m)^ {0,3}```[^\n]*", "", text))


def test_short_text_is_one_part() -> None:
    assert split_text("hello", 100) == ["hello"]


def test_prefers_paragraph_breaks() -> None:
    text = "first paragraph " * 5 + "\n\n" + "second paragraph " * 5
    parts = split_text(text, 120)
    assert parts[0] == ("first paragraph " * 5).rstrip()
    assert parts[1].startswith("second")


def test_code_block_is_kept_whole_when_it_fits() -> None:
    code = "```python\n" + "\n".join(f"print({i})" for i in range(8)) + "\n```"
    text = "intro " * 30 + "\n" + code + "\n\nafter"
    parts = split_text(text, 200)
    assert all(len(p) <= 200 for p in parts)
    assert any(code in p for p in parts), parts


def test_huge_code_block_is_closed_and_reopened() -> None:
    code = "```python\n" + "\n".join(f"value_{i} = {i}" for i in range(200)) + "\n```"
    parts = split_text("Here:\n\n" + code, 300)
    assert len(parts) > 3
    for part in parts:
        assert len(part) <= 300
        assert len(FENCE.findall(part)) % 2 == 0, part  # every part's fences are balanced
    assert all(p.startswith("```python") for p in parts[1:])
    assert normalized("\n".join(parts)) == normalized("Here:\n\n" + code)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a", "b", "word ", " ", "`", "\n", "#", "\n```\n",
                                  "\n```py\n", "\n\n", "x" * 30]),
               max_size=400).map("".join),
       st.integers(min_value=40, max_value=500))
def test_no_part_too_long_and_nothing_lost(text: str, limit: int) -> None:
    parts = split_text(text, limit)
    assert all(len(p) <= limit for p in parts)
    joined = "\n".join(parts)
    # Only whitespace at cuts and the fences added to close/reopen a block may differ.
    assert normalized(joined) == normalized(text)


def test_block_opened_right_before_the_limit_still_makes_progress() -> None:
    # Found by hypothesis: a cut just after the opening fence reopened the same text.
    text = "```#b\n`" + "x" * 60 + "word b```py\n\n\n\n`#```py\n" + "x" * 30 + "\n```py\n\nab"
    parts = split_text(text, 80)
    assert all(len(p) <= 80 for p in parts)
    assert normalized("\n".join(parts)) == normalized(text)


def test_tilde_block_is_closed_and_reopened_with_tildes() -> None:
    code = "~~~python\n" + "\n".join(f"value_{i} = {i}" for i in range(60)) + "\n~~~"
    parts = split_text(code, 300)
    assert len(parts) > 2
    assert all(p.startswith("~~~python\n") for p in parts)
    assert all(p.endswith("\n~~~") for p in parts)


def test_long_fence_is_closed_with_one_as_long() -> None:
    # A block opened with four backticks may hold ``` lines; three would not close it.
    lines = [f"line {i}" if i % 5 else "```" for i in range(80)]
    code = "````md\n" + "\n".join(lines) + "\n````"
    parts = split_text(code, 200)
    assert len(parts) > 2
    for part in parts:
        assert part.startswith("````md\n") and part.endswith("\n````"), part
    assert normalized("\n".join(parts)) == normalized(code)


def test_fence_line_with_info_inside_a_block_is_content() -> None:
    # "```py" inside a block does not close it (a closing fence has no info string), so a
    # cut after it is still inside the block and closes it.
    text = "```\n" + "first\n```py\n" + "\n".join(f"x{i}" for i in range(40)) + "\n```"
    parts = split_text(text, 60)
    assert all(p.startswith("```") and p.endswith("\n```") for p in parts), parts


def test_deeply_indented_fence_is_not_a_fence() -> None:
    # Four spaces at the top level make indented code, not a fence: nothing to close.
    text = "    ```\n" + "\n".join(f"word{i}" for i in range(40))
    parts = split_text(text, 60)
    assert not any(p.rstrip().endswith("```") for p in parts), parts
