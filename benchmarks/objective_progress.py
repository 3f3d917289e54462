"""How far each optimizer moves the objective it is given, beside the held-out score it is judged on.

    python benchmarks/objective_progress.py --runs-dir runs/bench-reward --reward-mode functions

Reads the finished runs of ``bench_reward.py`` (``<runs-dir>/<mode>/<method>-seed<s>``) and, for each
rollout of the ZO phase (iteration ≥ 1), the RLOO objective J the loop logged at the first and the
last of the rollout's reuses (``num_iterations`` optimisation steps on the same sampled batch, J
computed at the centre point before each step). Their difference, ΔJ, is how much the optimizer
lowered the objective on that batch in those steps; the rollout's fresh KL to the reference and
its training task score come with it. The first rollout of the ZO phase is the same batch for
every method of a seed (same start, same sampling seed), so ZOPrO − MeZO on it is exactly paired.

Writes benchmarks/results/objective-<device>-<mode>[-<tag>]-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import environment, environment_line, results_stem, write_results  # noqa: E402

METHODS = ("zopro", "mezo", "adamw")
T95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26}


def rollouts(metrics_path: Path, first_iteration: int = 1) -> list[dict]:
    """Per rollout of iterations ≥ ``first_iteration``: J at its first and last reuse, ΔJ, fresh KL and score."""
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "step" in r and "event" not in r and r.get("iteration", 0) >= first_iteration]
    groups: dict[tuple, list[dict]] = {}
    for r in steps:
        groups.setdefault((r["iteration"], r["rollout"]), []).append(r)
    out = []
    for (iteration, rollout), group in sorted(groups.items()):
        group.sort(key=lambda r: r["reuse"])
        if group[0]["reuse"] != 0 or len(group) < 2:
            continue  # a rollout cut short: no first-to-last change
        out.append({"iteration": iteration, "rollout": rollout, "reuses": len(group),
                    "J_first": group[0]["J"], "J_last": group[-1]["J"], "delta_J": group[-1]["J"] - group[0]["J"],
                    "kl": group[0].get("kl"), "task_score": group[0].get("task_score")})
    return out


def t_interval(values: list[float]) -> dict:
    n = len(values)
    mean = statistics.fmean(values) if values else math.nan
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    half = T95.get(n, 2.0) * statistics.stdev(values) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def summarise(runs: dict[str, dict[int, list[dict]]]) -> dict:
    """Per method: mean ΔJ per rollout (t-interval over seeds of each seed's mean), and ZOPrO minus
    each other method on the shared first rollout, per seed."""
    per_method = {}
    for method, seeds in runs.items():
        seed_means = {s: statistics.fmean(r["delta_J"] for r in rs) for s, rs in seeds.items() if rs}
        per_method[method] = {"delta_J_per_rollout": t_interval(list(seed_means.values())),
                              "per_seed": seed_means,
                              "kl_fresh": t_interval([r["kl"] for rs in seeds.values() for r in rs
                                                      if r["kl"] is not None])}
    paired = {}
    zopro = runs.get("zopro", {})
    for other in (m for m in runs if m != "zopro"):
        diffs = {}
        for seed, rs in zopro.items():
            mine = next((r for r in rs if r["rollout"] == 0), None)
            theirs = next((r for r in runs[other].get(seed, []) if r["rollout"] == 0), None)
            if mine and theirs and mine["iteration"] == theirs["iteration"]:
                diffs[seed] = mine["delta_J"] - theirs["delta_J"]
        paired[other] = {"first_rollout": t_interval(list(diffs.values())), "per_seed": diffs,
                         "zopro_lower_in_every_seed": bool(diffs) and all(d < 0 for d in diffs.values())}
    return {"methods": per_method, "paired_first_rollout": paired}


def fmt(stat: dict, spec: str = "+.4f") -> str:
    if stat["low"] is None:
        return f"{stat['mean']:{spec}}"
    return f"{stat['mean']:{spec}} [{stat['low']:{spec}}, {stat['high']:{spec}}]"


def markdown(summary: dict, runs: dict, env: dict, mode: str) -> str:
    lines = [f"The RLOO objective J on each reused rollout of the ZO phase ({mode} reward mode): ΔJ = J at the "
             "last reuse − J at the first (lower is better: how far the optimizer moved the objective it "
             "was given, on that batch, in those steps). 95 % t-intervals over seeds.", "",
             environment_line(env), "",
             "| method | ΔJ per rollout | per seed | fresh KL to the reference |", "|---|---|---|---|"]
    for method, stat in summary["methods"].items():
        per_seed = ", ".join(f"{v:+.4f}" for _, v in sorted(stat["per_seed"].items()))
        lines.append(f"| {method} | {fmt(stat['delta_J_per_rollout'])} | {per_seed} | {fmt(stat['kl_fresh'], '.3f')} |")
    lines += ["", "On the first rollout of the ZO phase (the same batch for every method of a seed), ZOPrO minus:", "",
              "| versus | ΔJ difference | per seed | ZOPrO lower in every seed |", "|---|---|---|---|"]
    for other, stat in summary["paired_first_rollout"].items():
        per_seed = ", ".join(f"{v:+.4f}" for _, v in sorted(stat["per_seed"].items()))
        lines.append(f"| {other} | {fmt(stat['first_rollout'])} | {per_seed} | "
                     f"{'yes' if stat['zopro_lower_in_every_seed'] else 'no'} |")
    lines += ["", "Per rollout (method, seed: ΔJ):", ""]
    for method, seeds in runs.items():
        for seed, rs in sorted(seeds.items()):
            lines.append(f"- {method} seed {seed}: " + ", ".join(
                f"it {r['iteration']} r{r['rollout']} {r['delta_J']:+.4f} (KL {r['kl']:.2f})" for r in rs))
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", required=True, help="bench_reward.py's --runs-dir")
    parser.add_argument("--reward-mode", default="functions")
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    base = Path(args.runs_dir) / args.reward_mode
    runs = {}
    for method in args.methods:
        for path in sorted(base.glob(f"{method}-seed*/metrics.jsonl")):
            seed = int(path.parent.name.rsplit("seed", 1)[1])
            runs.setdefault(method, {})[seed] = rollouts(path)
    if not runs:
        raise SystemExit(f"no finished runs under {base}")
    summary = summarise(runs)
    env = environment("cpu", argv)
    variant = "-".join(filter(None, [args.reward_mode, args.tag]))
    stem = results_stem(args.out, "objective", env, variant)
    path = write_results(stem, env, summary, markdown(summary, runs, env, args.reward_mode), runs=runs)
    print(stem.with_suffix(".md").read_text())
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
