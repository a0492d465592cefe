"""Liveness and readiness: what ``/health`` and ``/ready`` answer, kept up to date by the
wiring (``bot/app.py``) as the process starts, serves and stops.

*Health* says whether the process is sound and should be left running: its generator can
answer (a scheduler that stopped stepping with work queued, or a pool with no worker that
serves, is not). Loading the model is not a fault: health asks the generator only once it
is loaded. *Readiness* says whether it should be sent work: the model is loaded, every
configured platform is connected, it is not stopping, and it is healthy.

Asked on the event loop (the metrics server asks through it, which is how it learns that
the loop responds).
"""

from __future__ import annotations

from collections.abc import Sequence

from bot.generators import Generator
from bot.generators.pool import ModelPool


class Probes:
    def __init__(self, platforms: Sequence[str] = ()) -> None:
        """``platforms``: those that must be connected before the process is ready."""
        self._connecting = list(platforms)
        self._generator: Generator | ModelPool | None = None
        self._stopping = False

    def loaded(self, generator: Generator | ModelPool) -> None:
        """The model is loaded: from now on health is the generator's (a pool's: that of
        every model loaded)."""
        self._generator = generator

    def connected(self, platform: str) -> None:
        if platform in self._connecting:
            self._connecting.remove(platform)

    def stopping(self) -> None:
        """Shutting down: not ready any more (health stays as it is)."""
        self._stopping = True

    def health(self) -> str | None:
        """``None`` while sound; otherwise why not, in a few words."""
        return None if self._generator is None else self._generator.health()

    def ready(self) -> str | None:
        """``None`` when ready for work; otherwise why not."""
        if self._stopping:
            return "shutting down"
        if self._generator is None:
            return "the model is loading"
        if self._connecting:
            return f"connecting to {', '.join(self._connecting)}"
        return self.health()
