"""The public noise function: the values every backend's passes use, without storing them."""

from __future__ import annotations

import torch

from .backends import resolve_backend
from .philox import check_seed


def noise(seed: int, start: int, numel: int, *, device="cpu", dtype=torch.float32, backend="auto"):
    """Standard-normal values of global indices ``[start, start + numel)`` under ``seed``.

    A pure function of (seed, index): any range, chunking or backend gives the same values (to
    float rounding; float64 is computed in float64 by the reference). See ``philox.py``.
    """
    check_seed(seed)
    for name, value in (("start", start), ("numel", numel)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating type, got {dtype}")
    device = torch.device(device)
    return resolve_backend(backend, device, dtype).noise(seed, start, numel, device, dtype)
