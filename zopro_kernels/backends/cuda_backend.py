"""The compiled CUDA backend: csrc/'s kernels through the C ABI of ``libzopro_csrc.so``.

The same chunk table, tensor tables and per-chunk partials as the Triton backend (shared helpers
in ``chunked``), so the two differ only in the kernel. Passes run through the ``torch.library``
custom ops of ``ops`` (``zopro::zo_pass_`` and ``zopro::noise``, with fake kernels, so
``torch.compile`` and ``torch.library.opcheck`` accept them). On CPU tensors (tests only: the
backend is never resolved for them) it runs the library's host execution of the same per-item
code directly, which lets the tests exercise the CUDA pass logic on machines without a GPU (the
ops' own CPU kernels run the ``cpu`` backend's library).

Importing this module registers the ops and loads nothing: the library is opened on the first
call (``zopro_kernels.native``).
"""

from __future__ import annotations


import torch

from .chunked import block_from_env, pass_flags, prepare_chunked_pass, sum_chunk_partials
from .ops import cuda_library_noise, noise_op, run_cuda_library_pass, zo_pass_  # noqa: F401 (the ops, re-exported)

DEFAULT_BLOCK = 4096  # global indices per CTA (one chunk row): 256 threads x 2 items of 8


def block_size() -> int:
    """Indices per chunk row. ``ZOPRO_CUDA_BLOCK`` overrides it (a power of two >= 16); results do
    not depend on it beyond the reduction order."""
    return block_from_env("ZOPRO_CUDA_BLOCK", DEFAULT_BLOCK, minimum=16)


class CudaBackend:
    name = "cuda"

    def noise(self, seed: int, start: int, numel: int, device, dtype) -> torch.Tensor:
        device = torch.device(device)
        if device.type == "cpu":  # the library's host code (tests)
            return cuda_library_noise(seed, start, numel, device).to(dtype)
        return torch.ops.zopro.noise(seed, start, numel, device).to(dtype)

    @torch.no_grad()
    def zo_pass(self, pset, *, seed, coefs, write_master, use_policy, reduce_seed):
        """Same contract as ``TorchBackend.zo_pass``; fp32 arithmetic and fp32 reductions."""
        block = block_size()
        reduce = reduce_seed is not None
        tables, coefs, _ = prepare_chunked_pass(pset, block, coefs, reduce=False)
        flags = pass_flags(pset, tables, coefs is not None, write_master, use_policy, reduce_seed, seed)
        args = (
            pset.params,
            tables["chunks"],
            tables["tensor_starts"],
            tables["tensor_arena_shifts"],
            coefs,
            pset.master,
            pset.policy_delta if use_policy else None,
            pset.reward_delta,
            seed,
            reduce_seed if reduce else 0,
            flags,
            block,
        )
        if pset.device.type == "cpu":
            partials = run_cuda_library_pass(True, *args)
        else:
            partials = torch.ops.zopro.zo_pass_(*args)
        if not reduce:
            return None
        return sum_chunk_partials(partials, tables)
