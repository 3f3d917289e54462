"""Per-step seeds from a base seed.

``step_seed(base, step, sample)`` mixes its three integers with SplitMix64's finaliser:

    x = splitmix64(splitmix64(base) ^ (step * 0x9E3779B97F4A7C15 + sample))
    seed = x >> 1                               (63 bits, a valid Philox key)

Every rank and every resumed run derives the same seed for the same step, and
nearby steps get unrelated keys.
"""

from __future__ import annotations

from .philox import check_seed

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def splitmix64(x: int) -> int:
    x = (x + _GOLDEN) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def step_seed(base_seed: int, step: int, sample: int = 0) -> int:
    """The Philox key of step ``step`` (and ``sample`` within it) of a run seeded ``base_seed``."""
    check_seed(base_seed)
    if step < 0 or sample < 0:
        raise ValueError(f"step and sample must be >= 0, got step={step}, sample={sample}")
    mixed = splitmix64(splitmix64(base_seed) ^ ((step * _GOLDEN + sample) & _MASK64))
    return mixed >> 1
