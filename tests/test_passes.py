"""Every backend's passes against the float64 eq. 2 reference (zopro_kernels.reference)."""

import pytest
import torch

import zopro_kernels as zk
from zopro_kernels.philox import reference_noise
from zopro_kernels.seeds import step_seed

from .helpers import (
    SHAPES,
    assert_dtype_close,
    captured_step,
    check_bf16_guidance,
    check_guidance_variant,
    check_step_against_reference,
    starts_of,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("granularity", ["tensor", "global"])
@pytest.mark.parametrize("shapes", ["one", "odd"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_perturb_and_update_match_reference(target, dtype, shapes, granularity):
    backend, device = target
    check_step_against_reference(backend, device, DTYPES[dtype], SHAPES[shapes], granularity)


@pytest.mark.parametrize("direction_norm", ["policy_delta", "noise"])
@pytest.mark.parametrize("kind", ["none", "reward", "policy", "zeros"])
@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_guidance_variants_match_reference(target, kind, granularity, direction_norm):
    backend, device = target
    check_guidance_variant(backend, device, SHAPES["odd"], granularity, kind, direction_norm)


def test_unguided_direction_is_exactly_the_noise(target):
    backend, device = target
    shapes = SHAPES["odd"]
    _, seen, _, _ = captured_step(backend, device, torch.float32, shapes, kind="none", eps=1.0,
                                  init_scale=0.0)
    seed = step_seed(11, 0)
    for t, (shape, start) in enumerate(zip(shapes, starts_of(shapes))):
        numel = seen[0][t].numel()
        # the definition (float64 reference), to fp32 rounding ...
        assert_dtype_close(seen[0][t], reference_noise(seed, start, numel, dtype=torch.float64), torch.float32)
        # ... and bit for bit the backend's own noise function: the pass and zk.noise agree exactly
        assert torch.equal(seen[0][t].reshape(-1), zk.noise(seed, start, numel, device=device, backend=backend))


def test_many_tiny_tensors_beside_a_large_one(target):
    backend, device = target
    shapes = SHAPES["many-tiny"]
    initial, seen, _, z = captured_step(backend, device, torch.bfloat16, shapes, eps=1e-2)
    for t, theta0 in enumerate(initial):
        assert_dtype_close(seen[0][t], theta0.double().cpu() + 1e-2 * z[t], torch.bfloat16)


@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_eq2_properties(target, granularity):
    """z − αΔπ ⟂ ΔR and ‖z − αΔπ‖ = √(1−α²)‖Δπ‖, per tensor or over the whole vector."""
    backend, device = target
    shapes = [(40, 30), (513,), (17, 3)]
    alpha = 0.7
    dtype = torch.float32
    from .helpers import guidance

    dpi, dr = guidance(shapes, "both", "cpu", torch.float64)
    _, seen, _, _ = captured_step(backend, device, dtype, shapes, granularity=granularity, eps=1.0,
                                  init_scale=0.0, alpha=alpha)
    z = [s.double().cpu().reshape(-1) for s in seen[0]]
    residual = [zt - alpha * p.reshape(-1) for zt, p in zip(z, dpi)]
    units = [[t] for t in range(len(shapes))] if granularity == "tensor" else [list(range(len(shapes)))]
    for unit in units:
        res = torch.cat([residual[t] for t in unit])
        r = torch.cat([dr[t].reshape(-1) for t in unit])
        p = torch.cat([dpi[t].reshape(-1) for t in unit])
        assert abs(res @ r) / (res.norm() * r.norm()) < 1e-5
        assert res.norm().item() == pytest.approx((1 - alpha**2) ** 0.5 * p.norm().item(), rel=1e-5)


def test_one_element_tensor_with_reward_delta_is_not_nan(target):
    backend, device = target
    _, seen, _, z = captured_step(backend, device, torch.float32, [(1,)], kind="reward", eps=1.0,
                                  init_scale=0.0)
    # u lives in the complement of span(ΔR), which is {0} in one dimension.
    assert torch.equal(seen[0][0].cpu(), torch.zeros(1))
    assert torch.equal(z[0], torch.zeros(1, dtype=torch.float64))


def test_software_bf16_rounding_matches_torch():
    """The interpreter path's fp32 → bf16 rounding (round to nearest even, NaN kept)."""
    triton = pytest.importorskip("triton")
    import triton.language as tl
    global round_to_bf16_bits  # Triton resolves names a kernel calls from module globals
    from zopro_kernels.triton_ops.zo_pass import round_to_bf16_bits

    @triton.jit
    def kernel(x_ptr, out_ptr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, round_to_bf16_bits(tl.load(x_ptr + i)))

    gen = torch.Generator().manual_seed(3)
    bits = torch.randint(-(2**31), 2**31 - 1, (4096,), generator=gen, dtype=torch.int64)
    x = bits.to(torch.int32).view(torch.float32).clone()
    ties = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8), 2**-130, 3.4e38, float("inf"), float("nan")])
    x[: len(ties)] = ties
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.empty(4096, dtype=torch.int16, device=device)
    kernel[(1,)](x.to(device), out, N=4096)
    expected = x.to(torch.bfloat16)
    got = out.cpu().view(torch.bfloat16)
    finite = ~torch.isnan(expected)
    assert torch.equal(got[finite], expected[finite])
    assert torch.isnan(got[~finite]).all()


def test_bf16_guidance_storage_matches_reference_of_rounded_guidance(target):
    """guidance_dtype=bf16 stores Δπ and ΔR rounded; eq. 2 then holds exactly for those values."""
    backend, device = target
    opt = check_bf16_guidance(backend, device, SHAPES["odd"])
    assert opt.state_dict()["state"][0]["reward_delta"].dtype == torch.bfloat16
