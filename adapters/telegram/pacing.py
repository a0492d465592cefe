"""Per-chat pacing of streaming edits, so busy groups stay within Telegram's limits.

Telegram allows a bot about 20 messages a minute in one group (edits included) and about
one a second in a private chat. Required calls (a new message, the final text) always go
out and are counted; optional ones (intermediate streaming edits) are made only while the
chat has room, and not at all while Telegram has asked us to wait. Flood control itself is
still honoured where it is raised, so this never fights Telegram's own limiter.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

GROUP_WINDOW_S = 60.0
GROUP_BUDGET = 20
GROUP_RESERVE = 5
"""Calls per window kept for required updates (first and final texts)."""
GROUP_MIN_GAP_S = 3.0
SWEEP_EVERY = 256


class ChatPacer:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._calls: dict[int, deque[float]] = {}
        self._held_until: dict[int, float] = {}
        self._records = 0

    def record(self, chat_id: int) -> None:
        """A call that went out to this chat."""
        now = self._clock()
        self._recent(chat_id, now).append(now)
        self._records += 1
        if self._records % SWEEP_EVERY == 0:
            self._sweep(now)

    def hold(self, chat_id: int, seconds: float) -> None:
        """Telegram asked us to wait before writing to this chat again."""
        self._held_until[chat_id] = self._clock() + seconds

    def may_update(self, chat_id: int) -> bool:
        """Whether an optional update to this chat fits now."""
        now = self._clock()
        if self._held_until.get(chat_id, float("-inf")) > now:
            return False
        if chat_id > 0:
            return True  # private chat: the stream's own edit interval is enough
        recent = self._recent(chat_id, now)
        if recent and now - recent[-1] < GROUP_MIN_GAP_S:
            return False
        return len(recent) < GROUP_BUDGET - GROUP_RESERVE

    @property
    def tracked_chats(self) -> int:
        return len(self._calls)

    def _recent(self, chat_id: int, now: float) -> deque[float]:
        calls = self._calls.setdefault(chat_id, deque())
        while calls and now - calls[0] > GROUP_WINDOW_S:
            calls.popleft()
        return calls

    def _sweep(self, now: float) -> None:
        # Idle chats leave nothing behind.
        for chat_id in [c for c, calls in self._calls.items()
                        if not calls or now - calls[-1] > GROUP_WINDOW_S]:
            del self._calls[chat_id]
        for chat_id in [c for c, until in self._held_until.items() if until <= now]:
            del self._held_until[chat_id]
