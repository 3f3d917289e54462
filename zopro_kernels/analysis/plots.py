"""Static PNG figures (matplotlib, Agg canvas: no display, no global pyplot state)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .metrics import GLOBAL_LAYER, natural_key
from .projection import Projection

ROLE_COLOURS = {"policy": "#1f77b4", "reward": "#d62728"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    return path


def _axis_labels(projection: Projection) -> list[str]:
    names = {"pca": "PC", "umap": "UMAP", "tsne": "t-SNE"}
    labels = []
    for i in range(projection.dims):
        label = f"{names[projection.method]} {i + 1}"
        if projection.explained_variance_ratio is not None:
            label += f" ({100 * projection.explained_variance_ratio[i]:.1f} %)"
        labels.append(label)
    return labels


def plot_projection(projection: Projection, path) -> Path:
    """Both trajectories as paths through the projected space; iteration ends are labelled."""
    three_d = projection.dims == 3
    figure = _figure(6.5, 5.5)
    axes = figure.add_subplot(projection="3d" if three_d else None)
    for role, colour in ROLE_COLOURS.items():
        points, labels = projection.of_role(role)
        if not len(points):
            continue
        columns = [points[:, i] for i in range(projection.dims)]
        axes.plot(*columns, "-", color=colour, alpha=0.5, linewidth=1.2)
        axes.scatter(*columns, color=colour, s=14, label=role)
        axes.scatter(*[c[:1] for c in columns], color=colour, s=70, marker="s", edgecolor="black")
        ends = _iteration_end_rows(labels)
        for row in ends:
            axes.text(*[c[row] for c in columns], f" {labels[row][0]}", color=colour, fontsize=7)
    names = _axis_labels(projection)
    axes.set_xlabel(names[0])
    axes.set_ylabel(names[1])
    if three_d:
        axes.set_zlabel(names[2])
    what = "displacement from each role's first snapshot" if projection.relative else "absolute weights"
    axes.set_title(
        f"Policy and reward trajectories ({projection.method.upper()}, {projection.dims}D, {what})\n"
        "square: first snapshot; numbers: end of iteration",
        fontsize=9,
    )
    axes.legend(loc="best", fontsize=8)
    return _save(figure, path)


def _iteration_end_rows(labels: list[tuple[int, int]]) -> list[int]:
    last = {}
    for row, (iteration, _) in enumerate(labels):
        last[iteration] = row
    return sorted(last.values())


def _global_pairs(metrics: dict, kind: str) -> list[dict]:
    return [r for r in metrics["pairs"] if r["kind"] == kind and r["layer"] == GLOBAL_LAYER]


def plot_metrics_over_iterations(metrics: dict, path) -> Path:
    """The findings over a run: the angle between ΔR_t and Δπ_{t+1}, the cosine between
    consecutive Δπ, the Pearson correlations, and the size of the updates."""
    figure = _figure(7.5, 8.5)
    top, middle, bottom = figure.subplots(3, 1, sharex=True)

    guided = _global_pairs(metrics, "reward_then_policy")
    top.plot(
        [r["iteration"] for r in guided],
        [r["angle_deg"] for r in guided],
        "o-",
        color="#2ca02c",
        label="∠(ΔR_t, Δπ_{t+1})",
    )
    top.axhline(90, color="grey", linestyle="--", linewidth=1, label="90° (orthogonal)")
    top.set_ylabel("angle (degrees)")
    top.set_ylim(0, 180)
    top.legend(fontsize=8, loc="lower right")

    consecutive = _global_pairs(metrics, "policy_consecutive")
    for rows, key, style, colour, label in (
        (consecutive, "cosine", "o-", ROLE_COLOURS["policy"], "cos(Δπ_t, Δπ_{t+1})"),
        (guided, "pearson", "s--", "#2ca02c", "Pearson(ΔR_t, Δπ_{t+1})"),
        (consecutive, "pearson", "^:", "#9467bd", "Pearson(Δπ_t, Δπ_{t+1})"),
    ):
        middle.plot([r["iteration"] for r in rows], [r[key] for r in rows], style, color=colour, label=label)
    middle.axhline(0, color="grey", linewidth=0.8)
    middle.set_ylim(-1.05, 1.05)
    middle.set_ylabel("cosine / correlation")
    middle.legend(fontsize=8, loc="lower right")

    for role, colour in ROLE_COLOURS.items():
        rows = [r for r in metrics["delta_norms"] if r["role"] == role]
        bottom.plot([r["iteration"] for r in rows], [r["norm"] for r in rows], "o-", color=colour, label=f"‖Δ{role}‖")
    if any(r["norm"] > 0 for r in metrics["delta_norms"]):
        bottom.set_yscale("log", nonpositive="mask")  # a zero update (no move) leaves a gap
    bottom.set_ylabel("update norm")
    bottom.set_xlabel("iteration t (x: the first update of each pair)")
    bottom.legend(fontsize=8)
    figure.suptitle("Policy-reward interplay over iterations", fontsize=11)
    return _save(figure, path)


def plot_layer_angles(metrics: dict, path, *, kind: str = "reward_then_policy") -> Path | None:
    """Heat map, tensor × iteration, of the angle between ΔR_t and Δπ_{t+1} (or consecutive Δπ)."""
    rows = [r for r in metrics["pairs"] if r["kind"] == kind and r["layer"] != GLOBAL_LAYER]
    if not rows:
        return None
    layers = sorted({r["layer"] for r in rows}, key=natural_key)
    iterations = sorted({r["iteration"] for r in rows})
    grid = np.full((len(layers), len(iterations)), np.nan)
    for r in rows:
        grid[layers.index(r["layer"]), iterations.index(r["iteration"])] = r["angle_deg"]
    figure = _figure(min(3 + 0.45 * len(iterations), 14), min(1.5 + 0.22 * len(layers), 24))
    axes = figure.add_subplot()
    image = axes.imshow(grid, aspect="auto", cmap="coolwarm", vmin=0, vmax=180, interpolation="nearest")
    axes.set_xticks(range(len(iterations)), [str(i) for i in iterations], fontsize=7)
    step = max(1, math.ceil(len(layers) / 60))  # keep tick labels readable for 224+ tensors
    axes.set_yticks(range(0, len(layers), step), layers[::step], fontsize=6)
    axes.set_xlabel("iteration t")
    title = "∠(ΔR_t, Δπ_{t+1}) per tensor" if kind == "reward_then_policy" else "∠(Δπ_t, Δπ_{t+1}) per tensor"
    axes.set_title(title + " (degrees; 90 = orthogonal)", fontsize=9)
    figure.colorbar(image, ax=axes, label="degrees")
    return _save(figure, path)
