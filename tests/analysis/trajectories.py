"""Synthetic trajectories with known structure, written through the recorder."""

from __future__ import annotations

import numpy as np
import torch

from zopro_kernels.analysis.recorder import TrajectoryRecorder

SHAPES = {"layers.0.lora_A": (4, 9), "layers.0.lora_B": (9, 4), "layers.1.lora_A": (4, 7), "layers.1.lora_B": (7, 4)}


def random_state(rng: np.random.Generator, shapes=SHAPES) -> dict[str, np.ndarray]:
    return {name: rng.standard_normal(shape) for name, shape in shapes.items()}


def record_states(run_dir, policy_states, reward_states, **recorder_options):
    """Record lists of {name: array} states as iterations 0, 1, ... (step = iteration)."""
    recorder = TrajectoryRecorder(run_dir / "trajectory", **recorder_options)
    for role, states in (("policy", policy_states), ("reward", reward_states)):
        for iteration, state in enumerate(states):
            recorder.record(role, {k: torch.as_tensor(v) for k, v in state.items()}, iteration, iteration)
    recorder.close()
    return run_dir


def orthogonal_run(run_dir, iterations: int = 6, seed: int = 0, shapes=SHAPES):
    """Δπ_{t+1} is made orthogonal to ΔR_t tensor by tensor (Gram-Schmidt in float64)."""
    rng = np.random.default_rng(seed)
    policy, reward = [random_state(rng, shapes)], [random_state(rng, shapes)]
    reward_delta = None
    for _ in range(iterations):
        step = {k: 0.1 * v for k, v in random_state(rng, shapes).items()}
        if reward_delta is not None:
            step = {
                k: v
                - (v.ravel() @ reward_delta[k].ravel())
                / (reward_delta[k].ravel() @ reward_delta[k].ravel())
                * reward_delta[k]
                for k, v in step.items()
            }
        policy.append({k: policy[-1][k] + step[k] for k in shapes})
        reward_delta = {k: 0.1 * v for k, v in random_state(rng, shapes).items()}
        reward.append({k: reward[-1][k] + reward_delta[k] for k in shapes})
    return record_states(run_dir, policy, reward, dtype=torch.float32)
