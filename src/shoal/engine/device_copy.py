"""Host data onto the model's device without waiting for the device.

`torch.tensor(values, device="cuda")` (and any `.to("cuda")` without `non_blocking`) copies and
then synchronizes the stream: the host waits until every kernel already queued has run. A step
launched while the last one is still on the device (`decode_ahead`) would wait for that one's
whole forward. A `non_blocking` copy from pageable memory may still synchronize (the driver
stages it through pinned memory as it sees fit), so the data goes through PyTorch's pinned
caching allocator first: a small host copy, and the pinned block is not reused until the queued
copy has read it.
"""

from __future__ import annotations

import torch


def move(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`, queued behind the device's work, not waited for (itself on a
    CPU)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.tensor(values, dtype) on `device`, as `move`."""
    return move(torch.tensor(values, dtype=dtype), device)
