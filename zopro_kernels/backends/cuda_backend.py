"""The compiled CUDA backend: csrc/'s kernels through the C ABI of ``libzopro_csrc.so``.

The same chunk table, tensor tables and per-chunk partials as the Triton backend (shared helpers
in ``chunked``), so the two differ only in the kernel. The kernels are declared once as
``torch.library`` custom ops (``zopro::zo_pass_`` and ``zopro::noise``) with fake kernels, so
``torch.compile`` and ``torch.library.opcheck`` accept them. Each op has a CUDA kernel (the
library's kernels on the current stream) and a CPU kernel: the library's host execution of the
same per-item code, which lets the tests exercise the pass logic on machines without a GPU.

Importing this module registers the ops and loads nothing: the library is opened on the first
call (``zopro_kernels.native``).
"""

from __future__ import annotations

import os

import torch

from .. import native
from .chunked import prepare_chunked_pass, sum_chunk_partials

DEFAULT_BLOCK = 4096  # global indices per CTA (one chunk row): 256 threads x 2 items of 8


def block_size() -> int:
    """Indices per chunk row. ``ZOPRO_CUDA_BLOCK`` overrides it (a power of two >= 16); results do
    not depend on it beyond the reduction order."""
    block = int(os.environ.get("ZOPRO_CUDA_BLOCK", DEFAULT_BLOCK))
    if block < 16 or block & (block - 1):
        raise ValueError(f"ZOPRO_CUDA_BLOCK must be a power of two >= 16, got {block}")
    return block


_DTYPE_CODES = {torch.float32: native.FLOAT32, torch.bfloat16: native.BFLOAT16, torch.float16: native.FLOAT16}


def _ptr(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


_address_tables: dict[tuple, tuple[torch.Tensor, bool]] = {}


def _address_table(params: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, bool]:
    """int64 [T] addresses of ``params`` on ``device`` and whether all are 16-byte aligned; cached
    by the addresses themselves, so the op always writes the tensors it was given (also when
    functionalization hands it copies)."""
    key = (str(device),) + tuple(p.data_ptr() for p in params)
    found = _address_tables.get(key)
    if found is None:
        addresses = key[1:]
        found = (
            torch.tensor(addresses, dtype=torch.int64).to(device, non_blocking=False),
            all(a % 16 == 0 for a in addresses),
        )
        if len(_address_tables) > 64:
            _address_tables.clear()
        _address_tables[key] = found
    return found


# ---- the ops -------------------------------------------------------------------------------


@torch.library.custom_op("zopro::zo_pass_", mutates_args=("params", "master"))
def zo_pass_(
    params: list[torch.Tensor],
    chunks: torch.Tensor,
    tensor_starts: torch.Tensor,
    tensor_arena_shifts: torch.Tensor,
    coefs: torch.Tensor | None,
    master: torch.Tensor | None,
    policy_delta: torch.Tensor | None,
    reward_delta: torch.Tensor | None,
    seed: int,
    reduce_seed: int,
    flags: int,
    block: int,
) -> torch.Tensor:
    """One ZO pass over ``params`` (one launch); see csrc/zopro.h for the tables and ``flags``.

    Writes ``params`` (and ``master`` with WRITE_MASTER); returns the per-chunk partials
    [chunks, 2] (sum n², sum n·ΔR of ``reduce_seed``'s noise) with REDUCE, else an empty [0, 2].
    ``flags``' ALIGNED bit asserts the index boundaries are multiples of 16; the op adds the
    pointer alignment itself, and GUIDANCE_BF16 from the dtype of ``policy_delta``/``reward_delta``
    (fp32 or bf16)."""
    raise NotImplementedError("zopro::zo_pass_ has CUDA and CPU kernels only")


@zo_pass_.register_fake
def _(params, chunks, tensor_starts, tensor_arena_shifts, coefs, master, policy_delta, reward_delta,
      seed, reduce_seed, flags, block):
    rows = chunks.shape[0] if flags & native.REDUCE else 0
    return chunks.new_empty((rows, 2), dtype=torch.float32)


def _run_zo_pass(host: bool, params, chunks, tensor_starts, tensor_arena_shifts, coefs, master,
                 policy_delta, reward_delta, seed, reduce_seed, flags, block):
    lib = native.load()
    device = chunks.device
    dtype = params[0].dtype
    if dtype not in _DTYPE_CODES:
        raise TypeError(f"the CUDA kernels take fp32/bf16/fp16 parameters, got {dtype}")
    for name, t in (("chunks", chunks), ("tensor_starts", tensor_starts),
                    ("tensor_arena_shifts", tensor_arena_shifts)):
        if t.dtype != torch.int64 or not t.is_contiguous() or t.device != device:
            raise ValueError(f"{name} must be a contiguous int64 tensor on {device}")
    for name, t in (("coefs", coefs), ("master", master)):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or t.device != device):
            raise ValueError(f"{name} must be a contiguous fp32 tensor on {device}")
    guidance_dtypes = set()
    for name, t in (("policy_delta", policy_delta), ("reward_delta", reward_delta)):
        if t is not None:
            if t.dtype not in (torch.float32, torch.bfloat16) or not t.is_contiguous() or t.device != device:
                raise ValueError(f"{name} must be a contiguous fp32 or bf16 tensor on {device}")
            guidance_dtypes.add(t.dtype)
    if len(guidance_dtypes) > 1:
        raise ValueError("policy_delta and reward_delta must have the same dtype")
    flags &= ~native.GUIDANCE_BF16
    if guidance_dtypes == {torch.bfloat16}:
        flags |= native.GUIDANCE_BF16
    addresses, aligned = _address_table(params, device)
    arenas = (master, policy_delta, reward_delta)
    if not (aligned and all(t is None or t.data_ptr() % 16 == 0 for t in arenas)):
        flags &= ~native.ALIGNED
    reduce = bool(flags & native.REDUCE)
    partials = torch.empty((chunks.shape[0] if reduce else 0, 2), device=device, dtype=torch.float32)
    args = (
        _DTYPE_CODES[dtype], chunks.data_ptr(), chunks.shape[0], block, tensor_starts.data_ptr(),
        tensor_arena_shifts.data_ptr(), addresses.data_ptr(), _ptr(coefs), _ptr(master),
        _ptr(policy_delta), _ptr(reward_delta), partials.data_ptr() if reduce else None,
        seed, reduce_seed, flags,
    )
    if host:
        code = lib.zopro_zo_pass_host(*args)
    else:
        code = lib.zopro_zo_pass(*args, device.index, _stream(device))
    native.check(code, "zopro_zo_pass" + ("_host" if host else ""), lib)
    return partials


@zo_pass_.register_kernel("cuda")
def _(*args):
    return _run_zo_pass(False, *args)


@zo_pass_.register_kernel("cpu")
def _(*args):
    return _run_zo_pass(True, *args)


@torch.library.custom_op("zopro::noise", mutates_args=())
def noise_op(seed: int, start: int, numel: int, device: torch.device) -> torch.Tensor:
    """fp32 noise of global indices [start, start + numel) (see zopro_kernels/philox.py)."""
    raise NotImplementedError("zopro::noise has CUDA and CPU kernels only")


@noise_op.register_fake
def _(seed, start, numel, device):
    return torch.empty(numel, device=device, dtype=torch.float32)


def _run_noise(seed, start, numel, device):
    lib = native.load()
    device = torch.device(device)
    out = torch.empty(numel, device=device, dtype=torch.float32)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        code = lib.zopro_noise(out.data_ptr(), seed, start, numel, index, _stream(torch.device("cuda", index)))
    else:
        code = lib.zopro_noise_host(out.data_ptr(), seed, start, numel)
    native.check(code, "zopro_noise", lib)
    return out


# A factory op has no tensor argument to dispatch on: its device argument picks the kernel.
noise_op.register_kernel("cuda")(_run_noise)
noise_op.register_kernel("cpu")(_run_noise)
noise_op.register_kernel("meta")(lambda seed, start, numel, device: torch.empty(numel, device=device))


# ---- the backend ---------------------------------------------------------------------------


def arena_shifts(pset, tables: dict) -> torch.Tensor:
    """Per-tensor arena shifts (arena position = global index − shift) of a set's tables."""
    shifts = tables.get("tensor_arena_shifts")
    if shifts is None:  # parameter sets whose tensors are contiguous from group_start
        shifts = torch.full((len(pset),), pset.group_start, dtype=torch.int64, device=pset.device)
        tables["tensor_arena_shifts"] = shifts
    return shifts


class CudaBackend:
    name = "cuda"

    def noise(self, seed: int, start: int, numel: int, device, dtype) -> torch.Tensor:
        return torch.ops.zopro.noise(seed, start, numel, torch.device(device)).to(dtype)

    @torch.no_grad()
    def zo_pass(self, pset, *, seed, coefs, write_master, use_policy, reduce_seed):
        """Same contract as ``TorchBackend.zo_pass``; fp32 arithmetic and fp32 reductions."""
        block = block_size()
        reduce = reduce_seed is not None
        tables, coefs, _ = prepare_chunked_pass(pset, block, coefs, reduce=False)
        has_master = pset.master is not None
        flags = (
            (native.APPLY if coefs is not None else 0)
            | (native.HAS_MASTER if has_master else 0)
            | (native.WRITE_MASTER if write_master and has_master else 0)
            | (native.HAS_POLICY if use_policy else 0)
            | (native.HAS_REWARD if pset.reward_delta is not None else 0)
            | (native.REDUCE if reduce else 0)
            | (native.REDUCE_SAME_SEED if reduce and reduce_seed == seed else 0)
            | (native.ALIGNED if tables["aligned"] else 0)
        )
        partials = torch.ops.zopro.zo_pass_(
            pset.params,
            tables["chunks"],
            tables["tensor_starts"],
            arena_shifts(pset, tables),
            coefs,
            pset.master,
            pset.policy_delta if use_policy else None,
            pset.reward_delta,
            seed,
            reduce_seed if reduce else 0,
            flags,
            block,
        )
        if not reduce:
            return None
        return sum_chunk_partials(partials, tables)
