"""Recorder round trips (float32, bf16, projection) and the loader's errors and conventions."""

import json
import math

import numpy as np
import pytest
import torch

from zopro_kernels.analysis import TrajectoryRecorder
from zopro_kernels.analysis.recorder import project_tensor
from zopro_kernels.analysis.trajectory import TrajectoryError, load_trajectory

from .trajectories import SHAPES


def _tensors(seed, shapes=SHAPES, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    return {name: scale * torch.randn(shape, generator=generator) for name, shape in shapes.items()}


def _flat(tensors, dtype=torch.float64):
    return np.concatenate([tensors[k].to(dtype).reshape(-1).numpy() for k in sorted(tensors)])


def _record(directory, snapshots, **options):
    """snapshots: [(role, tensors, iteration, step)]"""
    recorder = TrajectoryRecorder(directory, **options)
    for role, tensors, iteration, step in snapshots:
        recorder.record(role, tensors, iteration, step)
    recorder.close()
    return recorder


def test_float32_round_trip_is_exact_and_index_reports_disk_use(tmp_path):
    snapshots = [
        (role, _tensors(10 * i + (role == "reward")), i, 5 * i) for i in range(3) for role in ("policy", "reward")
    ]
    recorder = _record(tmp_path / "trajectory", snapshots)
    trajectory = load_trajectory(tmp_path)
    for role in ("policy", "reward"):
        expected = [s[1] for s in snapshots if s[0] == role]
        loaded = trajectory.role(role)
        assert loaded.labels == [(0, 0), (1, 5), (2, 10)]
        np.testing.assert_array_equal(loaded.matrix, np.stack([_flat(t) for t in expected]))
        name = "layers.1.lora_B"
        np.testing.assert_array_equal(loaded.layer(name)[2], expected[2][name].double().reshape(-1).numpy())
    index = json.loads((tmp_path / "trajectory" / "index.json").read_text())
    assert len(index["snapshots"]) == 6
    for entry in index["snapshots"]:
        assert entry["bytes"] == (tmp_path / "trajectory" / entry["file"]).stat().st_size
        assert entry["numel_original"] == entry["numel_stored"] == sum(math.prod(s) for s in SHAPES.values())
    assert index["total_bytes"] == recorder.total_bytes == sum(e["bytes"] for e in index["snapshots"])


def test_bf16_round_trip_equals_torch_rounding_and_halves_disk(tmp_path):
    tensors = _tensors(1)
    _record(tmp_path / "f32" / "trajectory", [("policy", tensors, 0, 0), ("reward", tensors, 0, 0)])
    _record(
        tmp_path / "bf16" / "trajectory", [("policy", tensors, 0, 0), ("reward", tensors, 0, 0)], dtype=torch.bfloat16
    )
    loaded = load_trajectory(tmp_path / "bf16")
    expected = _flat({k: v.to(torch.bfloat16) for k, v in tensors.items()})
    np.testing.assert_array_equal(loaded.policy.matrix[0], expected)
    values = sum(math.prod(s) for s in SHAPES.values())
    sizes = {
        d: json.loads((tmp_path / d / "trajectory" / "index.json").read_text())["snapshots"][0]["bytes"]
        for d in ("f32", "bf16")
    }
    assert sizes["f32"] - sizes["bf16"] == pytest.approx(2 * values, abs=64)  # 2 bytes saved per value (header aside)


def test_projection_is_deterministic_shared_by_roles_and_seed_dependent(tmp_path):
    tensors = _tensors(2, {"big": (64, 50), "small": (3, 2)})
    _record(tmp_path / "a", [("policy", tensors, 0, 0), ("reward", tensors, 0, 0)], projection_dim=32, seed=7)
    _record(tmp_path / "b", [("policy", tensors, 0, 0), ("reward", tensors, 0, 0)], projection_dim=32, seed=7)
    _record(tmp_path / "c", [("policy", tensors, 0, 0), ("reward", tensors, 0, 0)], projection_dim=32, seed=8)
    a, b, c = (load_trajectory(tmp_path / d) for d in "abc")
    np.testing.assert_array_equal(a.policy.matrix, b.policy.matrix)  # same seed: same projection
    np.testing.assert_array_equal(a.policy.matrix, a.reward.matrix)  # same for both roles
    assert not np.array_equal(a.policy.layer("big"), c.policy.layer("big"))  # seed changes it
    assert a.policy.layer("big").shape == (1, 32)
    # Tensors no larger than the projection are stored as they are.
    np.testing.assert_array_equal(a.policy.layer("small")[0], tensors["small"].double().reshape(-1).numpy())
    index = json.loads((tmp_path / "a" / "index.json").read_text())
    assert index["projection_dim"] == 32 and index["snapshots"][0]["numel_stored"] == 32 + 6


def test_projection_is_linear_and_preserves_angles_approximately():
    generator = torch.Generator().manual_seed(3)
    x, y = (
        torch.randn(20000, generator=generator, dtype=torch.float64),
        torch.randn(20000, generator=generator, dtype=torch.float64),
    )
    y = 0.6 * x + 0.8 * y  # cos(x, y) ≈ 0.6
    dim = 2048
    px, py = (project_tensor(v, dim, seed=0, name="w").numpy() for v in (x, y))
    np.testing.assert_allclose(project_tensor(2 * x - y, dim, 0, "w").numpy(), 2 * px - py, atol=1e-10)
    true_cos = float(x @ y / (x.norm() * y.norm()))
    sketch_cos = px @ py / (np.linalg.norm(px) * np.linalg.norm(py))
    # Count-sketch inner products have relative standard error ≤ sqrt(2/dim): allow 4 of them.
    assert abs(sketch_cos - true_cos) < 4 * math.sqrt(2 / dim)
    assert np.linalg.norm(px) ** 2 / float(x @ x) == pytest.approx(1.0, abs=4 * math.sqrt(2 / dim))


def test_iteration_states_use_start_and_last_snapshot_of_each_iteration(tmp_path):
    # Start (0, 0), two more snapshots in iteration 0, one in iteration 1, two in iteration 2.
    labels = [(0, 0), (0, 4), (0, 8), (1, 12), (2, 13), (2, 16)]
    snapshots = [("policy", _tensors(i), it, st) for i, (it, st) in enumerate(labels)]
    snapshots += [("reward", _tensors(100 + i), it, st) for i, (it, st) in enumerate(labels)]
    _record(tmp_path / "trajectory", snapshots)
    trajectory = load_trajectory(tmp_path)
    keys, rows = trajectory.policy.state_rows()
    assert keys == [-1, 0, 1, 2] and rows == [0, 2, 3, 5]
    delta_keys, deltas = trajectory.policy.deltas()
    assert delta_keys == [0, 1, 2]
    np.testing.assert_allclose(deltas[0], _flat(_tensors(2)) - _flat(_tensors(0)))


def test_intermediate_snapshot_is_not_mistaken_for_a_start_state(tmp_path):
    # The RLOO loop's pattern: policy every k steps plus at each iteration's end, no step-0 snapshot.
    snapshots = [
        ("policy", _tensors(0), 0, 2),
        ("policy", _tensors(1), 0, 4),
        ("policy", _tensors(2), 1, 6),
        ("policy", _tensors(3), 1, 8),
        ("reward", _tensors(10), 0, 4),
        ("reward", _tensors(11), 1, 8),
    ]
    _record(tmp_path / "trajectory", snapshots)
    trajectory = load_trajectory(tmp_path)
    assert trajectory.policy.state_rows() == ([0, 1], [1, 3])
    assert trajectory.policy.deltas()[0] == trajectory.reward.deltas()[0] == [1]


def test_recording_twice_replaces_and_reopening_resumes(tmp_path):
    directory = tmp_path / "trajectory"
    _record(directory, [("policy", _tensors(0), 0, 0), ("policy", _tensors(1), 0, 0), ("reward", _tensors(2), 0, 0)])
    _record(directory, [("policy", _tensors(3), 1, 1), ("reward", _tensors(4), 1, 1)])
    trajectory = load_trajectory(tmp_path)
    assert trajectory.policy.labels == [(0, 0), (1, 1)]
    np.testing.assert_array_equal(trajectory.policy.matrix[0], _flat(_tensors(1)))
    with pytest.raises(ValueError, match="projection_dim"):
        TrajectoryRecorder(directory, projection_dim=8)


def test_recorder_rejects_bad_input(tmp_path):
    recorder = TrajectoryRecorder(tmp_path)
    with pytest.raises(ValueError, match="role"):
        recorder.record("critic", _tensors(0), 0, 0)
    with pytest.raises(ValueError, match="no tensors"):
        recorder.record("policy", {}, 0, 0)
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        recorder.record("policy", {"w": [1.0, 2.0]}, 0, 0)
    with pytest.raises(ValueError, match="dtype"):
        TrajectoryRecorder(tmp_path / "x", dtype=torch.int8)
    recorder.close()
    with pytest.raises(RuntimeError, match="close"):
        recorder.record("policy", _tensors(0), 0, 0)


def test_loader_errors_are_clear(tmp_path):
    with pytest.raises(TrajectoryError, match="does not exist"):
        load_trajectory(tmp_path / "missing")
    with pytest.raises(TrajectoryError, match="no trajectory in"):
        load_trajectory(tmp_path)
    _record(tmp_path / "policy_only" / "trajectory", [("policy", _tensors(0), 0, 0)])
    with pytest.raises(TrajectoryError, match="empty trajectory.*no reward snapshots"):
        load_trajectory(tmp_path / "policy_only")
    reward = dict(_tensors(1), **{"value_head.weight": torch.ones(3)})
    _record(tmp_path / "mismatch" / "trajectory", [("policy", _tensors(0), 0, 0), ("reward", reward, 0, 0)])
    with pytest.raises(TrajectoryError, match="different names.*value_head.weight"):
        load_trajectory(tmp_path / "mismatch")
    common = load_trajectory(tmp_path / "mismatch", common_names=True)
    assert common.names == sorted(SHAPES) and common.reward.matrix.shape == common.policy.matrix.shape
