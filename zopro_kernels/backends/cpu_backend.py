"""The compiled CPU backend: csrc/cpu/'s passes through the C ABI of ``libzopro_cpu.so``.

One call per pass over a whole parameter set, on the chunk table every chunk-table backend uses:
Philox + Box–Muller vectorised (AVX-512 or AVX2, chosen at run time; a portable scalar path
elsewhere, giving the same bits), the pass fused as on the GPU (perturb/project/rescale in one
sweep, the update fused with the next step's reduce), fp32 arithmetic on fp32/bf16/fp16 model
tensors with the fp32 master, fp32 or bf16 guidance. ``torch.get_num_threads()`` threads per call.

The reduce's per-tensor sums come back from the library as float64, summed there in chunk order
from per-chunk fp32 partials: the same bits for any thread count (and any ISA).
"""

from __future__ import annotations


import torch

from .. import native
from .chunked import COEF_COLUMNS, block_from_env, pass_flags
from .ops import cpu_noise, dtype_code, guidance_flag, ptr

DEFAULT_BLOCK = 4096  # global indices per chunk row: one thread's unit of work


def block_size() -> int:
    """Indices per chunk row. ``ZOPRO_CPU_BLOCK`` overrides it (a power of two >= 64); results do
    not depend on it beyond the reduction order."""
    return block_from_env("ZOPRO_CPU_BLOCK", DEFAULT_BLOCK, minimum=64)


class CpuBackend:
    name = "cpu"

    def noise(self, seed: int, start: int, numel: int, device, dtype) -> torch.Tensor:
        return cpu_noise(seed, start, numel).to(dtype)

    @torch.no_grad()
    def zo_pass(self, pset, *, seed, coefs, write_master, use_policy, reduce_seed):
        """Same contract as ``TorchBackend.zo_pass``; fp32 arithmetic, float64 [T, 2] sums."""
        lib = native.load_cpu()
        block = block_size()
        tables = pset.kernel_tables(block)
        apply = coefs is not None
        if apply:
            coefs = coefs.to(dtype=torch.float32).contiguous()
            assert coefs.shape == (len(pset), COEF_COLUMNS)
        policy = pset.policy_delta if use_policy else None
        flags = pass_flags(pset, tables, apply, write_master, use_policy, reduce_seed, seed)
        flags = guidance_flag(flags, policy, pset.reward_delta, pset.device)
        reduce = reduce_seed is not None
        sums = torch.empty(len(pset), 2, dtype=torch.float64) if reduce else None
        chunks = tables["chunks"]
        code = lib.zopro_cpu_zo_pass(
            dtype_code(pset.dtype), chunks.data_ptr(), chunks.shape[0], block,
            tables["tensor_starts"].data_ptr(), tables["tensor_arena_shifts"].data_ptr(),
            tables["tensor_addresses"].data_ptr(), ptr(coefs), ptr(pset.master), ptr(policy),
            ptr(pset.reward_delta), None, len(pset), ptr(sums), seed, reduce_seed if reduce else 0,
            flags, torch.get_num_threads(),
        )
        native.check_cpu(code, "zopro_cpu_zo_pass", lib)
        return sums
