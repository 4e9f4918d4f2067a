"""Moving tensors to the device without making the host wait for it.

A copy from ordinary (pageable) host memory to a CUDA device blocks the host until the copy is done, and the
copy waits behind every kernel already queued: each one is a full host-device synchronisation. A copy from
pinned memory with ``non_blocking=True`` is queued like a kernel and the host carries on (PyTorch's pinned-memory
allocator keeps the buffer until the copy has run).
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``tensor`` on ``device``: a host tensor bound for a CUDA device goes through pinned memory, non-blocking;
    anything else is an ordinary ``.to``."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
