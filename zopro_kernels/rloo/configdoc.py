"""docs/config.md's table of every ``TrainConfig`` key: type and default from the dataclass,
meaning and TRL's name from ``KEYS`` below. A test checks that ``KEYS`` and the dataclass have
the same keys and that docs/config.md holds the table this module writes; after changing a key:

    python -m zopro_kernels.rloo.configdoc docs/config.md
"""

from __future__ import annotations

import dataclasses
import sys

from .config import RENAMED, TrainConfig

SAME = "same"
OURS = "ours only"
TRAINING_ARGUMENTS = "same (`TrainingArguments`)"

# key: (meaning, TRL column). The TRL column: "same" (RLOOConfig has the key with this meaning),
# "same (...)" where it lives elsewhere in TRL/transformers, or "ours only" with a note on the
# nearest TRL key where there is one. A renamed key gets "renamed from `old`" appended.
KEYS: dict[str, tuple[str, str]] = {
    # what to train on
    "model": ("The policy's base: a named asset, a local HF directory, or a `.gguf` file.",
              f"{OURS} (RLOOTrainer's `model` argument)"),
    "prompts": ("A named prompt asset or a JSONL file with a `prompt` field.",
                f"{OURS} (RLOOTrainer's `train_dataset`)"),
    "judge": ("`vader`, `llm:<local model directory>` (a pairwise LLM judge), or `simulated:<score>` "
              "(Bradley–Terry feedback from `vader` or `module:function`, docs/preference_zo.md).", OURS),
    "judge_order": ("LLM judge: ask in `both` orders (cancels position bias), `random` or `fixed`.", OURS),
    "prompt_words": ("Opening words of each review snippet (the named prompt asset).", OURS),
    "max_prompts": ("Use only the first N prompts (after the seeded shuffle).", OURS),
    "prompt_template": ("How a prompt is shown to the policy (`{prompt}` is replaced).", OURS),
    "cache_dir": ("Assets (default: `$ZOPRO_CACHE` or `~/.cache/zopro-kernels`).", OURS),
    "output_dir": ("metrics.jsonl, checkpoint.pt, adapters/, runs/ (TensorBoard), reward_curve.png.",
                   TRAINING_ARGUMENTS),
    # model
    "dtype": ("Base and adapter dtype: `float32`, `bfloat16`, `float16`, `float64`.",
              f"{OURS} (TRL `ModelConfig.dtype`)"),
    "load_in_4bit": ("NF4 base through bitsandbytes.", f"{OURS} (TRL `ModelConfig`: same name)"),
    "lora_r": ("LoRA rank of both adapters.", f"{OURS} (TRL `ModelConfig`: same name)"),
    "lora_alpha": ("LoRA alpha of both adapters.", f"{OURS} (TRL `ModelConfig`: same name)"),
    "lora_targets": ("peft `target_modules` (`all-linear` or a list of module names).",
                     f"{OURS} (TRL `ModelConfig.lora_target_modules`)"),
    "policy_adapter": ("The policy adapter's peft name.", OURS),
    "reward_adapter": ("The reward adapter's peft name.", OURS),
    "shared_lora_init": ("The reward adapter starts as the policy's copy: ΔR and Δπ share one LoRA A basis.", OURS),
    # sampling and objective
    "num_generations": ("Completions per prompt (RLOO's k, ≥ 2).", SAME),
    "max_completion_length": ("New tokens per completion.", SAME),
    "max_prompt_tokens": ("Prompts longer than this (in tokens, after `prompt_template`) are skipped and "
                          "counted, never truncated.",
                          f"{OURS}: TRL's `max_prompt_length` (left truncation) was deprecated and, since "
                          "TRL 0.29, removed; TRL now asks you to filter the dataset, which this key does"),
    "max_length": ("Upper bound on prompt + completion tokens (checked against the two above).", OURS),
    "temperature": ("Sampling temperature (π_old is the distribution `generate` sampled from).", SAME),
    "top_k": ("Top-k filtering while sampling (0: off).", SAME),
    "top_p": ("Nucleus sampling (1.0: off).", SAME),
    "beta": ("KL coefficient of the reward R − β·KL.", SAME),
    "objective": ("`ppo` (clipped sequence ratio) or `reinforce`.", OURS),
    "clip": ("PPO clip c: the ratio is clipped to [1 − c, 1 + c].",
             f"{OURS}: TRL calls it `epsilon`; kept as `clip` because `eps` here is the zeroth-order "
             "perturbation ε, and `epsilon` beside `eps` would read as one setting"),
    "normalize_advantages": ("Standardise the advantages over each sampled batch (all processes): (A − mean) / "
                             "(std + 1e-4). J then reads in units of the batch's spread, not of the reward, so a step "
                             "size means the same step length under a reward model's logits or a judge's [−1, 1] "
                             "score (an lr found without it × the steps' recorded advantage_std gives the same "
                             "length; the best length still differed between rewards on the task: sweep).", SAME),
    "logprob_chunk": ("Sequence positions per vocabulary projection (memory of the log-prob pass).", OURS),
    "num_iterations": ("Optimisation steps per sampled rollout (μ); π_old fixed at sampling.", SAME),
    # rewards
    "reward_model": ("Train and use the LoRA reward model; false: no refinement and no ΔR.", OURS),
    "reward_funcs": ("Reward functions added to the reward: `judge` (the judge's score) or `module:function`.",
                     "same (RLOOTrainer's `reward_funcs` argument)"),
    # optimisation
    "optimizer": ("`zopro` (guided ZO), `mezo` (unguided SPSA) or `adamw` (first order) on the RLOO objective; "
                  "`zpg`, `zbcpg` or `zorank`: preference-only zeroth order, no reward (docs/preference_zo.md).",
                  f"{OURS} (`TrainingArguments.optim` picks a first-order optimizer)"),
    "first_iteration": ("`zopro`/`mezo`: iteration 0 first order (`adamw`, as published) or unguided `spsa` "
                        "(the preference modes' iteration 0 is always unguided).", OURS),
    "iterations": ("Outer iterations (policy steps, then the reward refinement).",
                   f"{OURS} (TRL's `num_iterations` is the inner reuse, above)"),
    "prompt_fraction": ("Share of the training prompts used per iteration.", OURS),
    "batch_prompts": ("Prompts per rollout, over all processes (each with `num_generations` completions).",
                      f"{OURS} (TRL counts completions per device: `per_device_train_batch_size`)"),
    "steps_per_iteration": ("Rollouts per iteration (default: the iteration's prompts / `batch_prompts`).", OURS),
    "lr": ("Step size of guided ZO steps, and of every step of the preference modes.", OURS),
    "direction_norm": ("Scale of a guided z: `noise` (‖z‖ ≈ √d) or `policy_delta` (‖z‖ ≈ ‖Δπ‖, as published).",
                       OURS),
    "rescale_guided_lr": ("With `policy_delta`: η_t = lr·‖Δπ_0‖²/‖Δπ_{t−1}‖² keeps iteration 1's step size.",
                          OURS),
    "directions": ("Two-sided estimates per ZO step (n-SPSA), averaged.", OURS),
    "max_projected_grad": ("ZO modes: a bound on the size of g = (J₊ − J₋)/2ε, so no step moves θ by more than "
                           "lr·bound·√d (`direction_norm: noise`); each step logs g and `g_clipped`. Null: no bound.",
                           OURS),
    "spsa_lr": ("Step size of unguided SPSA steps.", OURS),
    "eps": ("ZO perturbation ε (θ ± εz; the preference modes' unit-sphere radius is μ = ε√d).", OURS),
    "adamw_lr": ("AdamW's learning rate (first-order iterations and the `adamw` mode).",
                 f"{OURS}: TRL's `learning_rate` is AdamW's; kept as `adamw_lr` because `lr` (ZO) and "
                 "`learning_rate` side by side would be two learning rates under one name"),
    "weight_decay": ("Weight decay (AdamW and ZO steps).", TRAINING_ARGUMENTS),
    "alpha": ("Guidance weight α: `linear`, `exp`, `constant`, or a float in [0, 1].", OURS),
    "granularity": ("Projection and ‖Δπ‖ rescale per `tensor` (published) or `global`.", OURS),
    # preference-only modes
    "guided": ("Preference modes: iterations after the first draw z as eq. 2 with Δπ (no ΔR).", OURS),
    "judge_queries": ("Preference modes: judge queries per pair (p̂ = wins / queries, a tie counts ½).", OURS),
    "trim_delta": ("`zpg`, `zbcpg`: p̂ trimmed to [δ, 1 − δ] before the inverse link.", OURS),
    "link": ("Preference link: `bt` (Bradley–Terry) or `weibull` (double Weibull); inverted by `zpg`/`zbcpg`, "
             "followed by a `simulated:` judge.", OURS),
    "weibull_shape": ("Shape k of the `weibull` link.", OURS),
    "two_sided": ("`zpg`, `zbcpg`: compare θ+εz with θ−εz (published: with θ); `zorank`: ± pairs of directions.",
                  OURS),
    "perturbation": ("Unguided z of the preference modes: `sphere`, `gaussian`, or `published` (`zpg`/`zbcpg` "
                     "sphere, `zorank` Gaussian).", OURS),
    "blocks": ("`zbcpg`: blocks estimated per step, each from its share of the step's prompts.", OURS),
    "block_tensors": ("`zbcpg`: consecutive tensors per block (2: one module's lora_A and lora_B).", OURS),
    "rank_policies": ("`zorank`: perturbed policies m whose completions the judge ranks per prompt.", OURS),
    # reward model
    "reward_lr": ("AdamW learning rate of the reward adapter and value head.", OURS),
    "reward_epochs": ("Bradley–Terry epochs per refinement.", OURS),
    "reward_batch_size": ("Preference pairs per reward-model step.", OURS),
    "reward_max_grad_norm": ("Clip the reward model's gradient norm to this before each step (none: off).",
                             f"{OURS}: TRL's RewardTrainer clips at `max_grad_norm` (1.0 by default)"),
    "reward_warmup": ("Fit R_0 on pairs from π_0 before iteration 0.", OURS),
    "reward_warmup_prompts": ("Prompts (one pair each) of that warm-up (default: iteration 0's chunk).", OURS),
    "judge_temperature": ("Judge `simulated:<score>`: τ of P(a ≻ b) = σ((s_a − s_b)/τ).", OURS),
    # bookkeeping
    "device": ("`auto`: this process's GPU (`LOCAL_RANK` under torchrun) if any, else cpu.", OURS),
    "backend": ("The ZO passes' backend (`ZOPrO(backend=...)`): `auto` picks the fastest that is built; `torch` is "
                "the float64-capable reference, whose noise the CPU runs before the `cpu` backend existed used.",
                OURS),
    "time_budget_s": ("End the run after this much training time (held-out evaluations excluded).", OURS),
    "seed": ("Seeds prompts' shuffle, LoRA init, sampling and ZO noise.",
             "same (`TrainingArguments`; its default is 42)"),
    "eval_prompts": ("Held-out prompts scored before and after each iteration.", OURS),
    "validation_prompts": ("A second held-out split, for choosing settings (the sweep).", OURS),
    "num_generations_eval": ("Samples per evaluation prompt, the same sampling seeds every time (paired); "
                             "None: `num_generations`.", "same (TRL's default is None; ours is 4)"),
    "eval_split": ("Which split evaluations score: `held_out`, `validation` or `both`.", OURS),
    "start_from": ("A checkpoint (file or run directory) to continue with this config's optimizer.", OURS),
    "snapshot_every": ("Recorder snapshots of the policy every N steps.", OURS),
    "threads": ("torch intra-op threads.", OURS),
    "progress": ("One progress bar over every optimisation step of the run (ETA; postfix: iteration, "
                 "held-out score), rank 0.", f"{OURS} (`TrainingArguments.disable_tqdm`, inverted)"),
    "plot": ("Write reward_curve.png at the end.", OURS),
    "save_adapters": ("Save both adapters with peft after every iteration and at the end "
                      "(`adapters/iteration-{i}`, `adapters/final`; see Outputs).",
                      f"{OURS} (TrainingArguments saves by `save_strategy`)"),
    "report_to": ("Integrations: `tensorboard`; `none` or [] (default) for none; `all`: those installed.",
                  TRAINING_ARGUMENTS),
    "logging_dir": ("TensorBoard's directory (default: `$TENSORBOARD_LOGGING_DIR`, else `output_dir/runs`).",
                    "same (transformers 4's `TrainingArguments`; transformers 5 reads "
                    "`$TENSORBOARD_LOGGING_DIR` instead, honoured here when unset)"),
}

BEGIN = "<!-- keys: generated by python -m zopro_kernels.rloo.configdoc docs/config.md -->"
END = "<!-- keys: end -->"


def _default(field: dataclasses.Field) -> str:
    value = field.default_factory() if field.default is dataclasses.MISSING else field.default
    return f"`{value!r}`" if isinstance(value, str) else f"`{value}`"


def trl_column(key: str) -> str:
    trl = KEYS[key][1]
    old = {new: old for old, new in RENAMED.items()}.get(key)
    return f"{trl}; renamed from `{old}`" if old else trl


def table() -> str:
    fields = dataclasses.fields(TrainConfig)
    missing = [f.name for f in fields if f.name not in KEYS]
    extra = sorted(set(KEYS) - {f.name for f in fields})
    if missing or extra:
        raise ValueError(f"configdoc.KEYS is out of date: undocumented {missing}, no longer keys {extra}")
    lines = ["| key | type | default | meaning | TRL RLOOConfig name |", "|---|---|---|---|---|"]
    for field in fields:
        meaning = KEYS[field.name][0]
        kind = str(field.type).replace("|", "\\|")
        lines.append(f"| `{field.name}` | {kind} | {_default(field).replace('|', chr(92) + '|')} | {meaning} "
                     f"| {trl_column(field.name)} |")
    return "\n".join(lines)


def render(document: str) -> str:
    """``document`` with the text between ``BEGIN`` and ``END`` replaced by the current table."""
    start, end = document.index(BEGIN) + len(BEGIN), document.index(END)
    return document[:start] + "\n" + table() + "\n" + document[end:]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m zopro_kernels.rloo.configdoc docs/config.md", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as handle:
        document = render(handle.read())  # before the file is opened for writing: an error leaves it whole
    with open(argv[0], "w", encoding="utf-8") as handle:
        handle.write(document)
    return 0


if __name__ == "__main__":
    sys.exit(main())
