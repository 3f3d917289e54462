"""Backends implement one op, the ZO pass (see ``zo_pass`` in each module), plus noise.

``torch``  : the reference, per tensor, float64 capable, any device.
``triton`` : one launch per pass over all tensors (GPU; CPU under TRITON_INTERPRET=1).
``cuda``   : compiled kernels from csrc/ (libzopro_csrc.so, built by pip install . where nvcc is).
``cpu``    : compiled CPU passes from csrc/cpu/ (libzopro_cpu.so, built by pip install . where a
             C++ compiler is): threaded, vectorised Philox; fp32/bf16/fp16 CPU tensors.
``auto``   : triton for CUDA tensors when Triton is installed; cpu for CPU tensors when the CPU
             library is built (not for float64); else torch.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton", "cuda", "cpu")


def triton_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the Triton backend cannot run tensors of this device and dtype (None if it can)."""
    if dtype == torch.float64:
        return "the Triton kernels take fp32/bf16/fp16 parameters (float64 uses backend='torch')"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed (pip install triton)"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type == "cuda":
        if interpreted:
            return "TRITON_INTERPRET=1 is set: interpreted Triton runs CPU tensors only"
        return None
    if device.type == "cpu":
        if interpreted:
            return None
        return "Triton runs CPU tensors only in its interpreter (set TRITON_INTERPRET=1; slow, for tests)"
    return f"Triton has no support for device {device}"


def cuda_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the compiled CUDA backend cannot run tensors of this device and dtype (None if it can):
    no GPU, the library not built (and how to build it), or built without this GPU's
    architecture. Queries the device only when called, never at import."""
    from .. import native

    if dtype == torch.float64:
        return "the CUDA kernels take fp32/bf16/fp16 parameters (float64 uses backend='torch')"
    reasons = []
    if device.type != "cuda":
        reasons.append(f"it runs CUDA tensors only, these are on {device}")
    elif not torch.cuda.is_available():
        reasons.append("no CUDA GPU is visible (torch.cuda.is_available() is False)")
    library = native.unavailable_reason()
    if library is not None:
        reasons.append(library)
    if reasons:
        return "; ".join(reasons)
    lib = native.load()
    index = device.index if device.index is not None else torch.cuda.current_device()
    archs = lib.zopro_cuda_archs().decode()
    arch = native.arch_reason(torch.cuda.get_device_capability(index), archs)
    if arch is not None:
        return f"{arch} ({torch.cuda.get_device_name(index)})"
    from .ops import cuda_device_scope

    with cuda_device_scope(index):
        code = lib.zopro_check_device(index)
    if code != 0:
        return f"the CUDA library cannot run on cuda:{index}: {lib.zopro_error_string(code).decode()}"
    return None


def cpu_unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the compiled CPU backend cannot run tensors of this device and dtype (None if it can):
    float64, tensors on another device, or the library not built (and how to build it)."""
    from .. import native

    if dtype == torch.float64:
        return "the CPU kernels take fp32/bf16/fp16 parameters (float64 uses backend='torch')"
    reasons = []
    if device.type != "cpu":
        reasons.append(f"it runs CPU tensors only, these are on {device}")
    library = native.cpu_unavailable_reason()
    if library is not None:
        reasons.append(library)
    return "; ".join(reasons) if reasons else None


def available_backends(device="cuda", dtype=torch.float32) -> list[str]:
    """Backends that can run parameters of ``device`` and ``dtype`` here."""
    device = torch.device(device)
    found = ["torch"]
    if triton_unavailable_reason(device, dtype) is None:
        found.append("triton")
    if cuda_unavailable_reason(device, dtype) is None:
        found.append("cuda")
    if cpu_unavailable_reason(device, dtype) is None:
        found.append("cpu")
    return found


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype):
    """The backend object for parameters of ``device``/``dtype``; a clear error if it can't run."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type == "cuda" and triton_unavailable_reason(device, dtype) is None:
            name = "triton"
        elif device.type == "cpu" and cpu_unavailable_reason(device, dtype) is None:
            name = "cpu"
        else:
            name = "torch"
    reason = {
        "triton": triton_unavailable_reason,
        "cuda": cuda_unavailable_reason,
        "cpu": cpu_unavailable_reason,
    }.get(name, lambda *_: None)(device, dtype)
    if reason is not None:
        raise RuntimeError(f"backend={name!r} cannot run {dtype} parameters on {device}: {reason}")
    if name == "triton":
        from .triton_backend import TritonBackend

        return TritonBackend()
    if name == "cuda":
        from .cuda_backend import CudaBackend

        return CudaBackend()
    if name == "cpu":
        from .cpu_backend import CpuBackend

        return CpuBackend()
    from .torch_backend import TorchBackend

    return TorchBackend()
