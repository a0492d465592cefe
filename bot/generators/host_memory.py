"""How much memory this process may still take, and a guard that says when it runs short.

The slot engine's CPU cache takes memory as conversations write to it
(``slot_cache.SlotCache.reserved``). Were the conversations to outgrow the machine, the
kernel's OOM killer would end the whole bot, every reply in flight with it; the engine asks
``MemoryGuard.short`` before each step instead and gives memory back first (see
``SlotScheduler._relieve``).

What is available is the least of Linux's ``MemAvailable`` and what each memory cgroup
that limits the process (a container's, a systemd slice's; v2 or v1) leaves: its limit less
the memory it uses, not counting the file cache the kernel would drop first
(``inactive_file``, as ``docker stats`` and the kubelet count it). Elsewhere it is unknown,
and the guard never says short.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

FLOOR_BYTES = 256 * 2**20
"""Below this (and what a step may write), memory is short: the engine gives back what it
can spare without cutting a reply, and new prompts wait while replies run."""
CRITICAL_BYTES = 64 * 2**20
"""Below this (and what a step may write), the kernel is about to kill a process: the
engine ends replies."""
SAID_EVERY_S = 60.0
"""A shortage that ends no conversation is logged at most this often."""
MIB = 2**20
UNLIMITED = 2**60
"""A cgroup limit at or past this is no limit (v1 writes one just under 2**63)."""


def free_memory() -> int:
    """The memory this process may take now, in bytes (``HostMemory``); where that is
    unknown, the free memory the system reports."""
    found = HostMemory()()
    if found is not None:
        return found
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class HostMemory:
    """The memory this process may still take, in bytes, when called; ``None`` where
    unknown. The cgroups that limit it (its own and its parents') are looked up once
    (``root``: where ``/proc`` and ``/sys`` are, for tests): reading these files costs tens
    of microseconds each in some sandboxes."""

    def __init__(self, root: Path = Path("/")) -> None:
        self._meminfo = root / "proc/meminfo"
        self._cgroups = _limiting_cgroups(root)

    def __call__(self) -> int | None:
        found = [_meminfo(self._meminfo), *(_left(*cgroup) for cgroup in self._cgroups)]
        known = [value for value in found if value is not None]
        return min(known) if known else None


Cgroup = tuple[Path, str, str, str]
"""A memory cgroup's folder, and its limit's, its usage's and its file cache's names."""


def _meminfo(path: Path) -> int | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "MemAvailable":
            return _number(value.split()[:1], 1024)
    return None


def _number(words: list[str], unit: int = 1) -> int | None:
    """``words[0]`` as a number of ``unit``s; ``None`` if it is none (an emulated file,
    gVisor's say, may differ from Linux's)."""
    try:
        return int(words[0]) * unit
    except (IndexError, ValueError):
        return None


def _limiting_cgroups(root: Path) -> list[Cgroup]:
    """The process's memory cgroup and its parents, those of them with a limit."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        _id, controllers, path = fields
        if controllers == "":  # v2: one hierarchy
            files = ("memory.max", "memory.current", "inactive_file")
            base = root / "sys/fs/cgroup"
        elif "memory" in controllers.split(","):
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            base = root / "sys/fs/cgroup/memory"
        else:
            continue
        # Its folder and each parent's, up to the hierarchy's root (inside a container the
        # cgroup's own folder is usually mounted there, and the path does not exist).
        folder, folders = base / path.strip().lstrip("/"), []
        while folder != base and base in folder.parents:
            folders.append(folder)
            folder = folder.parent
        folders.append(base)
        return [(folder, *files) for folder in folders if _left(folder, *files) is not None]
    return []


def _left(folder: Path, limit_file: str, usage_file: str, inactive: str) -> int | None:
    """The cgroup's limit less what it uses, not counting the file cache the kernel would
    drop first; ``None`` without a limit (or a file to read it from)."""
    try:
        limit = _number((folder / limit_file).read_text().split())  # "max": none
        if limit is None or limit >= UNLIMITED:
            return None
        usage = _number((folder / usage_file).read_text().split())
        stat = (folder / "memory.stat").read_text()
    except OSError:
        return None
    if usage is None:
        return None
    dropped = 0
    for line in stat.splitlines():
        name, _, value = line.partition(" ")
        if name == inactive:
            dropped = _number(value.split()) or 0
    return limit - max(0, usage - dropped)


class MemoryGuard:
    """Says when less than ``floor`` bytes are left, and when replies must give memory
    back (``available``: a ``HostMemory``, or a stand-in in tests). One per engine: it
    keeps count of a shortage's steps and says so in the log."""

    def __init__(self, floor: int, critical: int, step: int = 0,
                 available: Callable[[], int | None] | None = None) -> None:
        self.floor, self.critical = floor, critical
        self.step = step
        """What one step may write."""
        self._available = available or HostMemory()
        self.left: int | None = None
        """What was available when last read."""
        self.strained = 0
        """Short reads in a row, since memory was last enough or replies last gave back."""
        self._said = -math.inf

    @classmethod
    def for_steps(cls, step_bytes: int,
                  available: Callable[[], int | None] | None = None) -> MemoryGuard:
        """A guard for an engine whose step may write ``step_bytes``: twice that above each
        level."""
        return cls(FLOOR_BYTES + 2 * step_bytes, CRITICAL_BYTES + 2 * step_bytes, step_bytes,
                   available)

    def short(self) -> bool:
        """Whether less than ``floor`` is left now."""
        self.left = self._available()
        if self.left is not None and self.left < self.floor:
            self.strained += 1
            return True
        if self._said > -math.inf:  # the shortage was logged: so is its end
            logger.info("memory is no longer short: %.1f MiB left", (self.left or 0) / MIB)
        self.strained, self._said = 0, -math.inf
        return False

    def cut_due(self) -> int:
        """Asked after what could be given back was: the bytes the replies must give back
        now, else 0. Only on a second short step in a row (what a system reports may lag
        what was given back, and the levels leave room for two steps' writes), read
        anew, and only below ``critical``: enough to be a step's writes above it."""
        if self.strained < 2:
            return 0
        self.left = self._available()
        if self.left is None or self.left >= self.critical:
            return 0
        self.strained = 0
        return self.critical + self.step - self.left

    def report(self, ended: int, *, waiting: bool) -> None:
        """Log the shortage: once a minute, and whenever replies were ended."""
        if not ended and time.monotonic() - self._said < SAID_EVERY_S:
            return
        self._said = time.monotonic()
        logger.warning("memory is short: %.1f MiB left, %.1f MiB wanted (%.1f MiB critical); "
                       "the KV cache gave back what no conversation keeps%s; conversations "
                       "ended: %s", (self.left or 0) / MIB, self.floor / MIB,
                       self.critical / MIB, "; new prompts wait while replies run"
                       if waiting else "", ended)
