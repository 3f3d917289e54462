"""Launchers for the Triton kernels: one launch per pass over a whole parameter set."""

from __future__ import annotations

import os

import torch

from .chunked import block_from_env, prepare_chunked_pass, sum_chunk_partials

DEFAULT_BLOCK = 2048
NUM_WARPS = 8


def block_size() -> int:
    """Elements per program. ``ZOPRO_TRITON_BLOCK`` overrides it (the interpreter is faster with
    small blocks); results do not depend on it beyond reduction order."""
    return block_from_env("ZOPRO_TRITON_BLOCK", DEFAULT_BLOCK, minimum=16)


def _triton_dtypes(dtype: torch.dtype):
    import triton.language as tl

    return {
        torch.float32: (tl.float32, tl.int32),
        torch.bfloat16: (tl.bfloat16, tl.int16),
        torch.float16: (tl.float16, tl.int16),
    }[dtype]


class TritonBackend:
    name = "triton"

    def noise(self, seed: int, start: int, numel: int, device, dtype) -> torch.Tensor:
        from ..triton_ops.noise import fill_noise_

        out = torch.empty(numel, device=device, dtype=torch.float32)
        return fill_noise_(out, seed, start, block_size()).to(dtype)

    @torch.no_grad()
    def zo_pass(self, pset, *, seed, coefs, write_master, use_policy, reduce_seed):
        """Same contract as ``TorchBackend.zo_pass``; fp32 arithmetic and fp32 reductions."""
        from ..triton_ops.zo_pass import zo_pass_kernel

        block = block_size()
        tables, coefs, partials = prepare_chunked_pass(pset, block, coefs, reduce_seed is not None)
        chunks = tables["chunks"]
        device = pset.device
        unused = torch.empty(1, device=device, dtype=torch.float32)
        reduce = reduce_seed is not None
        apply = coefs is not None
        model_dtype, raw_dtype = _triton_dtypes(pset.dtype)
        zo_pass_kernel[(len(chunks),)](
            chunks,
            tables["tensor_starts"],
            tables["tensor_arena_shifts"],
            tables["tensor_addresses"],
            coefs if apply else unused,
            pset.master if pset.master is not None else unused,
            pset.policy_delta if use_policy else unused,
            pset.reward_delta if pset.reward_delta is not None else unused,
            partials if reduce else unused,
            seed,
            reduce_seed if reduce else 0,
            MODEL_DTYPE=model_dtype,
            RAW_DTYPE=raw_dtype,
            APPLY=apply,
            HAS_MASTER=pset.master is not None,
            WRITE_MASTER=write_master and pset.master is not None,
            HAS_POLICY=use_policy,
            HAS_REWARD=pset.reward_delta is not None,
            REDUCE=reduce,
            REDUCE_SAME_SEED=reduce and reduce_seed == seed,
            ALIGNED=tables["aligned"],
            SOFTWARE_BF16=pset.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
            BLOCK=block,
            num_warps=NUM_WARPS,
        )
        if not reduce:
            return None
        return sum_chunk_partials(partials, tables)
