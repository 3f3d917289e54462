"""The reference backend: plain PyTorch, one tensor at a time, in the master dtype (fp32, or
float64 for float64 parameters). Every other backend is tested against it."""

from __future__ import annotations

import torch

from ..philox import reference_noise


class TorchBackend:
    name = "torch"

    def noise(self, seed: int, start: int, numel: int, device, dtype) -> torch.Tensor:
        return reference_noise(seed, start, numel, device=device, dtype=dtype)

    @torch.no_grad()
    def zo_pass(
        self,
        pset,
        *,
        seed: int,
        coefs: torch.Tensor | None,
        write_master: bool,
        use_policy: bool,
        reduce_seed: int | None,
    ) -> torch.Tensor | None:
        """One pass over ``pset`` (see ``triton_ops/zo_pass.py`` for the arithmetic).

        ``coefs``: [T, 5] (a, b, c, scale, keep) to apply ``θ ← keep·src + scale·z``, or None to
        only reduce. ``reduce_seed``: also return [T, 2] sums (n·n, n·ΔR) of that seed's noise.
        """
        compute = pset.master_dtype
        # Guidance may be stored in bf16: compute in the master dtype (a 0-dim fp32 coefficient
        # times a bf16 tensor would stay bf16 under torch's promotion rules).
        widen = lambda views: [v.to(compute) for v in views]  # noqa: E731
        reward = widen(pset.views(pset.reward_delta)) if pset.reward_delta is not None else None
        policy = widen(pset.views(pset.policy_delta)) if use_policy else None
        master = pset.views(pset.master) if pset.master is not None else None
        coefs = coefs.to(device=pset.device, dtype=compute) if coefs is not None else None
        sums = []
        for t, (p, start) in enumerate(zip(pset.params, pset.starts)):
            noise = None
            if coefs is not None or reduce_seed == seed:
                noise = reference_noise(seed, start, p.numel(), device=pset.device, dtype=compute)
            if coefs is not None:
                a, b, c, scale, keep = coefs[t]
                z = b * noise
                if reward is not None:
                    z = z + c * reward[t]
                if policy is not None:
                    z = z + a * policy[t]
                src = master[t] if master is not None else p.detach().reshape(-1).to(compute)
                out = keep * src + scale * z
                if write_master and master is not None:
                    master[t].copy_(out)
                p.detach().copy_(out.view_as(p))
            if reduce_seed is not None:
                if reduce_seed != seed:
                    noise = reference_noise(
                        reduce_seed, start, p.numel(), device=pset.device, dtype=compute
                    )
                dot = (noise * reward[t]).sum() if reward is not None else noise.new_zeros(())
                sums.append(torch.stack((noise.square().sum(), dot)))
        return torch.stack(sums) if reduce_seed is not None else None
