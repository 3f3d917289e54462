"""The guided direction's scale (eq. 2 as published and the noise-normalised form), the Δπ = 0
degenerate case, and q-direction steps, against float64 math written out here."""

import math
import warnings

import pytest
import torch

import zopro_kernels as zk
from zopro_kernels import ZOPrO
from zopro_kernels.seeds import step_seed


def observed_direction(opt, params, eps):
    """z of the next step, read from the weights the closure sees at θ+εz (float64)."""
    start = [p.detach().double().clone() for p in params]
    seen = []

    def closure():
        if not seen:
            seen.append([p.detach().double().clone() for p in params])
        return torch.zeros(())  # g = 0: the update leaves the weights where they were

    opt.step(closure)
    return [(plus - s) / eps for plus, s in zip(seen[0], start)]


def eq2_reference(n, dpi, dr, alpha, norm):
    """z for one unit from float64 eq. 2 (``norm``: "policy_delta" or "noise")."""
    u = n - (n @ dr) / (dr @ dr) * dr if dr is not None and float(dr @ dr) > 0 else n
    unit_u = u / u.norm()
    if norm == "policy_delta":
        return alpha * dpi + math.sqrt(1 - alpha**2) * unit_u * dpi.norm()
    d = n.numel()
    direction = dpi / dpi.norm() if float(dpi.norm()) > 0 else torch.zeros_like(dpi)
    return math.sqrt(d) * (alpha * direction + math.sqrt(1 - alpha**2) * unit_u)


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(37, generator=g), torch.randn(5, 11, generator=g)]


@pytest.mark.parametrize("norm", ["policy_delta", "noise"])
@pytest.mark.parametrize("granularity", ["tensor", "global"])
def test_guided_direction_matches_float64_eq2(norm, granularity):
    params = tensors()
    g = torch.Generator().manual_seed(5)
    dpi = [1e-3 * torch.randn(p.shape, generator=g) for p in params]
    dr = [torch.randn(p.shape, generator=g) for p in params]
    eps, alpha = 1e-2, 0.6
    opt = ZOPrO(params, lr=0.0, eps=eps, alpha=alpha, granularity=granularity, direction_norm=norm,
                backend="torch", seed=3)
    opt.set_guidance(policy_delta=dpi, reward_delta=dr)
    z = observed_direction(opt, params, eps)
    seed = step_seed(3, 0)
    starts = [0, params[0].numel()]
    n = [zk.noise(seed, s, p.numel(), dtype=torch.float64) for s, p in zip(starts, params)]
    flat = lambda ts: [t.double().reshape(-1) for t in ts]  # noqa: E731
    if granularity == "tensor":
        expected = [eq2_reference(ni, pi, ri, alpha, norm) for ni, pi, ri in zip(n, flat(dpi), flat(dr))]
    else:
        whole = eq2_reference(torch.cat(n), torch.cat(flat(dpi)), torch.cat(flat(dr)), alpha, norm)
        expected = list(whole.split([p.numel() for p in params]))
    for zi, ei in zip(z, expected):
        # fp32 weights: θ+εz is rounded to fp32, so z is known to ~ulp(θ)/ε
        torch.testing.assert_close(zi.reshape(-1), ei, atol=2e-4 * max(1.0, float(ei.abs().max())), rtol=1e-3)
    if norm == "noise":  # ‖z‖ ≈ √d whatever ‖Δπ‖ is
        total = math.sqrt(sum(float(zi.square().sum()) for zi in z))
        assert total == pytest.approx(math.sqrt(sum(p.numel() for p in params)), rel=0.05)


@pytest.mark.parametrize("norm", ["policy_delta", "noise"])
def test_zero_policy_delta_tensor_never_gets_raw_noise_at_the_guided_scale(norm):
    """A tensor whose Δπ is 0 (here: missing from the guidance dict) beside one that moved."""
    model = torch.nn.Sequential(torch.nn.Linear(128, 128, bias=False), torch.nn.Linear(128, 128, bias=False))
    params = list(model.parameters())
    eps = 1e-3
    opt = ZOPrO(model.named_parameters(), lr=0.0, eps=eps, alpha=0.999, direction_norm=norm, backend="torch")
    with pytest.warns(UserWarning, match="Δπ is 0 for 1 tensor"):
        opt.set_guidance(policy_delta={"0.weight": 1e-3 * torch.ones(128, 128)})
    z_moved, z_still = observed_direction(opt, params, eps)
    if norm == "policy_delta":
        assert float(z_moved.norm()) == pytest.approx(1e-3 * 128, rel=0.01)  # ‖z‖ ≈ ‖Δπ‖
        assert float(z_still.abs().max()) == 0.0                           # still, not ‖z‖ ≈ 128
    else:
        root_d = 128.0
        assert float(z_moved.norm()) == pytest.approx(root_d, rel=0.01)
        # only the noise part, at the guided scale √(1−α²)·√d (≈ 0.045·√d), never √d
        assert float(z_still.norm()) == pytest.approx(math.sqrt(1 - 0.999**2) * root_d, rel=0.01)


def test_guidance_with_zero_policy_delta_everywhere_moves_nothing():
    """An iteration whose g stayed 0 gives Δπ = 0: the next guided steps must not become raw SPSA."""
    p = torch.randn(64)
    opt = ZOPrO([p], lr=1.0, eps=1e-3, alpha="constant", backend="torch")
    opt.mark_iteration()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.mark_iteration()  # nothing moved: Δπ = 0
        opt.mark_iteration()  # said once
    assert sum("Δπ is 0" in str(w.message) for w in caught) == 1
    before = p.clone()
    opt.step(lambda: p.sum())
    assert torch.equal(p, before)


def test_unguided_steps_are_the_same_under_both_norms():
    results = []
    for norm in ("policy_delta", "noise"):
        p = torch.linspace(-1, 1, 50)
        opt = ZOPrO([p], lr=1e-2, eps=1e-3, direction_norm=norm, backend="torch")
        for _ in range(3):
            opt.step(lambda: (p - 0.3).square().sum())
        results.append(p.clone())
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("master_weights", [True, False])
def test_q_directions_step_is_the_mean_of_q_two_sided_estimates(master_weights):
    q, lr, eps, seed = 3, 1e-2, 1e-3, 11
    target = torch.linspace(-1, 1, 40, dtype=torch.float64)
    start = torch.linspace(0.5, -0.2, 40, dtype=torch.float64)
    loss = lambda w: float((w - target).square().sum())  # noqa: E731
    p = start.clone()
    opt = ZOPrO([p], lr=lr, eps=eps, seed=seed, directions=q, master_weights=master_weights, backend="torch")
    opt.step(lambda: (p - target).square().sum())
    update = torch.zeros_like(start)
    for i in range(q):
        z = zk.noise(step_seed(seed, 0, i), 0, 40, dtype=torch.float64)
        g = (loss(start + eps * z) - loss(start - eps * z)) / (2 * eps)
        update += g * z / q
    torch.testing.assert_close(p, start - lr * update, rtol=1e-9, atol=1e-9 if master_weights else 1e-7)


def test_one_direction_is_the_default_step():
    runs = []
    for kwargs in ({}, {"directions": 1}):
        p = torch.linspace(-1, 1, 30)
        opt = ZOPrO([p], lr=1e-2, eps=1e-3, seed=4, backend="torch", **kwargs)
        for _ in range(4):
            opt.step(lambda: (p - 0.5).square().sum())
        runs.append(p.clone())
    assert torch.equal(*runs)


def test_q_directions_lower_the_variance_of_the_update():
    """n-SPSA: over many seeds the spread of the update around its mean shrinks about as 1/q."""
    target = torch.linspace(-1, 1, 200, dtype=torch.float64)
    spreads = {}
    for q in (1, 4):
        updates = []
        for seed in range(40):
            p = torch.zeros(200, dtype=torch.float64)
            ZOPrO([p], lr=1.0, eps=1e-4, seed=seed, directions=q, backend="torch").step(
                lambda: (p - target).square().sum())
            updates.append(p.clone())
        stacked = torch.stack(updates)
        spreads[q] = float((stacked - 2 * target).square().sum(-1).mean())  # E‖g z − ∇J‖², ∇J = −2·target
    assert spreads[4] < 0.4 * spreads[1]


@pytest.mark.parametrize("kwargs, match", [({"directions": 0}, "directions"), ({"directions": 1.5}, "directions"),
                                           ({"direction_norm": "unit"}, "direction_norm")])
def test_new_options_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZOPrO([torch.zeros(2)], **kwargs)
