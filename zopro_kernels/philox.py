"""Philox4x32-10 and the normal transform, in plain PyTorch integer math.

This is the definition of the noise every backend must reproduce:

    value(seed, i) = randn4x(seed, counter=i // 4)[i % 4]

where ``randn4x`` is Triton's ``tl.randn4x``: Philox4x32-10 with key
``(seed & 0xffffffff, seed >> 32)`` and counter ``(c & 0xffffffff, c >> 32, 0, 0)``,
each 32-bit output mapped to a uniform in [0, 1) and pairs mapped to normals by
Box-Muller ``(r cos θ, r sin θ)``. One Philox call feeds four consecutive indices,
so the GPU kernels pay one call per four values and the values never depend on
block sizes, chunking, or where a tensor's range starts.

On the CPU the rounds run on numpy uint64 arrays; on other devices on int64 tensors, with
32x32-bit products split into 16-bit halves so no intermediate overflows int64.
"""

from __future__ import annotations

import numpy as np
import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_ROUNDS = 10
# Triton's uint_to_uniform_float scale: the largest value with INT32_MAX * scale < 1 in float32.
_UNIFORM_SCALE = float(torch.tensor(4.6566127342e-10, dtype=torch.float32))
_TWO_PI = 6.283185307179586
_MIN_UNIFORM = 1.0e-7
MAX_SEED = 2**63 - 1


def _mul_hi_lo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of the 64-bit product of a 32-bit constant and uint32 values."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    hi_part = a_hi * b  # < 2**48
    lo_part = a_lo * b  # < 2**48
    high = (hi_part + (lo_part >> 16)) >> 16
    low = (((hi_part & 0xFFFF) << 16) + lo_part) & _MASK32
    return high, low


def philox4x32(seed: int, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Four uint32 streams (as int64 tensors) for 64-bit ``counters`` under ``seed``."""
    check_seed(seed)
    counters = counters.to(torch.int64)
    if counters.device.type == "cpu":
        return tuple(torch.from_numpy(w.view(np.int64)) for w in _philox4x32_numpy(seed, counters.numpy()))
    return _philox4x32_torch(seed, counters)


def _philox4x32_torch(seed: int, counters: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rounds on int64 tensors of any device, products split so nothing overflows."""
    c0 = counters & _MASK32
    c1 = (counters >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(_ROUNDS):
        hi_b, lo_b = _mul_hi_lo(_ROUND_B, c2)
        hi_a, lo_a = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def _philox4x32_numpy(seed: int, counters: np.ndarray) -> tuple[np.ndarray, ...]:
    """The same rounds on uint64 arrays, where 32x32-bit products wrap exactly (about 6x faster
    on the CPU than the 16-bit split that any-device torch int64 math needs)."""
    mask, shift = np.uint64(_MASK32), np.uint64(32)
    counters = counters.astype(np.uint64)
    c0, c1 = counters & mask, counters >> shift
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    round_a, round_b = np.uint64(_ROUND_A), np.uint64(_ROUND_B)
    for _ in range(_ROUNDS):
        product_b, product_a = round_b * c2, round_a * c0
        c0, c1, c2, c3 = (
            (product_b >> shift) ^ c1 ^ np.uint64(k0),
            product_b & mask,
            (product_a >> shift) ^ c3 ^ np.uint64(k1),
            product_a & mask,
        )
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def uint32_to_uniform(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Triton's ``uint_to_uniform_float``: reinterpret as int32, fold negatives, scale."""
    signed = torch.where(bits >= 2**31, bits - 2**32, bits)
    folded = torch.where(signed < 0, -signed - 1, signed)
    return folded.to(dtype) * _UNIFORM_SCALE


def _box_muller(u1: torch.Tensor, u2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u1 = torch.clamp(u1, min=_MIN_UNIFORM)
    theta = _TWO_PI * u2
    radius = torch.sqrt(-2.0 * torch.log(u1))
    return radius * torch.cos(theta), radius * torch.sin(theta)


def normal_from_counters(seed: int, counters: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[len(counters), 4]`` normals: row c holds the values of indices 4c .. 4c+3."""
    i1, i2, i3, i4 = philox4x32(seed, counters)
    n1, n2 = _box_muller(uint32_to_uniform(i1, dtype), uint32_to_uniform(i2, dtype))
    n3, n4 = _box_muller(uint32_to_uniform(i3, dtype), uint32_to_uniform(i4, dtype))
    return torch.stack((n1, n2, n3, n4), dim=-1)


def reference_noise(
    seed: int, start: int, numel: int, *, device="cpu", dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """Noise values of global indices ``[start, start + numel)``, computed in ``dtype``."""
    if start < 0 or numel < 0:
        raise ValueError(f"start and numel must be >= 0, got start={start}, numel={numel}")
    if numel == 0:
        return torch.empty(0, device=device, dtype=dtype)
    first, last = start // 4, (start + numel - 1) // 4
    counters = torch.arange(first, last + 1, device=device, dtype=torch.int64)
    values = normal_from_counters(seed, counters, dtype).reshape(-1)
    offset = start - 4 * first
    return values[offset : offset + numel]


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed
