"""The ``torch.library`` custom ops of the compiled backends: ``zopro::zo_pass_`` and ``zopro::noise``.

Declared once, with fake kernels, so ``torch.compile`` and ``torch.library.opcheck`` accept them.
The CUDA kernel of each runs ``libzopro_csrc.so``'s kernels on the current stream; the CPU kernel
runs ``libzopro_cpu.so``'s threaded passes (the ``cpu`` backend's code). Both libraries take the
same tables (csrc/zopro.h). Importing this module registers the ops and loads nothing: a library
is opened on the first call (``zopro_kernels.native``).
"""

from __future__ import annotations

import contextlib

import torch

from .. import native

_DTYPE_CODES = {torch.float32: native.FLOAT32, torch.bfloat16: native.BFLOAT16, torch.float16: native.FLOAT16}


def dtype_code(dtype: torch.dtype) -> int:
    if dtype not in _DTYPE_CODES:
        raise TypeError(f"the compiled kernels take fp32/bf16/fp16 parameters, got {dtype}")
    return _DTYPE_CODES[dtype]


def ptr(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def cuda_device_scope(index: int):
    """torch's guard making cuda:``index`` current (restored on exit without creating a context on
    a device the caller never used), so the library's own guard never switches devices; a no-op
    where torch has no CUDA."""
    if not hasattr(torch._C, "_cuda_exchangeDevice"):
        return contextlib.nullcontext()
    return torch.cuda.device(index)


_address_tables: dict[tuple, tuple[torch.Tensor, bool]] = {}


def address_table(params: list[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, bool]:
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


def guidance_flag(flags: int, policy_delta, reward_delta, device) -> int:
    """``flags`` with GUIDANCE_BF16 set from the dtype of the guidance arenas (fp32 or bf16, the same)."""
    dtypes = set()
    for name, t in (("policy_delta", policy_delta), ("reward_delta", reward_delta)):
        if t is not None:
            if t.dtype not in (torch.float32, torch.bfloat16) or not t.is_contiguous() or t.device != device:
                raise ValueError(f"{name} must be a contiguous fp32 or bf16 tensor on {device}")
            dtypes.add(t.dtype)
    if len(dtypes) > 1:
        raise ValueError("policy_delta and reward_delta must have the same dtype")
    flags &= ~native.GUIDANCE_BF16
    if dtypes == {torch.bfloat16}:
        flags |= native.GUIDANCE_BF16
    return flags


def check_tables(device, chunks, tensor_starts, tensor_arena_shifts, coefs, master):
    for name, t in (("chunks", chunks), ("tensor_starts", tensor_starts),
                    ("tensor_arena_shifts", tensor_arena_shifts)):
        if t.dtype != torch.int64 or not t.is_contiguous() or t.device != device:
            raise ValueError(f"{name} must be a contiguous int64 tensor on {device}")
    for name, t in (("coefs", coefs), ("master", master)):
        if t is not None and (t.dtype != torch.float32 or not t.is_contiguous() or t.device != device):
            raise ValueError(f"{name} must be a contiguous fp32 tensor on {device}")


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
    (fp32 or bf16). CPU tensors need ``block`` to be a multiple of 64."""
    raise NotImplementedError("zopro::zo_pass_ has CUDA and CPU kernels only")


@zo_pass_.register_fake
def _(params, chunks, tensor_starts, tensor_arena_shifts, coefs, master, policy_delta, reward_delta,
      seed, reduce_seed, flags, block):
    rows = chunks.shape[0] if flags & native.REDUCE else 0
    return chunks.new_empty((rows, 2), dtype=torch.float32)


def run_cuda_library_pass(host: bool, params, chunks, tensor_starts, tensor_arena_shifts, coefs, master,
                          policy_delta, reward_delta, seed, reduce_seed, flags, block):
    """libzopro_csrc.so's pass: its kernels on the GPU, or (``host``) the same per-item code run on
    host memory (how the CUDA code is tested without a GPU)."""
    lib = native.load()
    device = chunks.device
    model_dtype = dtype_code(params[0].dtype)
    check_tables(device, chunks, tensor_starts, tensor_arena_shifts, coefs, master)
    flags = guidance_flag(flags, policy_delta, reward_delta, device)
    addresses, aligned = address_table(params, device)
    arenas = (master, policy_delta, reward_delta)
    if not (aligned and all(t is None or t.data_ptr() % 16 == 0 for t in arenas)):
        flags &= ~native.ALIGNED
    reduce = bool(flags & native.REDUCE)
    partials = torch.empty((chunks.shape[0] if reduce else 0, 2), device=device, dtype=torch.float32)
    args = (
        model_dtype, chunks.data_ptr(), chunks.shape[0], block, tensor_starts.data_ptr(),
        tensor_arena_shifts.data_ptr(), addresses.data_ptr(), ptr(coefs), ptr(master),
        ptr(policy_delta), ptr(reward_delta), partials.data_ptr() if reduce else None,
        seed, reduce_seed, flags,
    )
    if host:
        code = lib.zopro_zo_pass_host(*args)
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        with cuda_device_scope(index):
            code = lib.zopro_zo_pass(*args, index, _stream(torch.device("cuda", index)))
    native.check(code, "zopro_zo_pass" + ("_host" if host else ""), lib)
    return partials


def run_cpu_library_pass(params, chunks, tensor_starts, tensor_arena_shifts, coefs, master,
                         policy_delta, reward_delta, seed, reduce_seed, flags, block):
    """libzopro_cpu.so's pass (torch.get_num_threads() threads); returns the per-chunk partials."""
    lib = native.load_cpu()
    device = chunks.device
    model_dtype = dtype_code(params[0].dtype)
    check_tables(device, chunks, tensor_starts, tensor_arena_shifts, coefs, master)
    flags = guidance_flag(flags, policy_delta, reward_delta, device)
    addresses, _ = address_table(params, device)
    reduce = bool(flags & native.REDUCE)
    partials = torch.empty((chunks.shape[0] if reduce else 0, 2), device=device, dtype=torch.float32)
    code = lib.zopro_cpu_zo_pass(
        model_dtype, chunks.data_ptr(), chunks.shape[0], block, tensor_starts.data_ptr(),
        tensor_arena_shifts.data_ptr(), addresses.data_ptr(), ptr(coefs), ptr(master),
        ptr(policy_delta), ptr(reward_delta), partials.data_ptr() if reduce else None,
        len(params), None, seed, reduce_seed, flags, torch.get_num_threads(),
    )
    native.check_cpu(code, "zopro_cpu_zo_pass", lib)
    return partials


@zo_pass_.register_kernel("cuda")
def _(*args):
    return run_cuda_library_pass(False, *args)


@zo_pass_.register_kernel("cpu")
def _(*args):
    return run_cpu_library_pass(*args)


@torch.library.custom_op("zopro::noise", mutates_args=())
def noise_op(seed: int, start: int, numel: int, device: torch.device) -> torch.Tensor:
    """fp32 noise of global indices [start, start + numel) (see zopro_kernels/philox.py)."""
    raise NotImplementedError("zopro::noise has CUDA and CPU kernels only")


@noise_op.register_fake
def _(seed, start, numel, device):
    return torch.empty(numel, device=device, dtype=torch.float32)


def cpu_noise(seed: int, start: int, numel: int) -> torch.Tensor:
    """fp32 noise from libzopro_cpu.so (torch.get_num_threads() threads)."""
    lib = native.load_cpu()
    out = torch.empty(numel, dtype=torch.float32)
    native.check_cpu(lib.zopro_cpu_noise(out.data_ptr(), seed, start, numel, torch.get_num_threads()),
                     "zopro_cpu_noise", lib)
    return out


def cuda_library_noise(seed: int, start: int, numel: int, device: torch.device) -> torch.Tensor:
    """fp32 noise from libzopro_csrc.so: on the GPU, or its host code for a CPU ``device``."""
    lib = native.load()
    device = torch.device(device)
    out = torch.empty(numel, device=device, dtype=torch.float32)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        with cuda_device_scope(index):
            code = lib.zopro_noise(out.data_ptr(), seed, start, numel, index, _stream(torch.device("cuda", index)))
    else:
        code = lib.zopro_noise_host(out.data_ptr(), seed, start, numel)
    native.check(code, "zopro_noise", lib)
    return out


# A factory op has no tensor argument to dispatch on: its device argument picks the kernel.
noise_op.register_kernel("cuda")(cuda_library_noise)
noise_op.register_kernel("cpu")(lambda seed, start, numel, device: cpu_noise(seed, start, numel))
noise_op.register_kernel("meta")(lambda seed, start, numel, device: torch.empty(numel, device=device))
