"""Metrics of the policy-reward interplay over a run, global and per tensor ("layer").

- angle between ΔR_t and Δπ_{t+1} (the orthogonality finding: the next policy update is
  orthogonal to the reward model's last update) and the Pearson correlation of their entries;
- cosine between consecutive policy updates Δπ_t, Δπ_{t+1} (the previous update predicts the next);
- distance correlation between the two trajectories, with its permutation null (its value for
  independent samples is not 0: it is biased upwards for few samples);
- Procrustes disparity between the policy and reward trajectories (scipy.spatial.procrustes).

Undefined values (a zero update, fewer than two states) are NaN in memory, empty in CSV and
null in JSON: never an error.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import re
from pathlib import Path

import numpy as np

from .trajectory import Trajectory

GLOBAL_LAYER = "(all)"
PAIR_KINDS = ("reward_then_policy", "policy_consecutive")


def natural_key(name: str) -> list:
    """Sort key putting layers.2 before layers.10 (numbers compared as numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def single_threaded_blas():
    """A context limiting BLAS to one thread, through threadpoolctl when it is installed.

    The metrics are thousands of tiny BLAS calls (n×n with n = states); on a shared CPU with
    torch's threads alive, OpenBLAS's threads spin against each other and made a 224-tensor run
    7× slower (163 s against 23 s on 2 cores). Without threadpoolctl this does nothing."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    norms = np.linalg.norm(a) * np.linalg.norm(b)
    return float(np.dot(a, b) / norms) if norms > 0 else math.nan


def angle_degrees(a: np.ndarray, b: np.ndarray) -> float:
    """Angle in degrees, as 2·atan2(‖â−b̂‖, ‖â+b̂‖): acos of the cosine loses half the digits
    near 0° and 180° (acos(1 − δ) ≈ √(2δ))."""
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    norm_a, norm_b = np.linalg.norm(a), np.linalg.norm(b)
    if norm_a == 0 or norm_b == 0:
        return math.nan
    a, b = a / norm_a, b / norm_b
    return math.degrees(2 * math.atan2(np.linalg.norm(a - b), np.linalg.norm(a + b)))


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    return cosine(a - a.mean(), b - b.mean()) if a.size > 1 else math.nan


def _centred_distances(samples: np.ndarray) -> np.ndarray:
    """Double-centred Euclidean distance matrix of the rows (through the Gram matrix: rows may
    have millions of columns, and there are few of them)."""
    x = np.asarray(samples, np.float64).reshape(len(samples), -1)
    x = x - x.mean(axis=0)  # translation-invariant; avoids cancellation in the Gram form
    gram = x @ x.T
    squared = np.diag(gram)[:, None] + np.diag(gram)[None, :] - 2 * gram
    distances = np.sqrt(np.maximum(squared, 0.0))
    return distances - distances.mean(axis=0) - distances.mean(axis=1)[:, None] + distances.mean()


def _dcor_from_centred(a: np.ndarray, b: np.ndarray) -> float:
    dcov2 = (a * b).mean()
    dvar2 = (a * a).mean() * (b * b).mean()
    if dvar2 <= 0:
        return math.nan
    return math.sqrt(max(dcov2, 0.0) / math.sqrt(dvar2))


def distance_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Székely's (biased, V-statistic) distance correlation between paired samples: row i of x
    with row i of y. 0 only for independence in the limit; in [0, 1]."""
    if len(x) != len(y):
        raise ValueError(f"distance correlation needs paired samples, got {len(x)} and {len(y)} rows")
    if len(x) < 2:
        return math.nan
    return _dcor_from_centred(_centred_distances(x), _centred_distances(y))


def distance_correlation_test(x, y, *, permutations: int = 199, seed: int = 0) -> dict:
    """Distance correlation with its permutation null: the mean null value and a p-value."""
    if len(x) != len(y):
        raise ValueError(f"distance correlation needs paired samples, got {len(x)} and {len(y)} rows")
    if len(x) < 2:
        return {"dcor": math.nan, "null_mean": math.nan, "p_value": math.nan, "samples": len(x)}
    a, b = _centred_distances(x), _centred_distances(y)
    observed = _dcor_from_centred(a, b)
    if math.isnan(observed) or permutations == 0:
        return {"dcor": observed, "null_mean": math.nan, "p_value": math.nan, "samples": len(x)}
    rng = np.random.default_rng(seed)
    null = []
    for _ in range(permutations):
        order = rng.permutation(len(b))
        null.append(_dcor_from_centred(a, b[np.ix_(order, order)]))
    null = np.array(null)
    p_value = (1 + np.sum(null >= observed - 1e-12)) / (1 + permutations)
    return {"dcor": observed, "null_mean": float(np.nanmean(null)), "p_value": float(p_value), "samples": len(x)}


def _in_joint_row_space(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both matrices in an orthonormal basis of their joint row space (at most 2n columns). This
    changes neither distances, centring nor the optimal rotation, so Procrustes is exact on it;
    scipy itself works on the d×d cross-product, impossible for millions of columns."""
    a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
    if a.shape[1] > 2 * len(a):
        basis, _ = np.linalg.qr(np.concatenate([a, b]).T)
        a, b = a @ basis, b @ basis
    return a, b


def _scipy_disparity(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.spatial import procrustes

    try:
        return float(procrustes(a, b)[2])
    except ValueError:  # a trajectory that does not move: no shape to compare
        return math.nan


def _check_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"Procrustes needs trajectories of the same shape, got {a.shape} and {b.shape}")
    return a, b


def procrustes_disparity(a: np.ndarray, b: np.ndarray) -> float:
    """scipy.spatial.procrustes disparity between two trajectories (rows: states, aligned)."""
    a, b = _check_pair(a, b)
    if len(a) < 2:
        return math.nan
    return _scipy_disparity(*_in_joint_row_space(a, b))


def procrustes_test(a, b, *, permutations: int = 199, seed: int = 0) -> dict:
    """Disparity with a permutation null: the reward states in shuffled order. A few states in
    many dimensions are near a regular simplex whatever they are, so unrelated trajectories can
    score far below 1; the null says what "unrelated" scores here, and p how often it did as well.
    Caveat: any two random walks share a shape (squared distance grows like |i − j|), so a low
    disparity with a low p says the roles move like walks of similar regularity, not that they
    are coupled; the update-level metrics (angles, dcor of deltas) speak to coupling."""
    a, b = _check_pair(a, b)
    if len(a) < 3:  # two points always match exactly: no test
        return {
            "disparity": procrustes_disparity(a, b) if len(a) == 2 else math.nan,
            "null_mean": math.nan,
            "p_value": math.nan,
        }
    a, b = _in_joint_row_space(a, b)
    observed = _scipy_disparity(a, b)
    if math.isnan(observed) or permutations == 0:
        return {"disparity": observed, "null_mean": math.nan, "p_value": math.nan}
    rng = np.random.default_rng(seed)
    null = np.array([_scipy_disparity(a, b[rng.permutation(len(b))]) for _ in range(permutations)])
    p_value = (1 + np.sum(null <= observed + 1e-12)) / (1 + permutations)
    return {"disparity": observed, "null_mean": float(np.nanmean(null)), "p_value": float(p_value)}


def _next_key(keys: list[int], after: int):
    later = [k for k in keys if k > after]
    return min(later) if later else None


def _pair_rows(trajectory: Trajectory, layer: str | None) -> list[dict]:
    name = GLOBAL_LAYER if layer is None else layer
    policy_keys, policy_deltas = trajectory.policy.deltas(layer)
    reward_keys, reward_deltas = trajectory.reward.deltas(layer)
    policy_by_key = dict(zip(policy_keys, policy_deltas))
    rows = []
    for key, reward_delta in zip(reward_keys, reward_deltas):
        nxt = _next_key(policy_keys, key)  # ΔR_t guides the policy's next iteration
        if nxt is not None:
            rows.append(_compare("reward_then_policy", name, key, nxt, reward_delta, policy_by_key[nxt]))
    for key, nxt in zip(policy_keys, policy_keys[1:]):
        rows.append(_compare("policy_consecutive", name, key, nxt, policy_by_key[key], policy_by_key[nxt]))
    return rows


def null_angle_std_degrees(dims: int) -> float:
    """Spread of the angle between two independent random directions in ``dims`` dimensions:
    90° ± this (cos ~ N(0, 1/dims)). Orthogonality means something only when clearly tighter, or
    when the alternative (alignment) was plausible: in millions of dimensions anything random is
    at 90°."""
    return math.degrees(1 / math.sqrt(dims)) if dims > 0 else math.nan


def _compare(kind, layer, iteration, next_iteration, first, second) -> dict:
    c = cosine(first, second)
    return {
        "kind": kind,
        "layer": layer,
        "iteration": int(iteration),
        "next_iteration": int(next_iteration),
        "cosine": c,
        "cosine_z": c * math.sqrt(np.size(first)),  # ~N(0, 1) for independent random directions
        "angle_deg": angle_degrees(first, second),
        "pearson": pearson(first, second),
        "norm_first": float(np.linalg.norm(first)),
        "norm_second": float(np.linalg.norm(second)),
    }


def _trajectory_row(trajectory: Trajectory, layer: str | None, permutations: int, seed: int) -> dict:
    keys, policy_states, reward_states = trajectory.aligned_states(layer)
    policy_keys, policy_deltas = trajectory.policy.deltas(layer)
    reward_keys, reward_deltas = trajectory.reward.deltas(layer)
    policy_by_key = dict(zip(policy_keys, policy_deltas))
    pairs = [
        (r, policy_by_key[_next_key(policy_keys, k)])
        for k, r in zip(reward_keys, reward_deltas)
        if _next_key(policy_keys, k) is not None
    ]
    procrustes = procrustes_test(policy_states, reward_states, permutations=permutations, seed=seed)
    states_test = distance_correlation_test(policy_states, reward_states, permutations=permutations, seed=seed)
    if pairs:
        deltas_test = distance_correlation_test(
            np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), permutations=permutations, seed=seed
        )
    else:
        deltas_test = distance_correlation_test(np.zeros((0, 1)), np.zeros((0, 1)))
    return {
        "layer": GLOBAL_LAYER if layer is None else layer,
        "states": len(keys),
        "procrustes_disparity": procrustes["disparity"],
        "procrustes_null_mean": procrustes["null_mean"],
        "procrustes_p_value": procrustes["p_value"],
        "dcor_states": states_test["dcor"],
        "dcor_states_null_mean": states_test["null_mean"],
        "dcor_states_p_value": states_test["p_value"],
        "delta_pairs": len(pairs),
        "dcor_deltas": deltas_test["dcor"],
        "dcor_deltas_null_mean": deltas_test["null_mean"],
        "dcor_deltas_p_value": deltas_test["p_value"],
    }


def compute_metrics(
    trajectory: Trajectory,
    *,
    per_layer: bool = True,
    permutations: int = 199,
    layer_permutations: int = 0,
    seed: int = 0,
) -> dict:
    """All metrics of a run: ``pairs`` (per iteration), ``trajectory`` (per run), ``delta_norms``
    and a ``summary`` of the global values. Rows with layer ``"(all)"`` are over all tensors.

    ``permutations``: size of the permutation nulls of the global distance correlations and
    Procrustes disparity; ``layer_permutations`` the same per tensor (0: values without a null,
    since 224+ tensors × hundreds of tiny permutations dominate the run time otherwise)."""
    pairs = _pair_rows(trajectory, None)
    whole = [_trajectory_row(trajectory, None, permutations, seed)]
    for layer in trajectory.names if per_layer else []:
        pairs.extend(_pair_rows(trajectory, layer))
        whole.append(_trajectory_row(trajectory, layer, layer_permutations, seed))
    delta_norms = []
    for role in ("policy", "reward"):
        keys, deltas = trajectory.role(role).deltas()
        delta_norms.extend(
            {"role": role, "iteration": int(k), "norm": float(np.linalg.norm(d))} for k, d in zip(keys, deltas)
        )
    summary = _summary(pairs, whole[0], trajectory.policy.matrix.shape[1])
    return {"pairs": pairs, "trajectory": whole, "delta_norms": delta_norms, "summary": summary}


def _summary(pairs: list[dict], global_row: dict, dims: int) -> dict:
    def mean_of(kind, key, absolute=False):
        values = [
            abs(r[key]) if absolute else r[key]
            for r in pairs
            if r["kind"] == kind and r["layer"] == GLOBAL_LAYER and not math.isnan(r[key])
        ]
        return float(np.mean(values)) if values else math.nan

    return {
        "mean_angle_reward_then_policy_deg": mean_of("reward_then_policy", "angle_deg"),
        "random_direction_angle_std_deg": null_angle_std_degrees(dims),
        "mean_abs_cosine_z_reward_then_policy": mean_of("reward_then_policy", "cosine_z", absolute=True),
        "mean_pearson_reward_then_policy": mean_of("reward_then_policy", "pearson"),
        "mean_cosine_consecutive_policy": mean_of("policy_consecutive", "cosine"),
        "procrustes_disparity": global_row["procrustes_disparity"],
        "procrustes_null_mean": global_row["procrustes_null_mean"],
        "procrustes_p_value": global_row["procrustes_p_value"],
        "dcor_states": global_row["dcor_states"],
        "dcor_states_null_mean": global_row["dcor_states_null_mean"],
        "dcor_states_p_value": global_row["dcor_states_p_value"],
        "dcor_deltas": global_row["dcor_deltas"],
        "dcor_deltas_null_mean": global_row["dcor_deltas_null_mean"],
        "dcor_deltas_p_value": global_row["dcor_deltas_p_value"],
    }


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as handle:
        if not rows:
            return
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})


def write_metrics(metrics: dict, directory) -> dict[str, Path]:
    """metrics.json (everything) plus pairs.csv, trajectory.csv and delta_norms.csv."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {"json": directory / "metrics.json"}
    paths["json"].write_text(json.dumps(_jsonable(metrics), indent=1, allow_nan=False) + "\n")
    for table in ("pairs", "trajectory", "delta_norms"):
        paths[table] = directory / f"{table}.csv"
        _write_csv(paths[table], metrics[table])
    return paths
