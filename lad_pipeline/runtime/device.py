"""Getting small host values onto the device without making the host wait for it.

A tensor built from Python values on a GPU (``torch.tensor(values, device=...)``) is a blocking copy: the
host waits until the device has finished everything queued before. Constants are therefore made once per
device and reused, and per-batch values go through a non-blocking copy (pageable memory is staged at once,
so the temporary host tensor may be freed right away).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

_CONSTANTS: dict[tuple, Tensor] = {}


def constant(values: Sequence[float], device: torch.device | str, dtype: torch.dtype = torch.float32) -> Tensor:
    """``torch.tensor(values)`` on ``device``, made once per (values, device, dtype): never modify it."""
    key = (tuple(values), torch.device(device), dtype)
    value = _CONSTANTS.get(key)
    if value is None:
        value = _CONSTANTS[key] = torch.tensor(key[0], dtype=dtype, device=device)
    return value


def upload(values: Sequence, device: torch.device | str, dtype: torch.dtype | None = None) -> Tensor:
    """``torch.tensor(values)`` copied to ``device`` without waiting for it."""
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)
