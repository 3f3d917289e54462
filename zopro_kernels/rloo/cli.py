"""``zopro-train --config examples/sentiment.yaml [--resume [--resume-override KEY[,KEY]]] [--set key=value ...]``
and ``train()``."""

from __future__ import annotations

import argparse
import os
import sys

from .config import TrainConfig


def build_judge(config: TrainConfig):
    from .judges import LLMPairwiseJudge, SimulatedHumanJudge, resolve_score, vader_judge

    if config.judge == "vader":
        return vader_judge()
    if config.judge.startswith("llm:"):
        from .models import load_base_model

        model, tokenizer = load_base_model(config.judge[4:], dtype=config.dtype, device=config.device)
        return LLMPairwiseJudge(model.eval(), tokenizer, order=config.judge_order, seed=config.seed)
    if config.judge.startswith("simulated:"):  # Bradley–Terry feedback from a score: "simulated:vader"
        return SimulatedHumanJudge(resolve_score(config.judge[len("simulated:"):]), tau=config.judge_temperature,
                                   seed=config.seed, link=config.link, shape=config.weibull_shape)
    raise ValueError(f"judge {config.judge!r} is not 'vader', 'llm:<local model directory>' or "
                     "'simulated:<vader | module:function>'")


def build_pair(config: TrainConfig):
    from .assets import resolve_model
    from .models import LoraSettings, PolicyAndReward, load_base_model

    model, tokenizer = load_base_model(resolve_model(config.model, config.cache_dir), dtype=config.dtype,
                                       load_in_4bit=config.load_in_4bit, device=config.device)
    model.eval()
    lora = LoraSettings(r=config.lora_r, alpha=config.lora_alpha, target_modules=config.lora_targets)
    return PolicyAndReward(model, tokenizer, lora, policy_adapter=config.policy_adapter,
                           reward_adapter=config.reward_adapter, seed=config.seed,
                           shared_lora_init=config.shared_lora_init)


def train(config: TrainConfig, *, resume: bool = False, recorder=None, pair=None, prompts=None, judge=None,
          parallel=None, resume_override=()):
    """Runs the loop; builds the model, prompts and judge from ``config`` unless given.

    ``resume``: continue from ``output_dir``'s checkpoint, whose config must match ``config`` in
    every key that decides the run; ``resume_override`` names keys changed on purpose
    (``RLOOTrainer.resume``).

    Under ``torchrun`` (WORLD_SIZE > 1) the process group is joined here (NCCL on GPUs, gloo on
    CPUs) and the loop is data parallel; rank 0 writes the outputs.
    """
    from .assets import resolve_prompts
    from .loop import RLOOTrainer
    from .parallel import init_from_environment
    from .report import plot_reward_curve, summary_table

    parallel = parallel if parallel is not None else init_from_environment()

    if config.threads:
        import torch

        torch.set_num_threads(config.threads)
    with parallel.main_first():  # one process fetches the assets, the others read its cache
        pair = pair if pair is not None else build_pair(config)
        prompts = prompts if prompts is not None else resolve_prompts(config.prompts, config.cache_dir,
                                                                      config.prompt_words)
    judge = judge if judge is not None else build_judge(config)
    trainer = RLOOTrainer(config, pair, prompts, judge, recorder=recorder, parallel=parallel)
    history = trainer.run(resume=resume, resume_override=resume_override)
    if not parallel.is_main:
        return trainer
    print(summary_table(history))
    print(f"[zopro-train] counters: {trainer.counters}")
    if config.save_adapters:
        print(f"[zopro-train] adapters (peft): {os.path.join(config.output_dir, 'adapters', 'final')}")
    if config.plot:
        png = plot_reward_curve(trainer.metrics_path, os.path.join(config.output_dir, "reward_curve.png"))
        if png:
            print(f"[zopro-train] reward curve: {png}")
    return trainer


def parse_overrides(pairs: list[str]) -> dict:
    """``key=value`` pairs (values read as YAML), with old key names mapped to TRL's (a
    FutureWarning), so that they override the same key of a config's ``to_dict()``."""
    import yaml

    from .config import canonical_keys

    values = {}
    for item in pairs:
        key, sep, raw = item.partition("=")
        if not sep:
            raise SystemExit(f"--set needs key=value, got {item!r}")
        values[key.strip()] = yaml.safe_load(raw)
    return canonical_keys(values)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="zopro-train",
        description="Iterative ZOPrO: a LoRA policy trained zeroth-order (RLOO objective) against a LoRA "
                    "reward model refined from a judge's pairwise preferences.")
    parser.add_argument("--config", help="YAML file of TrainConfig keys (defaults: the sentiment task)")
    parser.add_argument("--resume", action="store_true", help="continue from output_dir's last checkpoint")
    parser.add_argument("--resume-override", action="append", default=[], metavar="KEY[,KEY]",
                        help="with --resume: accept these keys differing from the checkpoint's config (changed on "
                             "purpose; logged in metrics.jsonl). Without it a resume refuses any key that decides "
                             "the run's trajectory")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    args = parser.parse_args(argv)
    if args.resume_override and not args.resume:
        parser.error("--resume-override needs --resume")
    try:
        base = TrainConfig.from_yaml(args.config).to_dict() if args.config else {}
        config = TrainConfig.from_dict(base | parse_overrides(args.set))
        train(config, resume=args.resume, resume_override=args.resume_override)
    except (FileNotFoundError, ValueError, ImportError, RuntimeError) as error:
        print(f"zopro-train: error: {error}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
