"""Splitting a long reply into platform-sized messages without breaking code blocks.

Preference order for a cut: a paragraph break outside code, a line break outside code,
then (only for a code block that alone exceeds the limit) a line break inside it, with the
fence closed at the end of one part and reopened at the start of the next; then a space;
then a hard cut.
"""

from __future__ import annotations

import re

_FENCE = re.compile(r"^ {0,3}(```|~~~)(.*)$")
_CLOSE_ROOM = 4  # "\n```"


def _fence_states(text: str) -> list[tuple[int, str | None]]:
    """For each line end in ``text``: its position and the open fence line after it (or None)."""
    states: list[tuple[int, str | None]] = []
    open_fence: str | None = None
    position = 0
    for line in text.split("\n"):
        match = _FENCE.match(line)
        if match:
            if open_fence is None:
                open_fence = line.strip()
            elif match.group(1) == open_fence[:3] and not match.group(2).strip():
                open_fence = None
        position += len(line)
        states.append((position, open_fence))
        position += 1
    return states


def open_fence_at_end(text: str) -> str | None:
    """The fence line of a code block left open at the end of ``text``, if any."""
    return _fence_states(text)[-1][1]


def split_first(text: str, limit: int) -> tuple[str, str]:
    """Cut ``text`` (longer than ``limit``) into a head of at most ``limit`` characters and
    the rest. A code block cut in two is closed in the head and reopened in the rest."""
    if len(text) <= limit:
        return text, ""
    if limit < 16:
        raise ValueError("limit too small to split sensibly")
    head, rest = _preferred_cut(text, limit)
    if len(rest) >= len(text):  # reopening a long fence would undo the cut: cut plainly
        return text[:limit], text[limit:]
    return head, rest


def _preferred_cut(text: str, limit: int) -> tuple[str, str]:
    window = _fence_states(text[: limit + 1])
    outside_breaks = [pos for pos, fence in window if fence is None and 0 < pos <= limit]
    paragraph = [pos for pos in outside_breaks if text[pos:pos + 2] == "\n\n"]
    if outside_breaks:
        cut = outside_breaks[-1]
        if paragraph and paragraph[-1] >= cut // 2:
            cut = paragraph[-1]
        return text[:cut].rstrip(), text[cut:].lstrip("\n")
    # Inside a block, only after at least one line of its content (not right after the fence).
    inside = [(pos, fence) for (pos, fence), (_, before) in zip(window[1:], window, strict=False)
              if fence is not None and before == fence and 0 < pos <= limit - _CLOSE_ROOM]
    if inside:
        cut, fence = inside[-1]
        head = text[:cut]
        if open_fence_at_end(head) is not None:
            return head + "\n" + fence[:3], fence + "\n" + text[cut + 1:]
        return head.rstrip(), text[cut:].lstrip("\n")
    trailing = open_fence_at_end(text[:limit])
    room = limit - (_CLOSE_ROOM if trailing else 0)
    space = text.rfind(" ", 0, room + 1)
    if space > room // 2:
        head, rest = text[:space], text[space:].lstrip(" ")
    else:
        head, rest = text[:room], text[room:]
    if trailing is not None:
        return head + "\n" + trailing[:3], trailing + "\n" + rest
    return head, rest


def split_text(text: str, limit: int) -> list[str]:
    """All the parts of ``text``, each at most ``limit`` characters."""
    parts: list[str] = []
    rest = text
    while len(rest) > limit:
        head, rest = split_first(rest, limit)
        if head.strip():
            parts.append(head)
    if rest.strip() or not parts:
        parts.append(rest)
    return parts
