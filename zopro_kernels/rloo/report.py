"""The end-of-run summary: a table per iteration and a reward-curve PNG from metrics.jsonl."""

from __future__ import annotations

import json
import math
import os


def read_metrics(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _fmt(value) -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def summary_table(history: list[dict]) -> str:
    """Markdown: held-out task score before training, then per iteration."""
    lines = ["| iteration | mode | steps | train task score | held-out task score | pairs | BT acc before → after |",
             "|---|---|---|---|---|---|---|"]
    for entry in history:
        if entry.get("event") == "eval":
            lines.append(f"| start | — | — | — | {_fmt(entry.get('task_score'))} | — | — |")
        elif entry.get("event") == "iteration":
            lines.append(
                f"| {entry['iteration']} | {entry['mode']} | {entry['steps']} | {_fmt(entry.get('mean_task_score'))} | "
                f"{_fmt(entry.get('eval_task_score'))} | {entry.get('pairs', 0)} | "
                f"{_fmt(entry.get('pair_accuracy_before'))} → {_fmt(entry.get('pair_accuracy_after'))} |")
    return "\n".join(lines)


def plot_reward_curve(metrics_path: str, png_path: str) -> str | None:
    """Per-step task score and RLOO reward; None (and a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[zopro-train] no reward-curve PNG: pip install matplotlib")
        return None
    steps = [r for r in read_metrics(metrics_path) if "step" in r and "reward" in r]
    if not steps:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    x = [r["step"] for r in steps]
    axis.plot(x, [r.get("task_score", math.nan) for r in steps], label="task score (judge)")
    axis.plot(x, [r["reward"] for r in steps], label="RLOO reward (R − β·KL)", alpha=0.7)
    for r in steps:
        if r.get("step_in_iteration") == 0:
            axis.axvline(r["step"], color="grey", lw=0.5)
    axis.set_xlabel("step")
    axis.legend()
    figure.tight_layout()
    temporary = png_path + ".tmp.png"
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    os.replace(temporary, png_path)
    return png_path
