"""Anonymous memory reserved whole and taken a page at a time as it is written: what the
slot engine's CPU KV cache lives in (``slot_cache.SlotCache.reserved``).

The kernel commits a page of a private anonymous mapping when it is first written, and
reads a page never written as zeros. With ``MAP_NORESERVE`` a mapping may be larger than
memory and swap; only what is written counts. Where a mapping is charged whole up front
(Windows, Linux's strict overcommit) or refused, there is no reservation. Pages can be
given back (``MADV_DONTNEED``): they read as zeros again.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import platform
import sys
from collections.abc import Iterable
from typing import Any

logger = logging.getLogger(__name__)


def no_reserve_flag() -> int:
    """``MAP_NORESERVE``: a reservation larger than memory and swap is then allowed (only
    what is written counts). Python names it from 3.13; its value where it is generic."""
    flag = getattr(mmap, "MAP_NORESERVE", None)
    if flag is not None:
        return int(flag)
    linux = sys.platform == "linux" and platform.machine() in ("x86_64", "aarch64")
    return 0x4000 if linux else 0


def strict_overcommit() -> bool:
    """Whether Linux charges every mapping whole, up front (``vm.overcommit_memory=2``)."""
    try:
        with open("/proc/sys/vm/overcommit_memory") as setting:
            return setting.read().strip() == "2"
    except OSError:
        return False


def reserve(shape: tuple[int, ...], dtype: Any,
            what: str) -> tuple[Any, mmap.mmap] | None:
    """A zeroed tensor of ``shape`` over an anonymous private mapping, and the mapping; or
    ``None`` (``what``: the log's name for it)."""
    import torch

    if sys.platform == "win32" or strict_overcommit():
        # A mapping is then charged whole against the commit limit, up front (Windows;
        # Linux's ``vm.overcommit_memory=2``, which also ignores MAP_NORESERVE).
        return None
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    try:
        mapping = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                            | no_reserve_flag(), prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, OverflowError, ValueError) as exc:
        logger.info("cannot reserve %s of %.1f GiB (%s): it grows as needed instead", what,
                    nbytes / 2**30, exc)
        return None
    # A huge page would commit 2 MiB at once (a KV cache row's window for one head, in one
    # layer, is about that size); a core dump need not hold it. Advice only: a kernel
    # without transparent huge pages refuses the first.
    for advice in ("MADV_NOHUGEPAGE", "MADV_DONTDUMP"):
        if hasattr(mmap, advice):
            with contextlib.suppress(OSError):
                mapping.madvise(getattr(mmap, advice))
    # The tensor holds the mapping (frombuffer keeps a reference): it is unmapped with it
    # and with whoever keeps the mapping.
    return torch.frombuffer(mapping, dtype=dtype).view(shape), mapping


def give_back(mapping: mmap.mmap, spans: Iterable[tuple[int, int]]) -> None:
    """Give the system back the whole pages inside each ``[first, end)`` byte range of
    ``mapping``: they read as zeros again. A page partly outside a range is kept."""
    page = mmap.PAGESIZE
    for first, end in spans:
        low, high = -(-first // page) * page, end // page * page
        if high > low:
            mapping.madvise(mmap.MADV_DONTNEED, low, high - low)
