"""Loading a run's recorded snapshots as matrices: one row per snapshot, per role.

A run directory is any directory holding the recorder's ``index.json``, either directly or in
its ``trajectory/`` subfolder (the convention: ``TrajectoryRecorder(RUN_DIR / "trajectory")``).

Each row is the concatenation of the role's tensors in sorted name order, flattened (projected
values when the run was recorded with ``projection_dim``); ``layer(name)`` gives the columns of one
tensor. Iteration states follow the recorder's convention: the last snapshot (largest step) of
each iteration, preceded by the start state when one was recorded at step 0.
Deltas are differences of consecutive states, labelled by the iteration they end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .recorder import FORMAT_NAME, INDEX_NAME, ROLES

TRAJECTORY_SUBDIR = "trajectory"


class TrajectoryError(ValueError):
    """A run directory or its snapshots cannot be analysed (the message says why)."""


def find_index(run_dir) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise TrajectoryError(f"run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise TrajectoryError(f"{run_dir} is not a directory")
    for candidate in (run_dir / INDEX_NAME, run_dir / TRAJECTORY_SUBDIR / INDEX_NAME):
        if candidate.is_file():
            return candidate
    raise TrajectoryError(
        f"no trajectory in {run_dir}: expected {run_dir / TRAJECTORY_SUBDIR / INDEX_NAME} "
        f"(written by zopro_kernels.analysis.TrajectoryRecorder)"
    )


@dataclass
class RoleTrajectory:
    """All snapshots of one role: ``matrix[i]`` is snapshot ``labels[i]`` = (iteration, step)."""

    role: str
    names: list[str]
    offsets: dict[str, slice]
    shapes: dict[str, list[int]]
    labels: list[tuple[int, int]]
    matrix: np.ndarray
    bytes_on_disk: list[int] = field(default_factory=list)

    def layer(self, name: str) -> np.ndarray:
        """The columns of one tensor (a view, rows as in ``matrix``)."""
        if name not in self.offsets:
            raise KeyError(f"{self.role} has no tensor {name!r}")
        return self.matrix[:, self.offsets[name]]

    def state_rows(self) -> tuple[list[int], list[int]]:
        """(keys, rows) of the iteration states: the last snapshot of each iteration (key: the
        iteration), preceded by the start state (key: -1) when the first snapshot was taken at
        step 0 and its iteration has later snapshots. Other intermediate snapshots (every k
        steps) are never states: they only add detail to the projected paths."""
        last_of_iteration = {}
        for row, (iteration, _step) in enumerate(self.labels):
            last_of_iteration[iteration] = row  # labels are sorted by (iteration, step)
        keys = sorted(last_of_iteration)
        rows = [last_of_iteration[k] for k in keys]
        if rows and rows[0] != 0 and self.labels[0][1] == 0:
            keys.insert(0, -1)
            rows.insert(0, 0)
        return keys, rows

    def states(self) -> tuple[list[int], np.ndarray]:
        keys, rows = self.state_rows()
        return keys, self.matrix[rows]

    def deltas(self, layer: str | None = None) -> tuple[list[int], np.ndarray]:
        """Δ of each iteration (its state minus the previous state), keyed by the iteration it ends."""
        keys, rows = self.state_rows()
        values = self.matrix if layer is None else self.layer(layer)
        return keys[1:], np.diff(values[rows], axis=0)


@dataclass
class Trajectory:
    policy: RoleTrajectory
    reward: RoleTrajectory
    index: dict
    directory: Path

    @property
    def names(self) -> list[str]:
        return self.policy.names

    def role(self, role: str) -> RoleTrajectory:
        return {"policy": self.policy, "reward": self.reward}[role]

    def aligned_states(self, layer: str | None = None) -> tuple[list[int], np.ndarray, np.ndarray]:
        """Policy and reward states at the iteration keys both roles have, rows aligned."""
        keyed = []
        for trajectory in (self.policy, self.reward):
            keys, rows = trajectory.state_rows()
            keyed.append(dict(zip(keys, rows)))
        common = sorted(set(keyed[0]) & set(keyed[1]))
        matrices = []
        for trajectory, rows_by_key in zip((self.policy, self.reward), keyed):
            values = trajectory.matrix if layer is None else trajectory.layer(layer)
            matrices.append(values[[rows_by_key[k] for k in common]])
        return common, matrices[0], matrices[1]


def _read_role(directory: Path, role: str, entries: list[dict], dtype) -> RoleTrajectory:
    from safetensors import safe_open

    entries = sorted(entries, key=lambda e: (e["iteration"], e["step"]))
    names, matrix, shapes = None, None, {}
    for row_index, entry in enumerate(entries):
        path = directory / entry["file"]
        if not path.is_file():
            raise TrajectoryError(f"snapshot {path} listed in {directory / INDEX_NAME} is missing")
        with safe_open(str(path), framework="pt") as handle:
            keys = sorted(handle.keys())
            if names is None:
                names = keys
                shapes = json.loads((handle.metadata() or {}).get("shapes", "{}"))
            elif keys != names:
                raise TrajectoryError(
                    f"{role} snapshot {path.name} has tensors {_describe_difference(names, keys)}; "
                    "every snapshot of a role must hold the same tensors"
                )
            row = np.concatenate([_as_float(handle, key, dtype) for key in keys])
        if matrix is None:  # filled in place: a stack of a row list would hold every value twice
            matrix = np.empty((len(entries), row.size), dtype=dtype)
        elif row.size != matrix.shape[1]:
            raise TrajectoryError(f"{role} snapshots do not all have the same tensor sizes ({path.name} differs)")
        matrix[row_index] = row
    with safe_open(str(directory / entries[0]["file"]), framework="pt") as handle:
        sizes = [handle.get_slice(key).get_shape() for key in names]
    offsets, start = {}, 0
    for name, shape in zip(names, sizes):
        length = int(np.prod(shape))
        offsets[name] = slice(start, start + length)
        start += length
    return RoleTrajectory(
        role=role,
        names=names,
        offsets=offsets,
        shapes=shapes,
        labels=[(e["iteration"], e["step"]) for e in entries],
        matrix=matrix,
        bytes_on_disk=[e["bytes"] for e in entries],
    )


def _as_float(handle, key, dtype) -> np.ndarray:
    # Read through torch: numpy has no bfloat16.
    import torch

    return handle.get_tensor(key).to(torch.float64).numpy().astype(dtype, copy=False).reshape(-1)


def _describe_difference(expected: list[str], found: list[str]) -> str:
    missing = sorted(set(expected) - set(found))
    extra = sorted(set(found) - set(expected))
    parts = []
    if missing:
        parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''} ({len(missing)} in all)")
    if extra:
        parts.append(f"extra {extra[:5]}{' ...' if len(extra) > 5 else ''} ({len(extra)} in all)")
    return ", ".join(parts) or "in a different order"


def load_trajectory(run_dir, *, dtype=np.float64, common_names: bool = False) -> Trajectory:
    """Read a run's snapshots. Both roles must have been recorded with the same tensor names
    (``common_names=True`` keeps only the names both have, e.g. to drop a value head)."""
    index_path = find_index(run_dir)
    index = json.loads(index_path.read_text())
    if index.get("format") != FORMAT_NAME:
        raise TrajectoryError(f"{index_path} is not a {FORMAT_NAME} index (format={index.get('format')!r})")
    directory = index_path.parent
    by_role = {role: [e for e in index.get("snapshots", []) if e["role"] == role] for role in ROLES}
    for role, entries in by_role.items():
        if not entries:
            raise TrajectoryError(f"empty trajectory: {index_path} has no {role} snapshots")
    policy = _read_role(directory, "policy", by_role["policy"], dtype)
    reward = _read_role(directory, "reward", by_role["reward"], dtype)
    if policy.names != reward.names:
        if not common_names:
            raise TrajectoryError(
                "policy and reward tensors have different names: reward "
                f"{_describe_difference(policy.names, reward.names)}; record the shared LoRA tensors under "
                "the same keys for both roles, or pass common_names=True (--common-names) to use only "
                "the names both have"
            )
        shared = sorted(set(policy.names) & set(reward.names))
        if not shared:
            raise TrajectoryError("policy and reward tensors have no name in common")
        policy, reward = _keep_names(policy, shared), _keep_names(reward, shared)
    for name in policy.names:
        if (
            policy.offsets[name].stop - policy.offsets[name].start
            != reward.offsets[name].stop - reward.offsets[name].start
        ):
            raise TrajectoryError(f"tensor {name!r} has a different size in the policy and the reward snapshots")
    return Trajectory(policy=policy, reward=reward, index=index, directory=directory)


def _keep_names(trajectory: RoleTrajectory, names: list[str]) -> RoleTrajectory:
    columns = np.concatenate([np.arange(trajectory.offsets[n].start, trajectory.offsets[n].stop) for n in names])
    offsets, start = {}, 0
    for name in names:
        length = trajectory.offsets[name].stop - trajectory.offsets[name].start
        offsets[name] = slice(start, start + length)
        start += length
    return RoleTrajectory(
        role=trajectory.role,
        names=names,
        offsets=offsets,
        shapes={n: trajectory.shapes.get(n) for n in names},
        labels=trajectory.labels,
        matrix=trajectory.matrix[:, columns],
        bytes_on_disk=trajectory.bytes_on_disk,
    )
