"""Metrics against synthetic trajectories with known answers and against numpy/scipy/naive oracles."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial import procrustes as scipy_procrustes
from scipy.stats import ortho_group

from zopro_kernels.analysis.metrics import (
    GLOBAL_LAYER,
    angle_degrees,
    compute_metrics,
    cosine,
    distance_correlation,
    distance_correlation_test,
    pearson,
    procrustes_disparity,
)
from zopro_kernels.analysis.trajectory import load_trajectory

from .trajectories import SHAPES, orthogonal_run, random_state, record_states


def test_hand_computed_values():
    assert angle_degrees([1.0, 0.0], [1.0, 1.0]) == pytest.approx(45.0, abs=1e-12)
    assert angle_degrees([1.0, 2.0], [-2.0, 1.0]) == pytest.approx(90.0, abs=1e-12)
    assert angle_degrees([1.0, 2.0], [-1.0, -2.0]) == pytest.approx(180.0, abs=1e-12)
    assert angle_degrees([1.0, 0.0], [1.0, 1e-9]) == pytest.approx(math.degrees(1e-9), rel=1e-6)  # acos would say 0
    assert math.isnan(angle_degrees([0.0, 0.0], [1.0, 2.0]))
    assert cosine([3.0, 4.0], [4.0, 3.0]) == pytest.approx(24 / 25, abs=1e-15)
    assert math.isnan(cosine([0.0, 0.0], [1.0, 2.0]))  # a zero update has no direction


def test_pearson_matches_numpy():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal(101), rng.standard_normal(101)
    b += 0.5 * a
    assert pearson(a, b) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)


def _bound_from_float32_storage(trajectory):
    """|cos| a float32-rounded orthogonal pair can show: each stored value is off by at most
    eps/2 relative, so a delta is off by ≲ eps·‖state‖, and the cosine by that over ‖delta‖."""
    eps = np.finfo(np.float32).eps
    state_norm = max(np.abs(trajectory.policy.matrix).max(), np.abs(trajectory.reward.matrix).max()) * math.sqrt(
        trajectory.policy.matrix.shape[1]
    )
    smallest_delta = min(np.linalg.norm(d) for role in ("policy", "reward") for d in trajectory.role(role).deltas()[1])
    return 4 * eps * state_norm / smallest_delta


def test_orthogonal_by_construction_gives_90_degrees(tmp_path):
    trajectory = load_trajectory(orthogonal_run(tmp_path))
    metrics = compute_metrics(trajectory, permutations=19)
    rows = [r for r in metrics["pairs"] if r["kind"] == "reward_then_policy"]
    assert {r["layer"] for r in rows} == {GLOBAL_LAYER, *SHAPES}
    assert len([r for r in rows if r["layer"] == GLOBAL_LAYER]) == 5  # ΔR_1..ΔR_5 each with the next Δπ
    tolerance_deg = math.degrees(_bound_from_float32_storage(trajectory))
    assert 0 < tolerance_deg < 1e-2
    for row in rows:
        assert row["angle_deg"] == pytest.approx(90.0, abs=tolerance_deg), row
        assert row["next_iteration"] == row["iteration"] + 1


def test_consecutive_policy_updates_that_are_not_orthogonal_are_not_90(tmp_path):
    # Control for the test above: the same run's consecutive policy updates are random, not ⟂-made.
    trajectory = load_trajectory(orthogonal_run(tmp_path))
    rows = compute_metrics(trajectory, per_layer=False, permutations=19)["pairs"]
    angles = [r["angle_deg"] for r in rows if r["kind"] == "policy_consecutive"]
    assert max(abs(a - 90) for a in angles) > 1.0


def test_identical_consecutive_updates_give_cosine_one(tmp_path):
    rng = np.random.default_rng(2)
    start, update = random_state(rng), {k: 0.05 * v for k, v in random_state(rng).items()}
    policy = [{k: start[k] + t * update[k] for k in SHAPES} for t in range(5)]
    reward = [random_state(rng) for _ in range(5)]
    trajectory = load_trajectory(record_states(tmp_path, policy, reward, dtype=torch.float32))
    rows = [r for r in compute_metrics(trajectory, permutations=19)["pairs"] if r["kind"] == "policy_consecutive"]
    assert len(rows) == 3 * (1 + len(SHAPES))
    tolerance = _bound_from_float32_storage(trajectory)
    for row in rows:
        assert row["cosine"] == pytest.approx(1.0, abs=tolerance), row
        assert row["pearson"] == pytest.approx(1.0, abs=10 * tolerance), row


def test_rotated_copy_has_zero_procrustes_disparity(tmp_path):
    rng = np.random.default_rng(3)
    policy = [random_state(rng) for _ in range(6)]
    columns = sum(int(np.prod(s)) for s in SHAPES.values())
    rotation = ortho_group.rvs(columns, random_state=4)
    flat = np.stack([np.concatenate([s[k].ravel() for k in sorted(SHAPES)]) for s in policy])
    rotated = 2.5 * flat @ rotation + 7.0  # rotation, scale and shift: the same shape
    reward, start = [], 0
    for row in rotated:
        state, start = {}, 0
        for name in sorted(SHAPES):
            size = int(np.prod(SHAPES[name]))
            state[name] = row[start : start + size].reshape(SHAPES[name])
            start += size
        reward.append(state)
    trajectory = load_trajectory(record_states(tmp_path, policy, reward, dtype=torch.float32))
    global_row = compute_metrics(trajectory, per_layer=False, permutations=19)["trajectory"][0]
    assert global_row["procrustes_disparity"] == pytest.approx(0.0, abs=1e-10)
    # Control: a straight-line trajectory has another shape. (Two random point clouds would not do:
    # in many dimensions both are near-regular simplices, whose disparity is small.)
    line = np.outer(np.arange(6.0), rng.standard_normal(columns))
    assert procrustes_disparity(flat, line) > 0.5


@pytest.mark.parametrize("rows, columns", [(5, 3), (6, 40), (8, 300)], ids=["narrow", "wide", "very-wide"])
def test_procrustes_reduction_matches_scipy(rows, columns):
    # Wide inputs go through an orthonormal basis of the row space: must equal scipy on the raw data.
    rng = np.random.default_rng(rows * columns)
    a, b = rng.standard_normal((rows, columns)), rng.standard_normal((rows, columns))
    b[:, 0] += 3 * a[:, 0]
    assert procrustes_disparity(a, b) == pytest.approx(scipy_procrustes(a, b)[2], rel=1e-9, abs=1e-12)


def _naive_distance_correlation(x, y):
    """Székely, Rizzo & Bakirov (2007), written out with loops: the definition, not our algebra."""
    n = len(x)
    a = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(n)] for i in range(n)])
    b = np.array([[np.linalg.norm(y[i] - y[j]) for j in range(n)] for i in range(n)])
    A = np.empty_like(a)
    B = np.empty_like(b)
    for i in range(n):
        for j in range(n):
            A[i, j] = a[i, j] - a[i].mean() - a[:, j].mean() + a.mean()
            B[i, j] = b[i, j] - b[i].mean() - b[:, j].mean() + b.mean()
    dcov = (A * B).sum() / n**2
    return math.sqrt(dcov / math.sqrt((A * A).sum() / n**2 * (B * B).sum() / n**2))


def test_distance_correlation_matches_definition():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((12, 4))
    y = np.hstack([x[:, :1] ** 2, rng.standard_normal((12, 2))])
    assert distance_correlation(x, y) == pytest.approx(_naive_distance_correlation(x, y), rel=1e-10)
    assert distance_correlation(x, x) == pytest.approx(1.0, abs=1e-12)
    assert distance_correlation(x, 3 * x @ ortho_group.rvs(4, random_state=0) + 1) == pytest.approx(1.0, abs=1e-12)


def test_distance_correlation_of_independent_noise_is_at_its_null_value():
    # For independent samples dcor is not 0 but the permutation null's typical value, and the
    # p-value is uniform: over many independent pairs, dcor - null mean averages 0, p averages 1/2.
    gaps, p_values = [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        x, y = rng.standard_normal((30, 20)), rng.standard_normal((30, 20))
        result = distance_correlation_test(x, y, permutations=99, seed=seed)
        assert result["null_mean"] > 0.3  # the null value is far from 0 for 30 wide samples
        gaps.append(result["dcor"] - result["null_mean"])
        p_values.append(result["p_value"])
    assert abs(np.mean(gaps)) < 0.01
    assert 0.35 < np.mean(p_values) < 0.65  # uniform p: mean 1/2, standard error 0.065


def test_distance_correlation_detects_nonlinear_dependence():
    rng = np.random.default_rng(7)
    half = rng.standard_normal((40, 3))
    x = np.concatenate([half, -half])  # symmetric: x and |x| are exactly uncorrelated
    y = np.abs(x) + 0.05 * rng.standard_normal((80, 3))
    assert abs(np.corrcoef(x[:, 0], np.abs(x[:, 0]))[0, 1]) < 1e-12
    result = distance_correlation_test(x, y, permutations=199, seed=0)
    assert result["p_value"] <= 0.01
    assert result["dcor"] > result["null_mean"] + 0.1


def test_too_few_states_gives_nan_not_an_error(tmp_path):
    rng = np.random.default_rng(8)
    trajectory = load_trajectory(record_states(tmp_path, [random_state(rng)], [random_state(rng)]))
    metrics = compute_metrics(trajectory, permutations=9)
    assert metrics["pairs"] == []
    assert math.isnan(metrics["trajectory"][0]["procrustes_disparity"])
    assert math.isnan(metrics["summary"]["mean_angle_reward_then_policy_deg"])


def test_random_directions_match_the_null_angle_spread():
    # Independent random directions: cos·√d ~ N(0, 1), so the angle is 90° ± null_angle_std_degrees(d).
    from zopro_kernels.analysis.metrics import null_angle_std_degrees

    rng = np.random.default_rng(9)
    dims = 400
    angles = np.array([angle_degrees(rng.standard_normal(dims), rng.standard_normal(dims)) for _ in range(400)])
    assert np.std(angles) == pytest.approx(null_angle_std_degrees(dims), rel=0.15)
    assert abs(np.mean(angles) - 90) < 4 * null_angle_std_degrees(dims) / math.sqrt(len(angles))


def test_procrustes_null_separates_a_rotated_copy_from_unrelated_states():
    from zopro_kernels.analysis.metrics import procrustes_test

    rng = np.random.default_rng(10)
    walk = np.cumsum(rng.standard_normal((8, 200)), axis=0)
    rotated = procrustes_test(walk, 3 * walk @ ortho_group.rvs(200, random_state=1), permutations=99)
    assert rotated["disparity"] == pytest.approx(0, abs=1e-10)
    assert rotated["p_value"] == pytest.approx(1 / 100)  # no shuffle does as well
    # Exchangeable, unrelated states: the observed order is one draw from the null, p is uniform.
    p_values = [
        procrustes_test(rng.standard_normal((6, 50)), rng.standard_normal((6, 50)), permutations=49, seed=k)["p_value"]
        for k in range(20)
    ]
    assert 0.3 < np.mean(p_values) < 0.7


def test_layers_sort_in_natural_order():
    from zopro_kernels.analysis.metrics import natural_key

    names = ["layers.10.q_proj.lora_A", "layers.2.q_proj.lora_B", "layers.2.q_proj.lora_A", "embed", "layers.1.v"]
    assert sorted(names, key=natural_key) == [
        "embed",
        "layers.1.v",
        "layers.2.q_proj.lora_A",
        "layers.2.q_proj.lora_B",
        "layers.10.q_proj.lora_A",
    ]
