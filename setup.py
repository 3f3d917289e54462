"""Build entry point. The package is pure Python today; the CUDA library of csrc/ (built by CMake
+ Ninja when nvcc is present, skipped with ZOPRO_SKIP_CUDA_BUILD=1) hooks in here."""

from setuptools import setup

setup()
