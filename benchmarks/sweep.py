"""Step sizes per method, chosen on the validation split (never the reported held-out one).

    python benchmarks/sweep.py --reward-mode functions --seed 0 \
        --grid zopro:lr=1e-6,3e-6,1e-5:eps=1e-5,1e-4,1e-3 --grid mezo:spsa_lr=1e-6,1e-5,1e-4:eps=1e-3 \
        --time-budget-min 60

As the paper did (a 3×3 grid of learning rate × ε per method), each grid point is one ZO iteration
from the seed's shared first-order iteration 0 (``bench_reward.py``'s start run, made here when it
is missing), scored by its validation-split gain (paired, same samples as the start's validation
evaluation). The validation prompts are disjoint from the training and the held-out prompts.
``--time-budget-min`` stops launching grid points once spent (reported: which points did not run).
Grid points run in the order given (``--jobs`` at a time); a point that finished earlier is read,
not run again.
Writes benchmarks/results/sweep-<device>-<mode>-<date>.{json,md}; its "chosen" entry is what
``bench_reward.py --settings`` takes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_reward  # noqa: E402
from results_io import command_argv, environment, environment_line, results_stem, write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def parse_grid(spec: str) -> tuple[str, list[dict]]:
    """``method:key=v1,v2:key2=w1,w2`` → (method, every combination as a dict of config values)."""
    method, *axes = spec.split(":")
    if method not in bench_reward.METHODS or not axes:
        raise SystemExit(f"--grid {spec!r}: expected <method>:<key>=<v1>,<v2>[:<key>=...] with a method of "
                         f"{bench_reward.METHODS}")
    keys, values = [], []
    for axis in axes:
        key, sep, raw = axis.partition("=")
        if not key or not sep or not raw:
            raise SystemExit(f"--grid {spec!r}: {axis!r} is not key=v1,v2")
        keys.append(key)
        values.append([_value(v) for v in raw.split(",")])
    return method, [dict(zip(keys, combo)) for combo in itertools.product(*values)]


def _value(text: str):
    """A number or true/false where it reads as one (JSON), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def point_name(method: str, point: dict) -> str:
    return "sweep-" + method + "-" + "-".join(f"{k}{v:g}" if isinstance(v, float) else f"{k}{v}"
                                              for k, v in point.items())


def validation_gain(run_metrics: Path, start_metrics: Path) -> dict:
    """Mean paired gain on the validation split of the run's last evaluation over the start's last."""
    start = bench_reward.read_evals(start_metrics, "validation")[-1]
    final = bench_reward.read_evals(run_metrics, "validation")[-1]
    diffs = bench_reward.differences(final, start)
    return {"gain": statistics.fmean(diffs), "start": start["score"], "final": final["score"]} | {
        "interval": bench_reward.interval({0: diffs})}


def choose(results: dict[str, list[dict]]) -> dict:
    """Per method, the grid point with the highest validation gain."""
    def gain(point):  # a NaN gain (failed judge scores) is never the best: max() would keep it when first
        return -math.inf if math.isnan(point["gain"]) else point["gain"]

    return {method: max(points, key=gain)["settings"] for method, points in results.items() if points}


def markdown(results: dict, chosen: dict, skipped: list, env: dict, seed: int, reward_mode: str) -> str:
    lines = [f"Validation-split gain (32-prompt split disjoint from training and held-out; paired samples) of one "
             f"ZO iteration from seed {seed}'s shared first-order iteration 0; reward mode **{reward_mode}**.", "",
             environment_line(env), "", "| method | settings | validation gain [95 % CI] | minutes |",
             "|---|---|---|---|"]
    for method, points in results.items():
        for p in points:
            ci = p["interval"]
            mark = " **chosen**" if p["settings"] == chosen.get(method) else ""
            lines.append(f"| {method} | `{json.dumps(p['settings'])}`{mark} | {p['gain']:+.3f} "
                         f"[{ci['low']:+.3f}, {ci['high']:+.3f}] | {p['minutes']:.1f} |")
    if skipped:
        lines += ["", f"Not run (time budget spent): {', '.join(skipped)}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parent / "quality.yaml"))
    parser.add_argument("--reward-mode", choices=sorted(bench_reward.REWARD_MODES), default="functions")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--start-set", nargs="*", default=bench_reward.START_SET, metavar="KEY=VALUE")
    parser.add_argument("--grid", action="append", required=True, help="method:key=v1,v2[:key=...]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="grid points at a time")
    parser.add_argument("--time-budget-min", type=float, default=None)
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench-reward"))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    from zopro_kernels.rloo.cli import parse_overrides
    from zopro_kernels.rloo.config import TrainConfig

    base = bench_reward.load_base_config(args.config, args.set, args.reward_mode)
    runs_dir = Path(args.runs_dir).resolve() / args.reward_mode  # the runs' subprocesses work in ROOT
    grids = [parse_grid(spec) for spec in args.grid]  # a bad spec or key fails now, before any run
    for method, points in grids:
        for point in points:
            TrainConfig.from_dict(bench_reward.method_config(base, {method: point}, method, args.seed, runs_dir,
                                                             args.threads, zo_iterations=1))
    start = bench_reward.start_config(base, parse_overrides(args.start_set), args.seed, runs_dir, args.threads)
    started = time.perf_counter()
    bench_reward.run_all([start], 1)
    start_metrics = Path(start["output_dir"]) / "metrics.jsonl"
    grid = []
    for spec in args.grid:
        method, points = parse_grid(spec)
        for point in points:
            name = point_name(method, point)
            grid.append((method, point, bench_reward.method_config(
                base, {method: point}, method, args.seed, runs_dir, args.threads, zo_iterations=1,
                eval_split="validation", name=name)))
    skipped = []

    def run_point(item):
        config = item[2]
        if bench_reward.finished(config):
            return
        if args.time_budget_min is not None and time.perf_counter() - started > 60 * args.time_budget_min:
            skipped.append(Path(config["output_dir"]).name)
            return
        bench_reward.launch(config)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(run_point, grid))
    results = {}
    for method, point, config in grid:
        if not bench_reward.finished(config):
            continue
        record = bench_reward.run_record(config) or {"wall_seconds": float("nan")}
        results.setdefault(method, []).append(
            {"settings": point, "minutes": record["wall_seconds"] / 60}
            | validation_gain(Path(config["output_dir"]) / "metrics.jsonl", start_metrics))
        print(f"[sweep] {Path(config['output_dir']).name}: validation gain {results[method][-1]['gain']:+.4f}",
              flush=True)
    chosen = choose(results)
    device = torch.device("cuda" if torch.cuda.is_available() and base.get("device", "auto") != "cpu" else "cpu")
    env = environment(device, command_argv(__file__, argv))
    stem = results_stem(args.out, "sweep", env, args.tag or args.reward_mode)
    stem.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(results, chosen, skipped, env, args.seed, args.reward_mode)
    write_results(stem, env, results, table, chosen=chosen, skipped=skipped, config=base,
                  total_seconds=time.perf_counter() - started)
    print(table)
    return {"results": results, "chosen": chosen, "skipped": skipped}


if __name__ == "__main__":
    main()
