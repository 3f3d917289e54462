"""Is the previous update Δπ a descent direction on fresh batches? The premise of ZOPrO, measured.

    python benchmarks/probe_direction.py --run runs/bench-reward/functions/start-seed0 --batches 8

From a run's checkpoint (e.g. the shared first-order iteration 0 of ``bench_reward.py``), for
``--batches`` fresh rollouts of the training prompts the run has not used yet, the two-sided
directional derivative of the RLOO objective J (the loop's own sampling, scoring and loss) along
the unit direction Δπ̂ and along random unit directions, each scaled to ‖z‖ = √d
(``direction_norm="noise"``), with lr = 0 so the weights never move. Reports each batch's value,
the mean with a 95 % t-interval, and how often the sign says "continue Δπ" (g < 0).
Writes benchmarks/results/direction-<device>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import command_argv, environment, environment_line, results_stem, write_results  # noqa: E402

T95 = {2: 12.71, 3: 4.30, 4: 3.18, 5: 2.78, 6: 2.57, 7: 2.45, 8: 2.36, 9: 2.31, 10: 2.26, 12: 2.20, 16: 2.13}


def t_interval(values: list[float]) -> dict:
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "low": None, "high": None, "n": n}
    half = T95.get(n, 2.0) * statistics.stdev(values) / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run directory with checkpoint.pt (its config is used)")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--eps", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=None, help="KL coefficient (default: the run's)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--tag", default=None)
    args = parser.parse_args(argv)

    from zopro_kernels import ZOPrO
    from zopro_kernels.rloo.checkpoint import load_checkpoint
    from zopro_kernels.rloo.cli import build_judge, build_pair
    from zopro_kernels.rloo.assets import resolve_prompts
    from zopro_kernels.rloo.config import TrainConfig, canonical_keys
    from zopro_kernels.rloo.loop import RLOOTrainer, derived_seed
    from zopro_kernels.rloo.objective import policy_loss, score_rollout, with_standardized_advantages

    state = load_checkpoint(str(Path(args.run) / "checkpoint.pt"))
    overrides = {"output_dir": str(Path(args.out) / ".probe"), "start_from": None, "progress": False}
    if args.beta is not None:
        overrides["beta"] = args.beta
    config = TrainConfig.from_dict(canonical_keys(state["config"], warn=False) | overrides)  # old checkpoints too
    if args.threads:
        torch.set_num_threads(args.threads)
    pair = build_pair(config)
    judge = build_judge(config)
    trainer = RLOOTrainer(config, pair, resolve_prompts(config.prompts, config.cache_dir, config.prompt_words), judge)
    trainer.restore(dict(state, zo=None, adamw=None))
    delta = state["zo"]["state"]
    names = [name for name, _ in pair.named_policy_parameters()]
    policy_delta = {name: delta[i]["policy_delta"] for i, name in enumerate(names)}
    rows = []
    start = trainer.next_iteration * trainer.chunk_size  # prompts the run has not trained on yet
    for batch in range(args.batches):
        prompts = [trainer.prompts[(start + batch * config.batch_prompts + j) % len(trainer.prompts)]
                   for j in range(config.batch_prompts)]
        rollout = trainer.sample(prompts, k=config.num_generations, seed=derived_seed(config.seed, 1000 + batch, 0, 1))
        scored = score_rollout(pair, rollout, beta=config.beta, chunk_size=config.logprob_chunk,
                               reward_model=config.reward_model, reward_funcs=trainer.reward_funcs,
                               sampling=trainer.sampling)
        if config.normalize_advantages:  # the run's J, as its loop scored it
            scored = with_standardized_advantages(scored)

        def closure():
            return policy_loss(pair, scored, kind=config.objective, clip=config.clip, chunk_size=config.logprob_chunk)

        row = {"batch": batch}
        for label, alpha in (("along_policy_delta", 1.0), ("random", 0.0)):
            optimizer = ZOPrO(pair.named_policy_parameters(), lr=0.0, eps=args.eps, alpha=alpha,
                              direction_norm="noise", seed=10_000 + batch, granularity=config.granularity)
            optimizer.set_guidance(policy_delta=policy_delta)
            optimizer.step(closure)
            row[label] = float(optimizer.last_step["projected_grad"])
        rows.append(row)
        print(f"[probe] batch {batch}: g along Δπ̂ {row['along_policy_delta']:+.3f}, random {row['random']:+.3f}",
              flush=True)
    summary = {label: t_interval([r[label] for r in rows]) | {
        "continue_share": sum(r[label] < 0 for r in rows) / len(rows)} for label in ("along_policy_delta", "random")}
    env = environment(pair.device, command_argv(__file__, argv))
    lines = [f"Directional derivative g of J (β = {config.beta:g}; per unit z, ‖z‖ = √d, ε = {args.eps:g}) on "
             f"{args.batches} fresh "
             f"rollouts of {config.batch_prompts} prompts × k={config.num_generations}, from `{args.run}` "
             f"(‖Δπ‖ = {math.sqrt(sum(float(v.double().square().sum()) for v in policy_delta.values())):.2f}).", "",
             environment_line(env), "", "| direction | mean g [95 % t-interval] | share with g < 0 (continue) | per batch |",
             "|---|---|---|---|"]
    for label, stat in summary.items():
        per = ", ".join(f"{r[label]:+.2f}" for r in rows)
        low = "—" if stat["low"] is None else f"{stat['low']:+.2f}, {stat['high']:+.2f}"
        lines.append(f"| {label} | {stat['mean']:+.2f} [{low}] | {stat['continue_share']:.2f} | {per} |")
    table = "\n".join(lines) + "\n"
    stem = results_stem(args.out, "direction", env, args.tag)
    write_results(stem, env, rows, table, summary=summary, run=str(args.run), beta=config.beta)
    print(table)
    return summary


if __name__ == "__main__":
    main()
