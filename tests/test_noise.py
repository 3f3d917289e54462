import math

import pytest
import torch

import zopro_kernels as zk
from zopro_kernels.philox import philox4x32, reference_noise
from zopro_kernels.seeds import step_seed

from .helpers import check_noise_against_reference, check_noise_independent_of_range_start

SEED = 0x5EED_1234_ABCD


def test_philox_integers_match_triton_randint4x_bit_for_bit():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def kernel(out, seed, N: tl.constexpr):
        i = tl.arange(0, N)
        counters = i.to(tl.int64) * 7919 + (1 << 33)  # high counter word in use too
        a, b, c, d = tl.randint4x(seed, counters)
        tl.store(out + i * 4, a.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out + i * 4 + 1, b.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out + i * 4 + 2, c.to(tl.int64) & 0xFFFFFFFF)
        tl.store(out + i * 4 + 3, d.to(tl.int64) & 0xFFFFFFFF)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.zeros(64 * 4, dtype=torch.int64, device=device)
    kernel[(1,)](out, SEED, N=64)
    expected = torch.stack(philox4x32(SEED, torch.arange(64) * 7919 + (1 << 33)), dim=1)
    assert torch.equal(out.cpu(), expected.reshape(-1))


def test_philox_known_answer():
    # Random123's published known-answer vector for philox4x32-10 with counter 0, key 0.
    words = philox4x32(0, torch.zeros(1, dtype=torch.int64))
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@pytest.mark.parametrize("start,numel", [(0, 1), (3, 1), (5, 4099), (2**33 + 7, 300)], ids=str)
def test_backend_noise_matches_float64_reference(target, start, numel):
    check_noise_against_reference(*target, SEED, start, numel)


def test_noise_is_independent_of_range_start(target):
    check_noise_independent_of_range_start(*target, SEED, [(1, 1), (2, 7), (1023, 900), (2047, 953)])


def test_triton_noise_is_independent_of_block_size(kernel_target, monkeypatch):
    backend, device = kernel_target
    values = []
    for block in ("64", "2048"):
        monkeypatch.setenv("ZOPRO_TRITON_BLOCK", block)
        values.append(zk.noise(SEED, 37, 5000, device=device, backend=backend))
    assert torch.equal(values[0], values[1])


def test_noise_statistics():
    n = reference_noise(SEED, 0, 400_000, dtype=torch.float64)
    count = n.numel()
    assert abs(n.mean()) < 5 / math.sqrt(count)
    assert abs(n.var() - 1) < 5 * math.sqrt(2 / count)
    # Quantiles of N(0, 1): P(X < q) for a few q.
    for q, p in [(-1.96, 0.025), (-1.0, 0.158655), (0.0, 0.5), (1.0, 0.841345), (1.96, 0.975)]:
        frac = (n < q).double().mean().item()
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / count), q
    # Neighbouring indices (the four outputs of one Philox call among them) are uncorrelated.
    for lag in (1, 2, 3, 4, 5):
        corr = torch.corrcoef(torch.stack((n[:-lag], n[lag:])))[0, 1]
        assert abs(corr) < 5 / math.sqrt(count), lag
    other = reference_noise(SEED + 1, 0, count, dtype=torch.float64)
    assert abs(torch.corrcoef(torch.stack((n, other)))[0, 1]) < 5 / math.sqrt(count)


def test_step_seeds_are_deterministic_distinct_and_valid_keys():
    seeds = [step_seed(7, k) for k in range(1000)] + [step_seed(8, k) for k in range(1000)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2**63 for s in seeds)
    assert step_seed(7, 3) == step_seed(7, 3)
    assert step_seed(7, 3, sample=1) != step_seed(7, 3)


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(seed=-1, start=0, numel=3), ValueError),
        (dict(seed=2**63, start=0, numel=3), ValueError),
        (dict(seed=1.5, start=0, numel=3), TypeError),
        (dict(seed=True, start=0, numel=3), TypeError),
        (dict(seed=1, start=-2, numel=3), ValueError),
        (dict(seed=1, start=0, numel=-3), ValueError),
    ],
    ids=["negative-seed", "seed-too-big", "float-seed", "bool-seed", "negative-start", "negative-numel"],
)
def test_noise_rejects_bad_input(kwargs, error):
    with pytest.raises(error):
        zk.noise(**kwargs)


def test_noise_unknown_or_unavailable_backend_says_why():
    with pytest.raises(ValueError, match="backend must be one of"):
        zk.noise(1, 0, 3, backend="jax")
    with pytest.raises(RuntimeError, match="runs CUDA tensors only"):
        zk.noise(1, 0, 3, backend="cuda")


def test_philox_numpy_and_any_device_paths_agree():
    """The CPU rounds (numpy uint64) and the any-device rounds (int64, 16-bit split products)."""
    from zopro_kernels.philox import _philox4x32_numpy, _philox4x32_torch

    counters = torch.cat((torch.arange(5000), torch.tensor([2**32 - 1, 2**32, 2**40 + 3, 2**62])))
    fast = _philox4x32_numpy(SEED, counters.numpy())
    split = _philox4x32_torch(SEED, counters)
    assert all(torch.equal(torch.from_numpy(a.astype("int64")), b) for a, b in zip(fast, split))
