"""The compiled CUDA backend (csrc/, libzopro_csrc.so).

CPU-runnable: the library compiles with the default architectures (skipped without nvcc/cmake/
ninja), exports its C ABI, matches the Python side's ABI version, and its loader and
``cuda_unavailable_reason`` say why the backend can't run. The pass logic itself runs on the CPU
too: the library has a host execution of the same per-item code (csrc/zo_pass.cuh) on host
memory, which ``backend="cuda"`` runs for CPU tensors here (``host_cuda``), checked against the
float64 reference through the same harness as test_passes.py. (The ops' own CPU kernels run the
``cpu`` backend's library, csrc/cpu/: see test_cpu_backend.py.)

GPU (marked ``gpu``): the CUDA kernels against the float64 reference and against Triton for every
pass, dtype, granularity, odd sizes and many tiny tensors; bit-exact restore; the optimizer end
to end; opcheck and torch.compile. Run them under compute-sanitizer with
``csrc/run_compute_sanitizer.sh``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zopro_kernels as zk
from zopro_kernels import ZOPrO, native
from zopro_kernels.backends import cuda_unavailable_reason, resolve_backend
from zopro_kernels.philox import philox4x32, reference_noise
from zopro_kernels.seeds import step_seed

from .helpers import (
    SHAPES,
    assert_dtype_close,
    captured_step,
    check_bf16_guidance,
    check_guidance_variant,
    check_noise_against_reference,
    check_noise_independent_of_range_start,
    check_restored_after_cycles,
    check_step_against_reference,
    guidance,
    starts_of,
)

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SEED = 0x5EED_1234_ABCD
EXPORTS = ["zopro_abi_version", "zopro_cuda_archs", "zopro_error_string", "zopro_check_device",
           "zopro_zo_pass", "zopro_noise", "zopro_zo_pass_host", "zopro_noise_host", "zopro_philox_host"]
# Shapes whose boundaries are multiples of 16: the 16-byte vector paths.
ALIGNED_SHAPES = [(64, 48), (16,), (4096,), (32, 3)]
HAS_CUDA = torch.cuda.is_available()


def _build_tools():
    nvcc = os.environ.get("CUDACXX") or shutil.which("nvcc")
    cmake, ninja = shutil.which("cmake"), shutil.which("ninja")
    return (nvcc, cmake, ninja) if nvcc and cmake and ninja else None


@pytest.fixture(scope="session")
def built_library(tmp_path_factory) -> Path:
    """A fresh CMake + Ninja build of csrc/ with the default architectures (skip without nvcc)."""
    tools = _build_tools()
    if tools is None:
        pytest.skip("needs nvcc, cmake and ninja")
    nvcc, cmake, ninja = tools
    build = tmp_path_factory.mktemp("csrc-build")
    env = {k: v for k, v in os.environ.items() if k != "ZOPRO_CUDA_ARCHS"}
    subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                    f"-DCMAKE_CUDA_COMPILER={nvcc}", f"-DCMAKE_MAKE_PROGRAM={ninja}"],
                   check=True, capture_output=True, env=env)
    result = subprocess.run([cmake, "--build", str(build)], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    return build / native.LIBRARY_NAME


@pytest.fixture(scope="session")
def library(request) -> Path:
    """The library the tests run: $ZOPRO_CSRC_LIBRARY if set (e.g. CI's build), else a fresh build."""
    override = os.environ.get(native.LIBRARY_ENV)
    return Path(override) if override else request.getfixturevalue("built_library")


@pytest.fixture
def use_library(library, monkeypatch):
    monkeypatch.setenv(native.LIBRARY_ENV, str(library))
    native.clear_cache()
    yield native.load()
    native.clear_cache()


# ---- the build and the C ABI ---------------------------------------------------------------


def test_library_builds_with_default_architectures(built_library):
    assert built_library.is_file()
    lib = native.load(built_library)
    assert lib.zopro_cuda_archs().decode() == "80-real,86-real,89-real,90"


def test_exported_symbols(library):
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("needs nm")
    out = subprocess.run([nm, "-D", "--defined-only", str(library)], check=True, capture_output=True,
                         text=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if " T " in line}
    assert set(EXPORTS) <= exported
    # Hidden visibility: nothing but the C ABI (and no libtorch) leaks out.
    assert {s for s in exported if s.startswith("zopro_")} == set(EXPORTS)
    if shutil.which("readelf"):
        needed = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True).stdout
        assert "libtorch" not in needed and "libcudart" not in needed  # cudart is static


def test_abi_version_matches_python_side(library):
    header = (ROOT / "csrc" / "zopro.h").read_text()
    assert int(re.search(r"#define ZOPRO_ABI_VERSION (\d+)", header).group(1)) == native.ABI_VERSION
    assert native.load(library).zopro_abi_version() == native.ABI_VERSION
    flags = {name: int(value) for name, value in re.findall(r"#define ZOPRO_([A-Z_0-9]+) (-?\d+)", header)}
    for name in ("APPLY", "HAS_MASTER", "WRITE_MASTER", "HAS_POLICY", "HAS_REWARD", "REDUCE",
                 "REDUCE_SAME_SEED", "ALIGNED", "GUIDANCE_BF16", "FLOAT32", "BFLOAT16", "FLOAT16"):
        assert getattr(native, name) == flags[name], name


def test_bad_arguments_are_reported_not_run(use_library):
    lib = use_library
    code = lib.zopro_zo_pass_host(7, None, 0, 4096, None, None, None, None, None, None, None, None, 0, 0, 0)
    assert code < 0 and "dtype" in lib.zopro_error_string(code).decode()
    code = lib.zopro_zo_pass_host(0, None, 0, 12, None, None, None, None, None, None, None, None, 0, 0, 0)
    assert "block" in lib.zopro_error_string(code).decode()
    code = lib.zopro_zo_pass_host(0, None, 1, 4096, None, None, None, None, None, None, None, None, 0, 0, 1)
    assert "NULL" in lib.zopro_error_string(code).decode()
    with pytest.raises(RuntimeError, match="NULL"):
        native.check(code, "zopro_zo_pass_host", lib)


def test_check_device_without_a_gpu_names_the_cuda_error(use_library):
    if HAS_CUDA:
        pytest.skip("a GPU is present")
    code = use_library.zopro_check_device(0)
    assert code > 0
    assert use_library.zopro_error_string(code).decode()  # e.g. "no CUDA-capable device is detected"


# ---- the loader's error paths --------------------------------------------------------------


def _compile_stub(tmp_path, source: str, name: str = "stub") -> Path:
    """A stand-in library (dlopen caches by path: give each stub its own name)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    src = tmp_path / f"{name}.cpp"
    src.write_text(source)
    out = tmp_path / f"lib{name}.so"
    subprocess.run([cxx, "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    return out


def test_missing_library_says_not_built_and_how_to_build(tmp_path):
    with pytest.raises(native.NativeLibraryError, match="was not built") as info:
        native.load(tmp_path / "nowhere" / native.LIBRARY_NAME)
    assert "cmake" in str(info.value) and "nvcc" in str(info.value)


def test_wrong_abi_version_is_refused(tmp_path):
    stub = _compile_stub(tmp_path, 'extern "C" int zopro_abi_version() { return 1; }')
    with pytest.raises(native.NativeLibraryError, match=f"version 1.*expects {native.ABI_VERSION}"):
        native.load(stub)


def test_library_without_entry_points_is_refused(tmp_path):
    stub = _compile_stub(tmp_path, f'extern "C" int zopro_abi_version() {{ return {native.ABI_VERSION}; }}')
    with pytest.raises(native.NativeLibraryError, match="lacks the entry point"):
        native.load(stub)
    other = _compile_stub(tmp_path, 'extern "C" int something_else() { return 0; }', "other")
    with pytest.raises(native.NativeLibraryError, match="not a zopro-kernels library"):
        native.load(other)


def test_unopenable_file_is_refused(tmp_path):
    bogus = tmp_path / native.LIBRARY_NAME
    bogus.write_text("not an ELF file")
    with pytest.raises(native.NativeLibraryError, match="cannot be opened"):
        native.load(bogus)


def test_failures_are_cached_and_cleared(tmp_path, monkeypatch):
    missing = tmp_path / native.LIBRARY_NAME
    monkeypatch.setenv(native.LIBRARY_ENV, str(missing))
    native.clear_cache()
    assert "not built" in native.unavailable_reason()
    stub = _compile_stub(tmp_path, 'extern "C" int zopro_abi_version() { return 1; }')
    shutil.copyfile(stub, missing)
    assert "not built" in native.unavailable_reason()  # cached until cleared
    native.clear_cache()
    assert "version 1" in native.unavailable_reason()
    native.clear_cache()


# ---- cuda_unavailable_reason ---------------------------------------------------------------


def test_reason_float64():
    assert "float64 uses backend='torch'" in cuda_unavailable_reason(torch.device("cuda"), torch.float64)


def test_reason_cpu_tensors_and_missing_library(tmp_path, monkeypatch):
    monkeypatch.setenv(native.LIBRARY_ENV, str(tmp_path / native.LIBRARY_NAME))
    native.clear_cache()
    reason = cuda_unavailable_reason(torch.device("cpu"), torch.float32)
    assert "CUDA tensors only" in reason and "not built" in reason
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run"):
        resolve_backend("cuda", torch.device("cpu"), torch.float32)
    assert "cuda" not in zk.available_backends("cpu")
    native.clear_cache()


def test_reason_no_gpu(use_library, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    reason = cuda_unavailable_reason(torch.device("cuda"), torch.bfloat16)
    assert reason == "no CUDA GPU is visible (torch.cuda.is_available() is False)"


def _fake_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake GPU")


def test_reason_built_without_this_architecture(use_library, monkeypatch):
    _fake_gpu(monkeypatch, (7, 5))
    reason = cuda_unavailable_reason(torch.device("cuda", 0), torch.float16)
    assert "built without this GPU's architecture sm_75" in reason
    assert 'ZOPRO_CUDA_ARCHS="75"' in reason and "Fake GPU" in reason


def test_reason_driver_or_device_error_from_the_library(use_library, monkeypatch):
    if HAS_CUDA:
        pytest.skip("a GPU is present")
    _fake_gpu(monkeypatch, (9, 0))  # an image exists: the library's own device check fails
    reason = cuda_unavailable_reason(torch.device("cuda", 0), torch.float32)
    assert reason.startswith("the CUDA library cannot run on cuda:0: ")


@pytest.mark.parametrize(
    "spec,capability,runs",
    [
        ("80-real,86-real,89-real,90", (8, 0), True),
        ("80-real,86-real,89-real,90", (8, 7), True),  # sm_86 SASS runs on 8.7
        ("80-real,86-real,89-real,90", (9, 0), True),
        ("80-real,86-real,89-real,90", (10, 0), True),  # compute_90 PTX, JIT-compiled
        ("80-real,86-real,89-real,90", (12, 0), True),
        ("80-real,86-real,89-real,90", (7, 5), False),
        ("80-real", (9, 0), False),
        ("90a-real", (9, 0), True),
        ("90a-real", (10, 0), False),  # arch-specific SASS: no forward compatibility
        ("80-virtual", (8, 9), True),
        ("80;90", (8, 6), True),  # CMake's own separator
    ],
    ids=lambda v: str(v).replace(",", "+") if not isinstance(v, tuple) else f"sm{v[0]}{v[1]}",
)
def test_arch_reason(spec, capability, runs):
    assert (native.arch_reason(capability, spec) is None) == runs


def test_import_queries_no_device():
    """Importing the package and the CUDA backend must not touch CUDA (STYLE habit 4)."""
    code = (
        "import torch\n"
        "def boom(*a, **k): raise AssertionError('device queried at import')\n"
        "torch.cuda.get_device_capability = boom\n"
        "torch.cuda.get_device_properties = boom\n"
        "torch.cuda.current_device = boom\n"
        "import zopro_kernels, zopro_kernels.native, zopro_kernels.backends.cuda_backend\n"
        "print('ok')\n"
    )
    env = dict(os.environ, **{native.LIBRARY_ENV: "/nonexistent/libzopro_csrc.so"})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ---- the kernels' code on the host (the library's host execution) ---------------------------


def test_philox_words_bit_for_bit(use_library):
    counters = torch.arange(64, dtype=torch.int64) * 7919 + (1 << 33)
    out = torch.zeros(64 * 4, dtype=torch.int32)
    assert use_library.zopro_philox_host(out.data_ptr(), SEED, counters.data_ptr(), 64) == 0
    expected = torch.stack(philox4x32(SEED, counters), dim=1).reshape(-1)
    assert torch.equal(out.to(torch.int64) & 0xFFFFFFFF, expected)
    zero = torch.zeros(1, dtype=torch.int64)
    assert use_library.zopro_philox_host(out.data_ptr(), 0, zero.data_ptr(), 1) == 0
    assert [w & 0xFFFFFFFF for w in out[:4].tolist()] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.fixture
def host_cuda(use_library, monkeypatch):
    """backend='cuda' on CPU tensors: the library's host execution (same per-item code as the GPU)."""
    import zopro_kernels.engine as engine_module
    noise_module = sys.modules["zopro_kernels.noise"]  # the package exports the function as .noise
    from zopro_kernels.backends.cuda_backend import CudaBackend

    original = engine_module.resolve_backend

    def resolve(name, device, dtype):
        if name == "cuda" and device.type == "cpu" and dtype != torch.float64:
            return CudaBackend()
        return original(name, device, dtype)

    monkeypatch.setattr(engine_module, "resolve_backend", resolve)
    monkeypatch.setattr(noise_module, "resolve_backend", resolve)
    return "cuda", "cpu"


@pytest.fixture(params=[
    pytest.param("host", id="cuda-host"),
    pytest.param("gpu", id="cuda-gpu", marks=pytest.mark.gpu),
])
def cuda_target(request):
    """The CUDA backend's code on the host (CPU) and, on a GPU machine, on the GPU."""
    if request.param == "host":
        return request.getfixturevalue("host_cuda")
    request.getfixturevalue("use_library")
    return "cuda", "cuda"


@pytest.mark.parametrize("start,numel", [(0, 1), (3, 1), (5, 4099), (2**33 + 7, 300)], ids=str)
def test_noise_matches_float64_reference(cuda_target, start, numel):
    check_noise_against_reference(*cuda_target, SEED, start, numel)


def test_noise_is_independent_of_range_start(cuda_target):
    check_noise_independent_of_range_start(*cuda_target, SEED, [(1, 1), (2, 7), (1023, 900), (2047, 953), (0, 0)])


BLOCKS = [pytest.param("4096", id="block4096"), pytest.param("16", id="block16")]


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize("shapes", ["one", "odd", "aligned"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_perturb_and_update_match_reference(cuda_target, dtype, shapes, granularity, block, monkeypatch):
    monkeypatch.setenv("ZOPRO_CUDA_BLOCK", block)
    backend, device = cuda_target
    shapes = ALIGNED_SHAPES if shapes == "aligned" else SHAPES[shapes]
    check_step_against_reference(backend, device, DTYPES[dtype], shapes, granularity)


@pytest.mark.parametrize("direction_norm", ["policy_delta", "noise"])
@pytest.mark.parametrize("kind", ["none", "reward", "policy", "zeros"])
@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_guidance_variants_match_reference(cuda_target, kind, granularity, direction_norm):
    backend, device = cuda_target
    check_guidance_variant(backend, device, SHAPES["odd"], granularity, kind, direction_norm)


@pytest.mark.parametrize("shapes", ["odd", "aligned"])
def test_bf16_guidance_storage_matches_reference_of_rounded_guidance(cuda_target, shapes):
    """guidance_dtype=bf16: Δπ and ΔR read from bf16 arenas (scalar and 16-byte paths)."""
    backend, device = cuda_target
    check_bf16_guidance(backend, device, ALIGNED_SHAPES if shapes == "aligned" else SHAPES[shapes])


def test_unguided_direction_is_exactly_the_noise(cuda_target):
    backend, device = cuda_target
    shapes = SHAPES["odd"] + ALIGNED_SHAPES
    _, seen, _, _ = captured_step(backend, device, torch.float32, shapes, kind="none", eps=1.0,
                                  init_scale=0.0)
    seed = step_seed(11, 0)
    for t, start in enumerate(starts_of(shapes)):
        numel = seen[0][t].numel()
        # the definition (float64 reference), to fp32 rounding, and bit for bit the backend's own noise
        assert_dtype_close(seen[0][t], reference_noise(seed, start, numel, dtype=torch.float64), torch.float32)
        assert torch.equal(seen[0][t].reshape(-1), zk.noise(seed, start, numel, device=device, backend=backend))


@pytest.mark.parametrize("block", BLOCKS)
def test_many_tiny_tensors_beside_a_large_one(cuda_target, block, monkeypatch):
    monkeypatch.setenv("ZOPRO_CUDA_BLOCK", block)
    backend, device = cuda_target
    shapes = SHAPES["many-tiny"]
    initial, seen, _, z = captured_step(backend, device, torch.bfloat16, shapes, eps=1e-2)
    for t, theta0 in enumerate(initial):
        assert_dtype_close(seen[0][t], theta0.double().cpu() + 1e-2 * z[t], torch.bfloat16)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("shapes", ["odd", "aligned", "many-tiny"])
def test_reduce_statistics_match_reference(cuda_target, shapes, block, monkeypatch):
    """The reduce pass and the update's fused next-seed reduce: per-tensor (Σn², Σn·ΔR)."""
    monkeypatch.setenv("ZOPRO_CUDA_BLOCK", block)
    backend, device = cuda_target
    shapes = ALIGNED_SHAPES if shapes == "aligned" else SHAPES[shapes]
    params = [torch.zeros(s, device=device) for s in shapes]
    opt = ZOPrO(params, lr=1e-3, eps=1e-2, seed=3, alpha=0.5, backend=backend)
    dpi, dr = guidance(shapes, "both", device)
    opt.set_guidance(policy_delta=dpi, reward_delta=dr)
    engine = opt._ensure_engine()
    pset, kernel = engine.sets[0], engine.backends[0]
    seed, next_seed = 77, 78
    reduced = kernel.zo_pass(pset, seed=seed, coefs=None, write_master=False, use_policy=False,
                             reduce_seed=seed)
    coefs = torch.zeros(len(pset), 5, device=device)
    coefs[:, 4] = 1.0  # keep θ: the pass only reduces the next seed's noise
    fused = kernel.zo_pass(pset, seed=seed, coefs=coefs, write_master=True, use_policy=True,
                           reduce_seed=next_seed)
    for got, s in ((reduced, seed), (fused, next_seed)):
        for t, (shape, start) in enumerate(zip(shapes, starts_of(shapes))):
            n = reference_noise(s, start, int(torch.Size(shape).numel()), dtype=torch.float64)
            r = dr[t].double().cpu().reshape(-1)
            expected = torch.stack(((n * n).sum(), (n * r).sum()))
            scale = torch.stack(((n * n).sum(), (n.abs() * r.abs()).sum()))
            assert ((got[t].double().cpu() - expected).abs() <= 1e-5 * scale + 1e-6).all(), t


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_weights_restored_bit_for_bit_after_many_cycles(cuda_target, dtype):
    backend, device = cuda_target
    cycles = 1000 if device == "cuda" else 50
    params = [torch.randn(s, generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype]).to(device)
              for s in SHAPES["odd"] + ALIGNED_SHAPES]
    opt = ZOPrO(params, lr=0.0, eps=1e-3, alpha=0.5, backend=backend)
    check_restored_after_cycles(params, opt, SHAPES["odd"] + ALIGNED_SHAPES, cycles)


def test_passes_are_deterministic(cuda_target):
    backend, device = cuda_target
    runs = []
    for _ in range(2):
        _, seen, losses, _ = captured_step(backend, device, torch.bfloat16, SHAPES["many-tiny"], lr=1e-3)
        runs.append((seen, losses))
    assert runs[0][1] == runs[1][1]
    for a, b in zip(runs[0][0], runs[1][0]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_optimizer_end_to_end_matches_torch_backend(cuda_target):
    """A small model trained 30 guided steps with each backend: same trajectory to fp32 rounding."""
    backend, device = cuda_target
    results = {}
    for name, dev in ((backend, device), ("torch", device)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1)).to(dev)
        x = torch.randn(256, 8, device=dev)
        y = x[:, :1] * 2 - x[:, 1:2]
        opt = ZOPrO(model.named_parameters(), lr=1e-2, eps=1e-3, seed=0, alpha="linear",
                    steps_per_iteration=30, backend=name)
        opt.set_guidance(policy_delta={n: 0.1 * torch.ones_like(p) for n, p in model.named_parameters()},
                         reward_delta={n: torch.randn_like(p) for n, p in model.named_parameters()})
        losses = [float(opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))) for _ in range(30)]
        results[name] = (losses, [p.detach().cpu().double() for p in model.parameters()])
    (cuda_losses, cuda_weights), (ref_losses, ref_weights) = results[backend], results["torch"]
    assert cuda_losses == pytest.approx(ref_losses, rel=1e-3, abs=1e-5)
    for a, b in zip(cuda_weights, ref_weights):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())


# ---- torch.library registration --------------------------------------------------------------


def _op_args(device, dtype=torch.bfloat16):
    params = [torch.randn(s, device=device).to(dtype) for s in ((3, 5), (64,), (1000,))]
    pset = ZOPrO(params, backend="torch")._ensure_engine().sets[0]
    tables = pset.kernel_tables(256)
    reward = torch.randn(pset.numel, device=device)
    coefs = torch.tensor([[0.0, 1.0, 0.5, 1e-2, 1.0]] * 3, device=device)
    flags = native.APPLY | native.HAS_MASTER | native.WRITE_MASTER | native.HAS_REWARD | native.REDUCE
    return (pset.params, tables["chunks"], tables["tensor_starts"], tables["tensor_arena_shifts"], coefs,
            pset.master, None, reward, 5, 6, flags, 256)


def _ops_cpu_kernels_need_the_cpu_library(device):
    """The ops' CPU kernels run libzopro_cpu.so (the cpu backend), not this library's host code."""
    if device == "cpu" and native.cpu_unavailable_reason() is not None:
        pytest.skip(f"the ops' CPU kernels need the CPU library: {native.cpu_unavailable_reason()}")


def test_opcheck(cuda_target):
    from zopro_kernels.backends import cuda_backend  # noqa: F401  (registers the ops)

    _, device = cuda_target
    _ops_cpu_kernels_need_the_cpu_library(device)
    torch.library.opcheck(torch.ops.zopro.zo_pass_.default, _op_args(device))
    torch.library.opcheck(torch.ops.zopro.noise.default, (SEED, 5, 1001, torch.device(device)))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from zopro_kernels.backends import cuda_backend  # noqa: F401

    args = _op_args("cpu")
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else
                [mode.from_tensor(t) for t in a] if isinstance(a, list) else a for a in args]
        partials = torch.ops.zopro.zo_pass_(*fake)
        assert partials.shape == (args[1].shape[0], 2) and partials.dtype == torch.float32
        assert torch.ops.zopro.noise(1, 2, 33, torch.device("cpu")).shape == (33,)


def test_torch_compile_calls_the_op(cuda_target):
    """fullgraph torch.compile of the mutating op: same partials and the same written tensors."""
    from zopro_kernels.backends import cuda_backend  # noqa: F401

    _ops_cpu_kernels_need_the_cpu_library(cuda_target[1])
    args = _op_args(cuda_target[1])
    eager_params = [p.clone() for p in args[0]]
    eager_args = (eager_params,) + tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args[1:])
    expected = torch.ops.zopro.zo_pass_(*eager_args)
    compiled = torch.compile(lambda *a: torch.ops.zopro.zo_pass_(*a), fullgraph=True)
    got = compiled(*args)
    assert torch.equal(got, expected)
    assert all(torch.equal(p, q) for p, q in zip(args[0], eager_params))


# ---- GPU only: CUDA against Triton -----------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_cuda_matches_triton(use_library, dtype, granularity):
    pytest.importorskip("triton")
    dtype = DTYPES[dtype]
    shapes = SHAPES["many-tiny"] + SHAPES["odd"] + ALIGNED_SHAPES
    steps = {}
    for backend in ("cuda", "triton"):
        _, seen, losses, _ = captured_step(backend, "cuda", dtype, shapes, granularity=granularity,
                                           lr=1e-3, weight_decay=0.1)
        steps[backend] = seen
    for cuda_stage, triton_stage in zip(steps["cuda"], steps["triton"]):
        for a, b in zip(cuda_stage, triton_stage):
            # Both compute in fp32 from the same Philox words; log/sqrt/sincos may differ by ulps,
            # so 16-bit results may differ by one rounding step.
            ulp = torch.finfo(dtype).eps * b.double().abs().clamp(min=1.0)
            assert ((a.double() - b.double()).abs() <= 2 * ulp).all()
    n_cuda = zk.noise(SEED, 3, 100_003, device="cuda", backend="cuda")
    n_triton = zk.noise(SEED, 3, 100_003, device="cuda", backend="triton")
    print("max |cuda - triton| noise:", (n_cuda - n_triton).abs().max().item())
    assert (n_cuda - n_triton).abs().max() <= 1e-5


@pytest.mark.gpu
def test_cuda_is_available_on_this_gpu(use_library):
    assert cuda_unavailable_reason(torch.device("cuda"), torch.bfloat16) is None
    assert "cuda" in zk.available_backends("cuda", torch.bfloat16)


@pytest.mark.gpu
def test_library_leaves_the_callers_current_device_as_it_found_it(use_library):
    """Called directly (no torch guard around it), the library switches to the device it is given
    and back: the caller's current device is unchanged afterwards (csrc/device_guard.cuh)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    torch.cuda.set_device(0)
    out = torch.empty(1000, device="cuda:1")
    assert use_library.zopro_noise(out.data_ptr(), SEED, 0, 1000, 1, None) == 0  # legacy stream of cuda:1
    torch.cuda.synchronize(1)
    assert torch.cuda.current_device() == 0
    assert use_library.zopro_check_device(1) == 0 and torch.cuda.current_device() == 0
    assert torch.equal(out.cpu(), zk.noise(SEED, 0, 1000, device="cuda:1", backend="cuda").cpu())
    assert torch.cuda.current_device() == 0
