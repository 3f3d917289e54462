"""Eq. 2 as three coefficients per tensor, shared by every backend.

For a unit (one tensor with granularity "tensor", the whole vector with "global"):

    u = n − (n·ΔR / ‖ΔR‖²) ΔR          ‖u‖² = ‖n‖² − (n·ΔR)² / ‖ΔR‖²
    z = α Δπ + √(1−α²) (u/‖u‖) ‖Δπ‖

so z = a·Δπ + b·n + c·ΔR with a = α, b = √(1−α²)‖Δπ‖/‖u‖, c = −b (n·ΔR)/‖ΔR‖².
Degenerate cases, never NaN: ‖ΔR‖ = 0 → u = n; ‖Δπ‖ = 0 → z = u (a = 0, b = 1);
‖u‖ ≈ 0 (only possible when n lies in span(ΔR), e.g. a one-element tensor) → u/‖u‖ := 0.
The kernels only need (n·n, n·ΔR) from the reduce pass and the precomputed ‖Δπ‖², ‖ΔR‖².
"""

from __future__ import annotations

import torch

GRANULARITIES = ("tensor", "global")
# ‖u‖² below this fraction of ‖n‖² is rounding noise of a vanishing projection residual.
DEGENERATE_RESIDUAL = 1e-6


def direction_coefficients(
    noise_sq: torch.Tensor,
    noise_dot_reward: torch.Tensor,
    reward_sq: torch.Tensor,
    policy_sq: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """``[U, 3]`` float64 coefficients (a, b, c) for U units from their per-unit statistics."""
    nn = noise_sq.double()
    dr = noise_dot_reward.double()
    rr = reward_sq.double()
    pp = policy_sq.double()
    has_reward = rr > 0
    projection = torch.where(has_reward, dr / torch.where(has_reward, rr, 1.0), 0.0)
    residual_sq = nn - projection * dr
    degenerate = residual_sq <= DEGENERATE_RESIDUAL * nn
    residual = torch.sqrt(torch.where(degenerate, 1.0, residual_sq))
    has_policy = pp > 0
    guided_b = (1.0 - alpha * alpha) ** 0.5 * torch.sqrt(pp) / residual
    b = torch.where(has_policy, guided_b, 1.0)
    b = torch.where(degenerate, 0.0, b)
    a = torch.where(has_policy, torch.full_like(nn, alpha), 0.0)
    c = -b * projection
    return torch.stack((a, b, c), dim=1)


def per_tensor_coefficients(stats, reward_sq, policy_sq, alpha: float, granularity: str):
    """Coefficients for every tensor (rows aligned with ``stats``: [T, 2] of (n·n, n·ΔR)).

    With "global" the statistics are summed over all tensors first and every tensor gets the
    same coefficients: one mechanism serves both granularities.
    """
    if granularity == "tensor":
        return direction_coefficients(stats[:, 0], stats[:, 1], reward_sq, policy_sq, alpha)
    totals = direction_coefficients(
        stats[:, 0].double().sum().reshape(1),
        stats[:, 1].double().sum().reshape(1),
        reward_sq.double().sum().reshape(1),
        policy_sq.double().sum().reshape(1),
        alpha,
    )
    return totals.expand(stats.shape[0], 3)
