"""Integrations with other libraries, imported on first use.

``from zopro_kernels.integrations import ZOTrainer, ZOTrainingArguments`` imports transformers
(and, through its Trainer, accelerate); ``import zopro_kernels`` and
``import zopro_kernels.integrations`` import neither.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "ZOTrainer": ".trainer",
    "ZOTrainingArguments": ".trainer",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
