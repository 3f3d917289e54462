"""Reward gained per hour: ZOPrO vs MeZO vs first-order RLOO on the real offline task.

    python benchmarks/bench_reward.py                        # examples/sentiment.yaml, 3 methods × 3 seeds
    python benchmarks/bench_reward.py --seeds 0 1 2 3 4 --jobs 2 --set iterations=5 eval_prompts=16
    python benchmarks/bench_reward.py --aggregate-only --runs-dir runs/bench-reward   # re-read finished runs

Each (method, seed) is one run of the RLOO loop (``zopro_kernels.rloo.cli.train``) from the same
start: the same seed gives every method the same LoRA initialisation, prompt split, sampling seeds
and, with the default ``first_iteration: adamw``, the same first-order iteration 0, so the methods
part ways at iteration 1. Every run has the same step budget (``iterations × steps_per_iteration``).
The held-out score is the judge's (VADER's) mean score of two samples per held-out prompt, never
the reward model's; the loop logs it before training and after every iteration together with the
training time so far (``train_seconds``: steps and reward refinement, held-out evaluations
excluded) and the step.

Reported per method (mean ± sample std over seeds): the held-out score before and after, its gain,
gain per hour of training time, the gain at equal steps (the score at the smallest final step of
all runs) and at a fixed wall-clock budget T: the score of each run's last evaluation at or before
T seconds of training (T = ``--time-budget-s``, else the shortest run's training time), so the fixed
time comparison reads the same runs at a common time instead of running them again (evaluations
come at the end of iterations: that is the time resolution). ``--time-budget-s`` is also handed to
the loop (``time_budget_s``), which then ends runs at T. A curve (held-out score against training
seconds and against steps, mean over seeds) goes to the PNG.

Runs run as subprocesses (``--jobs`` at a time, ``threads`` torch threads each); a finished run
(its ``metrics.jsonl`` ends with the last evaluation) is not run again unless ``--force``.
Writes benchmarks/results/reward-<device>-<date>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import (command_argv, environment, environment_line, matplotlib_pyplot,  # noqa: E402
                        results_stem, write_results)

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("zopro", "mezo", "adamw")
RUN_RECORD = "bench_run.json"  # written by launch() next to the run's metrics


# -- reading and aggregating runs (pure) ------------------------------------------------------

def read_evals(metrics_path) -> list[dict]:
    """The held-out evaluations of a run, in order: ``{"step", "seconds", "score", "iteration"}``."""
    evals = []
    with open(metrics_path, encoding="utf-8") as handle:
        for line in handle:
            if not line.strip():
                continue
            record = json.loads(line)
            if record.get("event") != "eval":
                continue
            if "train_seconds" not in record or "global_step" not in record:
                raise ValueError(f"{metrics_path}: eval records lack train_seconds/global_step "
                                 "(written by an older loop); run again")
            evals.append({"iteration": record["iteration"], "step": record["global_step"],
                          "seconds": record["train_seconds"], "score": record["task_score"]})
    if not evals:
        raise ValueError(f"{metrics_path}: no held-out evaluation")
    return sorted(evals, key=lambda e: (e["step"], e["seconds"]))


def score_at(evals: list[dict], key: str, limit: float) -> float:
    """The score of the last evaluation with ``key`` ("step" or "seconds") ≤ limit."""
    eligible = [e for e in evals if e[key] <= limit]
    return eligible[-1]["score"] if eligible else math.nan


def mean_std(values) -> dict:
    """Mean and sample standard deviation (n−1); std is None for one value; NaNs are left out."""
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def run_summary(evals: list[dict]) -> dict:
    start, final = evals[0], evals[-1]
    if start["step"] != 0:
        raise ValueError("the first held-out evaluation is not before training (step 0)")
    hours = final["seconds"] / 3600
    gain = final["score"] - start["score"]
    return {"start": start["score"], "final": final["score"], "gain": gain, "train_seconds": final["seconds"],
            "steps": final["step"], "gain_per_hour": gain / hours if hours > 0 else math.nan}


def aggregate(runs: dict[str, dict[int, list[dict]]], time_budget_s: float | None = None) -> dict:
    """``runs[method][seed]`` = that run's evaluations → per-method statistics and the budgets used."""
    summaries = {m: {seed: run_summary(evals) for seed, evals in by_seed.items()} for m, by_seed in runs.items()}
    every = [s for by_seed in summaries.values() for s in by_seed.values()]
    step_budget = min(s["steps"] for s in every)
    time_budget = time_budget_s if time_budget_s is not None else min(s["train_seconds"] for s in every)
    methods = {}
    for method, by_seed in runs.items():
        seeds = sorted(by_seed)
        per_seed = {seed: summaries[method][seed] | {
            "gain_at_equal_steps": score_at(by_seed[seed], "step", step_budget) - summaries[method][seed]["start"],
            "gain_at_time_budget": score_at(by_seed[seed], "seconds", time_budget) - summaries[method][seed]["start"],
        } for seed in seeds}
        methods[method] = {"seeds": seeds, "per_seed": per_seed} | {
            key: mean_std(per_seed[s][key] for s in seeds)
            for key in ("start", "final", "gain", "gain_per_hour", "gain_at_equal_steps", "gain_at_time_budget",
                        "train_seconds", "steps")}
    return {"step_budget": step_budget, "time_budget_s": time_budget, "methods": methods,
            "paired": paired_differences(methods)}


def paired_differences(methods: dict) -> list[dict]:
    """ZOPrO minus each other method, seed by seed (same start), mean ± std over the shared seeds."""
    if "zopro" not in methods:
        return []
    out = []
    zo = methods["zopro"]["per_seed"]
    for other, stats in methods.items():
        if other == "zopro":
            continue
        shared = sorted(set(zo) & set(stats["per_seed"]))
        for key in ("gain_per_hour", "gain_at_equal_steps", "gain_at_time_budget"):
            out.append({"versus": other, "quantity": key, "seeds": shared} |
                       mean_std(zo[s][key] - stats["per_seed"][s][key] for s in shared))
    return out


def target_checks(result: dict) -> list[dict]:
    """The issue's quality targets: ZOPrO's gain per hour ≥ first-order RLOO's, and at equal steps ≥ MeZO's."""
    methods, checks = result["methods"], []
    for name, other, key in (("ZOPrO held-out gain per hour ≥ first-order RLOO's", "adamw", "gain_per_hour"),
                             ("ZOPrO held-out gain at equal steps ≥ MeZO's", "mezo", "gain_at_equal_steps")):
        if "zopro" not in methods or other not in methods:
            continue
        zo, ot = methods["zopro"][key]["mean"], methods[other][key]["mean"]
        if zo is None or ot is None:
            continue
        paired = next((p for p in result["paired"] if p["versus"] == other and p["quantity"] == key), None)
        checks.append({"target": name, "zopro": zo, other: ot, "met": zo >= ot, "short_by": max(0.0, ot - zo),
                       "paired_difference": paired})
    return checks


# -- running -----------------------------------------------------------------------------------

def run_dir(runs_dir, method: str, seed: int) -> Path:
    return Path(runs_dir) / f"{method}-seed{seed}"


def run_config(base: dict, method: str, seed: int, runs_dir, threads: int, time_budget_s) -> dict:
    config = base | {"optimizer": method, "seed": seed, "output_dir": str(run_dir(runs_dir, method, seed)),
                     "threads": threads, "progress": False, "plot": False}
    if time_budget_s is not None:
        config["time_budget_s"] = time_budget_s
    return config


def finished(config: dict) -> bool:
    """The run's metrics end with the evaluation after its last iteration (or its time budget)."""
    path = Path(config["output_dir"]) / "metrics.jsonl"
    if not path.exists():
        return False
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    done = [r for r in records if r.get("event") == "iteration"]
    return bool(done) and (done[-1]["iteration"] == config.get("iterations", 5) - 1 or "stopped" in done[-1]) \
        and records[-1].get("event") in ("eval", "iteration")


def launch(config: dict) -> dict:
    """One run in a subprocess (``--run-one``); its output goes to ``output_dir/train.log``."""
    out = Path(config["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(out / "train.log", "w", encoding="utf-8") as log:
        done = subprocess.run([sys.executable, __file__, "--run-one", json.dumps(config)], stdout=log,
                              stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wall = time.perf_counter() - started
    print(f"[bench_reward] {out.name}: exit {done.returncode} after {wall / 60:.1f} min", flush=True)
    record = {"output_dir": str(out), "returncode": done.returncode, "wall_seconds": wall}
    (out / RUN_RECORD).write_text(json.dumps(record))
    return record


def run_record(config: dict) -> dict | None:
    """How the run went (exit status, wall time), as ``launch`` recorded it next to the run."""
    path = Path(config["output_dir"]) / RUN_RECORD
    return json.loads(path.read_text()) if path.exists() else None


def run_one(config: dict):
    from zopro_kernels.rloo.cli import train
    from zopro_kernels.rloo.config import TrainConfig

    train(TrainConfig.from_dict(config))


def load_base_config(path: str | None, overrides: list[str]) -> dict:
    from zopro_kernels.rloo.cli import parse_overrides
    from zopro_kernels.rloo.config import TrainConfig

    base = TrainConfig.from_yaml(path).to_dict() if path else TrainConfig().to_dict()
    return TrainConfig.from_dict(base | parse_overrides(overrides)).to_dict()


# -- table and plot ----------------------------------------------------------------------------

def _pm(stat: dict, spec: str = ".3f") -> str:
    if stat["mean"] is None:
        return "—"
    return format(stat["mean"], spec) + ("" if stat["std"] is None else f" ± {format(stat['std'], spec)}")


def markdown(result: dict, checks: list[dict], env: dict, config: dict, runs: list[dict] = (),
             jobs: int = 1, total_seconds: float | None = None) -> str:
    seeds = sorted({s for m in result["methods"].values() for s in m["seeds"]})
    lines = [f"Held-out judge score (judge: {config.get('judge')}) on the {config.get('prompts')} task, "
             f"policy {config.get('model')}, LoRA r={config.get('lora_r')}; {config.get('iterations')} iterations × "
             f"{config.get('steps_per_iteration')} steps of {config.get('batch_prompts')} prompts × k={config.get('k')}, "
             f"first iteration {config.get('first_iteration')}; seeds {seeds}; mean ± std over seeds.",
             "", environment_line(env), "",
             *([f"{len(runs)} runs, {config.get('threads')} torch thread(s) each, "
                f"{statistics.fmean(r['wall_seconds'] for r in runs) / 60:.1f} min per run on average "
                "(held-out evaluations and start-up included)"
                + (f"; this command ran {jobs} at a time, {total_seconds / 60:.0f} min in all." if total_seconds
                   else "."), ""] if runs else []),
             f"Equal steps: step {result['step_budget']}. Fixed wall clock: T = {result['time_budget_s']:.0f} s "
             "of training (each run's last held-out evaluation at or before T).", "",
             "| method | held-out before | after | gain | training s | gain per hour | gain at equal steps | "
             "gain at T |", "|---|---|---|---|---|---|---|---|"]
    for method, m in result["methods"].items():
        lines.append(f"| {method} | {_pm(m['start'])} | {_pm(m['final'])} | {_pm(m['gain'])} | "
                     f"{_pm(m['train_seconds'], '.0f')} | "
                     f"{_pm(m['gain_per_hour'])} | {_pm(m['gain_at_equal_steps'])} | {_pm(m['gain_at_time_budget'])} |")
    if result["paired"]:
        lines += ["", "Paired by seed (same start), ZOPrO minus the other method:", "",
                  "| versus | quantity | mean ± std | seeds |", "|---|---|---|---|"]
        for p in result["paired"]:
            lines.append(f"| {p['versus']} | {p['quantity']} | {_pm(p)} | {len(p['seeds'])} |")
    if checks:
        lines += ["", "| target | ZOPrO | other | met | short by |", "|---|---|---|---|---|"]
        for c in checks:
            other = next(v for k, v in c.items() if k in ("adamw", "mezo"))
            lines.append(f"| {c['target']} | {c['zopro']:.3f} | {other:.3f} | {'yes' if c['met'] else 'no'} | "
                         f"{c['short_by']:.3f} |")
    return "\n".join(lines) + "\n"


def mean_curve(runs: dict[int, list[dict]], key: str) -> tuple[list, list, list]:
    """x (mean over seeds of ``key``), mean score and its std, per evaluation index."""
    longest = max(len(evals) for evals in runs.values())
    xs, ys, sd = [], [], []
    for i in range(longest):
        points = [evals[i] for evals in runs.values() if i < len(evals)]
        xs.append(statistics.fmean(p[key] for p in points))
        scores = [p["score"] for p in points]
        ys.append(statistics.fmean(scores))
        sd.append(statistics.stdev(scores) if len(scores) > 1 else 0.0)
    return xs, ys, sd


def plot(runs: dict, path: Path) -> str | None:
    plt = matplotlib_pyplot()
    if plt is None or not runs:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for method, by_seed in runs.items():
        for axis, key, scale, label in ((axes[0], "seconds", 1 / 60, "training minutes (held-out evaluations excluded)"),
                                        (axes[1], "step", 1, "policy steps")):
            xs, ys, sd = mean_curve(by_seed, key)
            xs = [x * scale for x in xs]
            line, = axis.plot(xs, ys, marker="o", label=f"{method} ({len(by_seed)} seeds)")
            axis.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)],
                              color=line.get_color(), alpha=0.15)
            axis.set_xlabel(label)
    axes[0].set_ylabel("held-out judge score (mean ± std over seeds)")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return str(path)


# -- main --------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "examples" / "sentiment.yaml"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys (all runs)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="training seconds per run (handed to the loop) and the fixed-time read-off")
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench-reward"))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--tag", default=None, help="added to the results file name")
    parser.add_argument("--force", action="store_true", help="run again runs that finished")
    parser.add_argument("--aggregate-only", action="store_true", help="read the runs in --runs-dir, run nothing")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_one:
        return run_one(json.loads(args.run_one))

    base = load_base_config(args.config, args.set)
    configs = [run_config(base, m, s, args.runs_dir, args.threads, args.time_budget_s)
               for s in args.seeds for m in args.methods]
    launched, started = [], time.perf_counter()
    if not args.aggregate_only:
        todo = [c for c in configs if args.force or not finished(c)]
        print(f"[bench_reward] {len(todo)} run(s) to do of {len(configs)}, {args.jobs} at a time; "
              f"logs in {args.runs_dir}/<method>-seed<seed>/train.log", flush=True)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            launched = list(pool.map(launch, todo))
    records = [r for r in map(run_record, configs) if r is not None]
    runs = {}
    for c in configs:
        path = Path(c["output_dir"]) / "metrics.jsonl"
        if finished(c):
            runs.setdefault(c["optimizer"], {})[c["seed"]] = read_evals(path)
        else:
            print(f"[bench_reward] {c['output_dir']}: not finished, left out", flush=True)
    if not runs:
        raise SystemExit("no finished run to aggregate")
    result = aggregate(runs, args.time_budget_s)
    checks = target_checks(result)
    device = torch.device("cuda" if torch.cuda.is_available() and base.get("device", "auto") != "cpu" else "cpu")
    env = environment(device, command_argv(__file__, argv))
    stem = results_stem(args.out, "reward", env, args.tag)
    stem.parent.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter() - started
    table = markdown(result, checks, env, base, records, args.jobs, total if launched else None)
    png = plot(runs, stem.with_suffix(".png"))
    write_results(stem, env, result, table, config=base, targets=checks, runs=records, plot=png,
                  jobs=args.jobs, total_seconds=total if launched else None,
                  evaluations={m: {str(s): e for s, e in by_seed.items()} for m, by_seed in runs.items()})
    print(table)
    return result


if __name__ == "__main__":
    main()
