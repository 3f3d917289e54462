"""Passes over all parameter sets: the step structure shared by every backend.

A ZO step is four passes (DESIGN.md §2): reduce (n·n, n·ΔR) → perturb +εz → perturb −εz →
update, the update also reducing the next step's noise so that reduce is paid once per run.
The engine owns that structure, the reduce cache and the eq. 2 coefficients; backends only run
``zo_pass`` over one set. Statistics are gathered per parameter (rows of the optimizer's flat
parameter list), so sharded parameters combine across processes in one small all-reduce.
"""

from __future__ import annotations

import torch

from .backends import resolve_backend
from .direction import per_tensor_coefficients


class ZOEngine:
    def __init__(self, sets, backend: str, granularity: str, *, parameter_count: int, home: torch.device,
                 sharded: list[bool], communicator=None, numels: list[int] | None = None,
                 direction_norm: str = "policy_delta"):
        self.sets = sets
        self.granularity = granularity
        self.direction_norm = direction_norm
        # Full (unsharded) values per parameter: the √d of direction_norm="noise".
        self.numels = (torch.tensor(numels, dtype=torch.float64, device=home) if numels is not None
                       else None)
        self.backends = [resolve_backend(backend, s.device, s.dtype) for s in sets]
        self.parameter_count = parameter_count
        self.home = home
        # Each set's rows in the per-parameter tables, made once (no host-to-device copy per step).
        self._rows = [torch.tensor(s.rows, device=home) for s in sets]
        self.sharded = torch.tensor(sharded, dtype=torch.bool, device=home)
        self.communicator = communicator if any(sharded) else None
        # Whether guidance was given (the same on every process, even one whose shards are empty).
        self.has_policy = False
        self.has_reward = False
        self.reward_version = 0
        self._statistics = None  # (seed, reward_version, [per set [T, 2]])
        self._norms = None  # per parameter (‖ΔR‖², ‖Δπ‖²), float64 [P] each
        self._unguided = None  # z = n: (a, b, c) = (0, 1, 0) for every tensor, made once

    # ---- guidance -------------------------------------------------------------------------
    def guidance_changed(self, *, reward: bool):
        self._norms = None
        if reward:
            self.reward_version += 1
            self._statistics = None

    def wants_statistics(self) -> bool:
        return self.has_policy or self.has_reward

    def _per_parameter(self, per_set_rows) -> torch.Tensor:
        """Scatter per-set rows into a float64 table over all parameters; sum shards across processes."""
        first = next((r for r in per_set_rows if r is not None), None)
        shape = (self.parameter_count,) + (tuple(first.shape[1:]) if first is not None else ())
        table = torch.zeros(shape, dtype=torch.float64, device=self.home)
        for index, rows in zip(self._rows, per_set_rows):
            if rows is not None:
                table[index] = rows.to(self.home, torch.float64)
        if self.communicator is not None:
            table = self.communicator.sum_over_shards(table, self.sharded)
        return table

    def _guidance_norms(self):
        if self._norms is None:
            self._norms = (
                self._per_parameter([s.reward_sq for s in self.sets]),
                self._per_parameter([s.policy_sq for s in self.sets]),
            )
        return self._norms

    # ---- passes ---------------------------------------------------------------------------
    def statistics(self, seed: int):
        """Per set [T, 2] of (n·n, n·ΔR) for ``seed``: from the last update's fused reduce, or
        from a reduce pass."""
        cached = self._statistics
        if cached is not None and cached[:2] == (seed, self.reward_version):
            return cached[2]
        stats = [
            backend.zo_pass(s, seed=seed, coefs=None, write_master=False, use_policy=False, reduce_seed=seed)
            for s, backend in zip(self.sets, self.backends)
        ]
        self._statistics = (seed, self.reward_version, stats)
        return stats

    def coefficients(self, seed: int, alpha: float) -> list[torch.Tensor]:
        """Per set [T, 3] float64 (a, b, c) with z = a·Δπ + b·n + c·ΔR."""
        if not self.wants_statistics():
            if self._unguided is None:
                self._unguided = [
                    torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64, device=s.device).expand(len(s), 3)
                    for s in self.sets
                ]
            return self._unguided
        stats = self._per_parameter(self.statistics(seed))
        reward_sq, policy_sq = self._guidance_norms()
        coefs = per_tensor_coefficients(stats, reward_sq, policy_sq, alpha, self.granularity,
                                        guided=self.has_policy, numel=self.numels,
                                        direction_norm=self.direction_norm)
        return [coefs[index].to(s.device) for index, s in zip(self._rows, self.sets)]

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

    def still_policy_units(self) -> int:
        """Units (tensors, or the whole vector with "global") whose ‖Δπ‖ is 0 while Δπ is set."""
        if not self.has_policy:
            return 0
        policy_sq = self._guidance_norms()[1]
        if self.granularity == "global":
            return int(not bool(policy_sq.sum() > 0))
        return int((policy_sq == 0).sum())

    def check_unmoved(self):
        for s in self.sets:
            s.check_unmoved()
