"""Fenced code blocks in Markdown, the one grammar for everything that must agree on which
lines are code: the splitter (``bot.splitting``) and the Telegram formatting.

It follows CommonMark: a fence is a run of three or more backticks or tildes, indented at
most three spaces; an opening fence may carry an info string (the language), one of
backticks no backtick; the closing fence is of the same character, at least as long, and
carries nothing else, so a fence line with info text inside a block is content. A block
left open runs to the end of the text. Lines of a block lose as much indentation as its
opening fence had.

Lists are followed only as far as fences need: inside a list item the three spaces count
from the item's content column, as a model writes a fence under ``1. Run:``. A block in a
list item ends only at its closing fence (CommonMark would also end it where the item
ends); models close the blocks they open, and one rule for both is what matters here.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

MAX_FENCE_INDENT = 3
"""Columns of indentation a fence may have; four make an indented code block instead."""
TAB_STOP = 4

_FENCE = re.compile(r"(?P<run>`{3,}|~{3,})(?P<info>.*)")
_LIST_MARKER = re.compile(r"(?P<marker>[-+*]|\d{1,9}[.)])(?P<gap>[ \t]+|$)")


@dataclass(frozen=True, slots=True)
class Fence:
    """The opening fence of a block."""

    char: str
    length: int
    indent: int
    """Its column: as many columns of indentation are taken off the block's lines."""
    info: str
    """The info string, stripped; its first word names the language."""

    @property
    def opening(self) -> str:
        """The fence that opens the block again (at column 0, in a new message)."""
        return self.char * self.length + self.info

    @property
    def closing(self) -> str:
        return self.char * self.length

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info.strip() else ""


class Kind(Enum):
    PROSE = "prose"
    OPENING = "opening"
    CODE = "code"
    CLOSING = "closing"


@dataclass(frozen=True, slots=True)
class Line:
    kind: Kind
    text: str
    """The line; for ``CODE``, without the indentation the block's fence had."""
    fence: Fence | None = None
    """The block a non-prose line belongs to."""

    @property
    def block_open_after(self) -> bool:
        return self.kind in (Kind.OPENING, Kind.CODE)


def _indentation(line: str) -> tuple[int, int]:
    """The leading whitespace of ``line``: its width in columns and in characters."""
    columns = 0
    for count, char in enumerate(line):
        if char == " ":
            columns += 1
        elif char == "\t":
            columns += TAB_STOP - columns % TAB_STOP
        else:
            return columns, count
    return columns, len(line)


def _dedent(line: str, columns: int) -> str:
    """``line`` without up to ``columns`` columns of leading whitespace."""
    width = 0
    for count, char in enumerate(line):
        step = 1 if char == " " else TAB_STOP - width % TAB_STOP if char == "\t" else 0
        if step == 0 or width + step > columns:
            return line[count:]
        width += step
    return ""


def _opening(rest: str, column: int) -> Fence | None:
    match = _FENCE.fullmatch(rest)
    if match is None:
        return None
    run, info = match.group("run"), match.group("info")
    if run[0] == "`" and "`" in info:  # ```x` is inline code, not a fence
        return None
    return Fence(run[0], len(run), column, info.strip())


def _closes(rest: str, fence: Fence) -> bool:
    run = len(rest) - len(rest.lstrip(fence.char))
    return run >= fence.length and not rest[run:].strip()


def classify(lines: Sequence[str]) -> list[Line]:
    """Each line of a text as prose, an opening fence, code or a closing fence."""
    classified: list[Line] = []
    items: list[int] = []  # content columns of the list items the current line may be in
    fence: Fence | None = None
    for line in lines:
        columns, chars = _indentation(line)
        rest = line[chars:]
        if fence is not None:
            if columns - fence.indent <= MAX_FENCE_INDENT and _closes(rest, fence):
                classified.append(Line(Kind.CLOSING, line, fence))
                fence = None
            else:
                classified.append(Line(Kind.CODE, _dedent(line, fence.indent), fence))
            continue
        if not rest.strip():
            classified.append(Line(Kind.PROSE, line))
            continue
        while items and columns < items[-1]:
            items.pop()
        base = items[-1] if items else 0
        if columns - base <= MAX_FENCE_INDENT:
            fence = _opening(rest, columns)
            marker = None if fence is not None else _LIST_MARKER.match(rest)
            if marker is not None:
                gap = len(marker.group("gap"))
                content = columns + len(marker.group("marker")) + (gap if 0 < gap <= 4 else 1)
                items.append(content)
                fence = _opening(rest[marker.end():], content)  # "- ```sh" opens a block
        classified.append(Line(Kind.PROSE, line) if fence is None
                          else Line(Kind.OPENING, line, fence))
    return classified
