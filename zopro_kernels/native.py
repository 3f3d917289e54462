"""The native library of csrc/ (``libzopro_csrc.so``), loaded lazily with ctypes.

Nothing here runs at import: the library is opened on the first ``load()`` and its ABI version
checked against ``ABI_VERSION``. The library links no libtorch and its CUDA runtime statically,
so it opens on any machine (also without a GPU); its kernels need a CUDA device and driver.

Where it is looked for: ``$ZOPRO_CSRC_LIBRARY`` if set (a development build, e.g.
``build/libzopro_csrc.so``), else ``zopro_kernels/_lib/libzopro_csrc.so`` (placed there by
``pip install .`` when nvcc was found at install time).
"""

from __future__ import annotations

import ctypes
import os
import threading
from pathlib import Path

ABI_VERSION = 2  # csrc/zopro.h ZOPRO_ABI_VERSION
LIBRARY_NAME = "libzopro_csrc.so"
LIBRARY_ENV = "ZOPRO_CSRC_LIBRARY"

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


class NativeLibraryError(RuntimeError):
    """The native library is missing, cannot be opened, or has another ABI version."""


_lock = threading.Lock()
_cache: dict[str, object] = {}  # path -> ctypes.CDLL or NativeLibraryError


def library_path() -> Path:
    override = os.environ.get(LIBRARY_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parent / "_lib" / LIBRARY_NAME


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


def _open(path: Path) -> ctypes.CDLL:
    if not path.is_file():
        where = f"{LIBRARY_ENV}={path}" if os.environ.get(LIBRARY_ENV) else str(path)
        raise NativeLibraryError(f"the CUDA library {LIBRARY_NAME} was not built (not found at {where}); {BUILD_HINT}")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as err:
        raise NativeLibraryError(f"the CUDA library {path} cannot be opened ({err}); {BUILD_HINT}") from None
    try:
        version_fn = lib.zopro_abi_version
    except AttributeError:
        raise NativeLibraryError(f"{path} is not a zopro-kernels library (no zopro_abi_version); {BUILD_HINT}") from None
    version_fn.restype, version_fn.argtypes = _i32, []
    version = version_fn()
    if version != ABI_VERSION:
        raise NativeLibraryError(
            f"{path} has C ABI version {version}, this Python package expects {ABI_VERSION} "
            f"(a stale build: rebuild it; {BUILD_HINT})"
        )
    for name, (restype, argtypes) in _SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise NativeLibraryError(f"{path} lacks the entry point {name} (a stale build?); {BUILD_HINT}") from None
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def load(path: str | os.PathLike | None = None) -> ctypes.CDLL:
    """The opened library (cached per path); raises ``NativeLibraryError`` saying why not."""
    path = Path(path) if path is not None else library_path()
    key = str(path)
    with _lock:
        if key not in _cache:
            try:
                _cache[key] = _open(path)
            except NativeLibraryError as err:
                _cache[key] = err
        found = _cache[key]
    if isinstance(found, NativeLibraryError):
        raise found
    return found


def clear_cache():
    """Forget opened libraries and failures (tests; after building the library in-process)."""
    with _lock:
        _cache.clear()


def unavailable_reason(path=None) -> str | None:
    try:
        load(path)
    except NativeLibraryError as err:
        return str(err)
    return None


def check(code: int, what: str, lib=None):
    if code != 0:
        lib = lib or load()
        message = lib.zopro_error_string(code).decode()
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
