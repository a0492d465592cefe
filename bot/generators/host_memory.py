"""How much memory this process may still take, and a guard that says when it runs short.

The slot engine's CPU cache takes memory as conversations write to it
(``slot_cache.SlotCache.reserved``). Were the conversations to outgrow the machine, the
kernel's OOM killer would end the whole bot, every reply in flight with it; the engine asks
``MemoryGuard.short`` before each step instead and gives memory back first (see
``SlotScheduler._relieve``).

What is available is the least of Linux's ``MemAvailable`` and what the process's memory
cgroup (a container's limit; v2 or v1) leaves: its limit less the memory it uses, not
counting the file cache the kernel would drop first (``inactive_file``, as ``docker stats``
and the kubelet count it). Elsewhere it is unknown, and the guard never says short.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

FLOOR_BYTES = 256 * 2**20
"""Memory left for everything else (the step's activations, the event loop, the store)."""
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
    unknown. The cgroup is looked up once (``root``: where ``/proc`` and ``/sys`` are, for
    tests): reading these files costs tens of microseconds each in some sandboxes."""

    def __init__(self, root: Path = Path("/")) -> None:
        self._meminfo = root / "proc/meminfo"
        self._cgroup = _limited_cgroup(root)

    def __call__(self) -> int | None:
        found = [value for value in (_meminfo(self._meminfo),
                                     self._cgroup and _left(*self._cgroup))
                 if value is not None]
        return min(found) if found else None


def _meminfo(path: Path) -> int | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "MemAvailable":
            return int(value.split()[0]) * 1024
    return None


def _limited_cgroup(root: Path) -> tuple[Path, str, str, str] | None:
    """The process's memory cgroup folder and its files' names, when it has a limit."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy
            files = ("memory.max", "memory.current", "inactive_file")
            base = root / "sys/fs/cgroup"
        elif "memory" in controllers.split(","):
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            base = root / "sys/fs/cgroup/memory"
        else:
            continue
        # Inside a container the cgroup's own folder is usually mounted as the root.
        for folder in (base / path.lstrip("/"), base):
            if _left(folder, *files) is not None:
                return (folder, *files)
    return None


def _left(folder: Path, limit_file: str, usage_file: str, inactive: str) -> int | None:
    """The cgroup's limit less what it uses, not counting the file cache the kernel would
    drop first; ``None`` without a limit."""
    try:
        limit_text = (folder / limit_file).read_text().strip()
        if limit_text == "max" or int(limit_text) >= UNLIMITED:
            return None
        usage = int((folder / usage_file).read_text())
        stat = (folder / "memory.stat").read_text()
    except (OSError, ValueError):
        return None
    dropped = 0
    for line in stat.splitlines():
        name, _, value = line.partition(" ")
        if name == inactive:
            dropped = int(value)
    return int(limit_text) - max(0, usage - dropped)


class MemoryGuard:
    """Says when less than ``floor`` bytes are left (``available``: a ``HostMemory``, or a
    stand-in in tests)."""

    def __init__(self, floor: int, available: Callable[[], int | None] | None = None) -> None:
        self.floor = floor
        self._available = available or HostMemory()
        self.left: int | None = None
        """What was available when last asked."""

    def short(self) -> bool:
        self.left = self._available()
        return self.left is not None and self.left < self.floor
