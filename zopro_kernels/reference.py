"""Eq. 2 written the way the paper writes it, in float64: the oracle the passes are tested against.

Deliberately not the (a, b, c) coefficient form the kernels use (``direction.py``): it forms n,
projects, normalises and rescales as separate float64 tensors.
"""

from __future__ import annotations

import torch

from .philox import reference_noise


def reference_direction(
    seed: int,
    starts: list[int],
    shapes: list[torch.Size],
    policy_delta: list[torch.Tensor | None] | None,
    reward_delta: list[torch.Tensor | None] | None,
    alpha: float,
    granularity: str,
    direction_norm: str = "policy_delta",
) -> list[torch.Tensor]:
    """z for every tensor (float64, CPU), given their global starts and shapes.

    ``policy_delta`` None: no guidance, z = u. Given (a list, entries may be None or zero), every
    step is guided: a unit whose Δπ is 0 has no Δπ part and keeps the guided scale of its noise
    part (0 with "policy_delta", √(1−α²)·√d·u/‖u‖ with "noise").
    """
    guided = policy_delta is not None
    numels = [int(torch.Size(s).numel()) for s in shapes]
    count = len(numels)
    policy = _float64_or_zeros(policy_delta, numels)
    reward = _float64_or_zeros(reward_delta, numels)
    noise = [reference_noise(seed, s, n, dtype=torch.float64) for s, n in zip(starts, numels)]
    units = [[t] for t in range(count)] if granularity == "tensor" else [list(range(count))]
    z = [None] * count
    for unit in units:
        n = torch.cat([noise[t] for t in unit])
        dpi = torch.cat([policy[t] for t in unit])
        dr = torch.cat([reward[t] for t in unit])
        u = n
        if dr.norm() > 0:
            r_hat = dr / dr.norm()
            u = n - (n @ r_hat) * r_hat
        degenerate = not u.norm() > 1e-3 * n.norm()
        if not guided:
            direction = torch.zeros_like(u) if degenerate else u
        else:
            unit_u = torch.zeros_like(u) if degenerate else u / u.norm()
            if direction_norm == "policy_delta":
                direction = alpha * dpi + (1 - alpha**2) ** 0.5 * unit_u * dpi.norm()
            else:
                root_d = float(n.numel()) ** 0.5
                unit_dpi = dpi / dpi.norm() if dpi.norm() > 0 else torch.zeros_like(dpi)
                direction = root_d * (alpha * unit_dpi + (1 - alpha**2) ** 0.5 * unit_u)
        for t, piece in zip(unit, direction.split([numels[t] for t in unit])):
            z[t] = piece.reshape(shapes[t])
    return z


def _float64_or_zeros(tensors, numels):
    if tensors is None:
        return [torch.zeros(n, dtype=torch.float64) for n in numels]
    return [
        torch.zeros(n, dtype=torch.float64) if t is None else t.detach().double().reshape(-1).cpu()
        for t, n in zip(tensors, numels)
    ]
