"""A report folder for one run: metrics (CSV, JSON), PNG figures, an HTML page, a markdown summary.

Layout of ``OUTPUT`` (default ``RUN_DIR/analysis``)::

    summary.md                      what the run shows, with the figures
    report.html                     self-contained interactive page
    metrics/metrics.json            everything; pairs.csv, trajectory.csv, delta_norms.csv
    metrics_over_iterations.png     angle ΔR_t/Δπ_{t+1}, consecutive-Δπ cosine, Pearson, update norms
    layer_angles.png                the angle per tensor and iteration
    trajectory_<method>_<2|3>d.png  projections of both trajectories
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np

from .html_report import write_html
from .metrics import compute_metrics, single_threaded_blas, write_metrics
from .plots import plot_layer_angles, plot_metrics_over_iterations, plot_projection
from .projection import METHODS, MissingDependencyError, project_trajectory, require_package
from .trajectory import Trajectory, load_trajectory

logger = logging.getLogger(__name__)
DEFAULT_OUTPUT_SUBDIR = "analysis"


def write_report(
    run_dir,
    output=None,
    *,
    methods=("pca",),
    dims=(2, 3),
    per_layer: bool = True,
    common_names: bool = False,
    html: bool = True,
    permutations: int = 199,
    seed: int = 0,
    relative: bool = True,
    float32: bool = False,
) -> dict[str, Path]:
    """Analyse ``run_dir`` and write the report; returns the written paths by name.
    Optional projection methods whose package is missing raise ``MissingDependencyError``
    before any work is done."""
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown projection method {method!r}; choose from {METHODS}")
        if method != "pca":
            require_package(method)
    trajectory = load_trajectory(run_dir, common_names=common_names, dtype=np.float32 if float32 else np.float64)
    output = Path(output) if output is not None else Path(run_dir) / DEFAULT_OUTPUT_SUBDIR
    output.mkdir(parents=True, exist_ok=True)

    with single_threaded_blas():
        metrics = compute_metrics(trajectory, per_layer=per_layer, permutations=permutations, seed=seed)
    paths = {f"metrics_{k}": v for k, v in write_metrics(metrics, output / "metrics").items()}
    paths["metrics_over_iterations"] = plot_metrics_over_iterations(metrics, output / "metrics_over_iterations.png")
    layer_plot = plot_layer_angles(metrics, output / "layer_angles.png")
    if layer_plot is not None:
        paths["layer_angles"] = layer_plot

    projections, skipped = [], []
    for method in methods:
        for dim in dims:
            try:
                with single_threaded_blas():
                    projection = project_trajectory(trajectory, method, dim, seed=seed, relative=relative)
            except ValueError as error:  # too few snapshots for this method: say so, go on
                skipped.append(f"{method} {dim}D: {error}")
                logger.warning("skipping %s %dD projection: %s", method, dim, error)
                continue
            projections.append(projection)
            paths[f"trajectory_{method}_{dim}d"] = plot_projection(
                projection, output / f"trajectory_{method}_{dim}d.png"
            )
    if html:
        paths["html"] = write_html(
            metrics,
            projections,
            output / "report.html",
            title=f"ZOPrO trajectory analysis: {Path(run_dir).resolve().name}",
        )
    paths["summary"] = output / "summary.md"
    paths["summary"].write_text(summary_markdown(trajectory, metrics, paths, output, skipped))
    return paths


def _fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _disk_lines(trajectory: Trajectory) -> list[str]:
    index = trajectory.index
    sizes = [e["bytes"] for e in index["snapshots"]]
    mode = (
        f"count-sketch projection to {index['projection_dim']} values per tensor"
        if index.get("projection_dim")
        else "full tensors"
    )
    return [
        f"- snapshots: {len(trajectory.policy.labels)} policy, {len(trajectory.reward.labels)} reward; "
        f"{len(trajectory.names)} tensors, {trajectory.policy.matrix.shape[1]} stored values per snapshot",
        f"- storage: {index.get('dtype')}, {mode}; {np.mean(sizes) / 1e6:.3f} MB per snapshot on average, "
        f"{sum(sizes) / 1e6:.3f} MB in all",
    ]


def _findings(summary: dict) -> list[str]:
    lines = []
    angle = summary["mean_angle_reward_then_policy_deg"]
    if not math.isnan(angle):
        verdict = "nearly orthogonal" if abs(angle - 90) < 10 else "not orthogonal"
        z = summary["mean_abs_cosine_z_reward_then_policy"]
        chance = (
            "no further from 90° than independent random directions would be"
            if z < 3
            else "further from 90° than independent random directions would be"
        )
        lines.append(
            f"- ΔR_t and the next policy update Δπ_t+1 are {verdict}: mean angle {angle:.2f}°, {chance} "
            f"(90 ± {summary['random_direction_angle_std_deg']:.3f}° in this many dimensions; mean |cos|·√d = "
            f"{z:.2f}). ZOPrO's guided direction keeps its random part orthogonal to ΔR."
        )
    cos = summary["mean_cosine_consecutive_policy"]
    if not math.isnan(cos):
        verdict = "predicts" if cos > 0.5 else "weakly predicts" if cos > 0.1 else "does not predict"
        lines.append(f"- The previous policy update {verdict} the next: mean cos(Δπ_t, Δπ_t+1) = {cos:.3f}.")
    if not math.isnan(summary["dcor_states"]):
        lines.append(
            f"- Distance correlation of the two trajectories: {summary['dcor_states']:.3f} (the same states in "
            f"shuffled order give {_fmt(summary['dcor_states_null_mean'])}, permutation p = "
            f"{_fmt(summary['dcor_states_p_value'])}; it is well above 0 even for independent trajectories, and "
            "two random walks look dependent over time however they were made)."
        )
    if not math.isnan(summary["dcor_deltas"]):
        lines.append(
            f"- Distance correlation of paired updates (ΔR_t, Δπ_t+1), the coupling measure: "
            f"{summary['dcor_deltas']:.3f} (shuffled pairs give {_fmt(summary['dcor_deltas_null_mean'])}, "
            f"permutation p = {_fmt(summary['dcor_deltas_p_value'])})."
        )
    if not math.isnan(summary["procrustes_disparity"]):
        lines.append(
            f"- Procrustes disparity between the trajectories: {summary['procrustes_disparity']:.3f} "
            f"(0: same shape up to rotation, scale and shift; the same states in shuffled order give "
            f"{_fmt(summary['procrustes_null_mean'])}, permutation p = {_fmt(summary['procrustes_p_value'])})."
        )
    return lines or ["- Too few iterations for any metric (need at least two recorded iteration ends per role)."]


def summary_markdown(trajectory: Trajectory, metrics: dict, paths: dict, output: Path, skipped: list[str]) -> str:
    s = metrics["summary"]
    run_name = (
        trajectory.directory.name if trajectory.directory.name != "trajectory" else trajectory.directory.parent.name
    )
    lines = [f"# Trajectory analysis: {run_name}", "", "## Run", ""]
    lines += _disk_lines(trajectory)
    lines += ["", "## Findings", ""] + _findings(s)
    lines += ["", "## Global metrics", "", "| metric | value |", "|---|---|"]
    lines += [f"| {key.replace('_', ' ')} | {_fmt(value, 4)} |" for key, value in s.items()]
    guided = [r for r in metrics["pairs"] if r["kind"] == "reward_then_policy" and r["layer"] == "(all)"]
    if guided:
        lines += [
            "",
            "## Per iteration",
            "",
            "| t | ∠(ΔR_t, Δπ_t+1) ° | Pearson | ‖ΔR_t‖ | ‖Δπ_t+1‖ |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['iteration']} | {_fmt(r['angle_deg'], 2)} | {_fmt(r['pearson'])} | {_fmt(r['norm_first'], 4)} | "
            f"{_fmt(r['norm_second'], 4)} |"
            for r in guided
        ]
    lines += ["", "## Figures", ""]
    for name, path in paths.items():
        if path.suffix == ".png":
            lines += [f"![{name}]({path.relative_to(output).as_posix()})", ""]
    if "html" in paths:
        lines += ["Interactive version: [report.html](report.html)", ""]
    if skipped:
        lines += ["## Skipped projections", ""] + [f"- {s}" for s in skipped] + [""]
    lines += [
        "Metrics: `metrics/metrics.json`, `metrics/pairs.csv` (per iteration and tensor), "
        "`metrics/trajectory.csv` (per tensor), `metrics/delta_norms.csv`.",
        "",
    ]
    return "\n".join(lines)


__all__ = ["write_report", "MissingDependencyError"]
