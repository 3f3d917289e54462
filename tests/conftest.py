import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Triton kernels run on CPU tensors only in the interpreter; it must be set before import.
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # The interpreter pays per program, not per element: small blocks only add programs.
    os.environ.setdefault("ZOPRO_TRITON_BLOCK", "2048")


def _triton_ok():
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# (backend, device) pairs that run on this machine; the float64 reference is the oracle.
KERNEL_TARGETS = []
if _triton_ok():
    KERNEL_TARGETS.append(
        pytest.param(("triton", "cuda"), marks=pytest.mark.gpu, id="triton-cuda")
        if HAS_CUDA
        else pytest.param(("triton", "cpu"), id="triton-interp")
    )


def _cpu_library_reason():
    from zopro_kernels import native

    return native.cpu_unavailable_reason()


# The compiled CPU backend (libzopro_cpu.so): skipped, with the loader's reason, where not built.
CPU_LIBRARY_REASON = _cpu_library_reason()
KERNEL_TARGETS.append(
    pytest.param(("cpu", "cpu"), id="cpu")
    if CPU_LIBRARY_REASON is None
    else pytest.param(("cpu", "cpu"), id="cpu", marks=pytest.mark.skip(reason=CPU_LIBRARY_REASON))
)
ALL_TARGETS = [pytest.param(("torch", "cpu"), id="torch-cpu")] + KERNEL_TARGETS


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "slow: long-running")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=ALL_TARGETS)
def target(request):
    return request.param


@pytest.fixture(params=KERNEL_TARGETS)
def kernel_target(request):
    return request.param
