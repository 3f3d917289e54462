"""Step sizes per method, chosen on the validation split (never the reported held-out one).

    python benchmarks/sweep.py --reward-mode functions --seeds 0 \
        --grid zopro:lr=1e-6,3e-6,1e-5:eps=1e-5,1e-4,1e-3 --grid mezo:spsa_lr=1e-6,1e-5,1e-4:eps=1e-3 \
        --time-budget-min 60

As the paper did (a 3×3 grid of learning rate × ε per method), each grid point is one ZO iteration
from each seed's shared first-order iteration 0 (``bench_reward.py``'s start run, made here when it
is missing), scored by its validation-split gain (paired, same samples as the start's validation
evaluation), averaged over the seeds (``--seeds 0 1 2``: one 32-prompt split of one seed can rank
points differently from the held-out split; several seeds' splits average that out). The validation
prompts are disjoint from the training and the held-out prompts.
``--time-budget-min`` stops launching runs once spent; a point scored on fewer than all seeds is
reported as not run, never chosen. Points run in the order given, each on every seed (``--jobs``
runs at a time); a run that finished earlier is read, not run again.
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


def validation_gain(runs: dict[int, tuple[Path, Path]]) -> dict:
    """Paired gain on the validation split of each run's last evaluation over its start's last,
    ``runs`` being {seed: (run metrics, start metrics)}: the mean over seeds of each seed's mean
    gain, with a two-level bootstrap interval (seeds, then prompts)."""
    per_seed, starts, finals = {}, [], []
    for seed, (run_metrics, start_metrics) in sorted(runs.items()):
        start = bench_reward.read_evals(start_metrics, "validation")[-1]
        final = bench_reward.read_evals(run_metrics, "validation")[-1]
        per_seed[seed] = bench_reward.differences(final, start)
        starts.append(start["score"])
        finals.append(final["score"])
    gains = {seed: statistics.fmean(diffs) for seed, diffs in per_seed.items()}
    return {"gain": statistics.fmean(gains.values()), "per_seed": gains, "start": statistics.fmean(starts),
            "final": statistics.fmean(finals), "interval": bench_reward.interval(per_seed)}


def choose(results: dict[str, list[dict]]) -> dict:
    """Per method, the grid point with the highest validation gain."""
    def gain(point):  # a NaN gain (failed judge scores) is never the best: max() would keep it when first
        return -math.inf if math.isnan(point["gain"]) else point["gain"]

    return {method: max(points, key=gain)["settings"] for method, points in results.items() if points}


def markdown(results: dict, chosen: dict, skipped: list, env: dict, seeds: list[int], reward_mode: str) -> str:
    which = f"seed {seeds[0]}'s" if len(seeds) == 1 else f"each of seeds {', '.join(map(str, seeds))}' (mean over seeds)"
    lines = [f"Validation-split gain (32-prompt split disjoint from training and held-out; paired samples) of one "
             f"ZO iteration from {which} shared first-order iteration 0; reward mode **{reward_mode}**.", "",
             environment_line(env), "", "| method | settings | validation gain [95 % CI] | per seed | minutes |",
             "|---|---|---|---|---|"]
    for method, points in results.items():
        for p in points:
            ci = p["interval"]
            mark = " **chosen**" if p["settings"] == chosen.get(method) else ""
            per_seed = ", ".join(f"{g:+.3f}" for g in p["per_seed"].values())
            lines.append(f"| {method} | `{json.dumps(p['settings'])}`{mark} | {p['gain']:+.3f} "
                         f"[{ci['low']:+.3f}, {ci['high']:+.3f}] | {per_seed} | {p['minutes']:.1f} |")
    if skipped:
        lines += ["", f"Not run on every seed (time budget spent): {', '.join(skipped)}"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parent / "quality.yaml"))
    parser.add_argument("--reward-mode", choices=sorted(bench_reward.REWARD_MODES), default="functions")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--start-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help=f"on top of {' '.join(bench_reward.START_SET)}, as bench_reward.py")
    parser.add_argument("--grid", action="append", required=True, help="method:key=v1,v2[:key=...]")
    parser.add_argument("--seeds", "--seed", dest="seeds", type=int, nargs="+", default=[0],
                        help="seeds whose start runs' validation splits score each point (mean over them)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--time-budget-min", type=float, default=None)
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench-reward"))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    from zopro_kernels.rloo.config import TrainConfig

    base = bench_reward.load_base_config(args.config, args.set, args.reward_mode)
    runs_dir = Path(args.runs_dir).resolve() / args.reward_mode  # the runs' subprocesses work in ROOT
    grids = [parse_grid(spec) for spec in args.grid]  # a bad spec or key fails now, before any run
    for method, points in grids:
        for point in points:
            TrainConfig.from_dict(bench_reward.method_config(base, {method: point}, method, args.seeds[0],
                                                             runs_dir, args.threads, zo_iterations=1))
    start_set = bench_reward.start_overrides(args.start_set)
    starts = {seed: bench_reward.start_config(base, start_set, seed, runs_dir, args.threads) for seed in args.seeds}
    started = time.perf_counter()
    grid = [(method, point, {seed: bench_reward.method_config(
                base, {method: point}, method, seed, runs_dir, args.threads, zo_iterations=1,
                eval_split="validation", name=point_name(method, point)) for seed in args.seeds})
            for method, points in grids for point in points]  # point by point, each on every seed
    runs = [config for *_, configs in grid for config in configs.values()]
    for config in runs:  # a run dir holding another setting's run stops the sweep before anything runs
        bench_reward.finished(config)
    bench_reward.say_trusted_by_name()

    def run_point(config):
        if bench_reward.finished(config):
            return
        if args.time_budget_min is not None and time.perf_counter() - started > 60 * args.time_budget_min:
            return
        bench_reward.launch(config)

    bench_reward.run_all(starts, runs, args.jobs, run=run_point)
    results, skipped = {}, []
    for method, point, configs in grid:
        if not all(map(bench_reward.finished, configs.values())):
            skipped.append(point_name(method, point))
            continue
        minutes = sum((bench_reward.run_record(c) or {"wall_seconds": math.nan})["wall_seconds"]
                      for c in configs.values()) / 60
        results.setdefault(method, []).append({"settings": point, "minutes": minutes} | validation_gain(
            {seed: (Path(c["output_dir"]) / "metrics.jsonl", Path(starts[seed]["output_dir"]) / "metrics.jsonl")
             for seed, c in configs.items()}))
        print(f"[sweep] {point_name(method, point)}: validation gain {results[method][-1]['gain']:+.4f}", flush=True)
    chosen = choose(results)
    device = torch.device("cuda" if torch.cuda.is_available() and base.get("device", "auto") != "cpu" else "cpu")
    env = environment(device, command_argv(__file__, argv))
    stem = results_stem(args.out, "sweep", env, args.tag or args.reward_mode)
    stem.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(results, chosen, skipped, env, args.seeds, args.reward_mode)
    write_results(stem, env, results, table, chosen=chosen, skipped=skipped, seeds=args.seeds, config=base,
                  total_seconds=time.perf_counter() - started)
    print(table)
    return {"results": results, "chosen": chosen, "skipped": skipped}


if __name__ == "__main__":
    main()
