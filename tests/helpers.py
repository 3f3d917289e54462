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
    """``got`` (a kernel's result in ``dtype``) vs the float64 ``expected``, element by element: the
    correctly rounded ``dtype`` value of ``expected``, or (only where ``expected`` lies within the
    pass's fp32 arithmetic error of a rounding boundary) the neighbour across that boundary. Every
    element is checked against its own rounding, so a tiny tensor whose values are 0 or −z cannot
    pass inside a large tensor's tolerance."""
    expected = expected.double().cpu().reshape(-1)
    got = got.detach().double().cpu().reshape(-1)
    # fp32 arithmetic inside the pass: an absolute error on the scale of its terms (≈ 1 here)
    slack = 1e-6 * max(1.0, expected.abs().max().item()) if expected.numel() else 0.0
    nearest = expected.to(dtype).double()
    if dtype in (torch.float32, torch.float64):
        bad = (got - expected).abs() > (nearest - expected).abs() + slack
    else:
        boundary = (got + nearest) / 2  # the rounding boundary between got and the correctly rounded value
        near_boundary = (expected - boundary).abs() <= slack
        one_step = (got - nearest).abs() <= 2.0 ** -6 * nearest.abs() + 2.0 ** -126  # adjacent in bf16/fp16
        bad = (got != nearest) & ~(near_boundary & one_step)
    if bool(bad.any()):
        index = int(bad.nonzero()[0])
        raise AssertionError(f"{int(bad.sum())} of {bad.numel()} values are not the correctly rounded "
                             f"{dtype}: e.g. #{index}: got {got[index].item()!r}, exact {expected[index].item()!r}, "
                             f"rounded {nearest[index].item()!r}")


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


def python_noise(seed: int, start: int, numel: int) -> list[float]:
    """The noise definition written again in plain Python ints and ``math`` floats (float64), apart
    from zopro_kernels.philox: Philox4x32-10 (key = seed's two words, counter = (c_lo, c_hi, 0, 0)),
    Triton's uint→uniform fold and scale, Box–Muller (r cos θ, r sin θ) for each pair of words."""
    import math

    def philox(counter):
        c = [counter & 0xFFFFFFFF, counter >> 32, 0, 0]
        k = [seed & 0xFFFFFFFF, seed >> 32]
        for _ in range(10):
            a, b = 0xD2511F53 * c[0], 0xCD9E8D57 * c[2]
            c = [(b >> 32) ^ c[1] ^ k[0], b & 0xFFFFFFFF, (a >> 32) ^ c[3] ^ k[1], a & 0xFFFFFFFF]
            k = [(k[0] + 0x9E3779B9) & 0xFFFFFFFF, (k[1] + 0xBB67AE85) & 0xFFFFFFFF]
        return c

    scale = float(torch.tensor(4.6566127342e-10, dtype=torch.float32))

    def uniform(word):
        signed = word - 2**32 if word >= 2**31 else word
        return (-signed - 1 if signed < 0 else signed) * scale

    values = []
    for counter in range(start // 4, (start + numel - 1) // 4 + 1):
        words = philox(counter)
        for u1, u2 in ((uniform(words[0]), uniform(words[1])), (uniform(words[2]), uniform(words[3]))):
            radius = math.sqrt(-2.0 * math.log(max(u1, 1e-7)))
            values += [radius * math.cos(6.283185307179586 * u2), radius * math.sin(6.283185307179586 * u2)]
    offset = start - 4 * (start // 4)
    return values[offset: offset + numel]


def check_noise_against_reference(backend, device, seed, start, numel):
    """A backend's noise against the definition written independently in plain Python (float64):
    within 2x of plain fp32 PyTorch's error (plus a hair for log/cos ulps), and the package's own
    float64 reference equal to the independent one."""
    got = zk.noise(seed, start, numel, device=device, backend=backend).double().cpu()
    exact = torch.tensor(python_noise(seed, start, numel), dtype=torch.float64)
    assert torch.allclose(reference_noise(seed, start, numel, dtype=torch.float64), exact, rtol=1e-12, atol=1e-12)
    plain_fp32 = reference_noise(seed, start, numel, dtype=torch.float32).double()
    error, plain = (got - exact).abs().max().item(), (plain_fp32 - exact).abs().max().item()
    assert error <= 2 * plain + 1e-6, (error, plain)
    assert error <= 1e-5 * max(1.0, exact.abs().max().item()), error  # fp32 Box–Muller, whatever plain is


def check_noise_independent_of_range_start(backend, device, seed, ranges):
    """Any (start, numel) range of the noise equals that slice of one long range."""
    whole = zk.noise(seed, 0, 3000, device=device, backend=backend)
    for start, numel in ranges:
        part = zk.noise(seed, start, numel, device=device, backend=backend)
        assert torch.equal(part, whole[start : start + numel])
