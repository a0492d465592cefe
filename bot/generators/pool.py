"""The models chats have chosen, loaded as they are needed.

The default model is loaded at start (readiness means it is loaded); any other on its
first use. At most ``max_loaded`` in-process models (``catalog.IN_PROCESS_KINDS``) are
loaded at once, the default included; clients of another server and the echo generator
are not counted. When one more must load, the least recently used one goes, idle ones
first. **A model is never unloaded while it is writing a reply**: one that is busy is
*drained* instead: it takes no new work, the replies it is writing finish (within
``CHINWAG_GENERATION_TIMEOUT``), then it is closed and the waiting model loads. Its chats
wait meanwhile (they see "typing"), and are answered once it is back; nobody is refused.

Every use is a pin (``use``, ``counting``), held for the whole reply; a model is closed
only with no pin on it. Loading and closing run in tasks of the pool's own, so a reply
given up while waiting (a stop) leaves no model half loaded. All of it runs on the event
loop; only the metrics' scrape reads from another thread (a snapshot of the slots).

A model that fails to load is not tried again for ``RETRY_LOAD_AFTER_S``: its chats are
told at once, and it does not push a loaded model out on every message meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, Self

from bot.errors import ModelUnavailable
from bot.generators.base import Generator
from bot.generators.catalog import DEFAULT_NAME, ModelCatalog, ModelEntry
from bot.generators.stats import SchedulerStats
from bot.generators.tokens import EstimateCounter

logger = logging.getLogger(__name__)

COUNT_OFF_LOOP_CHARS = 4096
"""Texts longer than this are counted in tokens off the event loop (a tokenizer takes
milliseconds per few thousand characters)."""
ESTIMATED = "~"
"""``counted_by`` of a count made by estimate, when no model was loaded to count with:
it holds for no model, so answering counts again."""

RETRY_LOAD_AFTER_S = 60.0
"""How long a model that failed to load is left before a use tries loading it again."""

Factory = Callable[[ModelEntry], Generator]
"""Makes (does not load) the generator of an entry."""


class TokenCounting(Protocol):
    def count_tokens(self, role: str, text: str) -> int: ...

    def truncate(self, text: str, max_tokens: int) -> str: ...


class _Estimate:
    """Counts by estimate (``tokens.EstimateCounter``) while no model is loaded."""

    def __init__(self) -> None:
        self._counter = EstimateCounter()

    def count_tokens(self, role: str, text: str) -> int:
        return self._counter.count(role, text)

    def truncate(self, text: str, max_tokens: int) -> str:
        return self._counter.truncate(text, max_tokens)


@dataclass(frozen=True, slots=True)
class InUse:
    """A loaded model, pinned for a reply."""

    entry: ModelEntry
    """The entry asked for (the default for a name no longer configured)."""
    generator: Generator


@dataclass(frozen=True, slots=True)
class Counter:
    """Token counting for a conversation without loading anything: its model's if loaded,
    else the default's, else any loaded model's, else an estimate."""

    counted_by: str | None
    """What to store with the counts: the name of the model that counted (``None``: the
    default; ``ESTIMATED``: no model)."""
    tokens: TokenCounting

    async def count(self, role: str, text: str) -> int:
        """Off the event loop for a long text."""
        if len(text) > COUNT_OFF_LOOP_CHARS:
            return await asyncio.to_thread(self.tokens.count_tokens, role, text)
        return self.tokens.count_tokens(role, text)


@dataclass(eq=False)
class _Slot:
    entry: ModelEntry
    generator: Generator
    owned: bool = True
    """Loaded and closed by the pool (not by whoever made the pool with it)."""
    users: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when loading ended, loaded or not (``error``)."""
    error: BaseException | None = None
    draining: bool = False
    """To be closed: no new pins; waits for the last one to go."""
    closing: bool = False
    gone: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def usable(self) -> bool:
        return self.ready.is_set() and self.error is None and not self.draining


class ModelPool:
    def __init__(self, catalog: ModelCatalog, factory: Factory, *, max_loaded: int = 1,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``max_loaded``: in-process models loaded at once, at least 1."""
        self.catalog = catalog
        self._factory = factory
        self._max = max(1, max_loaded)
        self._clock = clock
        self._failed: dict[tuple[str, str], tuple[float, BaseException]] = {}
        """When each model that failed to load failed, and why (``RETRY_LOAD_AFTER_S``)."""
        self._slots: OrderedDict[tuple[str, str], _Slot] = OrderedDict()
        """By ``ModelEntry.identity``, least recently used first."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._retired: SchedulerStats | None = None
        """What the schedulers of closed models did, so the metrics' counters never go back."""

    @classmethod
    def serving(cls, generator: Generator) -> ModelPool:
        """Only ``generator``, loaded already and closed by its owner: the pool of a
        manager given one generator."""
        entry = ModelEntry(DEFAULT_NAME, generator.name, "")
        pool = cls(ModelCatalog(entry), _no_factory)
        slot = _Slot(entry, generator, owned=False)
        slot.ready.set()
        pool._slots[entry.identity] = slot
        return pool

    async def __aenter__(self) -> Self:
        """Loads the default model (its failure is the start's)."""
        slot = self._slots.get(self.catalog.default.identity) \
            or self._start_loading(self.catalog.default)
        try:
            await slot.ready.wait()
        except BaseException:  # a stop while it loads: it is closed once loaded
            await self.__aexit__(None, None, None)
            raise
        if slot.error is not None:
            raise slot.error
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        """Closes every model, once loads and drains under way have ended."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for slot in reversed(list(self._slots.values())):
            await self._close(slot)
        self._slots.clear()

    # Pins.

    @asynccontextmanager
    async def use(self, name: str | None) -> AsyncIterator[InUse]:
        """The model a chat that chose ``name`` is answered by, loaded (waiting for room
        if need be) and pinned for the block. Raises ``ModelUnavailable`` when it cannot
        be loaded."""
        entry = self.catalog.resolve(name)
        slot = await self._pin(entry)
        try:
            yield InUse(entry, slot.generator)
        finally:
            self._unpin(slot)

    @asynccontextmanager
    async def counting(self, name: str | None) -> AsyncIterator[Counter]:
        """Token counting for a chat that chose ``name``, loading nothing (see
        ``Counter``); what counts is pinned for the block."""
        wanted = self.catalog.resolve(name)
        slot = self._usable(wanted) or self._usable(self.catalog.default) or next(
            (s for s in reversed(self._slots.values()) if s.usable), None)
        if slot is None:
            yield Counter(ESTIMATED, _Estimate())
            return
        slot.users += 1
        try:
            yield Counter(self.catalog.recorded(slot.entry), slot.generator)
        finally:
            self._unpin(slot, used=False)

    def is_loaded(self, entry: ModelEntry) -> bool:
        return self._usable(entry) is not None

    def _usable(self, entry: ModelEntry) -> _Slot | None:
        slot = self._slots.get(entry.identity)
        return slot if slot is not None and slot.usable else None

    async def _pin(self, entry: ModelEntry) -> _Slot:
        while True:
            slot = self._slots.get(entry.identity)
            if slot is None:
                failed = self._failed.get(entry.identity)
                if failed is not None and self._clock() - failed[0] < RETRY_LOAD_AFTER_S:
                    raise ModelUnavailable(f"model {entry.name} could not be loaded: "
                                           f"{failed[1]}") from failed[1]
                if not self._room_for(entry):
                    await self._change()
                    continue
                try:
                    slot = self._start_loading(entry)
                except Exception as exc:  # making it failed: as if loading had
                    raise ModelUnavailable(f"model {entry.name} could not be made: "
                                           f"{exc}") from exc
            if slot.draining:
                await slot.gone.wait()
                continue
            slot.users += 1
            try:
                await slot.ready.wait()
            except BaseException:
                self._unpin(slot)
                raise
            if slot.error is not None:
                self._unpin(slot)
                raise ModelUnavailable(f"model {entry.name} could not be loaded: "
                                       f"{slot.error}") from slot.error
            self._slots.move_to_end(entry.identity)
            return slot

    def _unpin(self, slot: _Slot, *, used: bool = True) -> None:
        """``used``: for a reply (which makes it recently used), not only to count."""
        slot.users -= 1
        if used and self._slots.get(slot.entry.identity) is slot and not slot.draining:
            self._slots.move_to_end(slot.entry.identity)
        self._notify()

    # Loading and closing.

    def _room_for(self, entry: ModelEntry) -> bool:
        """Whether ``entry`` may start loading now; if not, a model is on its way out (or
        loading) and the caller waits for a change."""
        if not entry.in_process:
            return True
        resident = [s for s in self._slots.values() if s.entry.in_process]
        if len(resident) < self._max:
            return True
        if any(s.draining for s in resident):
            return False
        loaded = [s for s in resident if s.usable]
        if not loaded:  # all still loading: one of them may fail and make room
            return False
        victim = next((s for s in loaded if s.users == 0), loaded[0])
        logger.info("unloading model %s (%s: %s) to load %s: at most %s in-process models "
                    "are loaded%s", victim.entry.name, victim.entry.kind, victim.entry.model,
                    entry.name, self._max,
                    f"; waiting for its {victim.users} replies to finish" if victim.users
                    else "")
        victim.draining = True
        self._spawn(self._drain(victim))
        return False

    def _start_loading(self, entry: ModelEntry) -> _Slot:
        slot = _Slot(entry, self._factory(entry))
        self._slots[entry.identity] = slot
        self._spawn(self._load(slot))
        return slot

    async def _load(self, slot: _Slot) -> None:
        entry = slot.entry
        logger.info("loading model %s (%s: %s)", entry.name, entry.kind, entry.model)
        try:
            await slot.generator.__aenter__()
        except BaseException as exc:
            slot.error = exc
            if isinstance(exc, Exception):
                self._failed[entry.identity] = (self._clock(), exc)
                logger.error("could not load model %s (%s: %s): %s; trying again on a use "
                             "after %s s", entry.name, entry.kind, entry.model, exc,
                             RETRY_LOAD_AFTER_S)
            # What it started before failing (a scheduler thread and its model, a client)
            # would outlive it: each later use tries again, and would leak one more.
            try:
                await slot.generator.__aexit__(type(exc), exc, exc.__traceback__)
            except Exception:
                logger.exception("closing model %s after its failed load failed", entry.name)
            if self._slots.get(entry.identity) is slot:
                del self._slots[entry.identity]
            slot.gone.set()
            if not isinstance(exc, Exception):
                raise
        else:
            self._failed.pop(entry.identity, None)
            logger.info("loaded model %s", entry.name)
        finally:
            slot.ready.set()
            self._notify()

    async def _drain(self, slot: _Slot) -> None:
        while slot.users:
            await self._change()
        await self._close(slot)
        if self._slots.get(slot.entry.identity) is slot:
            del self._slots[slot.entry.identity]
        slot.gone.set()
        self._notify()

    async def _close(self, slot: _Slot) -> None:
        if not slot.owned or slot.error is not None or slot.closing:
            return
        slot.closing = True
        stats = _stats_of(slot.generator)
        if stats is not None:
            self._retired = stats.counters() if self._retired is None \
                else self._retired + stats.counters()
        try:
            await slot.generator.__aexit__(None, None, None)
        except Exception:
            logger.exception("closing model %s failed", slot.entry.name)
        else:
            logger.info("unloaded model %s", slot.entry.name)

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name="chinwag:models")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _change(self) -> None:
        await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # What health probes and metrics read.

    @property
    def name(self) -> str:
        """The default generator's name (the metrics' build info)."""
        slot = self._slots.get(self.catalog.default.identity)
        return slot.generator.name if slot is not None else self.catalog.default.kind

    def health(self) -> str | None:
        """``None`` while every loaded model can answer; otherwise the first one's reason
        (named when there are several models)."""
        for slot in tuple(self._slots.values()):
            if not slot.ready.is_set() or slot.error is not None or slot.closing:
                continue
            reason = slot.generator.health()
            if reason is not None:
                return reason if len(self.catalog) == 1 else f"{slot.entry.name}: {reason}"
        return None

    @property
    def device(self) -> str | None:
        """Where the first loaded in-process model runs, the default first."""
        slots = sorted(tuple(self._slots.values()),
                       key=lambda s: s.entry.identity != self.catalog.default.identity)
        return next((d for d in (getattr(s.generator, "device", None) for s in slots
                                 if s.ready.is_set()) if isinstance(d, str)), None)

    def scheduler_stats(self) -> SchedulerStats | None:
        """Every loaded model's scheduler together, with what closed ones did; ``None``
        when no model with a scheduler was ever loaded. Read from the scrape's thread."""
        total = self._retired
        for slot in tuple(self._slots.values()):
            if slot.closing:
                continue
            stats = _stats_of(slot.generator)
            if stats is not None:
                total = stats if total is None else total + stats
        return total


def _stats_of(generator: Generator) -> SchedulerStats | None:
    read = getattr(generator, "scheduler_stats", None)
    return read() if callable(read) else None


def _no_factory(entry: ModelEntry) -> Generator:
    raise ModelUnavailable(f"model {entry.name} is not configured")
