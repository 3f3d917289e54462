"""The loop's settings: one dataclass, loadable from YAML (unknown keys are an error).

Where a setting is one of TRL's ``RLOOConfig`` (or its parent ``transformers.TrainingArguments``)
it has TRL's name; the few older names (``RENAMED``) are still read, with a FutureWarning, from
YAML, ``from_dict`` and the configs stored in checkpoints. Every key is described in
docs/config.md (generated from ``configdoc.py``, checked by a test).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import warnings
from dataclasses import dataclass

from ..backends import BACKENDS
from ..direction import DIRECTION_NORMS
from .judges import LLMPairwiseJudge
from .links import LINKS
from .preference_zo import PERTURBATIONS, PREFERENCE_MODES

# the RLOO modes (reward model and/or reward functions, RLOO objective) and the preference-only
# zeroth-order modes (preference_zo.py: no reward, the judge's preferences alone)
OPTIMIZERS = ("zopro", "mezo", "adamw") + PREFERENCE_MODES
FIRST_ITERATIONS = ("adamw", "spsa")
EVAL_SPLITS = ("held_out", "validation", "both")
REPORT_TO = ("tensorboard",)  # report_to integrations ("none": none, "all": the installed ones)

# old key → TRL's name (RLOOConfig); the old names are read with a FutureWarning
RENAMED = {"k": "num_generations", "max_new_tokens": "max_completion_length",
           "eval_samples": "num_generations_eval"}
# TRL names that are deliberately not ours: the unknown-key error says which key to use
TRL_ONLY = {"epsilon": "clip (the PPO clip; `eps` is the zeroth-order perturbation)",
            "learning_rate": "adamw_lr (first-order steps) or lr (guided zeroth-order steps)",
            "max_prompt_length": "max_prompt_tokens (prompts over it are skipped, not truncated)",
            "disable_tqdm": "progress (inverted)"}


def canonical_keys(values: dict, *, warn: bool = True) -> dict:
    """``values`` with the old key names (``RENAMED``) replaced by TRL's; a key given under both
    names is an error. One FutureWarning names the new keys (``warn=False`` for the config stored
    in an older checkpoint: nothing the user can change)."""
    values = dict(values)
    both = [(old, new) for old, new in RENAMED.items() if old in values and new in values]
    if both:
        raise ValueError("config key(s) given under both the old and the new name: "
                         + ", ".join(f"{old!r} and {new!r}" for old, new in both) + f"; keep only {both[0][1]!r}")
    renamed = [(old, new) for old, new in RENAMED.items() if old in values]
    for old, new in renamed:
        values[new] = values.pop(old)
    if renamed and warn:
        warnings.warn("config key(s) renamed to TRL's names: "
                      + ", ".join(f"{old!r} is now {new!r}" for old, new in renamed)
                      + "; the old names will stop working in a later release", FutureWarning, stacklevel=3)
    return values


def tensorboard_available() -> bool:
    return importlib.util.find_spec("tensorboard") is not None


@dataclass
class TrainConfig:
    # what to train on
    model: str = "smollm2-135m-instruct"   # a named asset, a local HF directory, or a .gguf file
    prompts: str = "rotten-tomatoes-negative"  # a named asset or a JSONL file with a "prompt" field
    judge: str = "vader"                   # "vader", "llm:<local model directory>", or "simulated:<score>"
    judge_order: str = "both"              # LLM judge: ask in "both" orders (cancels position bias), "random", "fixed"
    prompt_words: int = 8                  # opening words of each review snippet (the named prompt asset)
    max_prompts: int | None = None         # use only the first N prompts (after the seeded shuffle)
    prompt_template: str = "{prompt}"      # how a prompt is shown to the policy
    cache_dir: str | None = None           # assets (default: $ZOPRO_CACHE or ~/.cache/zopro-kernels)
    output_dir: str = "runs/zopro"

    # model
    dtype: str = "float32"
    load_in_4bit: bool = False             # NF4 base through bitsandbytes
    lora_r: int = 64
    lora_alpha: int = 128
    lora_targets: str | list = "all-linear"
    policy_adapter: str = "policy"
    reward_adapter: str = "reward"
    shared_lora_init: bool = True          # reward adapter starts from the policy's LoRA A: ΔR and Δπ share a basis

    # sampling and objective
    num_generations: int = 4               # completions per prompt (RLOO's k; TRL's name, formerly k)
    max_completion_length: int = 53        # new tokens per completion (formerly max_new_tokens)
    max_prompt_tokens: int = 64            # prompts longer than this are skipped (counted), not truncated
    max_length: int = 1024
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    beta: float = 0.05                     # KL coefficient
    objective: str = "ppo"                 # "ppo" (clipped sequence ratio) or "reinforce"
    clip: float = 0.2                      # PPO clip (TRL's epsilon; not renamed: eps is the ZO perturbation)
    normalize_advantages: bool = False     # (A − mean) / (std + 1e-4) over each sampled batch (TRL's name): J in reward-free units
    logprob_chunk: int = 64                # sequence positions per vocabulary projection
    num_iterations: int = 1                # optimisation steps per sampled batch (TRL's name); π_old fixed at sampling

    # rewards: the reward model's score, reward functions (TRL's reward_funcs), or both
    reward_model: bool = True              # False: no reward model, no refinement, no ΔR (z uses Δπ alone)
    reward_funcs: list = dataclasses.field(default_factory=list)  # "judge" (the judge's score) or "module:function"

    # optimisation
    optimizer: str = "zopro"               # "zopro" (guided), "mezo" (unguided SPSA), "adamw" (first order)
    first_iteration: str = "adamw"         # zo modes: iteration 0 first order (published) or unguided "spsa"
    iterations: int = 5
    prompt_fraction: float = 0.2           # share of the prompts used per iteration
    batch_prompts: int = 4                 # prompts per step (k completions each)
    steps_per_iteration: int | None = None  # default: the iteration's prompts / batch_prompts
    lr: float = 1e-4                       # guided ZO steps (see direction_norm and docs/api.md "Choosing ε and η")
    # "noise": z rescaled to ‖z‖ ≈ √d (as N(0, I) noise), so lr and eps mean the same in every mode and
    # iteration. "policy_delta": eq. 2 as published, ‖z‖ ≈ ‖Δπ‖ (guided updates scale with ‖Δπ‖²).
    direction_norm: str = "noise"
    # Only with "policy_delta": η_t = lr·‖Δπ_0‖²/‖Δπ_{t−1}‖² keeps iteration 1's step size.
    rescale_guided_lr: bool = False
    directions: int = 1                    # q two-sided estimates per ZO step (n-SPSA), averaged
    max_projected_grad: float | None = None  # ZO modes: |g| bounded to this (a trust region: update ≤ lr·bound·√d); None: off
    spsa_lr: float = 1e-6                  # unguided SPSA steps (‖z‖ ≈ √d)
    eps: float = 1e-3
    adamw_lr: float = 1e-4
    weight_decay: float = 0.0
    alpha: str | float = "linear"
    granularity: str = "tensor"

    # preference-only modes (optimizer zpg | zbcpg | zorank; docs/preference_zo.md): eps is the
    # perturbation ε, lr the step size η of every step; the judge's preferences are the only signal
    guided: bool = False                   # iterations after the first draw z as eq. 2 with Δπ (no ΔR)
    judge_queries: int = 1                 # judge queries per pair (p̂ = wins / queries; ties count ½)
    trim_delta: float = 0.05               # p̂ trimmed to [δ, 1 − δ] before the inverse link (zpg, zbcpg)
    link: str = "bt"                       # preference link: "bt" (Bradley–Terry) or "weibull"
    weibull_shape: float = 2.0             # shape k of the "weibull" link
    two_sided: bool = False                # zpg/zbcpg: θ+εz against θ−εz (published: θ); zorank: ±z pairs
    perturbation: str = "published"        # unguided z: "sphere", "gaussian", or each mode's published one
    blocks: int = 1                        # zbcpg: blocks estimated per step (each from its share of the prompts)
    block_tensors: int = 2                 # zbcpg: consecutive tensors per block (2: one module's lora_A, lora_B)
    rank_policies: int = 4                 # zorank: perturbed policies m ranked per prompt
    judge_temperature: float = 0.1         # judge "simulated:<score>": τ of P(a ≻ b) = σ((s_a − s_b)/τ)

    # reward model
    reward_lr: float = 1e-4
    reward_epochs: int = 2
    reward_batch_size: int = 8
    reward_max_grad_norm: float | None = None  # clip R's gradient norm per step (TRL's RewardTrainer: 1.0); None: off
    reward_warmup: bool = True             # fit R_0 on pairs from π_0 before iteration 0
    reward_warmup_prompts: int | None = None  # prompts (one pair each) for that warm-up; default: iteration 0's chunk

    # bookkeeping
    device: str = "auto"                   # "auto": this process's GPU (LOCAL_RANK under torchrun) if any, else cpu
    backend: str = "auto"                  # ZO passes: "auto" (fastest built), "torch" (reference), "cpu", "triton", "cuda"
    time_budget_s: float | None = None     # end the run after this much training time (held-out evals excluded)
    seed: int = 0
    eval_prompts: int = 64                 # held-out prompts scored before and after each iteration
    validation_prompts: int = 0            # a second held-out split, for choosing settings (the sweep)
    num_generations_eval: int | None = 4   # samples per evaluation prompt (same sampling seeds every time:
                                           # paired); None: num_generations (formerly eval_samples)
    eval_split: str = "held_out"           # which split evaluations score: "held_out", "validation" or "both"
    start_from: str | None = None          # a checkpoint (file or run directory) to continue from with this
                                           # config's optimizer, e.g. a shared first-order iteration 0
    snapshot_every: int | None = None      # recorder snapshots of the policy every N steps
    threads: int | None = None             # torch intra-op threads (1 is fastest on a small, shared CPU)
    progress: bool = True                  # one progress bar over the whole run (ETA), rank 0
    plot: bool = True
    save_adapters: bool = True             # peft adapters in output_dir/adapters/{iteration-i,final}/{policy,reward}
    report_to: list[str] = dataclasses.field(default_factory=list)  # "tensorboard"; "none" ([]), "all"; a str too
    logging_dir: str | None = None         # TensorBoard's directory (default: $TENSORBOARD_LOGGING_DIR,
                                           # else output_dir/runs)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.first_iteration not in FIRST_ITERATIONS:
            raise ValueError(f"first_iteration {self.first_iteration!r} is not one of {FIRST_ITERATIONS}")
        if self.objective not in ("ppo", "reinforce"):
            raise ValueError(f"objective {self.objective!r} is not 'ppo' or 'reinforce'")
        if not 0 < self.prompt_fraction <= 1:
            raise ValueError(f"prompt_fraction must be in (0, 1], got {self.prompt_fraction}")
        if self.num_generations < 2:
            raise ValueError(f"num_generations must be ≥ 2 for leave-one-out advantages, got {self.num_generations}")
        if self.max_prompt_tokens + self.max_completion_length > self.max_length:
            total = self.max_prompt_tokens + self.max_completion_length
            raise ValueError(f"max_prompt_tokens + max_completion_length = {total} is over max_length {self.max_length}")
        if self.eval_split not in EVAL_SPLITS:
            raise ValueError(f"eval_split {self.eval_split!r} is not one of {EVAL_SPLITS}")
        if self.direction_norm not in DIRECTION_NORMS:
            raise ValueError(f"direction_norm {self.direction_norm!r} is not one of {DIRECTION_NORMS}")
        if self.judge_order not in LLMPairwiseJudge.ORDERS:
            raise ValueError(f"judge_order {self.judge_order!r} is not one of {LLMPairwiseJudge.ORDERS}")
        if not isinstance(self.reward_funcs, (list, tuple)) or not all(
                callable(f) or isinstance(f, str) for f in self.reward_funcs):
            raise ValueError(f"reward_funcs must be a list of names ('judge', 'module:function') or callables, "
                             f"got {self.reward_funcs!r}")
        if self.optimizer in PREFERENCE_MODES:
            self._check_preference_mode()
        elif not self.reward_model and not self.reward_funcs:
            raise ValueError("reward_model is false and reward_funcs is empty: there is no reward")
        if self.guided and self.optimizer not in PREFERENCE_MODES:
            raise ValueError(f"guided applies to the preference-only modes {PREFERENCE_MODES}; optimizer "
                             f"{self.optimizer!r} is guided (zopro) or not (mezo, adamw) by itself")
        if self.link not in LINKS:
            raise ValueError(f"link {self.link!r} is not one of {LINKS}")
        if not self.weibull_shape > 0:
            raise ValueError(f"weibull_shape must be > 0, got {self.weibull_shape}")
        if self.perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation {self.perturbation!r} is not one of {PERTURBATIONS}")
        if not 0 < self.trim_delta < 0.5:
            raise ValueError(f"trim_delta must be in (0, 0.5), got {self.trim_delta}")
        if not self.judge_temperature > 0:
            raise ValueError(f"judge_temperature must be > 0, got {self.judge_temperature}")
        if self.rank_policies < 2 or (self.optimizer == "zorank" and self.two_sided and self.rank_policies % 2):
            raise ValueError(f"rank_policies must be ≥ 2 (even with two_sided: ± pairs), got {self.rank_policies}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend {self.backend!r} is not one of {BACKENDS}")
        if self.max_projected_grad is not None and not 0 < self.max_projected_grad < math.inf:
            raise ValueError(f"max_projected_grad must be a finite number > 0 or null, got {self.max_projected_grad}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"time_budget_s must be > 0 seconds, got {self.time_budget_s}")
        for name in ("iterations", "batch_prompts", "reward_epochs", "reward_batch_size", "logprob_chunk",
                     "num_iterations", "directions", "num_generations_eval", "judge_queries", "blocks",
                     "block_tensors"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be ≥ 1, got {getattr(self, name)}")
        self.report_to = self._report_to(self.report_to)

    def _check_preference_mode(self):
        """zpg | zbcpg | zorank learn from the judge's preferences alone: no reward model, no reward
        functions, no reused rollouts (every step samples fresh completions from perturbed policies)."""
        if self.reward_model:
            raise ValueError(f"optimizer {self.optimizer!r} learns from the judge's preferences alone, without a "
                             "reward model: set reward_model: false")
        if self.reward_funcs:
            raise ValueError(f"optimizer {self.optimizer!r} uses no reward: reward_funcs {self.reward_funcs!r} "
                             "would be ignored; leave reward_funcs empty")
        if self.num_iterations != 1:
            raise ValueError(f"optimizer {self.optimizer!r} samples fresh completions at every step: "
                             f"num_iterations (rollout reuse) must be 1, got {self.num_iterations}")

    @staticmethod
    def _report_to(value) -> list[str]:
        """TrainingArguments' forms: None/"none"/[] (nothing), "all" (what is installed), a name or a list."""
        if value is None or value == "none" or value == ["none"]:
            return []
        if value == "all" or value == ["all"]:
            return ["tensorboard"] if tensorboard_available() else []
        names = [value] if isinstance(value, str) else list(value)
        unknown = [n for n in names if n not in REPORT_TO]
        if unknown:
            raise ValueError(f"report_to {unknown} not supported; supported: 'none', 'all', {list(REPORT_TO)}")
        return list(dict.fromkeys(names))

    @property
    def eval_generations(self) -> int:
        """Samples per evaluation prompt: ``num_generations_eval``, or ``num_generations`` when None."""
        return self.num_generations if self.num_generations_eval is None else self.num_generations_eval

    @classmethod
    def from_dict(cls, values: dict, *, warn: bool = True) -> "TrainConfig":
        """From a mapping of keys (old names accepted, see ``canonical_keys``); unknown keys are an error."""
        values = canonical_keys(values, warn=warn)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            hints = "".join(f"; TRL's {key!r} is {TRL_ONLY[key]} here" for key in unknown if key in TRL_ONLY)
            raise ValueError(f"unknown config key(s) {unknown}{hints}; known keys: {sorted(known)}")
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str) -> "TrainConfig":
        try:
            import yaml
        except ImportError as error:
            raise ImportError("YAML configs need PyYAML: pip install pyyaml") from error
        try:
            with open(path, encoding="utf-8") as handle:
                values = yaml.safe_load(handle) or {}
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path!r} does not exist") from None
        if not isinstance(values, dict):
            raise ValueError(f"config file {path!r} must hold a mapping of keys to values")
        return cls.from_dict(values)

    def to_dict(self) -> dict:
        values = dataclasses.asdict(self)
        values["reward_funcs"] = [f if isinstance(f, str) else getattr(f, "__qualname__", repr(f))
                                  for f in self.reward_funcs]
        return values
