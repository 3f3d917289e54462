"""The native libraries of csrc/, loaded lazily with ctypes (one mechanism for both).

- ``libzopro_csrc.so``: the CUDA passes (csrc/*.cu). It links no libtorch and its CUDA runtime
  statically, so it opens on any machine (also without a GPU); its kernels need a CUDA device.
- ``libzopro_cpu.so``: the CPU passes (csrc/cpu/): threaded (OpenMP), AVX-512/AVX2/scalar
  chosen at run time (``$ZOPRO_CPU_ISA`` forces one of those the CPU has).

Nothing here runs at import: a library is opened on its first ``load()``/``load_cpu()`` and its
ABI version checked. Where each is looked for: ``$ZOPRO_CSRC_LIBRARY`` / ``$ZOPRO_CPU_LIBRARY`` if
set (a development build, e.g. ``build/libzopro_cpu.so``), else ``zopro_kernels/_lib/`` (placed
there by ``pip install .``: the CUDA one when nvcc was found, the CPU one when a C++ compiler was).
"""

from __future__ import annotations

import ctypes
import os
import threading
from dataclasses import dataclass
from pathlib import Path

ABI_VERSION = 2  # csrc/zopro.h ZOPRO_ABI_VERSION
LIBRARY_NAME = "libzopro_csrc.so"
LIBRARY_ENV = "ZOPRO_CSRC_LIBRARY"
CPU_ABI_VERSION = 1  # csrc/cpu/zopro_cpu.h ZOPRO_CPU_ABI_VERSION
CPU_LIBRARY_NAME = "libzopro_cpu.so"
CPU_LIBRARY_ENV = "ZOPRO_CPU_LIBRARY"
CPU_ISA_ENV = "ZOPRO_CPU_ISA"

# csrc/zopro.h: model dtypes and pass flags.
FLOAT32, BFLOAT16, FLOAT16 = 0, 1, 2
APPLY, HAS_MASTER, WRITE_MASTER, HAS_POLICY = 1, 2, 4, 8
HAS_REWARD, REDUCE, REDUCE_SAME_SEED, ALIGNED = 16, 32, 64, 128
GUIDANCE_BF16 = 256

BUILD_HINT = (
    "build it by reinstalling with nvcc on PATH (pip install . ; ZOPRO_SKIP_CUDA_BUILD must not "
    "be 1, and cmake + ninja must be available), or build it in place with "
    "`cmake -S . -B build -G Ninja && cmake --build build` and set "
    f"{LIBRARY_ENV}=build/{LIBRARY_NAME}"
)
CPU_BUILD_HINT = (
    "build it by reinstalling with a C++ compiler on PATH (pip install . ; ZOPRO_SKIP_CPU_BUILD "
    "must not be 1, and cmake + ninja must be available), or build it in place with "
    "`cmake -S . -B build -G Ninja && cmake --build build` and set "
    f"{CPU_LIBRARY_ENV}=build/{CPU_LIBRARY_NAME}"
)


class NativeLibraryError(RuntimeError):
    """The native library is missing, cannot be opened, or has another ABI version."""


_lock = threading.Lock()
_cache: dict[tuple[str, str], object] = {}  # (library, path) -> ctypes.CDLL or NativeLibraryError

_i32, _i64, _u64, _ptr = ctypes.c_int32, ctypes.c_int64, ctypes.c_uint64, ctypes.c_void_p
_SIGNATURES = {
    "zopro_abi_version": (_i32, []),
    "zopro_cuda_archs": (ctypes.c_char_p, []),
    "zopro_error_string": (ctypes.c_char_p, [_i32]),
    "zopro_check_device": (_i32, [_i32]),
    "zopro_zo_pass": (
        _i32,
        [_i32, _ptr, _i64, _i32, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _u64, _u64, _i32, _i32, _ptr],
    ),
    "zopro_noise": (_i32, [_ptr, _u64, _i64, _i64, _i32, _ptr]),
    "zopro_zo_pass_host": (
        _i32,
        [_i32, _ptr, _i64, _i32, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _u64, _u64, _i32],
    ),
    "zopro_noise_host": (_i32, [_ptr, _u64, _i64, _i64]),
    "zopro_philox_host": (_i32, [_ptr, _u64, _ptr, _i64]),
}
_CPU_SIGNATURES = {
    "zopro_cpu_abi_version": (_i32, []),
    "zopro_cpu_error_string": (ctypes.c_char_p, [_i32]),
    "zopro_cpu_isa": (ctypes.c_char_p, []),
    "zopro_cpu_isas": (ctypes.c_char_p, []),
    "zopro_cpu_set_isa": (_i32, [ctypes.c_char_p]),
    "zopro_cpu_max_threads": (_i32, []),
    "zopro_cpu_zo_pass": (
        _i32,
        [_i32, _ptr, _i64, _i32, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _u64, _u64,
         _i32, _i32],
    ),
    "zopro_cpu_noise": (_i32, [_ptr, _u64, _i64, _i64, _i32]),
    "zopro_cpu_philox": (_i32, [_ptr, _u64, _ptr, _i64]),
}


@dataclass(frozen=True)
class _Library:
    what: str  # "CUDA library" / "CPU library"
    name: str
    env: str
    version_symbol: str
    version: int
    signatures: dict
    hint: str


_CUDA = _Library("CUDA library", LIBRARY_NAME, LIBRARY_ENV, "zopro_abi_version", ABI_VERSION, _SIGNATURES,
                 BUILD_HINT)
_CPU = _Library("CPU library", CPU_LIBRARY_NAME, CPU_LIBRARY_ENV, "zopro_cpu_abi_version", CPU_ABI_VERSION,
                _CPU_SIGNATURES, CPU_BUILD_HINT)


def _path(spec: _Library) -> Path:
    override = os.environ.get(spec.env)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent / "_lib" / spec.name


def library_path() -> Path:
    return _path(_CUDA)


def cpu_library_path() -> Path:
    return _path(_CPU)


def _open(path: Path, spec: _Library = _CUDA) -> ctypes.CDLL:
    hint = spec.hint
    if not path.is_file():
        where = f"{spec.env}={path}" if os.environ.get(spec.env) else str(path)
        raise NativeLibraryError(f"the {spec.what} {spec.name} was not built (not found at {where}); {hint}")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise NativeLibraryError(f"the {spec.what} {path} cannot be opened ({err}); {hint}") from None
    try:
        version_fn = getattr(lib, spec.version_symbol)
    except AttributeError:
        raise NativeLibraryError(
            f"{path} is not a zopro-kernels library (no {spec.version_symbol}, the {spec.what}'s); {hint}"
        ) from None
    version_fn.restype, version_fn.argtypes = _i32, []
    version = version_fn()
    if version != spec.version:
        raise NativeLibraryError(
            f"{path} has C ABI version {version}, this Python package expects {spec.version} "
            f"(a stale build: rebuild it; {hint})"
        )
    for name, (restype, argtypes) in spec.signatures.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise NativeLibraryError(f"{path} lacks the entry point {name} (a stale build?); {hint}") from None
        fn.restype, fn.argtypes = restype, argtypes
    if spec is _CPU:
        _choose_isa(lib, path)
    return lib


def _choose_isa(lib, path: Path):
    """Apply ``$ZOPRO_CPU_ISA`` (one of the ISAs this CPU runs: avx512, avx2, scalar)."""
    wanted = os.environ.get(CPU_ISA_ENV, "")
    if lib.zopro_cpu_set_isa(wanted.encode()) != 0:
        have = lib.zopro_cpu_isas().decode()
        raise NativeLibraryError(f"{CPU_ISA_ENV}={wanted!r}: not an ISA {path} can run on this CPU "
                                 f"(it can: {have})")


def _load(spec: _Library, path) -> ctypes.CDLL:
    path = Path(path) if path is not None else _path(spec)
    key = (spec.name, str(path))
    with _lock:
        if key not in _cache:
            try:
                _cache[key] = _open(path, spec)
            except NativeLibraryError as err:
                _cache[key] = err
        found = _cache[key]
    if isinstance(found, NativeLibraryError):
        raise found
    return found


def load(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """The opened CUDA library (cached per path); raises ``NativeLibraryError`` saying why not."""
    return _load(_CUDA, path)


def load_cpu(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """The opened CPU library (cached per path); raises ``NativeLibraryError`` saying why not."""
    return _load(_CPU, path)


def clear_cache():
    """Forget opened libraries and failures (tests; after building a library in-process)."""
    with _lock:
        _cache.clear()


def unavailable_reason(path=None) -> str | None:
    try:
        load(path)
    except NativeLibraryError as err:
        return str(err)
    return None


def cpu_unavailable_reason(path=None) -> str | None:
    try:
        load_cpu(path)
    except NativeLibraryError as err:
        return str(err)
    return None


def check(code: int, what: str, lib=None):
    if code != 0:
        lib = lib or load()
        message = lib.zopro_error_string(code).decode()
        raise RuntimeError(f"{what} failed: {message} (code {code})")


def check_cpu(code: int, what: str, lib=None):
    if code != 0:
        lib = lib or load_cpu()
        message = lib.zopro_cpu_error_string(code).decode()
        raise RuntimeError(f"{what} failed: {message} (code {code})")


def parse_archs(spec: str) -> tuple[set[tuple[int, int]], set[tuple[int, int]]]:
    """(SASS capabilities, PTX capabilities) of a CMake CUDA_ARCHITECTURES list ("80-real,90")."""
    sass, ptx = set(), set()
    for entry in spec.replace(";", ",").split(","):
        entry = entry.strip()
        if not entry:
            continue
        name, _, kind = entry.partition("-")
        digits = "".join(ch for ch in name if ch.isdigit())
        if not digits:
            continue
        number = int(digits)
        capability = (number // 10, number % 10)
        specific = name[-1:].isalpha()  # sm_90a / sm_100f: no forward compatibility
        if kind in ("", "real"):
            sass.add((capability, specific))
        if kind in ("", "virtual") and not specific:
            ptx.add(capability)
    plain_sass = {cap for cap, specific in sass if not specific}
    exact_sass = {cap for cap, _ in sass}
    return plain_sass | exact_sass, ptx


def arch_reason(capability: tuple[int, int], spec: str) -> str | None:
    """Why a build for ``spec`` has no image for a GPU of ``capability`` (None if it has one).

    SASS for sm_XY runs on sm_XZ with Z >= Y; PTX for compute_XY is JIT-compiled on any GPU >= XY.
    """
    sass, ptx = parse_archs(spec)
    major, minor = capability
    if any(m == major and n <= minor for m, n in sass) or any((m, n) <= capability for m, n in ptx):
        return None
    built = ", ".join(f"sm_{m}{n}" for m, n in sorted(sass)) or "none"
    virtual = ", ".join(f"compute_{m}{n}" for m, n in sorted(ptx)) or "none"
    return (
        f"the CUDA library was built without this GPU's architecture sm_{major}{minor} "
        f"(SASS: {built}; PTX: {virtual}); rebuild with ZOPRO_CUDA_ARCHS=\"{major}{minor}\" "
        "(pip install . or cmake), or add it to the list"
    )
