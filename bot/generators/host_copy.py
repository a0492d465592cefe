"""Host values to a device tensor without a host sync.

On CUDA a copy from pageable host memory waits for the device (torch stages it and
synchronizes the stream), so a prompt's ids built after a forward was queued would hold the
host until that forward is done. A copy from pinned memory is queued like a kernel instead;
torch's host allocator keeps the pinned buffer until the copy has run.
"""

from __future__ import annotations

from typing import Any


def to_device(values: Any, device: Any, dtype: Any = None) -> Any:
    """``torch.tensor(values)`` on ``device``: on CUDA through pinned memory, queued."""
    import torch

    pinned = torch.device(device).type == "cuda"
    return torch.tensor(values, dtype=dtype, pin_memory=pinned).to(device, non_blocking=pinned)
