"""The preference-only estimators (preference_zo.py) on a policy whose value is known exactly.

The policy is a softmax over K = 8 actions whose logits are the optimizer's parameters (four
tensors of two logits, so ZBCPG has blocks); an action's reward is r_a, the value V(θ) = Σ π_θ(a) r_a.
A "prompt" draws one action from each policy compared; the judge is Bradley–Terry (or the
double-Weibull link): P(a ≻ b) = F(r_a − r_b), each query one draw. Every step runs through the
engine's passes (PreferencePasses), vectorised over many prompts.

- means: the ZPG/ZBCPG estimate's mean along its direction agrees with ∇V·z (a 4-SE interval
  over up to a million draws, plus the exactly computed bias of the finite ε and finite queries);
  the ZO-RankSGD estimate's mean is 4ε·∇W (W: the win rate against π_θ) over many direction draws;
- the update is η·ĝ along the direction(s) the step perturbed with, in its blocks only;
- trimming bounds the estimate: |Δ̂| ≤ D = F⁻¹(1 − δ), so ‖ĝ‖ ≤ d·D/μ (μ = ε√d);
- a few hundred steps of each mode raise the exact value; perturbations restore bit for bit.
"""

from __future__ import annotations

import math

import pytest
import torch

from zopro_kernels.rloo.judges import Comparisons, SimulatedHumanJudge, compare_many
from zopro_kernels.rloo.links import inverse_link, link_cdf
from zopro_kernels.rloo.preference_zo import (PreferenceEstimator, PreferencePasses, PreferenceSettings, link_bound,
                                              rank_edges, trimmed_value_differences)

K = 8


def reward_vector():
    return torch.linspace(-1.0, 1.0, K, dtype=torch.float64)[torch.tensor([3, 7, 0, 5, 1, 6, 2, 4])]


def start_logits(seed=0):
    return torch.randn(K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def value(logits, reward):
    return float(torch.softmax(logits, 0) @ reward)


def value_gradient(logits, reward):
    probs = torch.softmax(logits, 0)
    return probs * (reward - probs @ reward)


class SoftmaxToy:
    """Four parameter tensors of two logits each; sampling and a link judge, vectorised over prompts."""

    def __init__(self, *, reward=None, logits=None, queries=1, link="bt", shape=2.0, tau=1.0, seed=0,
                 dtype=torch.float64):
        self.reward = reward_vector() if reward is None else reward
        logits = start_logits(seed) if logits is None else logits
        self.params = [torch.nn.Parameter(chunk.clone().to(dtype)) for chunk in logits.split(2)]
        self.queries, self.link, self.shape, self.tau = queries, link, shape, tau
        self.generator = torch.Generator().manual_seed(seed + 1)
        self.seen = {}  # key → logits at sampling time (θ₀, or θ₀ + s·z)

    def logits(self):
        return torch.cat([p.detach() for p in self.params]).to(torch.float64)

    def value(self):
        return value(self.logits(), self.reward)

    def sample(self, rows, key):
        logits = self.logits()
        self.seen[key] = logits.clone()
        return torch.multinomial(torch.softmax(logits, 0), len(rows), replacement=True, generator=self.generator)

    def compare(self, rows, first, second, key):
        p = link_cdf((self.reward[first] - self.reward[second]) / self.tau, self.link, self.shape)
        queries = torch.full_like(p, float(self.queries))
        wins = torch.binomial(queries, p, generator=self.generator)
        return Comparisons(wins, queries - wins, torch.zeros_like(p), queries)

    def estimator(self, **settings):
        settings = {"eps": 0.05, "lr": 0.0} | settings
        steps = settings.pop("steps_per_iteration", 100)
        passes = PreferencePasses(self.params, lr=settings["lr"], eps=settings["eps"], seed=7, backend="torch",
                                  steps_per_iteration=steps, direction_norm="noise")
        return PreferenceEstimator(passes, PreferenceSettings(judge_queries=self.queries, link=self.link,
                                                              weibull_shape=self.shape, **settings))

    def step(self, estimator, count):
        self.seen = {}
        return estimator.step(count=count, sample=self.sample, compare=self.compare)


def exact_mean_difference(first_logits, second_logits, reward, queries, delta, link="bt", shape=2.0, tau=1.0):
    """E[Δ̂] of one draw exactly: the actions' distributions and the Binomial(queries) of the judge."""
    first, second = torch.softmax(first_logits, 0), torch.softmax(second_logits, 0)
    p = link_cdf((reward[:, None] - reward[None, :]) / tau, link, shape)  # [a, b]
    k = torch.arange(queries + 1, dtype=torch.float64)
    binomial = torch.distributions.Binomial(queries, probs=p.clamp(1e-12, 1 - 1e-12)[..., None])
    weights = binomial.log_prob(k).exp()  # [a, b, k]
    values = inverse_link((k / queries).clamp(delta, 1 - delta), link, shape)
    return float(((weights * values).sum(-1) * first[:, None] * second[None, :]).sum())


def assert_within(estimate, standard_error, target, bias, what):
    assert abs(estimate - target) <= 4 * standard_error + bias, (
        f"{what}: {estimate:.5f} vs {target:.5f} (4 SE = {4 * standard_error:.5f}, bias ≤ {bias:.5f})")


# -- links --------------------------------------------------------------------------------------

@pytest.mark.parametrize("link", ["bt", "weibull"])
def test_links_are_symmetric_and_inverted(link):
    x = torch.linspace(-1.5, 1.5, 61, dtype=torch.float64)  # (shape 3.5 saturates beyond)
    for shape in (1.0, 2.0, 3.5):
        p = link_cdf(x, link, shape)
        assert torch.allclose(p + link_cdf(-x, link, shape), torch.ones_like(x), atol=1e-15)
        assert bool((p.diff() > 0).all()) and float(link_cdf(torch.tensor(0.0), link, shape)) == 0.5
        assert torch.allclose(inverse_link(p, link, shape), x, atol=1e-9)
    assert float(inverse_link(torch.tensor(1.0), link)) == math.inf
    assert link_bound(0.05, "bt") == pytest.approx(math.log(0.95 / 0.05))


# -- ZPG: the mean along the direction ------------------------------------------------------------

@pytest.mark.parametrize("two_sided,link,perturbation", [(False, "bt", "published"), (True, "bt", "published"),
                                                         (False, "weibull", "gaussian")])
def test_zpg_mean_agrees_with_the_gradient_projection(two_sided, link, perturbation):
    toy = SoftmaxToy(queries=200, link=link, seed=1)
    eps, delta, count = (0.02 if not two_sided else 0.05), 0.01, 1_000_000
    estimator = toy.estimator(mode="zpg", eps=eps, trim_delta=delta, two_sided=two_sided,
                              perturbation=perturbation)
    theta = toy.logits()
    info = toy.step(estimator, count)
    plus = toy.seen[1]
    other = toy.seen[2] if two_sided else toy.seen[0]
    z = (plus - theta) / eps
    if two_sided:
        assert torch.allclose((other - theta) / eps, -z)
    else:
        assert torch.equal(other, theta)
    if perturbation == "published":  # the unit sphere of radius μ = ε√d: ‖z‖ = √d exactly
        assert float(z.norm()) == pytest.approx(math.sqrt(K), rel=1e-12)
    span = 2 * eps if two_sided else eps
    draws = info["_diagnostics"]["differences"] / span
    assert bool(torch.isfinite(draws).all()) and draws.numel() == count
    target = float(value_gradient(theta, toy.reward) @ z)  # ∇V·z, the projection on z (E zzᵀ = I)
    exact = exact_mean_difference(plus, other, toy.reward, toy.queries, delta, link) / span
    bias = abs(exact - target)
    assert bias < 0.1 * abs(target), "the test's ε and queries must keep the estimator's bias small"
    assert_within(float(draws.mean()), float(draws.std()) / math.sqrt(count), target, bias, "ZPG mean")
    assert info["g"] == pytest.approx(float(draws.mean()), rel=1e-9)


def test_zpg_update_is_lr_times_the_estimate_along_z():
    toy = SoftmaxToy(queries=5, seed=2)
    lr, eps = 0.3, 0.05
    estimator = toy.estimator(mode="zpg", eps=eps, lr=lr, weight_decay=0.0)
    for _ in range(3):
        theta = toy.logits()
        info = toy.step(estimator, 64)
        z = (toy.seen[1] - theta) / eps
        mean_difference = float(info["_diagnostics"]["differences"].mean())
        assert info["g"] == pytest.approx(mean_difference / eps, rel=1e-12)  # the 1/μ (here 1/ε) is applied
        assert torch.allclose(toy.logits() - theta, lr * info["g"] * z, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["zpg", "zorank"])
def test_weight_decay_shrinks_theta_once_per_step(mode):
    toy = SoftmaxToy(queries=1, seed=3)
    lr, eps, decay = 0.1, 0.05, 0.5
    estimator = toy.estimator(mode=mode, eps=eps, lr=lr, weight_decay=decay, rank_policies=3)
    theta = toy.logits()
    info = toy.step(estimator, 16)
    if mode == "zpg":
        step = info["g"] * (toy.seen[1] - theta) / eps
    else:  # three update passes, one per direction: the decay goes with the first only
        step = sum(w * (toy.seen[1 + i] - theta) / eps for i, w in enumerate(info["rank_weights"]))
    assert torch.allclose(toy.logits(), (1 - lr * decay) * theta + lr * step, rtol=1e-9, atol=1e-12)


# -- trimming bounds the variance ---------------------------------------------------------------

@pytest.mark.parametrize("delta", [0.05, 0.2])
def test_trimming_bounds_the_estimate_and_its_variance(delta):
    """One query per pair: p̂ ∈ {0, 1}, so the untrimmed inverse link is ±∞ (infinite variance).
    Trimmed, |Δ̂| ≤ D = F⁻¹(1 − δ), so per prompt ‖ĝ‖ ≤ ‖z‖·D/ε = d·D/μ (μ = ε√d, sphere),
    E‖ĝ‖² ≤ (d·D/μ)², and the variance of the batch mean is ≤ D²/N ε²."""
    toy = SoftmaxToy(queries=1, seed=4)
    eps, count = 0.05, 20_000
    estimator = toy.estimator(mode="zpg", eps=eps, trim_delta=delta)
    theta = toy.logits()
    info = toy.step(estimator, count)
    z = (toy.seen[1] - theta) / eps
    bound = link_bound(delta)
    differences = info["_diagnostics"]["differences"]
    assert bool(torch.isfinite(differences).all())
    assert float(differences.abs().max()) <= bound + 1e-12
    assert set(differences.abs().tolist()) == {bound}  # p̂ ∈ {0, 1}: clipped to exactly ±D
    mu = eps * math.sqrt(K)
    per_prompt_norm = differences.abs() * float(z.norm()) / eps  # ‖ĝ_i‖ of one prompt's estimate
    assert float(per_prompt_norm.max()) <= K * bound / mu * (1 + 1e-9)
    assert float(per_prompt_norm.square().mean()) <= (K * bound / mu) ** 2 * (1 + 1e-9)
    assert float((differences / eps).var()) <= (bound / eps) ** 2
    assert abs(info["g"]) * float(z.norm()) <= K * bound / mu * (1 + 1e-9)
    # without trimming the same verdicts give infinite estimates
    untrimmed = trimmed_value_differences(Comparisons.from_verdicts(torch.tensor([[0], [1]])), 0.0)
    assert untrimmed.tolist() == [math.inf, -math.inf]


def test_ties_count_half_and_unanswered_pairs_are_dropped():
    comparisons = Comparisons.from_verdicts(torch.tensor([[0, 2, 1, 1], [2, 2, 2, 2], [-1, -1, -1, -1], [0, 0, 0, -1]]))
    values = trimmed_value_differences(comparisons, 0.1)
    assert values[0] == pytest.approx(math.log(1.5 / 2.5)) and values[1] == 0.0
    assert math.isnan(values[2]) and values[3] == pytest.approx(math.log(0.9 / 0.1))



@pytest.mark.parametrize("link", ["bt", "weibull"])
def test_swapping_the_pair_negates_the_estimate_exactly(link):
    """A won and a lost pair cancel to exactly 0, and the clipped values are exactly ±D, so a step
    whose verdicts balance does not move θ (p̂ and 1 − p̂ computed naively differ by ~1e-16)."""
    verdicts = torch.randint(-1, 3, (400, 5), generator=torch.Generator().manual_seed(0))
    swapped = torch.where(verdicts == 0, 1, torch.where(verdicts == 1, 0, verdicts))
    for delta in (0.05, 0.1, 0.3):
        values = trimmed_value_differences(Comparisons.from_verdicts(verdicts), delta, link)
        mirrored = trimmed_value_differences(Comparisons.from_verdicts(swapped), delta, link)
        answered = torch.isfinite(values)
        assert torch.equal(answered, torch.isfinite(mirrored)) and bool(answered.any())
        assert torch.equal(values[answered], -mirrored[answered])
        bound = link_bound(delta, link)
        assert float(values[answered].abs().max()) == bound
        assert bound == pytest.approx(float(inverse_link(torch.tensor(1.0 - delta, dtype=torch.float64), link)), rel=1e-12)
        won_and_lost = trimmed_value_differences(Comparisons.from_verdicts(torch.tensor([[0], [1]])), delta, link)
        assert float(won_and_lost.sum()) == 0.0 and won_and_lost.tolist() == [bound, -bound]

# -- ZBCPG: blocks -------------------------------------------------------------------------------

def test_zbcpg_estimates_each_block_and_updates_only_the_blocks():
    toy = SoftmaxToy(queries=200, seed=5)
    eps, lr, delta, count = 0.02, 0.05, 0.01, 600_000
    estimator = toy.estimator(mode="zbcpg", eps=eps, lr=lr, trim_delta=delta, blocks=2, block_tensors=1)
    theta = toy.logits()
    info = toy.step(estimator, count)
    diagnostics = info["_diagnostics"]
    blocks = diagnostics["blocks"]
    assert len(blocks) == 2 and len({b[0] for b in blocks}) == 2 and info["blocks"] == [b[0] for b in blocks]
    gradient = value_gradient(theta, toy.reward)
    step = toy.logits() - theta
    inside = torch.zeros(K, dtype=torch.bool)
    for j, (block, rows) in enumerate(zip(blocks, diagnostics["groups"])):
        assert rows == list(range(j, count, 2))
        plus, current = toy.seen[3 * j + 1], toy.seen[3 * j]
        assert torch.equal(current, theta)
        z = (plus - theta) / eps
        values = slice(2 * block[0], 2 * block[0] + 2)  # the block's two logits
        outside = torch.ones(K, dtype=torch.bool)
        outside[values] = False
        assert bool((z[outside] == 0).all()) and float(z[values].norm()) == pytest.approx(math.sqrt(2), rel=1e-12)
        draws = diagnostics["differences"][rows] / eps
        target = float(gradient @ z)
        exact = exact_mean_difference(plus, current, toy.reward, toy.queries, delta) / eps
        assert abs(exact - target) < 0.1 * abs(target)
        assert_within(float(draws.mean()), float(draws.std()) / math.sqrt(len(rows)), target, abs(exact - target),
                      f"block {block}")
        assert info["block_g"][j] == pytest.approx(float(draws.mean()), rel=1e-9)
        assert torch.allclose(step[values], lr * info["block_g"][j] * z[values], rtol=1e-9, atol=1e-12)
        inside[values] = True
    assert bool((step[~inside] == 0).all())  # no pass touched the other tensors


def test_zbcpg_blocks_are_seeded_distinct_windows():
    toy = SoftmaxToy()
    estimator = toy.estimator(mode="zbcpg", blocks=2, block_tensors=2)
    assert estimator.blocks_for(11) == estimator.blocks_for(11)
    seen = {tuple(map(tuple, estimator.blocks_for(seed))) for seed in range(40)}
    assert len(seen) == 2 and all(len(set(blocks)) == 2 for blocks in seen)  # the two windows {0,1}, {2,3}
    with pytest.raises(ValueError, match="only 2 windows"):
        toy.estimator(mode="zbcpg", blocks=3, block_tensors=2).blocks_for(0)


# -- ZO-RankSGD ----------------------------------------------------------------------------------

def win_rate_gradient(logits, reward, tau=1.0):
    """∇W at θ: W(θ') = E_{a~π_θ', b~π_θ} P(a ≻ b), the comparator held at θ."""
    opponent = torch.softmax(logits, 0)
    shaped = torch.sigmoid((reward[:, None] - reward[None, :]) / tau) @ opponent
    return value_gradient(logits, shaped)


@pytest.mark.parametrize("policies", [2, 4])
def test_rank_estimator_mean_is_4_eps_times_the_win_rate_gradient(policies):
    """Each compared pair (i, j) has E[s_ij (ξ_i − ξ_j)] = 2ε·2∇W + O(ε³) (s = ±1 the verdict), so the
    rank estimator (1/|E|) Σ_edges (ξ_winner − ξ_loser) has mean 4ε∇W whatever the graph."""
    generator = torch.Generator().manual_seed(6)
    reward, theta, eps, draws = reward_vector(), start_logits(6), 0.1, 200_000
    xi = torch.randn(draws, policies, K, generator=generator, dtype=torch.float64)
    probs = torch.softmax(theta + eps * xi, -1)
    actions = torch.multinomial(probs.reshape(-1, K), 1, generator=generator).reshape(draws, policies)
    by_pair = {}
    for a in range(policies):
        for b in range(a + 1, policies):
            p = torch.sigmoid(reward[actions[:, a]] - reward[actions[:, b]])
            second = (torch.rand(draws, generator=generator, dtype=torch.float64) >= p).to(torch.float64)
            by_pair[(a, b)] = Comparisons(1 - second, second, torch.zeros(draws, dtype=torch.float64),
                                          torch.ones(draws, dtype=torch.float64))
    net, edges = rank_edges(by_pair, policies, draws)
    assert bool((edges == policies * (policies - 1) / 2).all())
    estimate = ((net / edges[:, None])[..., None] * xi).sum(1)  # [draws, K]: g̃ per draw
    gradient = win_rate_gradient(theta, reward)
    along = gradient / gradient.norm()
    across = torch.randn(K, generator=generator, dtype=torch.float64)
    across = across - (across @ along) * along
    across = across / across.norm()
    for direction, target in ((along, 4 * eps * float(gradient.norm())), (across, 0.0)):
        projected = estimate @ direction
        assert_within(float(projected.mean()), float(projected.std()) / math.sqrt(draws), target,
                      0.03 * 4 * eps * float(gradient.norm()), "rank estimator")


def test_rank_edges_are_the_decided_queries_only():
    """A tie is no edge of the comparison graph (Tang et al.'s DAG): it moves no weight and is not in |E|."""
    by_pair = {(0, 1): Comparisons.from_verdicts(torch.tensor([[0, 0, 2], [2, 2, 2]])),
               (0, 2): Comparisons.from_verdicts(torch.tensor([[1, -1, 2], [0, 1, 2]])),
               (1, 2): Comparisons.from_verdicts(torch.tensor([[2, 2, 2], [1, 1, 2]]))}
    net, edges = rank_edges(by_pair, 3, 2)
    assert edges.tolist() == [3, 4]
    assert net.tolist() == [[1, -2, 1], [0, -2, 2]]


@pytest.mark.parametrize("two_sided", [False, True])
def test_rank_step_updates_along_the_weighted_directions(two_sided):
    toy = SoftmaxToy(queries=3, seed=8)
    lr, eps, m = 0.2, 0.1, 4
    estimator = toy.estimator(mode="zorank", eps=eps, lr=lr, rank_policies=m, two_sided=two_sided)
    theta = toy.logits()
    info = toy.step(estimator, 32)
    diagnostics = info["_diagnostics"]
    weights = diagnostics["per_prompt"].mean(0)
    assert float(weights.sum()) == pytest.approx(0.0, abs=1e-12)  # every edge adds +1 and −1
    assert diagnostics["per_prompt"].shape == (32, m)
    directions = m // 2 if two_sided else m
    expected = torch.zeros(K, dtype=torch.float64)
    for i in range(directions):
        if two_sided:
            z = (toy.seen[1 + 2 * i] - theta) / eps
            assert torch.allclose((toy.seen[2 + 2 * i] - theta) / eps, -z)
            w = float(weights[2 * i] - weights[2 * i + 1])
        else:
            z = (toy.seen[1 + i] - theta) / eps
            w = float(weights[i])
        assert info["rank_weights"][i] == pytest.approx(w, abs=1e-12)
        expected += lr * w * z  # ascent along Σ w_i z_i, no 1/ε (the rank estimator is a direction)
    assert torch.allclose(toy.logits() - theta, expected, rtol=1e-9, atol=1e-12)


# -- a few hundred steps raise the exact value -----------------------------------------------------

@pytest.mark.parametrize("mode,settings", [
    ("zpg", dict(eps=0.1, lr=0.02, judge_queries=1)),
    ("zpg", dict(eps=0.1, lr=0.02, judge_queries=1, two_sided=True)),
    ("zbcpg", dict(eps=0.1, lr=0.05, judge_queries=1, blocks=2, block_tensors=1)),
    ("zorank", dict(eps=0.3, lr=0.5, judge_queries=1, rank_policies=4)),
])
def test_a_few_hundred_steps_raise_the_exact_value(mode, settings):
    toy = SoftmaxToy(queries=settings.pop("judge_queries"), seed=9)
    estimator = toy.estimator(mode=mode, **settings)
    start = toy.value()
    for _ in range(300):
        toy.step(estimator, 32)
    best = float(toy.reward.max())
    assert toy.value() > start + 0.6 * (best - start), (start, toy.value(), best)


def test_guided_steps_follow_the_last_iterations_update():
    """Iteration 0 unguided; mark_iteration forms Δπ; iteration 1 draws z as eq. 2 (α decays from ≈1)."""
    toy = SoftmaxToy(queries=1, seed=10)
    steps = 150
    estimator = toy.estimator(mode="zpg", eps=0.1, lr=0.02, guided=True, steps_per_iteration=steps)
    passes = estimator.passes
    passes.mark_iteration()
    start = toy.value()
    alphas = [toy.step(estimator, 32)["alpha"] for _ in range(steps)]
    assert alphas == [0.0] * steps  # no Δπ yet
    before = toy.logits()
    passes.mark_iteration()
    theta = toy.logits()
    delta_pi = theta - start_logits(10)
    info = toy.step(estimator, 32)
    z = (toy.seen[1] - theta) / 0.1
    assert info["alpha"] == pytest.approx(1 - 1e-3)
    for part, moved in zip(z.split(2), delta_pi.split(2)):  # per tensor (granularity "tensor")
        cosine = float(part @ moved / (part.norm() * moved.norm()))
        assert cosine > 0.99, cosine  # α ≈ 1: z is (almost) Δπ, tensor by tensor
    for _ in range(steps - 1):
        info = toy.step(estimator, 32)
    assert info["alpha"] < 0.05 and toy.value() > start + 0.5 * (float(toy.reward.max()) - start)
    assert not torch.equal(before, toy.logits())


# -- the passes: bit-for-bit restores -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_perturbations_restore_bit_for_bit(dtype):
    toy = SoftmaxToy(seed=11, dtype=dtype)
    estimator = toy.estimator(mode="zorank", eps=1e-3, lr=0.0, rank_policies=4, two_sided=True)
    original = [p.detach().clone() for p in toy.params]
    for _ in range(20):  # lr = 0: every pass runs, θ₀ never moves
        toy.step(estimator, 4)
    assert all(torch.equal(p.detach(), o) for p, o in zip(toy.params, original))
    passes = estimator.passes
    table = passes.direction(3, kind="gaussian")[0]
    passes.perturb(3, table, 1e-3)
    assert not all(torch.equal(p.detach(), o) for p, o in zip(toy.params, original))
    passes.restore()
    assert all(torch.equal(p.detach(), o) for p, o in zip(toy.params, original))


def test_optimizer_state_resumes_the_same_steps():
    first, second = SoftmaxToy(queries=2, seed=12), SoftmaxToy(queries=2, seed=12)
    a, b = first.estimator(mode="zpg", lr=0.1), second.estimator(mode="zpg", lr=0.1)
    for _ in range(3):
        first.step(a, 8)
        second.step(b, 8)
    state = a.passes.state_dict()
    third = SoftmaxToy(queries=2, seed=99)
    c = third.estimator(mode="zpg", lr=0.1)
    c.passes.load_state_dict(state)
    third.generator.set_state(first.generator.get_state())
    assert torch.equal(third.logits(), first.logits())
    first.step(a, 8)
    third.step(c, 8)
    assert torch.equal(third.logits(), first.logits())


# -- the simulated human --------------------------------------------------------------------------

def test_simulated_human_follows_bradley_terry_and_is_seeded():
    judge = SimulatedHumanJudge(lambda prompt, response: len(response.split()), tau=2.0, seed=3)
    assert judge.probability("p", "a b c", "a") == pytest.approx(1 / (1 + math.exp(-1.0)))
    verdicts = judge.judge_batch(["p"] * 2, ["a b c", "a"], ["a", "a b c"], queries=20_000, seed=5)
    share = (verdicts == 0).double().mean(1)
    p = 1 / (1 + math.exp(-1.0))
    se = math.sqrt(p * (1 - p) / 20_000)
    assert abs(float(share[0]) - p) < 4 * se and abs(float(share[1]) - (1 - p)) < 4 * se
    assert torch.equal(verdicts, judge.judge_batch(["p"] * 2, ["a b c", "a"], ["a", "a b c"], queries=20_000, seed=5))
    assert not torch.equal(verdicts, judge.judge_batch(["p"] * 2, ["a b c", "a"], ["a", "a b c"], queries=20_000,
                                                       seed=6))
    # one call per pair: a pure function of (seed, prompt, a, b); over many pairs the same frequency
    calls = [judge(f"prompt {i}", "a b c", "a") for i in range(4000)]
    assert calls == [judge(f"prompt {i}", "a b c", "a") for i in range(4000)]
    assert abs(calls.count(0) / 4000 - p) < 4 * math.sqrt(p * (1 - p) / 4000)
    other = SimulatedHumanJudge(lambda prompt, response: len(response.split()), tau=2.0, seed=4)
    assert calls != [other(f"prompt {i}", "a b c", "a") for i in range(4000)]
    assert judge.score("p", "x y") == 2.0
    with pytest.raises(ValueError, match="tau"):
        SimulatedHumanJudge(len, tau=0.0)


def test_compare_many_batches_and_asks_a_deterministic_judge_once():
    asked = []

    def judge(prompt, a, b):
        asked.append((a, b))
        if a == "boom":
            raise RuntimeError("no verdict")
        return None if a == b else int(len(b) > len(a))

    judge.deterministic = True
    result = compare_many(judge, ["p"] * 3, ["aa", "boom", "c"], ["a", "b", "c"], queries=4)
    assert len(asked) == 3 and result.failures == 4 and "no verdict" in result.first_error
    assert result.first_wins.tolist() == [4, 0, 0] and result.answered.tolist() == [4, 0, 4]
    assert result.ties.tolist() == [0, 0, 4] and result.second_wins.tolist() == [0, 0, 0]
    calls = []
    stochastic = compare_many(lambda p, a, b: calls.append(a) or 1, ["p"], ["a"], ["b"], queries=3)
    assert len(calls) == 3 and stochastic.second_wins.tolist() == [3]
