"""Per-user rate limits: a token bucket for message bursts and a daily reply-token quota.

Buckets live in memory, oldest use first; a bucket that has refilled is the same as none,
so it is dropped, and memory holds only users who wrote in the last ``burst / rate``.
The daily quota is counted from stored usage, so it survives restarts.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float
    warned: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    retry_after: float
    """Seconds until the next message would be taken."""
    tell: bool
    """Whether to say so; only the first refusal of a burst is answered, so a flood gets
    one note, not one per message."""


class RateLimiter:
    def __init__(self, per_minute: float, burst: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = per_minute / 60.0
        self._burst = float(burst)
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self._rate > 0 and self._burst > 0

    @property
    def tracked(self) -> int:
        return len(self._buckets)

    def take(self, user_key: str) -> Refusal | None:
        """Spend one message of the user's allowance; a ``Refusal`` when none is left."""
        if not self.enabled:
            return None
        now = self._clock()
        self._evict_refilled(now)
        bucket = self._buckets.pop(user_key, None) or _Bucket(self._burst, now)
        bucket.tokens = min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)
        bucket.updated = now
        self._buckets[user_key] = bucket
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            bucket.warned = False
            return None
        tell = not bucket.warned
        bucket.warned = True
        return Refusal(retry_after=(1.0 - bucket.tokens) / self._rate, tell=tell)

    def give_back(self, user_key: str) -> None:
        """Return one message ``take`` spent (its message was not kept after all: the
        platform delivers it again, or its author is asked to resend it)."""
        bucket = self._buckets.get(user_key)
        if bucket is None:  # refilled and forgotten: the allowance is full anyway
            return
        bucket.tokens = min(self._burst, bucket.tokens + 1.0)

    def _evict_refilled(self, now: float) -> None:
        full_after = self._burst / self._rate
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if now - oldest.updated < full_after:
                return
            self._buckets.popitem(last=False)
