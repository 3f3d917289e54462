"""Held-out quality: ZOPrO vs MeZO vs first-order RLOO on the real offline task, from one start.

    python benchmarks/bench_reward.py --reward-mode functions --seeds 0 1 2 --settings SWEEP.json
    python benchmarks/bench_reward.py --reward-mode model --seeds 0 1 2 --settings SWEEP.json
    python benchmarks/bench_reward.py --reward-mode functions --aggregate-only   # re-read finished runs

Protocol, per seed:
1. a **start run**: iteration 0 only, first order (AdamW, as published), with the start settings
   (``--start-set``); it evaluates the held-out and the validation split before and after;
2. one run per method from that checkpoint (``start_from``): ``--zo-iterations`` more iterations
   of ZOPrO, MeZO or AdamW with the same number of optimisation steps, so the methods part ways
   at the same point and the comparison at equal steps is exact.
The settings of each method (lr, eps, ...) come from ``--settings`` (the sweep's choice on the
validation split, ``benchmarks/sweep.py``), never from the held-out split reported here.

Two reward modes: ``model`` (the published one: a LoRA reward model warmed up and refined on the
judge's pairs, ΔR guiding ZOPrO) and ``functions`` (the judge's own score as the reward, no reward
model and no ΔR: the optimizer's quality without the reward model's noise).

The held-out score is the judge's (VADER's) mean over ``num_generations_eval`` samples of each held-out
prompt, drawn with the same seeds at every evaluation, so gains are paired sample by sample.
Intervals are 95 % bootstrap intervals: per seed over prompts, and pooled over seeds by a
two-level bootstrap (seeds, then prompts within a seed). Reported per method: held-out gain from
the start (before iteration 0), gain over the ZO phase (from the start run's end), gain at equal
steps, gain per hour of training, and paired ZOPrO − other differences on the same prompts and
samples, at equal steps and at equal judge queries and sequence passes (``--zo-iterations-of
zpg=2`` runs a method that is cheaper per step until it has spent what ZOPrO spends).
Writes benchmarks/results/reward-<device>[-<tag>]-<date>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import (command_argv, environment, environment_line, matplotlib_pyplot,  # noqa: E402
                        results_stem, write_results)

ROOT = Path(__file__).resolve().parents[1]
RLOO_METHODS = ("zopro", "mezo", "adamw")  # the default comparison
# preference-only zeroth order (docs/preference_zo.md): no reward at all, so only in the "functions"
# reward mode (its start run has no reward model); settings such as guided come from --settings
PREFERENCE_METHODS = ("zpg", "zbcpg", "zorank")
METHODS = RLOO_METHODS + PREFERENCE_METHODS
REWARD_MODES = {"model": {"reward_model": True, "reward_funcs": []},
                "functions": {"reward_model": False, "reward_funcs": ["judge"]}}
RUN_RECORD = "bench_run.json"  # written by launch() next to the run's metrics
RUN_SETTINGS = "bench_settings.json"  # the settings a run was launched with, checked before it is reused
RUN_LOCK = "bench_running.json"  # {pid, host} of the process running it: never two writers in one run dir
# keys that say where a run lives and how it is scheduled, not what it computes
PLACEMENT_KEYS = ("output_dir", "start_from", "threads", "progress", "plot")
BOOTSTRAP = 4000
# the shared start run (iteration 0): 3 rollouts × 4 AdamW steps; sweep.py makes the same one
START_SET = ["num_iterations=4", "steps_per_iteration=3"]
COST_UNITS = ("judge_queries", "sequence_passes")  # the budgets besides steps that methods are compared at


# -- reading and statistics (pure) -------------------------------------------------------------

def read_records(metrics_path) -> list[dict]:
    """Every record of a run's metrics.jsonl, in order."""
    with open(metrics_path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def read_evals(metrics_path, split: str = "held_out") -> list[dict]:
    """A run's evaluations of ``split`` in order: ``{"iteration", "step", "seconds", "score", "prompts"}``
    (``prompts``: the per-prompt mean scores, aligned from one evaluation to the next)."""
    evals = []
    for record in read_records(metrics_path):
        if record.get("event") != "eval" or record.get("split", "held_out") != split:
            continue
        if "scores" not in record:
            raise ValueError(f"{metrics_path}: eval records lack per-sample scores (an older loop); run again")
        per_prompt = record["samples_per_prompt"]
        scores = record["scores"]
        evals.append({"iteration": record["iteration"], "step": record["global_step"],
                      "seconds": record["train_seconds"], "score": record["task_score"],
                      "prompts": [statistics.fmean(scores[i:i + per_prompt])
                                  for i in range(0, len(scores), per_prompt)]})
    if not evals:
        raise ValueError(f"{metrics_path}: no {split} evaluation")
    return sorted(evals, key=lambda e: (e["step"], e["seconds"], e["iteration"]))


def differences(after: dict, before: dict) -> list[float]:
    if len(after["prompts"]) != len(before["prompts"]):
        raise ValueError("evaluations of different prompt sets cannot be paired")
    return [a - b for a, b in zip(after["prompts"], before["prompts"])]


def interval(per_seed: dict[int, list[float]], *, seed: int = 0, draws: int = BOOTSTRAP) -> dict:
    """Mean of per-prompt values pooled over seeds with a 95 % two-level bootstrap interval
    (seeds resampled, then prompts within each); one seed: prompts only."""
    seeds = sorted(per_seed)
    if not seeds or not all(per_seed[s] for s in seeds):
        return {"mean": None, "low": None, "high": None, "seeds": len(seeds)}
    mean = statistics.fmean(statistics.fmean(per_seed[s]) for s in seeds)
    rng = random.Random(seed)
    means = []
    for _ in range(draws):
        chosen = [rng.choice(seeds) for _ in seeds] if len(seeds) > 1 else seeds
        total = 0.0
        for s in chosen:
            values = per_seed[s]
            total += sum(values[rng.randrange(len(values))] for _ in values) / len(values)
        means.append(total / len(chosen))
    means.sort()
    return {"mean": mean, "low": means[int(0.025 * draws)], "high": means[int(0.975 * draws) - 1],
            "seeds": len(seeds)}


def wilson(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (stays inside [0, 1] for small counts)."""
    if total == 0:
        return math.nan, math.nan
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return centre - half, centre + half


def fresh_pair_estimates(records: list[dict], first_iteration: int = 0) -> list[tuple[float, int]]:
    """(accuracy, pairs) of the reward model on each iteration's fresh pairs (the judged pairs it is
    refined on next, scored before that refinement), from iteration ``first_iteration`` on."""
    return [(r["fresh_pair_accuracy"], int(r["pairs"])) for r in records
            if r.get("event") == "iteration" and r["iteration"] >= first_iteration
            and r.get("fresh_pair_accuracy") is not None and r.get("pairs")]


def fresh_pair_accuracy(rows: dict[str, dict[int, list[tuple[float, int]]]]) -> dict:
    """Per row (e.g. "R_0", "after zopro"), from {seed: [(accuracy, pairs), ...]}: the mean of the
    estimates, and the pooled accuracy (correct / pairs) with its Wilson interval; and the same over
    every row ("all")."""
    def summary(by_seed):
        estimates = [e for per_seed in by_seed.values() for e in per_seed]
        correct, total = sum(round(a * n) for a, n in estimates), sum(n for _, n in estimates)
        low, high = wilson(correct, total)
        return {"per_seed": {s: [a for a, _ in e] for s, e in by_seed.items()},
                "mean": statistics.fmean(a for a, _ in estimates) if estimates else None,
                "estimates": len(estimates), "pairs": total,
                "pooled": correct / total if total else None, "low": low, "high": high}

    every = {}
    for by_seed in rows.values():
        for seed, estimates in by_seed.items():
            every.setdefault(seed, []).extend(estimates)
    return {"rows": {label: summary(by_seed) for label, by_seed in rows.items()}, "all": summary(every)}


def eval_at(evals: list[dict], key: str, limit: float) -> dict | None:
    eligible = [e for e in evals if e[key] <= limit]
    return eligible[-1] if eligible else None


def aggregate(runs: dict[str, dict[int, list[dict]]], start_step: dict[int, int]) -> dict:
    """``runs[method][seed]``: that run's held-out evaluations (the start run's included);
    ``start_step[seed]``: the step at which the methods parted ways."""
    every = [evals for by_seed in runs.values() for evals in by_seed.values()]
    step_budget = last_shared_step(every)
    methods = {}
    for method, by_seed in runs.items():
        per_seed, gain, zo_gain, equal, rows = {}, {}, {}, {}, {}
        for seed, evals in sorted(by_seed.items()):
            first, final = evals[0], evals[-1]
            if first["step"] != 0:
                raise ValueError(f"{method} seed {seed}: the first evaluation is not before training")
            parted = eval_at(evals, "step", start_step[seed])
            at_budget = eval_at(evals, "step", step_budget)
            gain[seed] = differences(final, first)
            zo_gain[seed] = differences(final, parted)
            equal[seed] = differences(at_budget, first)
            hours = final["seconds"] / 3600
            rows[seed] = final
            per_seed[seed] = {"start": first["score"], "parted": parted["score"], "final": final["score"],
                              "gain": final["score"] - first["score"],
                              "phase_gain": final["score"] - parted["score"],
                              "gain_at_equal_steps": at_budget["score"] - first["score"],
                              "train_seconds": final["seconds"], "steps": final["step"],
                              "gain_per_hour": (final["score"] - first["score"]) / hours if hours else math.nan,
                              "gain_interval": interval({seed: gain[seed]})}
        methods[method] = {
            "seeds": sorted(by_seed), "per_seed": per_seed, "final_evals": rows,
            "gain": interval(gain), "phase_gain": interval(zo_gain), "gain_at_equal_steps": interval(equal),
            "gain_per_hour": mean_std(p["gain_per_hour"] for p in per_seed.values()),
            "train_seconds": mean_std(p["train_seconds"] for p in per_seed.values()),
            "start": mean_std(p["start"] for p in per_seed.values()),
            "final": mean_std(p["final"] for p in per_seed.values()),
        }
    # each pair at the last step both evaluated at: a third method that stopped earlier does not pull
    # ZOPrO − MeZO back, and a pair with no shared evaluation after the start is said, not compared
    paired, unpaired = [], []
    if "zopro" in runs:
        for other in (m for m in runs if m != "zopro"):
            shared = sorted(set(runs["zopro"]) & set(runs[other]))
            step = last_shared_step([runs[m][s] for m in ("zopro", other) for s in shared])
            if step <= max(start_step[s] for s in shared):
                unpaired.append(other)
                continue
            paired.append(paired_difference(other, "score_at_equal_steps",
                                            {s: eval_at(runs["zopro"][s], "step", step) for s in shared},
                                            {s: eval_at(runs[other][s], "step", step) for s in shared})
                          | {"step": step})
    for m in methods.values():
        m.pop("final_evals")
    return {"step_budget": step_budget, "start_step": start_step, "methods": methods, "paired": paired,
            "unpaired_at_equal_steps": unpaired, "paired_at_equal_cost": paired_at_equal_cost(runs)}


def last_shared_step(evaluations: list[list[dict]]) -> int:
    """The last step at which every one of these runs was evaluated (evaluations come after each
    iteration, so a run's step between two of them has none to compare)."""
    return max(set.intersection(*({e["step"] for e in evals} for evals in evaluations)))


def paired_at_equal_cost(runs: dict[str, dict[int, list[dict]]]) -> list[dict]:
    """ZOPrO minus each other method at equal judge queries and at equal sequence passes: per seed,
    ZOPrO's final evaluation against the other's last evaluation whose phase cost (``with_costs``)
    is within ZOPrO's. A method cheaper per step compared this way needs more steps
    (``--zo-iterations-of``); one dearer per step falls back to an earlier evaluation."""
    paired = []
    if "zopro" not in runs:
        return paired
    for unit in COST_UNITS:
        for other in (m for m in runs if m != "zopro"):
            shared = sorted(set(runs["zopro"]) & set(runs[other]))
            if not shared or any(unit not in e for s in shared for e in runs["zopro"][s] + runs[other][s]):
                continue
            ours = {s: runs["zopro"][s][-1] for s in shared}
            theirs = {s: eval_at(runs[other][s], unit, ours[s][unit]) for s in shared}
            paired.append(paired_difference(other, f"score_at_equal_{unit}", ours, theirs) | {
                "budget": mean_std(ours[s][unit] for s in shared), "spent": mean_std(theirs[s][unit] for s in shared),
                "steps": mean_std(theirs[s]["step"] for s in shared)})
    return paired


def paired_difference(versus: str, quantity: str, ours: dict[int, dict], theirs: dict[int, dict]) -> dict:
    """ZOPrO's evaluation minus the other's, per seed, on the same prompts and samples, with the interval."""
    return ({"versus": versus, "quantity": quantity,
             "per_seed": {s: statistics.fmean(differences(ours[s], theirs[s])) for s in ours}}
            | interval({s: differences(ours[s], theirs[s]) for s in ours}))


def phase_costs(config: dict, records: list[dict], start_step: int) -> dict:
    """What a method's phase (steps from ``start_step`` on) cost, from its config and step records:

    - ``completions``: sequences generated. RLOO: N·k per rollout; ``zpg``/``zbcpg``: 2N per step;
      ``zorank``: m·N per step (N = ``batch_prompts``, k = ``num_generations``, m = ``rank_policies``);
    - ``judge_queries``: what the judge was asked for the training signal. RLOO with the judge as a
      reward function: one score per completion; RLOO with a reward model: the refinement's
      comparisons; the preference methods: the comparisons they recorded. (Held-out evaluations and
      the judge's score logged as a metric are not counted.)
    - ``sequence_passes``: policy-sized passes over one sequence, a generation counted as one (KV
      cache) and a backward as two: RLOO per rollout N·k × (generation, π_old, reference, + the
      reward model), per ZO step 2·q·N·k (J₊ and J₋ of q directions), per AdamW step 3·N·k; the
      preference methods generate only;
    - ``peak_memory_bytes``: the largest of the phase's step records.
    """
    steps = [r for r in records if r.get("event") is None and "step" in r and r["step"] >= start_step]
    iterations = [r for r in records if r.get("event") == "iteration" and r.get("global_step", 0) > start_step]
    method, n = config["optimizer"], config["batch_prompts"]
    if method in PREFERENCE_METHODS:
        per_step = config.get("rank_policies", 4) * n if method == "zorank" else 2 * n
        completions = per_step * len(steps)
        judge = sum(int(r.get("judge_queries", 0)) for r in steps)
        passes = completions
    else:
        k = config["num_generations"]
        rollouts = len({(r["iteration"], r["rollout"]) for r in steps})
        completions = rollouts * n * k
        judge = (completions if "judge" in config.get("reward_funcs", []) else 0) + (
            sum(int(r.get("pairs", 0)) + int(r.get("judge_ties", 0)) + int(r.get("judge_failures", 0))
                for r in iterations) if config.get("reward_model") else 0)
        per_step = 3 if method == "adamw" else 2 * config.get("directions", 1)
        passes = completions * (3 + bool(config.get("reward_model"))) + per_step * n * k * len(steps)
    return {"steps": len(steps), "completions": completions, "judge_queries": judge, "sequence_passes": passes,
            "peak_memory_bytes": max((int(r.get("peak_memory_bytes", 0)) for r in steps), default=0)}


def with_costs(config: dict, records: list[dict], evals: list[dict], start_step: int) -> list[dict]:
    """``evals`` with what the phase had cost when each was taken (``COST_UNITS`` of ``phase_costs``;
    0 up to the start): the x axis of a comparison at equal judge queries or sequence passes."""
    def upto(step):  # the steps before the evaluation, the iterations (refinements) ending at it
        return [r for r in records if (r.get("global_step", 0) <= step if r.get("event") == "iteration"
                                       else r.get("step", 0) < step)]
    return [e | {unit: phase_costs(config, upto(e["step"]), start_step)[unit] for unit in COST_UNITS}
            for e in evals]


def mean_std(values) -> dict:
    values = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "n": len(values)}


def excludes_zero_above(stat: dict) -> bool:
    return stat.get("low") is not None and stat["low"] > 0


def target_checks(result: dict) -> list[dict]:
    """The issue's targets: AdamW's and ZOPrO's held-out gain > 0 with the interval excluding 0;
    ZOPrO − MeZO at equal steps > 0 with the paired interval excluding 0; the reward model's
    fresh-pair accuracy ≥ 0.65 on average (reward-model mode)."""
    checks = []
    for method in ("adamw", "zopro"):
        if method in result["methods"]:
            stat = result["methods"][method]["gain"]
            checks.append({"target": f"{method} held-out gain > 0, interval excluding 0", "value": stat,
                           "met": excludes_zero_above(stat)})
    for p in result["paired"]:
        if p["versus"] == "mezo":
            checks.append({"target": "ZOPrO − MeZO at equal steps > 0, paired interval excluding 0", "value": p,
                           "met": excludes_zero_above(p)})
    accuracy = result.get("reward_model_accuracy", {}).get("all")
    if accuracy and accuracy["mean"] is not None:
        checks.append({"target": "reward model's fresh-pair accuracy ≥ 0.65 on average (every iteration's estimate; "
                                 "pooled, with its Wilson interval)",
                       "value": {"mean": accuracy["pooled"], "low": accuracy["low"], "high": accuracy["high"]},
                       "shown": f"mean {accuracy['mean']:.3f} of {accuracy['estimates']} estimates; pooled "
                                f"{accuracy['pooled']:.3f} [{accuracy['low']:.3f}, {accuracy['high']:.3f}] "
                                f"over {accuracy['pairs']} pairs", "met": accuracy["mean"] >= 0.65})
    return checks


# -- running -----------------------------------------------------------------------------------

def run_dir(runs_dir, name: str, seed: int) -> Path:
    return Path(runs_dir) / f"{name}-seed{seed}"


def start_overrides(items: list[str]) -> dict:
    """``--start-set``: ``START_SET`` with the given ``key=value`` items on top (they add to the
    default start, never silently drop it: a key given wins)."""
    from zopro_kernels.rloo.cli import parse_overrides

    return parse_overrides(START_SET + list(items))


def start_config(base: dict, overrides: dict, seed: int, runs_dir, threads: int) -> dict:
    """Iteration 0 only, first order, evaluated on both splits (the sweep reads the validation one)."""
    return base | overrides | {"optimizer": "zopro", "first_iteration": "adamw", "iterations": 1, "seed": seed,
                               "eval_split": "both", "output_dir": str(run_dir(runs_dir, "start", seed)),
                               "threads": threads, "progress": False, "plot": False, "save_adapters": False}


def method_config(base: dict, settings: dict, method: str, seed: int, runs_dir, threads: int, zo_iterations: int,
                  eval_split: str = "held_out", name: str | None = None) -> dict:
    from zopro_kernels.rloo.config import canonical_keys

    # the preference-only methods use no reward (their runs share the start run all the same), and
    # sample fresh completions every step: as many steps as the others' rollouts × reuses
    no_reward = {}
    if method in PREFERENCE_METHODS:
        steps, reuse = base.get("steps_per_iteration"), base.get("num_iterations", 1)
        no_reward = {"reward_model": False, "reward_funcs": [], "num_iterations": 1,
                     "steps_per_iteration": steps * reuse if steps else None}
    # a settings file (or grid point) may use the keys' old names: they must override base's new ones
    return base | no_reward | canonical_keys(settings.get(method, {})) | {
        "optimizer": method, "seed": seed, "iterations": 1 + zo_iterations, "eval_split": eval_split,
        "start_from": str(run_dir(runs_dir, "start", seed)),
        "output_dir": str(run_dir(runs_dir, name or method, seed)), "threads": threads, "progress": False,
        "plot": False, "save_adapters": False}  # the comparison reads metrics only: no adapters on disk per run


def run_settings(config: dict) -> dict:
    """What a run computes: its config as JSON values, less ``PLACEMENT_KEYS``."""
    return {k: v for k, v in json.loads(json.dumps(config)).items() if k not in PLACEMENT_KEYS}


def settings_mismatch(recorded: dict, wanted: dict) -> list[str]:
    """The keys whose values differ. A key the record lacks (added to the config since) counts only
    where the wanted value is not the config's default, which is what the older run used."""
    from zopro_kernels.rloo.config import TrainConfig

    defaults = run_settings(TrainConfig().to_dict())
    missing = object()
    return sorted(k for k in recorded.keys() | wanted.keys()
                  if recorded.get(k, defaults.get(k, missing)) != wanted.get(k, missing))


_TRUSTED_BY_NAME: dict[Path, bool] = {}  # run → said yet


def finished(config: dict) -> bool:
    """The run's metrics end with the evaluation after its last iteration. A run directory holding a
    run (finished or not) launched with other settings stops the benchmark: runs are found by
    directory name, so reusing it would report one setting under another's name, and running it
    again would overwrite it."""
    out = Path(config["output_dir"])
    path = out / "metrics.jsonl"
    if not path.exists():
        return False
    recorded = out / RUN_SETTINGS
    if recorded.exists():
        differ = settings_mismatch(json.loads(recorded.read_text()), run_settings(config))
        if differ:
            raise SystemExit(f"{out} holds a run with other settings ({', '.join(differ)} differ, see {recorded}); "
                             "use another --runs-dir, or --force to run it again with these")
    records = read_records(path)
    done = [r for r in records if r.get("event") == "iteration"]
    complete = bool(done) and (done[-1]["iteration"] == config.get("iterations", 5) - 1 or "stopped" in done[-1]) \
        and records[-1].get("event") in ("eval", "iteration")
    if complete and not recorded.exists():  # a run from before settings were recorded: said by say_trusted_by_name
        _TRUSTED_BY_NAME.setdefault(out, False)
    return complete


def say_trusted_by_name() -> None:
    """One line for the finished runs ``finished`` reused without recorded settings, not said before."""
    new = sorted(path for path, said in _TRUSTED_BY_NAME.items() if not said)
    if new:
        where = {str(path.parent) for path in new}
        print(f"[bench] {len(new)} run(s) from before {RUN_SETTINGS} was written, reused by their directory names "
              f"in {', '.join(sorted(where))}: {' '.join(path.name for path in new)}", flush=True)
        _TRUSTED_BY_NAME.update(dict.fromkeys(new, True))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process, alive
        pass
    return True


def holder_of(pid: int, run_pid: int | None = None) -> dict:
    return {"pid": pid, "host": os.uname().nodename} | ({"run_pid": run_pid} if run_pid else {})


def claim(out: Path) -> Path:
    """Take ``out`` for this process (``RUN_LOCK``); a run directory another live process on this
    machine is running (a second benchmark or sweep on the same ``--runs-dir``) is refused. A lock
    left by a process that died is taken over."""
    lock = out / RUN_LOCK
    mine = json.dumps(holder_of(os.getpid()))
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(lock.read_text())
            except (OSError, ValueError):  # being written this instant, or torn: treat as held
                holder = {"pid": -1, "host": os.uname().nodename}
            pids = [holder.get("pid", -1), holder.get("run_pid", -1)]  # the benchmark's and its run's
            if holder.get("host") != os.uname().nodename or pids[0] < 0 or any(_alive(p) for p in pids if p > 0):
                raise RuntimeError(f"run {out} is being run by process {holder.get('pid')} on "
                                   f"{holder.get('host')} ({lock}); wait for it, or stop it and delete the file")
            lock.unlink(missing_ok=True)  # its process is gone
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(mine)
        return lock
    raise RuntimeError(f"could not take {lock}")


def launch(config: dict) -> dict:
    """One run in a subprocess (``--run-one``); its output goes to ``output_dir/train.log``."""
    out = Path(config["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    lock = claim(out)
    try:
        (out / RUN_SETTINGS).write_text(json.dumps(run_settings(config), indent=1, sort_keys=True))
        started = time.perf_counter()
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        with open(out / "train.log", "w", encoding="utf-8") as log:
            child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--run-one", json.dumps(config)],
                                     stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            # the run's own pid too: it goes on writing if this process is killed
            lock.write_text(json.dumps(holder_of(os.getpid(), child.pid)))
            returncode = child.wait()
        wall = time.perf_counter() - started
        print(f"[bench] {out.name}: exit {returncode} after {wall / 60:.1f} min", flush=True)
        record = {"output_dir": str(out), "returncode": returncode, "wall_seconds": wall}
        (out / RUN_RECORD).write_text(json.dumps(record))
    finally:
        lock.unlink(missing_ok=True)
    if returncode:
        raise RuntimeError(f"run {out} failed (exit {returncode}); see {out / 'train.log'}")
    return record


def run_record(config: dict) -> dict | None:
    path = Path(config["output_dir"]) / RUN_RECORD
    return json.loads(path.read_text()) if path.exists() else None


def run_one(config: dict):
    from zopro_kernels.rloo.cli import train
    from zopro_kernels.rloo.config import TrainConfig

    train(TrainConfig.from_dict(config))


def load_base_config(path: str | None, overrides: list[str], reward_mode: str | None = None) -> dict:
    from zopro_kernels.rloo.cli import parse_overrides
    from zopro_kernels.rloo.config import TrainConfig

    base = TrainConfig.from_yaml(path).to_dict() if path else TrainConfig().to_dict()
    mode = REWARD_MODES[reward_mode] if reward_mode else {}
    return TrainConfig.from_dict(base | mode | parse_overrides(overrides)).to_dict()


def run_all(starts: dict[int, dict], configs: list[dict], jobs: int, force: bool = False,
            run=None) -> None:
    """Every start run, then each method run as soon as its seed's start is done, ``jobs`` at a time.

    A free slot takes the first waiting run, in the given order, whose start is done, so no slot
    idles while one seed's start holds the others back. ``run`` runs one method config (default:
    ``launch`` unless it finished). A failed start leaves its seed's runs out; failures are raised
    after every other run is done."""
    def run_start(config):
        if force or not finished(config):
            launch(config)

    todo = [c for c in list(starts.values()) + configs if force or not finished(c)]
    if todo:
        print(f"[bench] {len(todo)} run(s) to do of {len(starts) + len(configs)}, {jobs} at a time", flush=True)
    # (what runs it, its config, the seed whose start it waits for)
    waiting = [(run_start, c, None) for c in starts.values()] + [(run or run_start, c, c["seed"]) for c in configs]
    started, failed, errors = set(), set(), []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        running = {}
        while waiting or running:
            waiting = [task for task in waiting if task[2] not in failed]
            while len(running) < jobs:
                task = next((t for t in waiting if t[2] is None or t[2] in started), None)
                if task is None:
                    break
                waiting.remove(task)
                running[pool.submit(task[0], task[1])] = task
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                _, config, after = running.pop(future)
                if future.exception() is not None:
                    errors.append(future.exception())
                if after is None:  # a start: its seed's runs may go (or are left out)
                    (failed if future.exception() is not None else started).add(config["seed"])
    if errors:
        raise errors[0]


def start_step_of(start: dict) -> int:
    return read_evals(Path(start["output_dir"]) / "metrics.jsonl")[-1]["step"]


# -- table and plot ----------------------------------------------------------------------------

def _ci(stat: dict, spec: str = "+.3f") -> str:
    if stat.get("mean") is None:
        return "—"
    return f"{format(stat['mean'], spec)} [{format(stat['low'], spec)}, {format(stat['high'], spec)}]"


def _pm(stat: dict, spec: str = ".3f") -> str:
    if stat["mean"] is None:
        return "—"
    return format(stat["mean"], spec) + ("" if stat["std"] is None else f" ± {format(stat['std'], spec)}")


def markdown(result: dict, checks: list[dict], env: dict, config: dict, settings: dict, reward_mode: str,
             runs: list[dict] = ()) -> str:
    seeds = sorted({s for m in result["methods"].values() for s in m["seeds"]})
    walls = [r["wall_seconds"] for r in runs if r]
    lines = [f"Held-out judge score (judge {config.get('judge')}, {config.get('eval_prompts')} prompts × "
             f"{config.get('num_generations_eval')} samples, paired) on the {config.get('prompts')} task; policy "
             f"{config.get('model')}, LoRA r={config.get('lora_r')}; reward mode **{reward_mode}**; seeds {seeds}.",
             f"Each seed: a shared first-order iteration 0 (start run), then each method's "
             f"optimisation steps ({config.get('steps_per_iteration')} rollouts of "
             f"{config.get('batch_prompts')} prompts × k={config.get('num_generations')} per iteration, each reused "
             f"num_iterations times). Settings per method (from the validation split): `{json.dumps(settings)}`.",
             "", environment_line(env), ""]
    if walls:
        lines += [f"{len(walls)} runs, {sum(walls) / 60:.0f} min in all ({statistics.fmean(walls) / 60:.1f} min "
                  "per run, held-out evaluations and start-up included).", ""]
    lines += ["Intervals: 95 % bootstrap (seeds, then prompts within a seed).", "",
              "| method | held-out before | after | gain from start | gain over the ZO phase "
              f"| gain at step {result['step_budget']} (the last all evaluated at) | training s | gain per hour |", "|---|---|---|---|---|---|---|---|"]
    for method, m in result["methods"].items():
        lines.append(f"| {method} | {_pm(m['start'])} | {_pm(m['final'])} | {_ci(m['gain'])} | {_ci(m['phase_gain'])} "
                     f"| {_ci(m['gain_at_equal_steps'])} | {_pm(m['train_seconds'], '.0f')} | {_pm(m['gain_per_hour'])} |")
    if all("costs" in m for m in result["methods"].values()):
        lines += ["", "What each method's phase cost (mean over seeds; `phase_costs`: a generation counts as one "
                  "sequence pass, a backward as two; judge queries are the training signal's):", "",
                  "| method | steps | completions | judge queries | sequence passes | peak memory MiB "
                  "| phase gain per 100 judge queries |", "|---|---|---|---|---|---|---|"]
        for method, m in result["methods"].items():
            cost, gain = m["costs"], m["phase_gain"]["mean"]
            queries = cost["judge_queries"]["mean"]
            per = f"{100 * gain / queries:+.4f}" if queries and gain is not None else "—"
            lines.append(f"| {method} | {cost['steps']['mean']:.0f} | {cost['completions']['mean']:.0f} "
                         f"| {queries:.0f} | {cost['sequence_passes']['mean']:.0f} "
                         f"| {cost['peak_memory_bytes']['mean'] / 2**20:.0f} | {per} |")
    if result["paired"]:
        lines += ["", "Paired on the same held-out prompts and samples (same seed), ZOPrO minus the other, at equal "
                  "steps (the last step both evaluated at):", "", "| versus | step | difference | per seed |",
                  "|---|---|---|---|"]
        for p in result["paired"]:
            per = ", ".join(f"{v:+.3f}" for v in p["per_seed"].values())
            lines.append(f"| {p['versus']} | {p['step']} | {_ci(p)} | {per} |")
    for other in result["unpaired_at_equal_steps"]:
        lines += ["", f"{other} and ZOPrO share no evaluation after the start (their iterations end at other "
                  "steps): not compared at equal steps; see equal cost below."]
    if result.get("paired_at_equal_cost"):
        lines += ["", "Paired the same way at equal cost: ZOPrO's final evaluation against the other's last "
                  "evaluation within ZOPrO's phase cost in that unit (evaluations are taken after each iteration, "
                  "so a method dearer per step falls back to an earlier one):", "",
                  "| versus | unit | ZOPrO's phase | the other's, at its evaluation (steps) | difference | per seed |",
                  "|---|---|---|---|---|---|"]
        for p in result["paired_at_equal_cost"]:
            per = ", ".join(f"{v:+.3f}" for v in p["per_seed"].values())
            unit = p["quantity"].removeprefix("score_at_equal_").replace("_", " ")
            lines.append(f"| {p['versus']} | {unit} | {p['budget']['mean']:.0f} | {p['spent']['mean']:.0f} "
                         f"({p['steps']['mean']:.0f}) | {_ci(p)} | {per} |")
    lines += ["", "Per seed (held-out score: start → where the methods part, after the shared iteration 0 → final):", ""]
    for method, m in result["methods"].items():
        per = "; ".join(f"seed {s}: {p['start']:.3f} → {p['parted']:.3f} → {p['final']:.3f}"
                        for s, p in m["per_seed"].items())
        lines.append(f"- {method}: {per}")
    accuracy = result.get("reward_model_accuracy")
    if accuracy:
        lines += ["", "The reward model on each iteration's fresh pairs (judged pairs of the policy it is refined on "
                  "next, scored before that refinement; ties dropped): R_0 is the warmed-up model on iteration 0's "
                  "pairs, \"after <method>\" the model refined on the previous iteration's pairs, on the method's "
                  "iteration's. Intervals: 95 % Wilson, pooled over pairs.", "",
                  "| reward model | accuracy per seed | mean of estimates | pooled [95 %] | pairs |",
                  "|---|---|---|---|---|"]
        for label, row in list(accuracy["rows"].items()) + [("every iteration", accuracy["all"])]:
            if row["mean"] is None:
                continue
            per = "; ".join(f"{s}: " + ", ".join(f"{a:.2f}" for a in acc) for s, acc in row["per_seed"].items())
            lines.append(f"| {label} | {per} | {row['mean']:.3f} | {row['pooled']:.3f} [{row['low']:.3f}, "
                         f"{row['high']:.3f}] | {row['pairs']} |")
    if checks:
        lines += ["", "| target | value | met |", "|---|---|---|"]
        for c in checks:
            lines.append(f"| {c['target']} | {c.get('shown') or _ci(c['value'])} | {'yes' if c['met'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(runs: dict, path: Path) -> str | None:
    plt = matplotlib_pyplot()
    if plt is None or not runs:
        return None
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for method, by_seed in runs.items():
        for axis, key, scale, label in ((axes[0], "seconds", 1 / 60, "training minutes (evaluations excluded)"),
                                        (axes[1], "step", 1, "optimisation steps")):
            longest = max(len(e) for e in by_seed.values())
            xs, ys = [], []
            for i in range(longest):
                points = [e[i] for e in by_seed.values() if i < len(e)]
                xs.append(statistics.fmean(p[key] for p in points) * scale)
                ys.append(statistics.fmean(p["score"] for p in points))
            axis.plot(xs, ys, marker="o", label=f"{method} ({len(by_seed)} seeds)")
            axis.set_xlabel(label)
    axes[0].set_ylabel("held-out judge score (mean over seeds)")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return str(path)


# -- main --------------------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # the sweep's defaults (sweep.py): the start run is shared, so both scripts must make the same one
    parser.add_argument("--config", default=str(Path(__file__).resolve().parent / "quality.yaml"))
    parser.add_argument("--reward-mode", choices=sorted(REWARD_MODES), default="functions")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys (all runs)")
    parser.add_argument("--start-set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override keys of the shared first-order iteration 0 only, on top of "
                             f"{' '.join(START_SET)} (a key given here wins)")
    parser.add_argument("--settings", help="JSON {method: {key: value}} (the sweep's choice) or a sweep results file")
    parser.add_argument("--methods", nargs="+", default=list(RLOO_METHODS), choices=METHODS,
                        help=f"default: {' '.join(RLOO_METHODS)}; the preference-only {', '.join(PREFERENCE_METHODS)} "
                             "need --reward-mode functions")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--zo-iterations", type=int, default=1, help="iterations after the shared iteration 0")
    parser.add_argument("--zo-iterations-of", nargs="*", default=[], metavar="METHOD=N",
                        help="a method's own --zo-iterations, e.g. zpg=2: a method cheaper per step run until it "
                             "has spent what ZOPrO spends, for the comparison at equal judge queries")
    parser.add_argument("--run-name-of", nargs="*", default=[], metavar="METHOD=NAME",
                        help="a method's runs as NAME-seed<N> in --runs-dir (default METHOD-seed<N>), e.g. "
                             "zpg=zpg-two-sided: a variant of its settings beside the start and the other runs")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--threads", type=int, default=2, help="torch threads per run")
    parser.add_argument("--runs-dir", default=str(ROOT / "runs" / "bench-reward"))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--tag", default=None, help="added to the results file name")
    parser.add_argument("--force", action="store_true", help="run again runs that finished")
    parser.add_argument("--aggregate-only", action="store_true", help="read the runs in --runs-dir, run nothing")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def parse_zo_iterations_of(items: list[str]) -> dict[str, int]:
    parsed = {}
    for item in items:
        method, _, count = item.partition("=")
        if method not in METHODS or not count.isdigit() or int(count) < 1:
            raise SystemExit(f"--zo-iterations-of {item!r}: expected METHOD=N with METHOD one of {METHODS}, N ≥ 1")
        parsed[method] = int(count)
    return parsed


def parse_run_names_of(items: list[str], methods: list[str]) -> dict[str, str]:
    """``METHOD=NAME`` pairs; a name must be a plain directory name and take no other run's place
    (the start's, another method's default, or another method's given name)."""
    names = {}
    for item in items:
        method, _, name = item.partition("=")
        if method not in METHODS or not name or name.startswith(".") \
                or not all(ch.isalnum() or ch in "._-" for ch in name):
            raise SystemExit(f"--run-name-of {item!r}: expected METHOD=NAME with METHOD one of {METHODS} and NAME "
                             "of letters, digits, '.', '_', '-'")
        if name != method and name in ("start", *METHODS):
            raise SystemExit(f"--run-name-of: {method}'s runs would be named {name!r}, the name of {name}'s runs")
        names[method] = name
    taken = {}
    for method in methods:
        name = names.get(method, method)
        if name in taken:
            raise SystemExit(f"--run-name-of: {method}'s runs would be named {name!r}, as {taken[name]}'s are")
        taken[name] = method
    return names


def load_settings(path: str | None) -> dict:
    if not path:
        return {}
    data = json.loads(Path(path).read_text())
    return data.get("chosen", data) if isinstance(data, dict) else {}


def main(argv=None):
    args = parse_args(argv)
    if args.run_one:
        return run_one(json.loads(args.run_one))
    from zopro_kernels.rloo.cli import parse_overrides

    if args.reward_mode == "model" and set(args.methods) & set(PREFERENCE_METHODS):
        raise SystemExit(f"{sorted(set(args.methods) & set(PREFERENCE_METHODS))} use no reward model: their runs "
                         "cannot start from a start run that trained one; use --reward-mode functions")
    base = load_base_config(args.config, args.set, args.reward_mode)
    settings = load_settings(args.settings)
    runs_dir = Path(args.runs_dir).resolve() / args.reward_mode  # the runs' subprocesses work in ROOT
    start_set = start_overrides(args.start_set)
    starts = {s: start_config(base, start_set, s, runs_dir, args.threads) for s in args.seeds}
    zo_iterations = {m: args.zo_iterations for m in args.methods} | parse_zo_iterations_of(args.zo_iterations_of)
    run_names = parse_run_names_of(args.run_name_of, args.methods)
    configs = [method_config(base, settings, m, s, runs_dir, args.threads, zo_iterations[m], name=run_names.get(m))
               for s in args.seeds for m in args.methods]
    started = time.perf_counter()
    if not args.aggregate_only:
        if not args.force:  # a directory holding another setting's run stops the benchmark before anything runs
            for config in list(starts.values()) + configs:
                finished(config)
            say_trusted_by_name()
        run_all(starts, configs, args.jobs, args.force)
    records = [r for r in map(run_record, list(starts.values()) + configs) if r is not None]
    runs, start_step = {}, {}
    for c in configs:
        if finished(c) and finished(starts[c["seed"]]):
            metrics = Path(c["output_dir"]) / "metrics.jsonl"
            start_step[c["seed"]] = start_step_of(starts[c["seed"]])
            runs.setdefault(c["optimizer"], {})[c["seed"]] = with_costs(
                c, read_records(metrics), read_evals(metrics), start_step[c["seed"]])
        else:
            print(f"[bench] {c['output_dir']}: not finished, left out", flush=True)
    say_trusted_by_name()
    if not runs:
        raise SystemExit("no finished run to aggregate")
    result = aggregate(runs, start_step)
    for c in configs:
        method = result["methods"].get(c["optimizer"])
        if method is not None and c["seed"] in method["per_seed"]:
            method["per_seed"][c["seed"]]["costs"] = phase_costs(
                c, read_records(Path(c["output_dir"]) / "metrics.jsonl"), start_step[c["seed"]])
    for method in result["methods"].values():
        per_seed = [p["costs"] for p in method["per_seed"].values()]
        method["costs"] = {key: mean_std(costs[key] for costs in per_seed) for key in per_seed[0]}
    compared = sorted({seed for m in result["methods"].values() for seed in m["per_seed"]})
    rows = {"R_0": {s: fresh_pair_estimates(read_records(Path(starts[s]["output_dir"]) / "metrics.jsonl"))
                    for s in compared}}
    for c in configs:
        if c["optimizer"] in result["methods"] and c["seed"] in result["methods"][c["optimizer"]]["per_seed"]:
            rows.setdefault(f"after {c['optimizer']}", {})[c["seed"]] = fresh_pair_estimates(
                read_records(Path(c["output_dir"]) / "metrics.jsonl"), first_iteration=1)
    if any(e for by_seed in rows.values() for e in by_seed.values()):  # a reward model was refined
        result["reward_model_accuracy"] = fresh_pair_accuracy(rows)
    checks = target_checks(result)
    device = torch.device("cuda" if torch.cuda.is_available() and base.get("device", "auto") != "cpu" else "cpu")
    env = environment(device, command_argv(__file__, argv))
    stem = results_stem(args.out, "reward", env, args.tag or args.reward_mode)
    stem.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(result, checks, env, base, settings, args.reward_mode, records)
    png = plot(runs, stem.with_suffix(".png"))
    write_results(stem, env, result, table, config=base, settings=settings, reward_mode=args.reward_mode,
                  targets=checks, runs=records, plot=png, total_seconds=time.perf_counter() - started,
                  evaluations={m: {str(s): e for s, e in by_seed.items()} for m, by_seed in runs.items()})
    print(table)
    return result


if __name__ == "__main__":
    main()
