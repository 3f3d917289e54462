"""Eq. 2 as three coefficients per tensor, shared by every backend.

For a unit (one tensor with granularity "tensor", the whole vector with "global") of d values:

    u = n − (n·ΔR / ‖ΔR‖²) ΔR          ‖u‖² = ‖n‖² − (n·ΔR)² / ‖ΔR‖²
    z = α Δπ + √(1−α²) (u/‖u‖) ‖Δπ‖                      direction_norm="policy_delta" (eq. 2 as published)
    z = α √d Δπ/‖Δπ‖ + √(1−α²) √d u/‖u‖                  direction_norm="noise"

so z = a·Δπ + b·n + c·ΔR with c = −b (n·ΔR)/‖ΔR‖² and

    "policy_delta": a = α,             b = √(1−α²) ‖Δπ‖/‖u‖      (‖z‖ ≈ ‖Δπ‖: steps scale with ‖Δπ‖²)
    "noise":        a = α √d/‖Δπ‖,     b = √(1−α²) √d/‖u‖        (‖z‖ ≈ √d, as N(0, I) noise: ε and η
                                                                  mean the same in every mode and iteration)

Degenerate cases, never NaN, and a step never mixes scales:
- no guidance at all (``guided=False``): z = u (a = 0, b = 1): plain SPSA when ΔR is absent too;
- guided, but ‖Δπ‖ = 0 for a unit (a tensor that did not move, a name missing from a guidance
  dict): that unit's Δπ term is 0 and its noise term keeps the guided scale, so with
  "policy_delta" the unit stays still (b = 0) and with "noise" it gets √(1−α²)√d u/‖u‖. Never the
  raw noise at a guided step size;
- ‖ΔR‖ = 0 → u = n; ‖u‖ ≈ 0 (n in span(ΔR), e.g. a one-element tensor) → u/‖u‖ := 0.
The kernels only need (n·n, n·ΔR) from the reduce pass and the precomputed ‖Δπ‖², ‖ΔR‖².
"""

from __future__ import annotations

import torch

GRANULARITIES = ("tensor", "global")
DIRECTION_NORMS = ("policy_delta", "noise")
# ‖u‖² below this fraction of ‖n‖² is rounding noise of a vanishing projection residual.
DEGENERATE_RESIDUAL = 1e-6


def direction_coefficients(
    noise_sq: torch.Tensor,
    noise_dot_reward: torch.Tensor,
    reward_sq: torch.Tensor,
    policy_sq: torch.Tensor,
    alpha: float,
    *,
    guided: bool = True,
    numel: torch.Tensor | None = None,
    direction_norm: str = "policy_delta",
) -> torch.Tensor:
    """``[U, 3]`` float64 coefficients (a, b, c) for U units from their per-unit statistics.

    ``guided``: whether Δπ is set (a step of the guided mode); ``numel``: values per unit (needed
    by ``direction_norm="noise"``).
    """
    if direction_norm not in DIRECTION_NORMS:
        raise ValueError(f"direction_norm must be one of {DIRECTION_NORMS}, got {direction_norm!r}")
    nn = noise_sq.double()
    dr = noise_dot_reward.double()
    rr = reward_sq.double()
    pp = policy_sq.double()
    has_reward = rr > 0
    projection = torch.where(has_reward, dr / torch.where(has_reward, rr, 1.0), 0.0)
    residual_sq = nn - projection * dr
    degenerate = residual_sq <= DEGENERATE_RESIDUAL * nn
    residual = torch.sqrt(torch.where(degenerate, 1.0, residual_sq))
    if not guided:
        a = torch.zeros_like(nn)
        b = torch.ones_like(nn)
    else:
        has_policy = pp > 0
        policy_norm = torch.sqrt(pp)
        noise_part = (1.0 - alpha * alpha) ** 0.5
        if direction_norm == "policy_delta":
            a = torch.where(has_policy, torch.full_like(nn, alpha), 0.0)
            b = noise_part * policy_norm / residual  # 0 where Δπ = 0: the unit stays still
        else:
            if numel is None:
                raise ValueError('direction_norm="noise" needs the number of values per unit')
            root_d = torch.sqrt(numel.double())
            a = torch.where(has_policy, alpha * root_d / torch.where(has_policy, policy_norm, 1.0), 0.0)
            b = noise_part * root_d / residual
    b = torch.where(degenerate, 0.0, b)
    c = -b * projection
    return torch.stack((a, b, c), dim=1)


def per_tensor_coefficients(stats, reward_sq, policy_sq, alpha: float, granularity: str, *,
                            guided: bool = True, numel=None, direction_norm: str = "policy_delta"):
    """Coefficients for every tensor (rows aligned with ``stats``: [T, 2] of (n·n, n·ΔR)).

    With "global" the statistics are summed over all tensors first and every tensor gets the
    same coefficients: one mechanism serves both granularities.
    """
    options = dict(guided=guided, direction_norm=direction_norm)
    if granularity == "tensor":
        return direction_coefficients(stats[:, 0], stats[:, 1], reward_sq, policy_sq, alpha, numel=numel, **options)
    totals = direction_coefficients(
        stats[:, 0].double().sum().reshape(1),
        stats[:, 1].double().sum().reshape(1),
        reward_sq.double().sum().reshape(1),
        policy_sq.double().sum().reshape(1),
        alpha,
        numel=None if numel is None else numel.double().sum().reshape(1),
        **options,
    )
    return totals.expand(stats.shape[0], 3)
