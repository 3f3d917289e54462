"""The compiled CPU backend (csrc/cpu/, libzopro_cpu.so, ``backend="cpu"``).

The library as built (a fresh CMake build: skipped without cmake/ninja/a C++ compiler) and as the
loader finds it ($ZOPRO_CPU_LIBRARY or zopro_kernels/_lib/: tests skip with the loader's reason
where it is not built): its C ABI and errors; the noise against the float64 definition, for every
ISA path the CPU has (AVX-512, AVX2, scalar), and those paths bit-identical to each other; every
pass against the float64 reference (fp32/bf16/fp16, both granularities, one element, sizes that
are not multiples of the 64-value groups or the chunk block, 200 tiny tensors beside a large one,
fp32 and bf16 guidance); per-tensor sums and weights bit-identical for 1, 2, 3 and 4 threads and
across ISAs; restore after 1000 cycles; the torch.library ops' CPU kernels (opcheck,
torch.compile). test_passes.py, test_noise.py and test_optimizer.py run the same backend through
their ``target`` parametrisation (id ``cpu``), resume bit for bit included.

Tolerance: the library computes log/sin/cos with its own fp32 polynomials (one code path for all
ISAs), so its noise is not bit-identical to the torch reference's fp32 (nor to CUDA's or
Triton's); it is held to the standard the other backends are: within 2x of plain fp32 PyTorch's
error against the float64 definition (+1e-6), and passes within 2x of rounding the float64 result
into the dtype (+1e-6 relative for the fp32 arithmetic).
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
from zopro_kernels.backends import cpu_unavailable_reason, resolve_backend
from zopro_kernels.philox import philox4x32, reference_noise
from zopro_kernels.reference import reference_direction
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
    random_tensors,
    starts_of,
)

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SEED = 0x5EED_1234_ABCD
EXPORTS = {"zopro_cpu_abi_version", "zopro_cpu_error_string", "zopro_cpu_isa", "zopro_cpu_isas",
           "zopro_cpu_set_isa", "zopro_cpu_max_threads", "zopro_cpu_zo_pass", "zopro_cpu_noise",
           "zopro_cpu_philox"}
# Sizes around the 64-value groups and the chunk block: partial groups at both ends of chunks.
EDGE_SHAPES = [(63,), (65,), (1,), (4095,), (4097,), (3, 67), (129,), (8191,)]
BLOCKS = [pytest.param("4096", id="block4096"), pytest.param("64", id="block64")]
REASON = cpu_unavailable_reason(torch.device("cpu"), torch.float32)
needs_library = pytest.mark.skipif(REASON is not None, reason=str(REASON))


def isas() -> list[str]:
    return native.load_cpu().zopro_cpu_isas().decode().split(",") if REASON is None else ["scalar"]


@pytest.fixture
def lib():
    if REASON is not None:
        pytest.skip(REASON)
    return native.load_cpu()


@pytest.fixture
def isa(request, lib):
    """Run the test with ISA ``request.param`` (restored to the library's choice afterwards)."""
    if request.param not in isas():
        pytest.skip(f"this CPU (or build) has no {request.param} path: {isas()}")
    assert lib.zopro_cpu_set_isa(request.param.encode()) == 0
    yield request.param
    lib.zopro_cpu_set_isa(os.environ.get(native.CPU_ISA_ENV, "").encode())


ISAS = ["avx512", "avx2", "scalar"]


@pytest.fixture
def threads():
    """Restores torch's thread count after a test that changes it."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


# ---- the build and the C ABI ---------------------------------------------------------------


def _build_tools():
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    cmake, ninja = shutil.which("cmake"), shutil.which("ninja")
    return (cxx, cmake, ninja) if cxx and cmake and ninja else None


@pytest.fixture(scope="session")
def built_cpu_library(tmp_path_factory) -> Path:
    """A fresh CMake + Ninja build of the CPU library alone (what pip install . runs)."""
    tools = _build_tools()
    if tools is None:
        pytest.skip("needs a C++ compiler, cmake and ninja")
    cxx, cmake, ninja = tools
    build = tmp_path_factory.mktemp("cpu-build")
    subprocess.run([cmake, "-S", str(ROOT), "-B", str(build), "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                    "-DZOPRO_BUILD_CUDA=OFF", f"-DCMAKE_CXX_COMPILER={cxx}", f"-DCMAKE_MAKE_PROGRAM={ninja}"],
                   check=True, capture_output=True)
    result = subprocess.run([cmake, "--build", str(build)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning" not in result.stdout.lower(), result.stdout
    return build / native.CPU_LIBRARY_NAME


def test_library_builds_without_cuda_and_exports_only_its_c_abi(built_cpu_library):
    assert native.load_cpu(built_cpu_library).zopro_cpu_abi_version() == native.CPU_ABI_VERSION
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("needs nm")
    out = subprocess.run([nm, "-D", "--defined-only", str(built_cpu_library)], check=True,
                         capture_output=True, text=True).stdout
    exported = {line.split()[-1] for line in out.splitlines() if " T " in line}
    assert exported == EXPORTS  # hidden visibility: nothing else leaks out
    if shutil.which("readelf"):
        needed = subprocess.run(["readelf", "-d", str(built_cpu_library)], capture_output=True, text=True).stdout
        assert "libtorch" not in needed and "libcuda" not in needed
    if shutil.which("objdump"):
        # Only OpenMP entry points every libgomp has (torch's bundled one included): one runtime.
        symbols = subprocess.run(["objdump", "-T", str(built_cpu_library)], capture_output=True, text=True).stdout
        assert not re.search(r"GOMP_5|OMP_5", symbols), symbols


def test_abi_version_and_flags_match_python_side(lib):
    header = (ROOT / "csrc" / "cpu" / "zopro_cpu.h").read_text()
    version = int(re.search(r"#define ZOPRO_CPU_ABI_VERSION (\d+)", header).group(1))
    assert version == native.CPU_ABI_VERSION == lib.zopro_cpu_abi_version()
    assert '#include "../zopro.h"' in header  # the flags and dtype codes are the CUDA library's


def test_isa_list_choice_and_errors(lib):
    names = isas()
    assert names[-1] == "scalar" and set(names) <= set(ISAS)
    assert lib.zopro_cpu_set_isa(b"") == 0 and lib.zopro_cpu_isa().decode() == names[0]
    code = lib.zopro_cpu_set_isa(b"sse9")
    assert code < 0 and "ISA" in lib.zopro_cpu_error_string(code).decode()
    assert lib.zopro_cpu_isa().decode() == names[0]  # unchanged
    assert lib.zopro_cpu_max_threads() >= 1


def test_isa_from_the_environment(lib, monkeypatch):
    path = native.cpu_library_path()
    monkeypatch.setenv(native.CPU_LIBRARY_ENV, str(path))
    try:
        monkeypatch.setenv(native.CPU_ISA_ENV, "scalar")
        native.clear_cache()
        assert native.load_cpu().zopro_cpu_isa() == b"scalar"
        monkeypatch.setenv(native.CPU_ISA_ENV, "sse9")
        native.clear_cache()
        with pytest.raises(native.NativeLibraryError, match="ZOPRO_CPU_ISA='sse9'.*it can: "):
            native.load_cpu()
    finally:
        monkeypatch.delenv(native.CPU_ISA_ENV)
        native.clear_cache()
        native.load_cpu()  # back to the best ISA for the other tests


def test_bad_arguments_are_reported_and_nothing_is_written(lib):
    chunks = torch.tensor([[0, 0, 0, 10]], dtype=torch.int64)
    starts = torch.zeros(1, dtype=torch.int64)
    model = torch.zeros(10)
    addresses = torch.tensor([model.data_ptr()], dtype=torch.int64)
    coefs = torch.tensor([[0.0, 1.0, 0.0, 1.0, 1.0]])

    def run(dtype=native.FLOAT32, table=chunks, block=64, tensors=1, flags=native.APPLY, coef=coefs):
        return lib.zopro_cpu_zo_pass(dtype, table.data_ptr(), table.shape[0], block, starts.data_ptr(),
                                     starts.data_ptr(), addresses.data_ptr(), None if coef is None else coef.data_ptr(),
                                     None, None, None, None, tensors, None, 1, 1, flags, 2)

    def message(code):
        return lib.zopro_cpu_error_string(code).decode()

    assert "dtype" in message(run(dtype=7))
    assert "multiple of 64" in message(run(block=48))
    assert "NULL" in message(run(coef=None))
    assert "NULL" in message(run(flags=native.APPLY | native.HAS_MASTER))
    assert "chunk row" in message(run(tensors=0))  # tensor id 0 of 0 tensors
    assert "chunk row" in message(run(table=torch.tensor([[0, 0, 0, 65]], dtype=torch.int64)))  # past its window
    assert "chunk row" in message(run(table=torch.tensor([[0, 32, 32, 40]], dtype=torch.int64)))  # unaligned window
    assert "size" in message(lib.zopro_cpu_noise(model.data_ptr(), 1, -1, 3, 1))
    assert torch.equal(model, torch.zeros(10))
    assert run() == 0 and torch.equal(model, zk.noise(1, 0, 10, backend="cpu"))  # the good call writes
    with pytest.raises(RuntimeError, match="multiple of 64"):
        native.check_cpu(run(block=48), "zopro_cpu_zo_pass", lib)


# ---- the loader and backend selection ------------------------------------------------------


def test_missing_library_says_not_built_and_how_to_build(tmp_path, monkeypatch):
    monkeypatch.setenv(native.CPU_LIBRARY_ENV, str(tmp_path / native.CPU_LIBRARY_NAME))
    native.clear_cache()
    try:
        reason = cpu_unavailable_reason(torch.device("cpu"), torch.bfloat16)
        assert "CPU library libzopro_cpu.so was not built" in reason
        assert "ZOPRO_SKIP_CPU_BUILD" in reason and "cmake" in reason and native.CPU_LIBRARY_ENV in reason
        with pytest.raises(RuntimeError, match="backend='cpu' cannot run .* was not built"):
            resolve_backend("cpu", torch.device("cpu"), torch.float32)
        with pytest.raises(RuntimeError, match="was not built"):
            zk.noise(1, 0, 3, backend="cpu")
        assert resolve_backend("auto", torch.device("cpu"), torch.float32).name == "torch"
        assert "cpu" not in zk.available_backends("cpu")
    finally:
        native.clear_cache()


def test_stale_or_foreign_library_is_refused(tmp_path):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("needs a C++ compiler")
    for name, source, error in (
        ("old", 'extern "C" int zopro_cpu_abi_version() { return 99; }', "version 99.*expects"),
        ("bare", f'extern "C" int zopro_cpu_abi_version() {{ return {native.CPU_ABI_VERSION}; }}', "lacks the entry point"),
        ("cuda", 'extern "C" int zopro_abi_version() { return 2; }', "not a zopro-kernels library"),
    ):
        src = tmp_path / f"{name}.cpp"
        src.write_text(source)
        out = tmp_path / f"lib{name}.so"
        subprocess.run([cxx, "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
        with pytest.raises(native.NativeLibraryError, match=error):
            native.load_cpu(out)


def test_reasons_float64_and_other_devices():
    assert "float64 uses backend='torch'" in cpu_unavailable_reason(torch.device("cpu"), torch.float64)
    assert "runs CPU tensors only" in cpu_unavailable_reason(torch.device("cuda"), torch.float32)


@needs_library
def test_auto_picks_cpu_for_cpu_tensors_and_torch_for_float64():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert resolve_backend("auto", torch.device("cpu"), dtype).name == "cpu"
    assert resolve_backend("auto", torch.device("cpu"), torch.float64).name == "torch"
    assert "cpu" in zk.available_backends("cpu") and "cpu" not in zk.available_backends("cpu", torch.float64)


@needs_library
def test_float64_parameters_beside_fp32_ones_take_the_reference():
    """One optimizer, two sets: fp32 through the library, float64 through the torch reference."""
    shapes = [(5, 3), (40,)]
    params = [random_tensors(shapes[:1], torch.float32, "cpu", seed=1)[0],
              random_tensors(shapes[1:], torch.float64, "cpu", seed=2)[0]]
    initial = [p.clone() for p in params]
    opt = ZOPrO(params, lr=0.0, eps=1.0, seed=4, backend="auto")
    seen = []
    opt.step(lambda: seen.append([p.clone() for p in params]) or 0.0)
    assert [b.name for b in opt._engine.backends] == ["cpu", "torch"]
    z = reference_direction(step_seed(4, 0), starts_of(shapes), [torch.Size(s) for s in shapes], None, None,
                            0.0, "tensor")
    assert (seen[0][0].double() - initial[0].double() - z[0]).abs().max() < 1e-5
    assert (seen[0][1] - initial[1] - z[1]).abs().max() < 1e-12  # float64, computed in float64


# ---- noise -----------------------------------------------------------------------------------


def test_philox_words_bit_for_bit(lib):
    counters = torch.arange(64, dtype=torch.int64) * 7919 + (1 << 33)
    out = torch.zeros(64 * 4, dtype=torch.int32)
    assert lib.zopro_cpu_philox(out.data_ptr(), SEED, counters.data_ptr(), 64) == 0
    expected = torch.stack(philox4x32(SEED, counters), dim=1).reshape(-1)
    assert torch.equal(out.to(torch.int64) & 0xFFFFFFFF, expected)
    zero = torch.zeros(1, dtype=torch.int64)
    assert lib.zopro_cpu_philox(out.data_ptr(), 0, zero.data_ptr(), 1) == 0
    assert [w & 0xFFFFFFFF for w in out[:4].tolist()] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


# (4 * 2**32 - 37, 300): counters whose low word wraps into the high one inside the range.
NOISE_RANGES = [(0, 1), (3, 1), (5, 4099), (2**33 + 7, 300), (4 * 2**32 - 37, 300), (0, 100_003)]


@pytest.mark.parametrize("isa", ISAS, indirect=True)
@pytest.mark.parametrize("start,numel", NOISE_RANGES, ids=str)
def test_noise_matches_float64_reference_on_every_isa(isa, start, numel):
    check_noise_against_reference("cpu", "cpu", SEED, start, numel)


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "scalar"], indirect=True)
def test_vector_isas_give_the_scalar_paths_bits(isa, lib):
    for start, numel in NOISE_RANGES:
        vector = zk.noise(SEED, start, numel, backend="cpu")
        lib.zopro_cpu_set_isa(b"scalar")
        scalar = zk.noise(SEED, start, numel, backend="cpu")
        lib.zopro_cpu_set_isa(isa.encode())
        assert torch.equal(vector, scalar), (start, numel)


@needs_library
def test_noise_is_independent_of_range_start_and_threads(threads):
    check_noise_independent_of_range_start("cpu", "cpu", SEED, [(1, 1), (2, 7), (1023, 900), (2047, 953), (0, 0)])
    values = []
    for n in (1, 2, 3):
        threads(n)
        values.append(zk.noise(SEED, 12345, 300_001, backend="cpu"))
    assert all(torch.equal(v, values[0]) for v in values)


@needs_library
def test_noise_statistics_of_the_library():
    n = zk.noise(SEED, 0, 400_000, backend="cpu").double()
    assert abs(n.mean()) < 5 / 400_000**0.5 and abs(n.var() - 1) < 5 * (2 / 400_000) ** 0.5


# ---- passes against the float64 reference ----------------------------------------------------


@pytest.fixture
def cpu_target(lib):
    return "cpu", "cpu"


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize("shapes", ["one", "odd", "edges"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_perturb_and_update_match_reference(cpu_target, dtype, shapes, granularity, block, monkeypatch):
    monkeypatch.setenv("ZOPRO_CPU_BLOCK", block)
    shapes = EDGE_SHAPES if shapes == "edges" else SHAPES[shapes]
    check_step_against_reference(*cpu_target, DTYPES[dtype], shapes, granularity)


@pytest.mark.parametrize("direction_norm", ["policy_delta", "noise"])
@pytest.mark.parametrize("kind", ["none", "reward", "policy", "zeros"])
@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_guidance_variants_match_reference(cpu_target, kind, granularity, direction_norm):
    check_guidance_variant(*cpu_target, EDGE_SHAPES, granularity, kind, direction_norm)


@pytest.mark.parametrize("shapes", ["odd", "edges"])
def test_bf16_guidance_storage_matches_reference_of_rounded_guidance(cpu_target, shapes):
    check_bf16_guidance(*cpu_target, EDGE_SHAPES if shapes == "edges" else SHAPES[shapes])


def test_unguided_direction_is_exactly_the_noise(cpu_target):
    shapes = SHAPES["odd"] + EDGE_SHAPES
    _, seen, _, _ = captured_step(*cpu_target, torch.float32, shapes, kind="none", eps=1.0, init_scale=0.0)
    for t, start in enumerate(starts_of(shapes)):
        n = zk.noise(step_seed(11, 0), start, seen[0][t].numel(), backend="cpu")
        assert torch.equal(seen[0][t].reshape(-1), n)


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_many_tiny_tensors_beside_a_large_one(cpu_target, dtype, block, monkeypatch):
    monkeypatch.setenv("ZOPRO_CPU_BLOCK", block)
    shapes = SHAPES["many-tiny"]
    initial, seen, _, z = captured_step(*cpu_target, DTYPES[dtype], shapes, eps=1e-2)
    for t, theta0 in enumerate(initial):
        assert_dtype_close(seen[0][t], theta0.double() + 1e-2 * z[t], DTYPES[dtype])


def _optimizer_set(shapes, dtype=torch.float32, guidance_dtype=torch.float32):
    params = [torch.zeros(s, dtype=dtype) for s in shapes]
    opt = ZOPrO(params, lr=1e-3, eps=1e-2, seed=3, alpha=0.5, backend="cpu", guidance_dtype=guidance_dtype)
    dpi, dr = guidance(shapes, "both", "cpu")
    opt.set_guidance(policy_delta=dpi, reward_delta=dr)
    engine = opt._ensure_engine()
    return params, engine.sets[0], engine.backends[0], dr


@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("shapes", ["odd", "edges", "many-tiny"])
def test_reduce_statistics_match_reference(cpu_target, shapes, block, monkeypatch):
    """The reduce pass and the update's fused next-seed reduce: per-tensor (Σn², Σn·ΔR)."""
    monkeypatch.setenv("ZOPRO_CPU_BLOCK", block)
    shapes = EDGE_SHAPES if shapes == "edges" else SHAPES[shapes]
    _, pset, kernel, dr = _optimizer_set(shapes)
    seed, next_seed = 77, 78
    reduced = kernel.zo_pass(pset, seed=seed, coefs=None, write_master=False, use_policy=False, reduce_seed=seed)
    coefs = torch.zeros(len(pset), 5)
    coefs[:, 4] = 1.0  # keep θ: the pass only reduces the next seed's noise
    fused = kernel.zo_pass(pset, seed=seed, coefs=coefs, write_master=True, use_policy=True, reduce_seed=next_seed)
    assert reduced.dtype == fused.dtype == torch.float64
    for got, s in ((reduced, seed), (fused, next_seed)):
        for t, (shape, start) in enumerate(zip(shapes, starts_of(shapes))):
            n = reference_noise(s, start, int(torch.Size(shape).numel()), dtype=torch.float64)
            r = dr[t].double().reshape(-1)
            expected = torch.stack(((n * n).sum(), (n * r).sum()))
            scale = torch.stack(((n * n).sum(), (n.abs() * r.abs()).sum()))
            assert ((got[t] - expected).abs() <= 1e-5 * scale + 1e-6).all(), t


# ---- determinism: threads, ISAs, repeats ------------------------------------------------------

# 2.7 M values (threads take rows dynamically: enough work that every thread takes some), non-block
# sizes, tiny tensors among them.
LARGE_SHAPES = [(1000, 2111), (7,), (500_001,), (1000, 33), (2,)] + [(3,)] * 50 + [(65_537,)]


def _pass_outputs(shapes, dtype, guidance_dtype=torch.float32):
    """Weights, master and both reduces of a perturb+reduce pass and a fused update pass."""
    params, pset, kernel, _ = _optimizer_set(shapes, dtype, guidance_dtype)
    for p in params:
        p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    pset.sync_from_model()
    coefs = torch.tensor([[0.3, 0.7, -0.2, 1e-2, 1.0]] * len(pset), dtype=torch.float64)
    reduced = kernel.zo_pass(pset, seed=5, coefs=None, write_master=False, use_policy=False, reduce_seed=5)
    kernel.zo_pass(pset, seed=5, coefs=coefs, write_master=False, use_policy=True, reduce_seed=None)
    perturbed = [p.clone() for p in params]
    fused = kernel.zo_pass(pset, seed=5, coefs=coefs, write_master=True, use_policy=True, reduce_seed=6)
    return [reduced, fused, pset.master.clone()] + perturbed + [p.clone() for p in params]


def _identical(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_results_bit_identical_for_1_2_3_and_4_threads(cpu_target, threads, dtype):
    runs = []
    for n in (1, 2, 3, 4):
        threads(n)
        runs.append(_pass_outputs(LARGE_SHAPES, DTYPES[dtype]))
    assert all(_identical(run, runs[0]) for run in runs[1:])


@pytest.mark.parametrize("isa", [i for i in ISAS if i != "scalar"], indirect=True)
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_results_bit_identical_across_isas(isa, lib, dtype):
    shapes = SHAPES["odd"] + EDGE_SHAPES
    vector = _pass_outputs(shapes, DTYPES[dtype], torch.bfloat16)
    lib.zopro_cpu_set_isa(b"scalar")
    scalar = _pass_outputs(shapes, DTYPES[dtype], torch.bfloat16)
    lib.zopro_cpu_set_isa(isa.encode())
    assert _identical(vector, scalar)


def test_flush_denormal_applies_to_every_thread(cpu_target, threads):
    """torch.set_flush_denormal(True) on the caller: worker threads compute with the same MXCSR."""
    shapes = [(2048, 4096)]  # 8 M values: the worker threads take rows too
    threads(2)
    _pass_outputs(shapes, torch.float32)  # the OpenMP workers exist before the flag is set
    if not torch.set_flush_denormal(True):
        pytest.skip("no flush-denormal control on this CPU")
    try:
        runs = []
        for n in (1, 2):
            threads(n)
            params, pset, kernel, _ = _optimizer_set(shapes)
            pset.master.view(torch.int32).fill_(0x000B0000)  # a denormal (bits, no FP op): 0 under DAZ
            coefs = torch.tensor([[0.0, 0.0, 0.0, 1.0, 1.0]] * len(pset), dtype=torch.float64)  # θ ← master
            kernel.zo_pass(pset, seed=5, coefs=coefs, write_master=False, use_policy=False, reduce_seed=None)
            runs.append([p.clone() for p in params])
        assert _identical(runs[0], runs[1])
        assert all(torch.equal(p, torch.zeros_like(p)) for p in runs[0])
    finally:
        torch.set_flush_denormal(False)


def test_passes_are_deterministic(cpu_target):
    runs = []
    for _ in range(2):
        _, seen, losses, _ = captured_step(*cpu_target, torch.bfloat16, SHAPES["many-tiny"], lr=1e-3)
        runs.append((seen, losses))
    assert runs[0][1] == runs[1][1]
    for a, b in zip(runs[0][0], runs[1][0]):
        assert _identical(a, b)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_weights_restored_bit_for_bit_after_1000_cycles(cpu_target, dtype):
    shapes = SHAPES["odd"] + EDGE_SHAPES
    params = [torch.randn(s, generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype]) for s in shapes]
    opt = ZOPrO(params, lr=0.0, eps=1e-3, alpha=0.5, backend="cpu")
    check_restored_after_cycles(params, opt, shapes, 1000)


def test_optimizer_end_to_end_matches_torch_backend(cpu_target):
    """A small model trained 30 guided steps with each backend: same trajectory to fp32 rounding."""
    results = {}
    for name in ("cpu", "torch"):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
        x = torch.randn(256, 8)
        y = x[:, :1] * 2 - x[:, 1:2]
        opt = ZOPrO(model.named_parameters(), lr=1e-2, eps=1e-3, seed=0, alpha="linear",
                    steps_per_iteration=30, backend=name)
        opt.set_guidance(policy_delta={n: 0.1 * torch.ones_like(p) for n, p in model.named_parameters()},
                         reward_delta={n: torch.randn_like(p) for n, p in model.named_parameters()})
        losses = [float(opt.step(lambda: torch.nn.functional.mse_loss(model(x), y))) for _ in range(30)]
        results[name] = (losses, [p.detach().double() for p in model.parameters()])
    (cpu_losses, cpu_weights), (ref_losses, ref_weights) = results["cpu"], results["torch"]
    assert cpu_losses == pytest.approx(ref_losses, rel=1e-3, abs=1e-5)
    for a, b in zip(cpu_weights, ref_weights):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())


# ---- the torch.library ops' CPU kernels --------------------------------------------------------


def _op_args(dtype=torch.bfloat16):
    params = [torch.randn(s).to(dtype) for s in ((3, 5), (64,), (1000,))]
    pset = ZOPrO(params, backend="torch")._ensure_engine().sets[0]
    tables = pset.kernel_tables(256)
    reward = torch.randn(pset.numel)
    coefs = torch.tensor([[0.0, 1.0, 0.5, 1e-2, 1.0]] * 3)
    flags = native.APPLY | native.HAS_MASTER | native.WRITE_MASTER | native.HAS_REWARD | native.REDUCE
    return (pset.params, tables["chunks"], tables["tensor_starts"], tables["tensor_arena_shifts"], coefs,
            pset.master, None, reward, 5, 6, flags, 256), pset, tables


def test_ops_cpu_kernels_run_this_library(lib):
    from zopro_kernels.backends import ops
    from zopro_kernels.backends.chunked import sum_chunk_partials

    args, pset, tables = _op_args()
    partials = torch.ops.zopro.zo_pass_(*args)
    assert partials.shape == (tables["chunks"].shape[0], 2)
    n = reference_noise(6, 0, pset.numel, dtype=torch.float64)
    sums = sum_chunk_partials(partials, tables).double()
    for t, (lo, hi) in enumerate(pset.local_range(i) for i in range(len(pset))):
        assert abs(sums[t, 0] - (n[lo:hi] ** 2).sum()) <= 1e-5 * (n[lo:hi] ** 2).sum()
    assert torch.equal(torch.ops.zopro.noise(SEED, 5, 1001, torch.device("cpu")), zk.noise(SEED, 5, 1001, backend="cpu"))
    assert ops.cpu_noise(SEED, 5, 3).shape == (3,)


def test_opcheck(lib):
    args, _, _ = _op_args()
    torch.library.opcheck(torch.ops.zopro.zo_pass_.default, args)
    torch.library.opcheck(torch.ops.zopro.noise.default, (SEED, 5, 1001, torch.device("cpu")))


def test_torch_compile_calls_the_op(lib):
    """fullgraph torch.compile of the mutating op: same partials and the same written tensors."""
    args, _, _ = _op_args()
    eager_params = [p.clone() for p in args[0]]
    eager_args = (eager_params,) + tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args[1:])
    expected = torch.ops.zopro.zo_pass_(*eager_args)
    compiled = torch.compile(lambda *a: torch.ops.zopro.zo_pass_(*a), fullgraph=True)
    got = compiled(*args)
    assert torch.equal(got, expected)
    assert all(torch.equal(p, q) for p, q in zip(args[0], eager_params))


def test_import_loads_no_library():
    """Importing the package and the backends opens no native library (first use does)."""
    code = (
        "import ctypes\n"
        "real = ctypes.CDLL\n"
        "def spy(name, *a, **k):\n"
        "    assert 'zopro' not in str(name), name\n"
        "    return real(name, *a, **k)\n"
        "ctypes.CDLL = spy\n"
        "import zopro_kernels, zopro_kernels.backends.cpu_backend, zopro_kernels.backends.ops\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
