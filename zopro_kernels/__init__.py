"""zopro-kernels: zeroth-order preference optimisation (ZOPrO) with fused perturbation passes."""

from .backends import available_backends
from .noise import noise
from .optimizer import ZOPrO
from .seeds import step_seed

__version__ = "0.1.0"
__all__ = ["ZOPrO", "noise", "step_seed", "available_backends", "__version__"]
