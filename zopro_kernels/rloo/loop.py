"""The iterative loop of DESIGN.md §1: policy steps, pairs, judge, reward refinement, guidance.

    for t = 0..N−1:
        policy steps on chunk t (ZOPrO / MeZO / AdamW on the same RLOO objective J)
        two generations per prompt of chunk t from π_t, judged → pairs; R refined (Bradley–Terry)
        Δπ_t = θ_t − θ_{t−1} (``mark_iteration``), ΔR_t = φ_t − φ_{t−1} (``set_guidance``)
        checkpoint (temp file + rename)

Iteration 0 has no Δπ: first order by default (as published) or unguided SPSA.

A step samples one rollout (``batch_prompts`` × k completions) and scores it once (π_old, π_ref,
rewards); ``num_iterations`` optimisation steps then reuse it with π_old fixed at sampling time,
so the PPO clip binds and generation is paid once for several steps. The reward is the reward
model's score, reward functions (``reward_funcs``), or both; with no reward model there is no
refinement and no ΔR.

Under ``torchrun`` the loop is data parallel (``parallel.py``): each process samples, scores and
judges its share of the prompts; losses, gradients and metrics are reduced, so the weights stay
identical on every process; rank 0 alone writes metrics, checkpoints and recorder snapshots.

Outputs besides metrics.jsonl and the checkpoint (rank 0): the adapters in peft's format after
every iteration and at the end (``save_adapters``: ``adapters/iteration-{i}/{policy,reward}``,
``adapters/final/{policy,reward}``, each written to a temporary directory, then renamed), the
metrics as TensorBoard scalars (``report_to: [tensorboard]``, ``tracking.py``), and one progress
bar over every optimisation step of the run.
"""

from __future__ import annotations

import json
import math
import os
import resource
import time

import torch

from ..optimizer import ZOPrO
from .checkpoint import (RESUME_NOT_OVERRIDABLE, atomic_directory, kill_point, load_checkpoint, override_keys,
                         resume_differences, save_checkpoint)
from .config import PREFERENCE_MODES, TrainConfig, canonical_keys
from .judges import JudgeError, call_judge
from .logprobs import SamplingDistribution
from .objective import advantage_moments, mean_finite, policy_loss, score_rollout, spread, with_standardized_advantages
from .parallel import DataParallel, tensor_fingerprint, text_fingerprint
from .refine import PreferencePairs, finite_pairs, pair_accuracy, refine_reward_model, reward_optimizer
from .sampling import sample_completions

# a reward model that orders fewer than this share of the pairs it was just fitted on did not fit
# them (a working fit reaches 0.9 and more): said once per refinement and counted (reward_unfit)
UNFIT_ACCURACY, UNFIT_MIN_PAIRS = 0.6, 50

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
ADAPTERS = "adapters"


def derived_seed(seed: int, iteration: int, step: int, purpose: int, rank: int = 0) -> int:
    """A seed per (iteration, step, purpose, process): a rerun from any iteration draws the same samples."""
    value = (seed * 0x9E3779B1 + iteration * 1_000_003 + step * 10_007 + purpose * 101
             + rank * 0x2545F491) & 0xFFFFFFFF
    return value


def resolve_reward_funcs(names, judge) -> list:
    """Reward functions ``(prompt, completion) -> float`` from config entries: "judge" (the judge's
    own ``score``), "module:function" (imported), or callables (kept)."""
    import importlib

    functions = []
    for entry in names:
        if callable(entry):
            functions.append(entry)
        elif entry == "judge":
            score = getattr(judge, "score", None)
            if score is None:
                raise ValueError("reward_funcs has 'judge', but this judge has no score(prompt, response) method")
            functions.append(score)
        elif isinstance(entry, str) and ":" in entry:
            module, _, name = entry.partition(":")
            try:
                functions.append(getattr(importlib.import_module(module), name))
            except (ImportError, AttributeError) as error:
                raise ValueError(f"reward function {entry!r} could not be imported: {error}") from error
        else:
            raise ValueError(f"reward function {entry!r} is not 'judge', 'module:function' or a callable")
    return functions


def norm_of(tensors: dict) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in tensors.values()))


def cosine(first: dict, second: dict) -> float:
    """cos ∠(first, second) over the slots both have (NaN when either is 0); summed in ``first``'s
    order (a set's order follows the process's string hash seed: the last bits would differ)."""
    dot = sum(float((first[k].double() * second[k].double()).sum()) for k in first if k in second)
    norms = norm_of(first) * norm_of(second)
    return dot / norms if norms > 0 else math.nan


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


class RLOOTrainer:
    """Runs the loop for a ``PolicyAndReward`` pair, a prompt list and a judge.

    ``recorder``: optional object with ``record(role, tensors, iteration, step)``; called for
    "policy" and "reward" (LoRA tensors keyed by slot name, shared by both roles) once with the
    initial weights (iteration −1, step 0), at the end of each iteration, and for "policy" every
    ``snapshot_every`` steps when set.

    ``parallel``: a ``DataParallel`` (default: the world group when torch.distributed is
    initialised, else one process). Every process constructs the trainer with the same config,
    model and prompts (checked); ``batch_prompts`` is the global batch of a step.
    """

    def __init__(self, config: TrainConfig, pair, prompts: list[str], judge, *, recorder=None, parallel=None,
                 reward_funcs=None):
        self.config, self.pair, self.judge, self.recorder = config, pair, judge, recorder
        self.reward_funcs = (list(reward_funcs) if reward_funcs is not None
                             else resolve_reward_funcs(config.reward_funcs, judge))
        if not config.reward_model and not self.reward_funcs and config.optimizer not in PREFERENCE_MODES:
            raise ValueError("reward_model is false and there are no reward functions: there is no reward")
        self.sampling = SamplingDistribution(config.temperature, config.top_k, config.top_p)
        self.parallel = parallel if parallel is not None else DataParallel()
        if config.batch_prompts % self.parallel.world_size:
            raise ValueError(f"batch_prompts={config.batch_prompts} must be a multiple of the number of "
                             f"processes ({self.parallel.world_size}): each takes an equal share of a step")
        (self.prompts, self.eval_prompts, self.validation_prompts,
         self.skipped_long_prompts) = self._split_prompts(prompts)
        self.chunk_size = max(1, round(config.prompt_fraction * len(self.prompts)))
        # rollouts per iteration; each is reused for num_iterations optimisation steps
        self.steps = config.steps_per_iteration or max(1, math.ceil(self.chunk_size / config.batch_prompts))
        self.optimizer_steps = self.steps * config.num_iterations
        self.preference = None  # optimizer zpg | zbcpg | zorank: preference_zo.py, no reward at all
        if config.optimizer in PREFERENCE_MODES:
            from .preference_zo import PreferenceLoop

            self.preference = PreferenceLoop(self)
        self.zo = (self._zo_optimizer() if config.optimizer in ("zopro", "mezo")
                   else self.preference.passes if self.preference is not None else None)
        self.adamw = (torch.optim.AdamW(list(pair.policy_parameters.values()), lr=config.adamw_lr,
                                        weight_decay=config.weight_decay)
                      if config.optimizer == "adamw" or (config.first_iteration == "adamw" and self.preference is None)
                      else None)
        self.reward_adamw = reward_optimizer(pair, config.reward_lr)
        self.next_iteration, self.global_step, self.train_seconds = 0, 0, 0.0
        self.delta_sq = {"first": None, "last": None}  # ‖Δπ‖² of the first and the latest iteration
        self.last_reward_delta = None  # ΔR of the last refinement (for ∠(ΔR_{t−1}, Δπ_t))
        self.counters = {"judge_failures": 0, "judge_ties": 0, "nonfinite_reward_prompts": 0,
                         "nonfinite_reward_pairs": 0, "reward_unfit": 0,
                         "skipped_steps": 0, "skipped_long_prompts": self.skipped_long_prompts}
        self.history: list[dict] = []
        self.tensorboard = None  # opened by run() (report_to: tensorboard), rank 0
        self.postfix: dict = {}  # the progress bar's: iteration, mode, J, train score, held-out score
        if "tensorboard" in config.report_to and self.parallel.is_main:
            from .tracking import summary_writer_class

            summary_writer_class()  # a missing tensorboard is an error now, not after the first iteration
        os.makedirs(config.output_dir, exist_ok=True)
        self.metrics_path = os.path.join(config.output_dir, METRICS)
        self.checkpoint_path = os.path.join(config.output_dir, CHECKPOINT)
        self._agree_on_start(prompts)

    def _agree_on_start(self, prompts: list[str]):
        """Data parallel: the same config, prompts and base on every process; adapters from rank 0."""
        parallel = self.parallel
        if not parallel.active:
            return
        config = self.config.to_dict()
        for key in ("output_dir", "logging_dir"):  # may differ per process (each may keep its own copy)
            config.pop(key)
        parallel.check_same("config", text_fingerprint(config))
        parallel.check_same("prompt list", text_fingerprint(prompts))
        base = [p for name, p in self.pair.model.named_parameters() if ".lora_" not in name]
        parallel.check_same("base model weights", tensor_fingerprint(base))
        parallel.broadcast_tensors(list(self.pair.policy_parameters.values())
                                   + list(self.pair.reward_parameters.values())
                                   + list(self.pair.value_head.parameters()))
        if self.zo is not None:  # build its engine now, on every process (that is collective):
            self.zo.sync_from_model()  # rank 0 alone calls state_dict() for checkpoints later

    # -- setup -------------------------------------------------------------------------------

    def _split_prompts(self, prompts: list[str]):
        """Seeded shuffle; prompts over the token limit skipped (counted); held-out and validation
        prompts split off first (disjoint from each other and from training)."""
        config = self.config
        if not prompts:
            raise ValueError("no prompts")
        formatted = [config.prompt_template.format(prompt=p) for p in prompts]
        lengths = [len(ids) for ids in self.pair.tokenizer(formatted, add_special_tokens=True)["input_ids"]]
        kept = [p for p, n in zip(formatted, lengths) if n <= config.max_prompt_tokens]
        skipped = len(formatted) - len(kept)
        if skipped:
            print(f"[zopro-train] skipped {skipped} prompt(s) over max_prompt_tokens={config.max_prompt_tokens}")
        if not kept:
            raise ValueError(f"every prompt is over max_prompt_tokens={config.max_prompt_tokens}")
        order = torch.randperm(len(kept), generator=torch.Generator().manual_seed(config.seed)).tolist()
        kept = [kept[i] for i in order][: config.max_prompts]
        # held out whatever the judge: the training prompts must not depend on it
        held_out = min(config.eval_prompts, len(kept) // 5)
        validation = min(config.validation_prompts, len(kept) // 5)
        train = kept[held_out + validation:]
        return train, kept[:held_out], kept[held_out:held_out + validation], skipped

    def _zo_optimizer(self) -> ZOPrO:
        c = self.config
        return ZOPrO(self.pair.named_policy_parameters(), lr=c.lr, eps=c.eps, seed=c.seed,
                     weight_decay=c.weight_decay, alpha=c.alpha, steps_per_iteration=self.optimizer_steps,
                     granularity=c.granularity, direction_norm=c.direction_norm, directions=c.directions,
                     max_projected_grad=c.max_projected_grad, backend=c.backend, process_group=self.parallel.group)

    def iteration_mode(self, iteration: int) -> str:
        c = self.config
        if self.preference is not None:
            return self.preference.mode(iteration)
        if c.optimizer == "adamw" or (iteration == 0 and c.first_iteration == "adamw"):
            return "adamw"
        guided = c.optimizer == "zopro" and iteration > 0
        return "zopro" if guided else "spsa"

    def chunk(self, iteration: int) -> list[str]:
        start = (iteration * self.chunk_size) % len(self.prompts)
        return [self.prompts[(start + i) % len(self.prompts)] for i in range(self.chunk_size)]

    # -- metrics -----------------------------------------------------------------------------

    def log(self, record: dict):
        if not self.parallel.is_main:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if "event" not in record:  # test-only (tests/rloo/test_kill.py): a kill after this step's record
            kill_point("AFTER_STEP", record.get("step"))
        if self.tensorboard is not None:
            self.tensorboard.log(record)

    def _truncate_metrics(self, last_iteration: int):
        """After a resume, drop records of the iteration the kill interrupted (it reruns), and a
        last line that a crash tore (written in part, no newline)."""
        if not self.parallel.is_main or not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path, encoding="utf-8") as handle:
            lines = handle.readlines()
        if lines and not lines[-1].endswith("\n"):
            lines.pop()
        kept = [line for line in lines if line.strip() and json.loads(line).get("iteration", -1) <= last_iteration]
        temporary = self.metrics_path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.writelines(kept)
        os.replace(temporary, self.metrics_path)

    def record(self, role: str, iteration: int):
        if self.recorder is None or not self.parallel.is_main:
            return
        tensors = self.pair.policy_tensors() if role == "policy" else self.pair.reward_tensors()
        self.recorder.record(role, tensors, iteration, self.global_step)

    # -- the parts of an iteration -----------------------------------------------------------

    def sample(self, prompts, *, k, seed):
        """k completions per prompt; None for no prompts (a process whose share is empty)."""
        c = self.config
        if not prompts:
            return None
        with self.pair.adapter(self.pair.policy_adapter):
            return sample_completions(self.pair, prompts, k=k, max_new_tokens=c.max_completion_length,
                                      max_prompt_tokens=c.max_prompt_tokens, temperature=self.sampling.temperature,
                                      top_k=self.sampling.top_k, top_p=self.sampling.top_p, seed=seed)

    def say(self, message: str):
        if self.parallel.is_main:
            print(f"[zopro-train] {message}")

    def judge_scores(self, rollout) -> torch.Tensor:
        """The judge's score of each of this process's completions (NaN where it failed; empty
        when the judge has no ``score``)."""
        score = getattr(self.judge, "score", None)
        values = []
        for row, text in enumerate(rollout.completions if rollout is not None and score is not None else []):
            try:
                values.append(score(rollout.prompts[row // rollout.k], text))
            except Exception:  # counted through the judge path; a score is only a metric here
                values.append(math.nan)
        return torch.tensor(values, dtype=torch.float64)

    def task_score(self, rollout) -> float:
        """The judge's mean score of the rollout's completions, over every process's rollout."""
        return self.parallel.means_of(self.judge_scores(rollout))[0]

    def policy_step(self, iteration: int, rollout_index: int, prompts: list[str], mode: str) -> list[dict]:
        """One rollout on ``prompts`` (the global batch; this process samples its share), then
        ``num_iterations`` optimisation steps on it; one record per optimisation step."""
        c, parallel = self.config, self.parallel
        started = time.perf_counter()
        rollout = self.sample(parallel.shard(prompts), k=c.num_generations,
                              seed=derived_seed(c.seed, iteration, rollout_index, 1, parallel.rank))
        batch = score_rollout(self.pair, rollout, beta=c.beta, chunk_size=c.logprob_chunk,
                              reward_model=c.reward_model, reward_funcs=self.reward_funcs, sampling=self.sampling)
        moments = advantage_moments(batch, parallel.sum)  # the global batch's, as sampled
        if c.normalize_advantages:  # every process steps along the same J
            batch = with_standardized_advantages(batch, moments=moments)
        completions = parallel.gather_int(batch.advantages.numel())
        dropped = int(parallel.sum([batch.dropped_prompts])[0])
        self.counters["nonfinite_reward_prompts"] += dropped
        base = {"iteration": iteration, "rollout": rollout_index, "mode": mode, "dropped_prompts": dropped}
        reward, score, kl, task = parallel.means_of(batch.rewards, batch.scores, batch.kl,
                                                    self.judge_scores(batch.rollout))
        base |= {"reward": reward, "reward_score": score, "kl": kl, "task_score": task,
                 "advantage_std": spread(*moments)}  # the reward's scale in J (before any standardising)
        rollout_seconds = time.perf_counter() - started
        records = []
        for reuse in range(c.num_iterations):
            step_started = time.perf_counter()
            record = base | {"step": self.global_step, "step_in_iteration": rollout_index * c.num_iterations + reuse,
                             "reuse": reuse}
            if min(completions) == 0:  # one process has nothing to evaluate: the whole step is skipped
                self.counters["skipped_steps"] += 1
                self.say(f"step {self.global_step}: every reward was NaN/inf on a process; step skipped")
                records.append(record | {"skipped": True})
                self.global_step += 1
                continue
            record |= self.optimisation_step(batch, mode, completions)
            seconds, peak = parallel.maxima([time.perf_counter() - step_started + (rollout_seconds if reuse == 0 else 0.0),
                                             peak_memory_bytes(self.pair.device)])
            record |= {"seconds": seconds, "peak_memory_bytes": int(peak)}
            if parallel.active:
                record["processes"] = parallel.world_size
            records.append(record)
            self.global_step += 1
        return records

    def optimisation_step(self, batch, mode: str, completions: list[int]) -> dict:
        """One AdamW or ZO step on a scored batch; its metrics."""
        c, parallel = self.config, self.parallel

        def closure():
            return policy_loss(self.pair, batch, kind=c.objective, clip=c.clip, chunk_size=c.logprob_chunk)

        if mode == "adamw":
            parameters = list(self.pair.policy_parameters.values())
            self.adamw.zero_grad(set_to_none=True)
            loss = closure()
            if parallel.active:  # the global mean: each process's mean weighted by its share
                loss = loss * (completions[parallel.rank] / sum(completions))
            loss.backward()
            value = parallel.sum_gradients(parameters, loss)
            self.adamw.step()
            self.adamw.zero_grad(set_to_none=True)
            return {"J": value, "lr": self.adamw.param_groups[0]["lr"]}
        self.zo.param_groups[0]["lr"] = self.guided_lr() if mode == "zopro" else c.spsa_lr
        loss = self.zo.step(closure)  # J₊, J₋ averaged over the processes inside ZOPrO
        last = self.zo.last_step
        return {"J": float(loss), "J_plus": float(last["loss_plus"]), "J_minus": float(last["loss_minus"]),
                "g": float(last["projected_grad"]), "g_clipped": bool(last["clipped"]), "alpha": float(last["alpha"]),
                "lr": self.zo.param_groups[0]["lr"], "nonfinite_steps": int(self.zo.nonfinite_steps)}

    def guided_lr(self) -> float:
        first, last = self.delta_sq["first"], self.delta_sq["last"]
        if (not self.config.rescale_guided_lr or self.config.direction_norm != "policy_delta"
                or not first or not last):
            return self.config.lr
        return self.config.lr * first / last

    def preference_pairs(self, iteration: int, prompts: list[str], purpose: int) -> tuple[PreferencePairs, dict]:
        """Two generations per prompt (this process's share) from the current policy, judged."""
        parallel = self.parallel
        prompts = parallel.shard(prompts)
        rollout = self.sample(prompts, k=2, seed=derived_seed(self.config.seed, iteration, 0, purpose, parallel.rank))
        accepted, rejected, failures, ties, first_error = [], [], 0, 0, None
        for i, prompt in enumerate(rollout.prompts if rollout is not None else []):
            a, b = 2 * i, 2 * i + 1
            try:
                verdict = call_judge(self.judge, prompt, rollout.completions[a], rollout.completions[b])
            except JudgeError as error:
                failures += 1
                first_error = first_error or str(error)
                continue
            if verdict is None:  # a tie says nothing about which is better: no Bradley–Terry label
                ties += 1
                continue
            accepted.append(a if verdict == 0 else b)
            rejected.append(b if verdict == 0 else a)
        failures, ties, judged, asked = (int(v) for v in parallel.sum([failures, ties, len(accepted), len(prompts)]))
        self.counters["judge_failures"] += failures
        self.counters["judge_ties"] += ties
        if failures:
            self.say(f"iteration {iteration}: {failures} judge call(s) skipped; first: {first_error}")
        if not judged and asked and failures:  # decided on the global counts: every process raises together
            raise JudgeError(f"every judge call failed in iteration {iteration}; first: {first_error}")
        acc, rej = torch.tensor(accepted, dtype=torch.long), torch.tensor(rejected, dtype=torch.long)
        if rollout is None:
            ids = mask = torch.zeros(0, 1, dtype=torch.long, device=self.pair.device)
        else:
            ids, mask = rollout.input_ids, rollout.attention_mask
        pairs = PreferencePairs(ids[acc], mask[acc], ids[rej], mask[rej])
        return pairs, {"pairs": judged, "judge_failures": failures, "judge_ties": ties}

    def refine(self, iteration: int, prompts: list[str], purpose: int) -> dict:
        c = self.config
        pairs, info = self.preference_pairs(iteration, prompts, purpose)
        pairs, nonfinite = finite_pairs(self.pair, pairs)
        nonfinite = int(self.parallel.sum([nonfinite])[0])
        if nonfinite:
            self.counters["nonfinite_reward_pairs"] += nonfinite
            self.say(f"iteration {iteration}: {nonfinite} pair(s) with NaN/inf reward scores skipped")
        info["nonfinite_reward_pairs"] = nonfinite
        # R before this refinement on pairs it never saw (drawn from the current policy): generalisation
        before = pair_accuracy(self.pair, pairs, parallel=self.parallel)
        # the minibatch order must not depend on the process: the unranked seed
        losses = refine_reward_model(self.pair, pairs, self.reward_adamw, epochs=c.reward_epochs,
                                     batch_size=c.reward_batch_size, seed=derived_seed(c.seed, iteration, 0, purpose),
                                     parallel=self.parallel, max_grad_norm=c.reward_max_grad_norm)
        kill_point("IN_REFINEMENT", iteration)  # test-only (tests/rloo/test_kill.py): R moved, nothing logged
        after = pair_accuracy(self.pair, pairs, parallel=self.parallel)
        n = len(losses) // c.reward_epochs  # minibatches per epoch
        epochs = [sum(losses[e * n:(e + 1) * n]) / n for e in range(c.reward_epochs)] if n else []
        count = info["pairs"] - nonfinite  # every process's pairs (both already summed)
        if count >= UNFIT_MIN_PAIRS and after < UNFIT_ACCURACY:
            self.counters["reward_unfit"] += 1
            self.say(f"iteration {iteration}: the reward model orders only {after:.0%} of the {count} pairs it was "
                     f"just fitted on (Bradley–Terry loss per epoch {', '.join(f'{v:.3f}' for v in epochs)}): it "
                     "did not fit them; lower reward_lr or set reward_max_grad_norm")
        return info | {"bt_loss_first": losses[0] if losses else math.nan,
                       "bt_loss_last": losses[-1] if losses else math.nan, "bt_loss_epochs": epochs,
                       "pair_accuracy_before": before, "fresh_pair_accuracy": before, "pair_accuracy_after": after}

    def evaluate(self, iteration: int) -> float:
        """Mean judge score on the evaluation split(s) (``eval_split``), ``num_generations_eval`` per prompt,
        with the same sampling seed every time, so evaluations are paired sample by sample.

        Logged with each completion's score (``scores``: prompt-major, ``num_generations_eval`` per prompt),
        the training time so far (``train_seconds``, evaluations excluded) and the step. Returns the
        held-out score (the validation score when only that split is evaluated).
        """
        if getattr(self.judge, "score", None) is None:
            return math.nan
        splits = {"held_out": ["held_out"], "validation": ["validation"],
                  "both": ["held_out", "validation"]}[self.config.eval_split]
        value = math.nan
        for split in splits:
            prompts = self.eval_prompts if split == "held_out" else self.validation_prompts
            if not prompts:
                continue
            mine = self.parallel.shard(prompts)
            rollout = self.sample(mine, k=self.config.eval_generations,
                                  seed=derived_seed(self.config.seed, 0, 0, 9 if split == "held_out" else 10,
                                                    self.parallel.rank))
            scores = self.parallel.gather_floats(self.judge_scores(rollout))
            split_value = mean_finite(torch.tensor(scores, dtype=torch.float64))
            self.log({"event": "eval", "split": split, "iteration": iteration, "task_score": split_value,
                      "train_seconds": self.train_seconds, "global_step": self.global_step,
                      "samples_per_prompt": self.config.eval_generations, "scores": scores})
            if split == splits[0]:
                value = split_value
        if not math.isnan(value):  # the progress bar shows the latest
            self.postfix["validation" if splits == ["validation"] else "held_out"] = f"{value:.3f}"
        return value

    # -- the loop ----------------------------------------------------------------------------

    def out_of_time(self, iteration_started: float) -> bool:
        """``time_budget_s`` spent (decided together: processes never disagree about stopping)."""
        budget = self.config.time_budget_s
        if budget is None:
            return False
        return self.parallel.any(self.train_seconds + time.perf_counter() - iteration_started >= budget)

    def run_iteration(self, iteration: int, progress) -> dict:
        """Steps, refinement and guidance of one iteration; with ``time_budget_s`` spent mid-way the
        iteration (and the run) ends after the current step, without a refinement."""
        c = self.config
        started = time.perf_counter()
        mode = self.iteration_mode(iteration)
        prompts = self.chunk(iteration)
        if iteration == 0 and c.reward_warmup and c.reward_model:
            warmup_prompts = (prompts if c.reward_warmup_prompts is None else
                              [self.prompts[i % len(self.prompts)] for i in range(c.reward_warmup_prompts)])
            # long and before the first step (the progress bar stands still): said before and after
            self.say(f"reward warm-up: sampling, judging and fitting R_0 on {len(warmup_prompts)} prompts' pairs "
                     f"({c.reward_epochs} epoch(s)) before the first step")
            warming = time.perf_counter()
            warmup = self.refine(iteration, warmup_prompts, purpose=3)
            warmup["seconds"] = self.parallel.maxima([time.perf_counter() - warming])[0]
            self.say(f"reward warm-up done in {warmup['seconds'] / 60:.1f} min: R_0 orders "
                     f"{warmup['pair_accuracy_after']:.0%} of its {warmup['pairs']} pairs")
            self.log({"event": "reward_warmup", "iteration": iteration, "global_step": self.global_step} | warmup)
        if iteration == 0 and (c.optimizer == "zopro" or c.guided):
            self.zo.mark_iteration()  # θ_0: Δπ_0 is formed at the end of this iteration
        policy_at_start = self.pair.policy_tensors()
        rewards, stopped, steps_done = [], False, 0
        for step in range(self.steps):
            batch_prompts = [prompts[(step * c.batch_prompts + j) % len(prompts)] for j in range(c.batch_prompts)]
            step_of = self.preference.policy_step if self.preference is not None else self.policy_step
            records = step_of(iteration, step, batch_prompts, mode)
            for record in records:
                self.log(record)
            steps_done += len(records)
            rewards.append(records[0].get("task_score", math.nan))
            if c.snapshot_every and self.global_step % c.snapshot_every < len(records) and step < self.steps - 1:
                self.record("policy", iteration)  # (the last step is recorded with the iteration's end)
            evaluations = {k: v for k, v in self.postfix.items() if k in ("held_out", "validation")}
            self.postfix = {"it": iteration, "mode": mode, "J": f"{records[-1].get('J', math.nan):.4g}",
                            "score": f"{records[0].get('task_score', math.nan):.3f}"} | evaluations
            progress.set_postfix(self.postfix, refresh=False)
            progress.update(len(records))
            if self.out_of_time(started):
                stopped = step < self.steps - 1 or iteration < c.iterations - 1
                break
        refinement = {}
        if stopped:
            self.say(f"time budget of {c.time_budget_s:g} s spent after step {self.global_step}; the run ends")
        else:
            refinement = self.close_iteration(iteration, mode, prompts, policy_at_start)
        self.record("policy", iteration)
        if not stopped:
            self.record("reward", iteration)
        self.train_seconds += time.perf_counter() - started
        summary = {"event": "iteration", "iteration": iteration, "mode": mode, "steps": steps_done,
                   "global_step": self.global_step, "train_seconds": self.train_seconds,
                   "mean_task_score": mean_finite(torch.tensor(rewards, dtype=torch.float64))} | refinement
        if stopped:
            summary["stopped"] = "time_budget"
        summary["eval_task_score"] = self.evaluate(iteration)
        self.log(summary)
        progress.set_postfix(self.postfix)  # with the new held-out score
        return summary

    def close_iteration(self, iteration: int, mode: str, prompts: list[str], policy_at_start) -> dict:
        """Δπ (``mark_iteration``), the reward refinement and ΔR (``set_guidance``); the refinement's info."""
        c = self.config
        if self.zo is not None and mode == "adamw":
            self.zo.sync_from_model()  # AdamW moved the weights outside ZOPrO
        if c.optimizer == "zopro" or c.guided:
            self.zo.mark_iteration()  # Δπ_t = θ_t − θ_{t−1}; α restarts
        now = self.pair.policy_tensors()
        policy_delta = {slot: now[slot] - before for slot, before in policy_at_start.items()}
        geometry = {"policy_delta_norm": norm_of(policy_delta)}
        if self.last_reward_delta is not None:  # how far from ΔR_{t−1} the policy moved
            geometry["cos_policy_delta_previous_reward_delta"] = cosine(policy_delta, self.last_reward_delta)
        self.delta_sq["last"] = geometry["policy_delta_norm"] ** 2
        self.delta_sq["first"] = self.delta_sq["first"] or self.delta_sq["last"]
        if not c.reward_model:
            return geometry
        reward_before = self.pair.reward_tensors()
        refinement = self.refine(iteration, prompts, purpose=2)
        reward_delta = {slot: after - reward_before[slot] for slot, after in self.pair.reward_tensors().items()}
        geometry["reward_delta_norm"] = norm_of(reward_delta)
        self.last_reward_delta = reward_delta
        if c.optimizer == "zopro":
            self.zo.set_guidance(reward_delta=reward_delta)
        return refinement | geometry

    def state(self) -> dict:
        return {
            "next_iteration": self.next_iteration, "global_step": self.global_step,
            "train_seconds": self.train_seconds,
            "policy": self.pair.policy_tensors(), "reward": self.pair.reward_tensors(),
            "value_head": self.pair.value_head.state_dict(),
            "zo": self.zo.state_dict() if self.zo is not None else None,
            "adamw": self.adamw.state_dict() if self.adamw is not None else None,
            "reward_adamw": self.reward_adamw.state_dict(),
            "counters": dict(self.counters), "delta_sq": dict(self.delta_sq), "history": list(self.history),
            "last_reward_delta": self.last_reward_delta, "config": self.config.to_dict(),
        }

    def restore(self, state: dict):
        self.pair.load_adapter_tensors("policy", state["policy"])
        self.pair.load_adapter_tensors("reward", state["reward"])
        self.pair.value_head.load_state_dict(state["value_head"])
        if self.zo is not None and state["zo"] is not None:
            self.zo.load_state_dict(state["zo"])
        if self.adamw is not None and state["adamw"] is not None:
            self.adamw.load_state_dict(state["adamw"])
        self.reward_adamw.load_state_dict(state["reward_adamw"])
        self.next_iteration, self.global_step = state["next_iteration"], state["global_step"]
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.counters.update(state["counters"])
        self.delta_sq = dict(state.get("delta_sq", {"first": None, "last": None}))
        self.last_reward_delta = state.get("last_reward_delta")
        self.history = list(state["history"])

    def resume(self, override=()) -> bool:
        """Continue from the last checkpoint of ``output_dir`` (False when there is none).

        The checkpoint's config must equal this one in every key that decides the trajectory
        (all but ``checkpoint.RESUME_MAY_CHANGE``): a difference is refused, naming each key with
        both values. ``override`` ("lr,eps" or a list; CLI ``--resume-override``) names keys
        changed on purpose: their differences are accepted, take effect from the rerun iteration
        on, and are logged in metrics.jsonl (a ``resume_override`` event)."""
        override = override_keys(override)
        state = None
        if self.parallel.is_main:  # read once, handed to every process (no shared filesystem needed)
            try:
                state = load_checkpoint(self.checkpoint_path)
            except RuntimeError as error:
                state = error
        state = self.parallel.broadcast_object(state)
        if isinstance(state, Exception):
            raise RuntimeError(str(state))
        if state is None:
            return False
        differences = resume_differences(state["config"], self.config)
        refused = {key: values for key, values in differences.items() if key not in override}
        if refused:
            listed = ", ".join(f"{key} (checkpoint {old!r}, config {new!r})" for key, (old, new) in refused.items())
            fixed = [key for key in refused if key in RESUME_NOT_OVERRIDABLE]
            free = [key for key in refused if key not in RESUME_NOT_OVERRIDABLE]
            hint = (f"; to change {'it' if len(free) == 1 else 'them'} on purpose: --resume-override {','.join(free)}"
                    if free else "")
            hint += f"; {fixed} cannot be changed on resume: start a new run" if fixed else ""
            raise ValueError(f"cannot resume from {self.checkpoint_path}: the config differs from the checkpoint's "
                             f"in {listed}; the resumed run would diverge from the checkpoint's. Resume with the "
                             f"checkpoint's values{hint}")
        self.restore(state)
        self._apply_overrides(differences)
        self._truncate_metrics(self.next_iteration - 1)
        if differences:  # after the truncation; a rerun of this iteration drops it (and needs the override again)
            changed = {key: {"checkpoint": old, "config": new} for key, (old, new) in differences.items()}
            self.log({"event": "resume_override", "iteration": self.next_iteration,
                      "global_step": self.global_step, "changed": changed})
            self.say("resumed with " + ", ".join(f"{key}={new!r} (was {old!r})"
                                                 for key, (old, new) in differences.items()))
        return True

    def _apply_overrides(self, differences: dict):
        """Settings that ``restore`` brought back from the checkpoint's optimizer state (their
        param groups) set to this config's values where a resume override changed them."""
        c = self.config
        # (the RLOO modes also set the ZO lr at every step)
        groups = [(self.zo, {"lr": c.lr, "eps": c.eps, "weight_decay": c.weight_decay}),
                  (self.adamw, {"adamw_lr": c.adamw_lr, "weight_decay": c.weight_decay}),
                  (self.reward_adamw, {"reward_lr": c.reward_lr})]
        if self.zo is not None and "max_projected_grad" in differences:
            self.zo.max_projected_grad = c.max_projected_grad
        for optimizer, settings in groups:
            for key, value in settings.items():
                if optimizer is not None and key in differences:
                    for group in optimizer.param_groups:
                        group["lr" if key.endswith("lr") else key] = value

    def start_from(self, path: str):
        """Continue from another run's checkpoint with this config's optimizer (e.g. a shared
        first-order iteration 0, so that methods part ways from the same point): weights, reward
        model, counters and evaluations are taken over; the ZO optimizer's state is taken for
        "zopro" (Δπ, ΔR, its position) and "mezo" (its position, guidance dropped); AdamW's for "adamw"."""
        c = self.config
        if os.path.isdir(path):
            path = os.path.join(path, CHECKPOINT)
        state = self.parallel.broadcast_object(load_checkpoint(path) if self.parallel.is_main else None)
        if state is None:
            raise FileNotFoundError(f"start_from: no checkpoint at {path!r}")
        stored = canonical_keys(state["config"], warn=False)  # a checkpoint from before the renames too
        for key in ("model", "prompts", "seed", "lora_r", "lora_alpha", "lora_targets", "num_generations",
                    "prompt_fraction", "eval_prompts", "validation_prompts", "reward_model"):
            if stored.get(key) != getattr(c, key):
                raise ValueError(f"cannot start from {path}: it has {key}={stored.get(key)!r}, "
                                 f"this config has {getattr(c, key)!r}")
        zo_state, adamw_state = state["zo"], state["adamw"]
        state = dict(state, zo=None, adamw=None)
        self.restore(state)  # weights, reward model, position, counters, history
        if self.zo is not None:
            self.zo.sync_from_model()
            if zo_state is not None:
                self.zo.load_state_dict(zo_state)
                for group in self.zo.param_groups:  # this run's settings, not the start's
                    group.update(lr=c.lr, eps=c.eps, weight_decay=c.weight_decay)
            if c.optimizer == "mezo":
                self.zo.clear_guidance()
        if self.adamw is not None and adamw_state is not None and self.iteration_mode(self.next_iteration) == "adamw":
            self.adamw.load_state_dict(adamw_state)
            for group in self.adamw.param_groups:  # load_state_dict brought the start's settings back
                group.update(lr=c.adamw_lr, weight_decay=c.weight_decay)
        if self.parallel.is_main:  # its evaluations and steps so far are this run's too
            source = os.path.join(os.path.dirname(path), METRICS)
            with open(source, encoding="utf-8") as handle, open(self.metrics_path, "w", encoding="utf-8") as out:
                out.writelines(handle)
        self.say(f"started from {path} at iteration {self.next_iteration}")

    def export_adapters(self, name: str):
        """Both adapters in peft's format into ``output_dir/adapters/<name>/{policy,reward}`` (rank 0,
        ``save_adapters``): written into a temporary directory, then renamed, so a kill never
        leaves a half-written one."""
        if not (self.config.save_adapters and self.parallel.is_main):
            return
        with atomic_directory(os.path.join(self.config.output_dir, ADAPTERS, name)) as directory:
            self.pair.save_pretrained(directory)

    def open_tensorboard(self):
        """report_to: tensorboard (rank 0): the log directory rewritten from metrics.jsonl as it now
        stands (after a resume's truncation or start_from's copy); later records are added by ``log``."""
        if "tensorboard" not in self.config.report_to or not self.parallel.is_main:
            return
        from .tracking import TensorBoardLog, log_dir

        self.tensorboard = TensorBoardLog.from_metrics(log_dir(self.config), self.metrics_path)

    def close_tensorboard(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def run(self, *, resume: bool = False, resume_override=()) -> list[dict]:
        from tqdm.auto import tqdm

        c = self.config
        if resume and self.resume(override=resume_override):
            self.say(f"resumed from {self.checkpoint_path} at iteration {self.next_iteration}")
        elif c.start_from:
            self.start_from(c.start_from)
        elif self.parallel.is_main and os.path.exists(self.metrics_path):
            os.remove(self.metrics_path)  # a fresh run: no stale records
        self.open_tensorboard()
        try:
            if self.next_iteration == 0:
                self.record("policy", -1)
                self.record("reward", -1)
                self.history = [{"event": "eval", "iteration": -1, "task_score": self.evaluate(-1),
                                 "train_seconds": 0.0, "global_step": 0}]
            # one bar over every optimisation step of the run: its ETA is the run's
            total = c.iterations * self.optimizer_steps
            with tqdm(total=total, initial=min(total, self.next_iteration * self.optimizer_steps), unit="step",
                      disable=not (c.progress and self.parallel.is_main), desc="zopro-train",
                      dynamic_ncols=True) as progress:
                if self.next_iteration > 0:  # resumed (or started from a run): its last held-out score
                    scores = [e.get("eval_task_score", e.get("task_score")) for e in self.history]
                    scores = [v for v in scores if isinstance(v, float) and not math.isnan(v)]
                    self.postfix = {"held_out": f"{scores[-1]:.3f}"} if scores else {}
                progress.set_postfix(self.postfix)
                for iteration in range(self.next_iteration, c.iterations):
                    summary = self.run_iteration(iteration, progress)
                    self.history.append(summary)
                    # a run stopped by its time budget is over: a resume has nothing left to do
                    self.next_iteration = c.iterations if summary.get("stopped") else iteration + 1
                    # adapters before the checkpoint: a kill in between reruns the iteration, which rewrites them
                    self.export_adapters(f"iteration-{iteration}")
                    if self.parallel.is_main:
                        save_checkpoint(self.state(), self.checkpoint_path)
                    if self.tensorboard is not None:
                        self.tensorboard.flush()
                    if summary.get("stopped"):
                        break
            self.export_adapters("final")
        finally:
            self.close_tensorboard()
        return self.history
