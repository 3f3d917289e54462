"""Build entry point. The package is pure Python, plus the native libraries of csrc/ (C ABIs
without libtorch, placed in ``zopro_kernels/_lib/``), each built by CMake + Ninja where it can be:

- ``libzopro_cpu.so`` (the ``cpu`` backend) where a C++ compiler is found ($CXX, c++, g++,
  clang++); ``ZOPRO_SKIP_CPU_BUILD=1`` skips it. A failed build is reported and leaves the
  install without it (the ``torch`` backend then runs CPU tensors).
- ``libzopro_csrc.so`` (the ``cuda`` backend) where nvcc is found; ``ZOPRO_SKIP_CUDA_BUILD=1``
  skips it. ``ZOPRO_CUDA_ARCHS`` overrides the architectures (default ``80-real;86-real;89-real;90``:
  SASS for 80/86/89/90 and PTX for 90).

Neither built gives a pure-Python install (the ``triton`` and ``torch`` backends). An editable
install (``pip install -e .``) builds them in place, next to the sources.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CUDA_LIBRARY, CPU_LIBRARY = "libzopro_csrc.so", "libzopro_cpu.so"
EXTENSION = "zopro_kernels._lib.libzopro_csrc"
CPU_EXTENSION = "zopro_kernels._lib.libzopro_cpu"
LIBRARIES = {EXTENSION: CUDA_LIBRARY, CPU_EXTENSION: CPU_LIBRARY}


def find_nvcc() -> str | None:
    """nvcc from $CUDACXX, PATH, or $CUDA_HOME/bin (only an explicitly set CUDA_HOME)."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc")):
        if candidate and Path(candidate).is_file():
            return candidate
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return str(Path(cuda_home) / "bin" / "nvcc")
    return None


def find_cxx() -> str | None:
    """The C++ compiler: $CXX, else c++, g++ or clang++ from PATH."""
    explicit = os.environ.get("CXX")
    if explicit:
        return shutil.which(explicit) or (explicit if Path(explicit).is_file() else None)
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def find_tool(name: str) -> str | None:
    """cmake/ninja from PATH or from their Python packages, if installed in this environment."""
    found = shutil.which(name)
    if found:
        return found
    try:
        module = __import__(name)
        return str(Path(module.BIN_DIR) / name)
    except (ImportError, AttributeError):
        return None


def _with_cmake(tools: dict, what: str) -> tuple[dict | None, str]:
    tools = dict(tools, cmake=find_tool("cmake"), ninja=find_tool("ninja"))
    missing = [name for name in ("cmake", "ninja") if tools[name] is None]
    if missing:
        return None, f"{what} found but {' and '.join(missing)} not (pip install cmake ninja)"
    return tools, what


def cuda_build_plan() -> tuple[dict | None, str]:
    """(tools, why) for the CUDA build; tools is None when it is not built."""
    if os.environ.get("ZOPRO_SKIP_CUDA_BUILD") == "1":
        return None, "ZOPRO_SKIP_CUDA_BUILD=1"
    if sys.platform != "linux":
        return None, f"the CUDA library is built on Linux only (platform {sys.platform})"
    nvcc = find_nvcc()
    if nvcc is None:
        return None, "nvcc not found (PATH, CUDACXX, CUDA_HOME)"
    return _with_cmake({"nvcc": nvcc}, f"nvcc at {nvcc}")


def cpu_build_plan() -> tuple[dict | None, str]:
    """(tools, why) for the CPU build; tools is None when it is not built."""
    if os.environ.get("ZOPRO_SKIP_CPU_BUILD") == "1":
        return None, "ZOPRO_SKIP_CPU_BUILD=1"
    if sys.platform != "linux":
        return None, f"the CPU library is built on Linux only (platform {sys.platform})"
    cxx = find_cxx()
    if cxx is None:
        return None, "no C++ compiler found ($CXX, c++, g++, clang++)"
    return _with_cmake({"cxx": cxx}, f"C++ compiler {cxx}")


class CMakeExtension(Extension):
    def __init__(self, name: str, kind: str, tools: dict):
        super().__init__(name, sources=[])
        self.kind, self.tools = kind, tools  # kind: "cpu" or "cuda"


class BuildCMake(build_ext):
    """Builds each library with CMake + Ninja (only its own target) into zopro_kernels/_lib/."""

    def get_ext_filename(self, fullname):
        # Called with the dotted name and with its last part: no Python ABI suffix for a C library.
        for extension, library in LIBRARIES.items():
            if fullname in (extension, extension.rsplit(".", 1)[1]):
                return os.path.join(*fullname.split(".")[:-1], library)
        return super().get_ext_filename(fullname)

    def copy_extensions_to_source(self):
        # Editable installs copy the libraries next to the sources: zopro_kernels/_lib/ may not exist.
        package_dir = self.get_finalized_command("build_py").get_package_dir(EXTENSION.rsplit(".", 1)[0])
        (ROOT / package_dir).mkdir(parents=True, exist_ok=True)
        super().copy_extensions_to_source()

    def build_extensions(self):
        built = []
        for ext in self.extensions:
            try:
                self.build_extension(ext)
            except (subprocess.CalledProcessError, OSError) as err:
                if getattr(ext, "kind", None) != "cpu":
                    raise
                # Optional: the install goes on without it and backend="cpu" says it was not built.
                print(f"zopro-kernels: WARNING: the CPU library {CPU_LIBRARY} failed to build ({err}); "
                      "the install has no 'cpu' backend (CPU tensors use the 'torch' backend)", file=sys.stderr)
                continue
            built.append(ext)
        self.extensions[:] = built

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        tools = ext.tools
        library = LIBRARIES[ext.name]
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        with tempfile.TemporaryDirectory(prefix="zopro-cmake-") as build:
            configure = [
                tools["cmake"], "-S", str(ROOT), "-B", build, "-G", "Ninja",
                f"-DCMAKE_MAKE_PROGRAM={tools['ninja']}",
                "-DCMAKE_BUILD_TYPE=Release",
                f"-DZOPRO_BUILD_CPU={'ON' if ext.kind == 'cpu' else 'OFF'}",
                f"-DZOPRO_BUILD_CUDA={'ON' if ext.kind == 'cuda' else 'OFF'}",
            ]
            if ext.kind == "cuda":
                configure.append(f"-DCMAKE_CUDA_COMPILER={tools['nvcc']}")
            else:
                configure.append(f"-DCMAKE_CXX_COMPILER={tools['cxx']}")
            self.announce(f"zopro-kernels: building {library} ({' '.join(configure)})", level=3)
            subprocess.run(configure, check=True)
            subprocess.run([tools["cmake"], "--build", build], check=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(build) / library, target)
            os.chmod(target, 0o755)


ext_modules = []
for kind, extension, plan in (("cpu", CPU_EXTENSION, cpu_build_plan), ("cuda", EXTENSION, cuda_build_plan)):
    tools, why = plan()
    library = LIBRARIES[extension]
    if tools is None:
        print(f"zopro-kernels: {library} not built: {why}", file=sys.stderr)
    else:
        print(f"zopro-kernels: building {library} of csrc/ ({why})", file=sys.stderr)
        ext_modules.append(CMakeExtension(extension, kind, tools))
if not ext_modules:
    print("zopro-kernels: pure-Python install", file=sys.stderr)

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildCMake})
