"""Shared test harness: one ZOPrO step with every intermediate weight captured."""

from __future__ import annotations

import torch

import zopro_kernels as zk
from zopro_kernels import ZOPrO
from zopro_kernels.philox import reference_noise
from zopro_kernels.reference import reference_direction
from zopro_kernels.seeds import step_seed

SHAPES = {
    "one": [(1,)],
    "odd": [(3, 5), (1,), (1000,), (7, 300)],
    "many-tiny": [(2,)] * 100 + [(3, 1)] * 100 + [(4099,)],
}


def random_tensors(shapes, dtype, device, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype).to(device) for s in shapes]


def starts_of(shapes):
    starts, cursor = [], 0
    for s in shapes:
        starts.append(cursor)
        cursor += int(torch.Size(s).numel())
    return starts


def guidance(shapes, kind, device, dtype=torch.float32):
    """Δπ and ΔR for the guidance ``kind``: none, reward, policy, both or zeros."""
    dpi = random_tensors(shapes, dtype, device, seed=101, scale=0.3)
    dr = random_tensors(shapes, dtype, device, seed=202)
    # Give Δπ a component along ΔR, so projecting it out matters.
    dpi = [(p.double() + 0.5 * r.double()).to(dtype) for p, r in zip(dpi, dr)]
    zeros = [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
    return {
        "none": (None, None),
        "reward": (None, dr),
        "policy": (dpi, None),
        "both": (dpi, dr),
        "zeros": (zeros, zeros),
    }[kind]


def captured_step(backend, device, dtype, shapes, *, granularity="tensor", kind="both", alpha=0.6,
                  eps=1e-2, lr=0.0, weight_decay=0.0, init_scale=1.0, seed=11, direction_norm="policy_delta"):
    """Run one step; return (initial θ, [θ at J₊, θ at J₋, θ after], (J₊, J₋), reference z)."""
    params = random_tensors(shapes, dtype, device, seed=7, scale=init_scale)
    initial = [p.clone() for p in params]
    opt = ZOPrO(params, lr=lr, eps=eps, weight_decay=weight_decay, seed=seed, alpha=alpha,
                granularity=granularity, backend=backend, direction_norm=direction_norm)
    dpi, dr = guidance(shapes, kind, device)
    opt.set_guidance(policy_delta=dpi, reward_delta=dr)
    seen, losses = [], []

    def closure():
        seen.append([p.clone() for p in params])
        loss = sum((p.double() - 0.25).square().sum() for p in params)
        losses.append(float(loss))
        return loss

    opt.step(closure)
    seen.append([p.clone() for p in params])
    z = reference_direction(step_seed(seed, 0), starts_of(shapes), [torch.Size(s) for s in shapes],
                            dpi, dr, alpha, granularity, direction_norm)
    return initial, seen, losses, z


def assert_dtype_close(got, expected, dtype):
    """``got`` (a kernel's result in ``dtype``) vs the float64 ``expected``: the error must be within
    2x of what plain PyTorch gets by rounding ``expected`` through fp32 into ``dtype``."""
    expected = expected.double().cpu()
    plain = expected.float().to(dtype).double()
    plain_error = (plain - expected).abs().max().item()
    error = (got.double().cpu() - expected).abs().max().item()
    slack = 1e-6 * max(1.0, expected.abs().max().item())  # fp32 arithmetic inside the pass
    assert error <= 2 * plain_error + slack, (error, plain_error)


def check_step_against_reference(backend, device, dtype, shapes, granularity, eps=1e-2, lr=1e-3, wd=0.1):
    """θ at J₊, at J₋ and after the update, each against float64 eq. 2 (dtype-noise tolerance)."""
    initial, seen, (j_plus, j_minus), z = captured_step(
        backend, device, dtype, shapes, granularity=granularity, eps=eps, lr=lr, weight_decay=wd
    )
    g = (j_plus - j_minus) / (2 * eps)
    for t, theta0 in enumerate(initial):
        theta0 = theta0.double().cpu()
        assert_dtype_close(seen[0][t], theta0 + eps * z[t], dtype)
        assert_dtype_close(seen[1][t], theta0 - eps * z[t], dtype)
        assert_dtype_close(seen[2][t], theta0 - lr * (g * z[t] + wd * theta0), dtype)


def check_guidance_variant(backend, device, shapes, granularity, kind, direction_norm="policy_delta"):
    """With θ₀ = 0 and ε = 1 the weights seen at J₊ are z itself: compare with float64 eq. 2.
    ("zeros": Δπ set but 0 everywhere, so a guided step whose z has no Δπ part: 0 under
    "policy_delta", the projected noise at the guided scale under "noise".)"""
    _, seen, _, z = captured_step(backend, device, torch.float32, shapes, granularity=granularity,
                                  kind=kind, eps=1.0, init_scale=0.0, direction_norm=direction_norm)
    for t in range(len(shapes)):
        got = seen[0][t].double().cpu()
        assert torch.isfinite(got).all()
        assert (got - z[t]).abs().max() <= 1e-5 * max(1.0, z[t].abs().max().item())


def check_bf16_guidance(backend, device, shapes):
    """guidance_dtype=bf16: one step with θ₀ = 0, ε = 1 against float64 eq. 2 of the bf16-rounded
    Δπ and ΔR (the values the kernels read). Returns the optimizer."""
    params = random_tensors(shapes, torch.float32, device, seed=7, scale=0.0)
    dpi, dr = guidance(shapes, "both", device)
    opt = ZOPrO(params, eps=1.0, lr=0.0, seed=11, alpha=0.6, backend=backend, guidance_dtype=torch.bfloat16)
    opt.set_guidance(policy_delta=dpi, reward_delta=dr)
    seen = []
    opt.step(lambda: seen.append([p.clone() for p in params]) or 0.0)
    rounded = [[t.to(torch.bfloat16) for t in ts] for ts in (dpi, dr)]
    z = reference_direction(step_seed(11, 0), starts_of(shapes), [torch.Size(s) for s in shapes],
                            *rounded, 0.6, "tensor")
    for t in range(len(shapes)):
        assert (seen[0][t].double().cpu() - z[t]).abs().max() <= 1e-5 * max(1.0, z[t].abs().max().item())
    return opt


def check_restored_after_cycles(params, opt, shapes, cycles):
    """With Δπ and ΔR set and lr = 0, ``cycles`` steps with finite losses (every update pass runs,
    with a zero step) perturb the weights each time and leave them bit-identical to the start."""
    assert all(group["lr"] == 0 for group in opt.param_groups), "the cycles test needs lr = 0"
    dpi, dr = guidance(shapes, "both", params[0].device)
    opt.set_guidance(policy_delta=dpi, reward_delta=dr)
    initial = [p.clone() for p in params]
    moved = []

    def closure():
        moved.append(any(not torch.equal(p, q) for p, q in zip(params, initial)))
        return sum((p.double() - 0.25).square().sum() for p in params)  # finite, differs at ±εz

    for _ in range(cycles):
        opt.step(closure)
    assert all(moved) and opt.nonfinite_steps == 0
    assert float(opt.last_step["projected_grad"]) != 0  # a real g, times lr = 0
    assert all(torch.equal(p, q) for p, q in zip(params, initial))


def check_noise_against_reference(backend, device, seed, start, numel):
    """A backend's noise within 2x of plain fp32 PyTorch's error against float64 (plus a hair for
    log/cos ulps)."""
    got = zk.noise(seed, start, numel, device=device, backend=backend).double().cpu()
    exact = reference_noise(seed, start, numel, dtype=torch.float64)
    plain_fp32 = reference_noise(seed, start, numel, dtype=torch.float32).double()
    error, plain = (got - exact).abs().max().item(), (plain_fp32 - exact).abs().max().item()
    assert error <= 2 * plain + 1e-6, (error, plain)


def check_noise_independent_of_range_start(backend, device, seed, ranges):
    """Any (start, numel) range of the noise equals that slice of one long range."""
    whole = zk.noise(seed, 0, 3000, device=device, backend=backend)
    for start, numel in ranges:
        part = zk.noise(seed, start, numel, device=device, backend=backend)
        assert torch.equal(part, whole[start : start + numel])
