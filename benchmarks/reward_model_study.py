"""How well does the reward model order pairs it never saw? Accuracy against warm-up size and fit.

    python benchmarks/reward_model_study.py --config benchmarks/quality.yaml --seed 0 \
        --warmup 128 256 512 --epochs 3 6 --lr 1e-3 3e-4

ZOPrO's reward-model mode stands on R: the policy climbs R's score, the judge measures. This
script samples preference pairs from π_0 (the policy at its LoRA init, two completions per prompt,
judged, ties dropped) exactly as the loop's warm-up does: a training pool from the training prompts
(cycled, fresh samples each pass) and a test pool from the **validation** split (several passes:
the held-out split is never touched). For each (warm-up pairs, epochs, lr) it fits R from the same
initialisation with the loop's own Bradley–Terry refinement and reports the test accuracy with a
95 % Wilson interval. The test pairs come from π_0 while the loop's "fresh pairs" come from the
policy after an iteration; the two are close at the start (the policy moves little in one
iteration), which is what the warm-up decides.
Writes benchmarks/results/reward-model-<device>[-tag]-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reward import wilson  # noqa: E402
from results_io import command_argv, environment, environment_line, results_stem, write_results  # noqa: E402

CHUNK = 32  # prompts sampled at once (memory, progress)


def draw_pairs(trainer, prompts: list[str], purpose: int, first_round: int):
    """Judged pairs of π_0 on ``prompts`` (in chunks, each with its own sampling seed); ties counted."""
    from zopro_kernels.rloo.refine import PreferencePairs

    parts, ties = [], 0
    for i, start in enumerate(range(0, len(prompts), CHUNK)):
        pairs, info = trainer.preference_pairs(first_round + i, prompts[start:start + CHUNK], purpose)
        parts.append(pairs)
        ties += info["judge_ties"]
    width = max(p.accepted_ids.shape[1] for p in parts)

    def cat(field: str) -> torch.Tensor:  # rows from different chunks are left-padded to one width
        rows = []
        for p in parts:
            t = getattr(p, field)
            pad = width - t.shape[1]
            rows.append(torch.nn.functional.pad(t, (pad, 0), value=0 if "mask" in field or
                                                trainer.pair.tokenizer.pad_token_id is None
                                                else trainer.pair.tokenizer.pad_token_id))
        return torch.cat(rows)

    return PreferencePairs(*(cat(f) for f in ("accepted_ids", "accepted_mask", "rejected_ids", "rejected_mask"))), ties


def _norm(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(Path(__file__).resolve().parent / "quality.yaml"))
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, nargs="+", default=[128, 256, 512], help="warm-up prompts (one pair each)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[3])
    parser.add_argument("--lr", type=float, nargs="+", default=[1e-3])
    parser.add_argument("--max-grad-norm", type=_norm, nargs="+", default=[None],
                        help="clip R's gradient norm (reward_max_grad_norm); none: off")
    parser.add_argument("--test-rounds", type=int, default=8, help="passes over the validation prompts for test pairs")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--tag", default=None)
    args = parser.parse_args(argv)
    if min(args.warmup) < 1 or min(args.epochs) < 1 or min(args.lr) <= 0 or args.test_rounds < 1:
        raise SystemExit("--warmup, --epochs and --test-rounds must be ≥ 1 and --lr > 0")

    from bench_reward import load_base_config
    from zopro_kernels.rloo.assets import resolve_prompts
    from zopro_kernels.rloo.cli import build_judge, build_pair
    from zopro_kernels.rloo.config import TrainConfig
    from zopro_kernels.rloo.loop import RLOOTrainer, derived_seed
    from zopro_kernels.rloo.refine import pair_accuracy, refine_reward_model, reward_optimizer

    if args.threads:
        torch.set_num_threads(args.threads)
    values = load_base_config(args.config, args.set, "model") | {
        "seed": args.seed, "output_dir": str(Path(args.out) / ".reward-model-study"), "progress": False}
    config = TrainConfig.from_dict(values)
    if not config.validation_prompts:
        raise SystemExit("the config has no validation split (validation_prompts: 0): the test pairs come from it")
    pair, judge = build_pair(config), build_judge(config)
    trainer = RLOOTrainer(config, pair, resolve_prompts(config.prompts, config.cache_dir, config.prompt_words), judge)
    started = time.perf_counter()
    train_prompts = [trainer.prompts[i % len(trainer.prompts)] for i in range(max(args.warmup))]
    train_pairs, train_ties = draw_pairs(trainer, train_prompts, purpose=3, first_round=0)
    test_prompts = trainer.validation_prompts * args.test_rounds
    test_pairs, test_ties = draw_pairs(trainer, test_prompts, purpose=11, first_round=0)
    print(f"[reward-model] {len(train_pairs)} training pairs ({train_ties} ties), {len(test_pairs)} test pairs "
          f"({test_ties} ties) in {time.perf_counter() - started:.0f} s", flush=True)
    initial = (pair.reward_tensors(), {k: v.clone() for k, v in pair.value_head.state_dict().items()})
    rows = []
    for warmup, epochs, lr, clip in itertools.product(sorted(args.warmup), args.epochs, args.lr, args.max_grad_norm):
        pair.load_adapter_tensors("reward", initial[0])
        pair.value_head.load_state_dict(initial[1])
        # N warm-up prompts: about the first N/max of the pool's pairs (pairs keep prompt order, ties dropped)
        used = train_pairs.subset(torch.arange(round(len(train_pairs) * warmup / max(args.warmup))))
        fit_started = time.perf_counter()
        # the loop's minibatch order (its warm-up's seed): at the loop's settings this is its R_0
        losses = refine_reward_model(pair, used, reward_optimizer(pair, lr), epochs=epochs,
                                     batch_size=config.reward_batch_size, seed=derived_seed(args.seed, 0, 0, 3),
                                     max_grad_norm=clip)
        accuracy = pair_accuracy(pair, test_pairs)
        low, high = wilson(round(accuracy * len(test_pairs)), len(test_pairs))
        rows.append({"warmup_prompts": warmup, "pairs": len(used), "epochs": epochs, "lr": lr, "max_grad_norm": clip,
                     "test_accuracy": accuracy, "low": low, "high": high,
                     "train_accuracy": pair_accuracy(pair, used), "bt_loss_last": losses[-1] if losses else math.nan,
                     "fit_seconds": time.perf_counter() - fit_started})
        print(f"[reward-model] warm-up {warmup} ({len(used)} pairs), {epochs} epochs, lr {lr:g}, clip {clip}: "
              f"test {accuracy:.3f} [{low:.3f}, {high:.3f}], train {rows[-1]['train_accuracy']:.3f}, "
              f"{rows[-1]['fit_seconds']:.0f} s", flush=True)
    env = environment(pair.device, command_argv(__file__, argv))
    lines = [f"Reward model ({config.model}, LoRA r={config.lora_r}, value head) fitted on pairs of π_0 (judge "
             f"{config.judge}, ties dropped), tested on {len(test_pairs)} pairs of π_0 from the {len(trainer.validation_prompts)}"
             f" validation prompts × {args.test_rounds} samplings ({test_ties} ties dropped); seed {args.seed}, "
             f"minibatch {config.reward_batch_size}.", "", environment_line(env), "",
             "| warm-up prompts | pairs | epochs | lr | gradient clip | test accuracy [95 % Wilson] | train accuracy "
             "| fit s |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        clip = "—" if r["max_grad_norm"] is None else f"{r['max_grad_norm']:g}"
        lines.append(f"| {r['warmup_prompts']} | {r['pairs']} | {r['epochs']} | {r['lr']:g} | {clip} | {r['test_accuracy']:.3f} "
                     f"[{r['low']:.3f}, {r['high']:.3f}] | {r['train_accuracy']:.3f} | {r['fit_seconds']:.0f} |")
    table = "\n".join(lines) + "\n"
    write_results(results_stem(args.out, "reward-model", env, args.tag), env, rows, table, seed=args.seed,
                  test_pairs=len(test_pairs), test_ties=test_ties, train_ties=train_ties, config=values)
    print(table)
    return rows


if __name__ == "__main__":
    main()
