"""Passes over all parameter sets: the step structure shared by every backend.

A ZO step is four passes (DESIGN.md §2): reduce (n·n, n·ΔR) → perturb +εz → perturb −εz →
update, the update also reducing the next step's noise so that reduce is paid once per run.
The engine owns that structure, the reduce cache and the eq. 2 coefficients; backends only run
``zo_pass`` over one set.
"""

from __future__ import annotations

import torch

from .backends import resolve_backend
from .direction import per_tensor_coefficients


class ZOEngine:
    def __init__(self, sets, backend: str, granularity: str):
        self.sets = sets
        self.granularity = granularity
        self.backends = [resolve_backend(backend, s.device, s.dtype) for s in sets]
        self.reward_version = 0
        self._statistics = None  # (seed, reward_version, [per set [T, 2]])
        self._unguided = None  # z = n: (a, b, c) = (0, 1, 0) for every tensor, made once

    # ---- guidance -------------------------------------------------------------------------
    @property
    def has_policy(self) -> bool:
        return any(s.policy_delta is not None for s in self.sets)

    @property
    def has_reward(self) -> bool:
        return any(s.reward_delta is not None for s in self.sets)

    def guidance_changed(self):
        self.reward_version += 1
        self._statistics = None

    # ---- passes ---------------------------------------------------------------------------
    def statistics(self, seed: int):
        """Per set [T, 2] of (n·n, n·ΔR) for ``seed``: from the last update's fused reduce, or
        from a reduce pass."""
        cached = self._statistics
        if cached is not None and cached[:2] == (seed, self.reward_version):
            return cached[2]
        stats = [
            backend.zo_pass(
                s, seed=seed, coefs=None, write_master=False, use_policy=False, reduce_seed=seed
            )
            for s, backend in zip(self.sets, self.backends)
        ]
        self._statistics = (seed, self.reward_version, stats)
        return stats

    def coefficients(self, seed: int, alpha: float) -> list[torch.Tensor]:
        """Per set [T, 3] float64 (a, b, c) with z = a·Δπ + b·n + c·ΔR."""
        if not (self.has_policy or self.has_reward):
            if self._unguided is None:
                self._unguided = [
                    torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64, device=s.device).expand(len(s), 3)
                    for s in self.sets
                ]
            return self._unguided
        stats = self.statistics(seed)
        home = self.sets[0].device
        cat = lambda tensors: torch.cat([t.to(home) for t in tensors])  # noqa: E731
        zeros = lambda s: torch.zeros(len(s), dtype=torch.float64, device=s.device)  # noqa: E731
        reward_sq = cat([s.reward_sq if s.reward_sq is not None else zeros(s) for s in self.sets])
        policy_sq = cat([s.policy_sq if s.policy_sq is not None else zeros(s) for s in self.sets])
        coefs = per_tensor_coefficients(cat(stats), reward_sq, policy_sq, alpha, self.granularity)
        parts = coefs.split([len(s) for s in self.sets])
        return [part.to(s.device) for part, s in zip(parts, self.sets)]

    def apply_(self, seed, coefs, scales, keeps, *, write_master: bool, use_policy: bool, next_seed=None):
        """θ ← keep·src + scale·z over every set (scales/keeps: per set [T] tensors). With
        ``next_seed``, the same pass reduces that seed's noise for the next step."""
        new_stats = []
        for s, backend, coef, scale, keep in zip(self.sets, self.backends, coefs, scales, keeps):
            full = torch.cat((coef, scale[:, None].to(coef), keep[:, None].to(coef)), dim=1)
            new_stats.append(
                backend.zo_pass(
                    s,
                    seed=seed,
                    coefs=full,
                    write_master=write_master,
                    use_policy=use_policy and s.policy_delta is not None,
                    reduce_seed=next_seed,
                )
            )
        if next_seed is not None:
            self._statistics = (next_seed, self.reward_version, new_stats)

    def wants_statistics(self) -> bool:
        return self.has_policy or self.has_reward

    def check_unmoved(self):
        for s in self.sets:
            s.check_unmoved()
