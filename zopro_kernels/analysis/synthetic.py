"""Synthetic runs with the structure ZOPrO expects, for tests, demos and checking a report.

Each policy update is the previous one plus noise (so consecutive updates correlate), projected
per tensor off the reward model's last update (so ΔR_t ⟂ Δπ_{t+1} exactly, per tensor and
globally). ``zopro-analyze RUN_DIR --synthetic`` writes one and analyses it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .recorder import TrajectoryRecorder
from .trajectory import TRAJECTORY_SUBDIR


def synthetic_shapes(layers: int = 3, rank: int = 4, width: int = 24) -> dict[str, tuple[int, int]]:
    shapes = {}
    for layer in range(layers):
        shapes[f"layers.{layer}.q_proj.lora_A"] = (rank, width)
        shapes[f"layers.{layer}.q_proj.lora_B"] = (width, rank)
    return shapes


def _off(vector: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    norm2 = direction.pow(2).sum()
    return vector if norm2 == 0 else vector - (vector * direction).sum() / norm2 * direction


def write_synthetic_run(
    run_dir,
    *,
    iterations: int = 6,
    snapshots_per_iteration: int = 3,
    shapes: dict | None = None,
    persistence: float = 0.8,
    seed: int = 0,
    dtype=torch.float32,
    projection_dim=None,
) -> Path:
    """Record a synthetic run into ``RUN_DIR/trajectory`` and return RUN_DIR.

    Iteration 0 holds the start state (step 0); iterations 1..N each end with a full update and
    have ``snapshots_per_iteration - 1`` intermediate snapshots along the way.
    """
    shapes = shapes or synthetic_shapes()
    generator = torch.Generator().manual_seed(seed)
    randn = lambda shape: torch.randn(shape, generator=generator, dtype=torch.float64)  # noqa: E731
    policy = {name: randn(shape) for name, shape in shapes.items()}
    reward = {name: randn(shape) for name, shape in shapes.items()}
    policy_delta = {name: 0.1 * randn(shape) for name, shape in shapes.items()}
    reward_delta = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}
    run_dir = Path(run_dir)
    recorder = TrajectoryRecorder(run_dir / TRAJECTORY_SUBDIR, dtype=dtype, projection_dim=projection_dim, seed=seed)
    recorder.record("policy", policy, 0, 0)
    recorder.record("reward", reward, 0, 0)
    step = 0
    for iteration in range(1, iterations + 1):
        policy_delta = {
            name: _off(persistence * policy_delta[name] + (1 - persistence) * 0.1 * randn(shape), reward_delta[name])
            for name, shape in shapes.items()
        }
        start = dict(policy)
        for part in range(1, snapshots_per_iteration + 1):
            step += 1
            policy = {name: start[name] + policy_delta[name] * part / snapshots_per_iteration for name in shapes}
            if part < snapshots_per_iteration:
                recorder.record("policy", policy, iteration, step)
        recorder.record("policy", policy, iteration, step)
        reward_delta = {name: 0.1 * randn(shape) for name, shape in shapes.items()}
        reward = {name: reward[name] + reward_delta[name] for name in shapes}
        recorder.record("reward", reward, iteration, step)
    recorder.close()
    return run_dir
