"""Host lists onto the model's device without waiting for the device.

`torch.tensor(values, device="cuda")` (and any `.to("cuda")` without `non_blocking`) copies and
then synchronizes the stream: the host waits until every kernel already queued has run. A step
launched while the last one is still on the device (`decode_ahead`) would wait for that one's
whole forward. A copy from pageable memory with `non_blocking=True` is staged by the driver before
the call returns (the list may go away) and queued behind the kernels already there.
"""

from __future__ import annotations

import torch


def to_device(values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """torch.tensor(values, dtype) on `device`, queued, not waited for (a no-op move on a CPU)."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
