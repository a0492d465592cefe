"""Splitting a long reply into platform-sized messages without breaking code blocks.

Preference order for a cut: a paragraph break outside code, a line break outside code,
then (only for a code block that alone exceeds the limit) a line break inside it, with the
fence closed at the end of one part and reopened at the start of the next; then a space,
or the end of a sentence in Chinese or Japanese (which put no spaces between words); then
a hard cut. What is code is decided by ``bot.fences``, as the Telegram formatting
decides it.
"""

from __future__ import annotations

from bot.fences import Fence, classify

_SENTENCE_ENDS = "。！？；…"
_CLOSERS = "”’」』）》】〕〉\"')"
"""What may follow a sentence's end and belongs to it (a closing quote or bracket)."""


def _close_room(fence: Fence) -> int:
    return 1 + fence.length  # "\n```"


def _fence_states(text: str) -> list[tuple[int, Fence | None]]:
    """For each line end in ``text``: its position and the block open after it (or None)."""
    states: list[tuple[int, Fence | None]] = []
    position = 0
    lines = text.split("\n")
    for line, kind in zip(lines, classify(lines), strict=True):
        position += len(line)
        states.append((position, kind.fence if kind.block_open_after else None))
        position += 1
    return states


def open_fence_at_end(text: str) -> Fence | None:
    """The fence of a code block left open at the end of ``text``, if any."""
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
              if fence is not None and before is fence and 0 < pos <= limit - _close_room(fence)]
    if inside:
        cut, fence = inside[-1]
        head = text[:cut]
        if open_fence_at_end(head) is not None:
            return head + "\n" + fence.closing, fence.opening + "\n" + text[cut + 1:]
        return head.rstrip(), text[cut:].lstrip("\n")
    trailing = open_fence_at_end(text[:limit])
    if trailing is not None and _close_room(trailing) > limit // 4:
        trailing = None  # a fence of dozens of backticks: closing it would leave no room
    room = limit - (_close_room(trailing) if trailing else 0)
    space = text.rfind(" ", 0, room + 1)
    after_sentence = max(text.rfind(mark, 0, room) for mark in _SENTENCE_ENDS) + 1
    while 0 < after_sentence < room and text[after_sentence] in _CLOSERS:
        after_sentence += 1
    if after_sentence > max(space, room // 2):
        head, rest = text[:after_sentence], text[after_sentence:]
    elif space > room // 2:
        head, rest = text[:space], text[space:].lstrip(" ")
    else:
        head, rest = text[:room], text[room:]
    if trailing is not None:
        return head + "\n" + trailing.closing, trailing.opening + "\n" + rest
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
