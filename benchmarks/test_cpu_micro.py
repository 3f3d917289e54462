"""CPU micro-benchmarks (pytest-benchmark): python -m pytest benchmarks --benchmark-only"""

import pytest
import torch

from zopro_kernels import ZOPrO, noise

pytest.importorskip("pytest_benchmark")


def test_reference_noise_1m(benchmark):
    values = benchmark(noise, 1234, 0, 1 << 20, backend="torch")
    assert values.shape == (1 << 20,)


@pytest.mark.parametrize("guided", [False, True], ids=["mezo-mode", "zopro"])
def test_torch_backend_step_lora_like(benchmark, guided):
    params = [torch.randn(64, 256) * 0.01 for _ in range(8)] + [torch.randn(256, 64) * 0.01 for _ in range(8)]
    opt = ZOPrO(params, lr=1e-4, eps=1e-3, alpha=0.5, backend="torch")
    if guided:
        opt.set_guidance(policy_delta=[torch.randn_like(p) for p in params],
                         reward_delta=[torch.randn_like(p) for p in params])
    benchmark(opt.step, lambda: 0.0)
