"""Build entry point. The package is pure Python, plus the CUDA library of csrc/
(``zopro_kernels/_lib/libzopro_csrc.so``, a C ABI without libtorch) built by CMake + Ninja when
nvcc is found. No nvcc, or ``ZOPRO_SKIP_CUDA_BUILD=1``, gives a pure-Python install (the
``triton`` and ``torch`` backends). ``ZOPRO_CUDA_ARCHS`` overrides the architectures
(default ``80-real;86-real;89-real;90``: SASS for 80/86/89/90 and PTX for 90).
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
LIBRARY = "libzopro_csrc.so"
EXTENSION = "zopro_kernels._lib.libzopro_csrc"


def find_nvcc() -> str | None:
    """nvcc from $CUDACXX, PATH, or $CUDA_HOME/bin (only an explicitly set CUDA_HOME)."""
    for candidate in (os.environ.get("CUDACXX"), shutil.which("nvcc")):
        if candidate and Path(candidate).is_file():
            return candidate
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and (Path(cuda_home) / "bin" / "nvcc").is_file():
        return str(Path(cuda_home) / "bin" / "nvcc")
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


def cuda_build_plan() -> tuple[dict | None, str]:
    """(tools, why) for the CUDA build; tools is None when the install stays pure Python."""
    if os.environ.get("ZOPRO_SKIP_CUDA_BUILD") == "1":
        return None, "ZOPRO_SKIP_CUDA_BUILD=1"
    if sys.platform != "linux":
        return None, f"the CUDA library is built on Linux only (platform {sys.platform})"
    nvcc = find_nvcc()
    if nvcc is None:
        return None, "nvcc not found (PATH, CUDACXX, CUDA_HOME)"
    tools = {"nvcc": nvcc, "cmake": find_tool("cmake"), "ninja": find_tool("ninja")}
    missing = [name for name in ("cmake", "ninja") if tools[name] is None]
    if missing:
        return None, f"nvcc found but {' and '.join(missing)} not (pip install cmake ninja)"
    return tools, f"nvcc at {nvcc}"


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class BuildCMake(build_ext):
    """Builds libzopro_csrc.so with CMake + Ninja and places it at zopro_kernels/_lib/."""

    def get_ext_filename(self, fullname):
        # Called with the dotted name and with its last part: no Python ABI suffix for a C library.
        parts = fullname.split(".")
        if fullname == EXTENSION or fullname == EXTENSION.rsplit(".", 1)[1]:
            return os.path.join(*parts[:-1], LIBRARY)
        return super().get_ext_filename(fullname)

    def copy_extensions_to_source(self):
        # Editable installs copy the library next to the sources: zopro_kernels/_lib/ may not exist.
        package_dir = self.get_finalized_command("build_py").get_package_dir(EXTENSION.rsplit(".", 1)[0])
        (ROOT / package_dir).mkdir(parents=True, exist_ok=True)
        super().copy_extensions_to_source()

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        tools, _ = cuda_build_plan()
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        with tempfile.TemporaryDirectory(prefix="zopro-cmake-") as build:
            configure = [
                tools["cmake"], "-S", str(ROOT), "-B", build, "-G", "Ninja",
                f"-DCMAKE_MAKE_PROGRAM={tools['ninja']}",
                f"-DCMAKE_CUDA_COMPILER={tools['nvcc']}",
                "-DCMAKE_BUILD_TYPE=Release",
            ]
            self.announce(f"zopro-kernels: building {LIBRARY} ({' '.join(configure)})", level=3)
            subprocess.run(configure, check=True)
            subprocess.run([tools["cmake"], "--build", build], check=True)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(build) / LIBRARY, target)
            os.chmod(target, 0o755)


tools, why = cuda_build_plan()
if tools is None:
    print(f"zopro-kernels: pure-Python install, CUDA library not built: {why}", file=sys.stderr)
    ext_modules = []
else:
    print(f"zopro-kernels: building the CUDA library of csrc/ ({why})", file=sys.stderr)
    ext_modules = [CMakeExtension(EXTENSION)]

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildCMake})
