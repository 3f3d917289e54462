"""The RLOO objective J, shared by every optimizer mode (ZOPrO, MeZO, AdamW).

    r_i = R(x, y_i) − β Σ_t (log π_old − log π_ref)      (fixed per batch, from sampling time)
    R   = the reward model's score and/or the sum of reward functions (TRL's ``reward_funcs``)
    A_i = r_i − mean_{j≠i} r_j                           (leave-one-out over the k samples of x)
    J   = mean_i max(−A_i ρ_i, −A_i clip(ρ_i, 1−c, 1+c)) ρ_i = π_θ(y_i|x) / π_old(y_i|x)   ("ppo")
    J   = −mean_i A_i log π_θ(y_i|x)                                                   ("reinforce")

π_old and π_θ in the ratio are the *sampling* distribution (temperature, top-k, top-p applied, as
``generate`` sampled), so the ratio is on-policy whatever the sampling settings; the KL term
compares the model's own (untransformed) distributions.
"""

from __future__ import annotations

import math
import dataclasses
from dataclasses import dataclass

import torch

from .logprobs import (SamplingDistribution, completion_logprobs, completion_logprobs_with_sampling,
                       reward_scores)
from .sampling import Rollout

OBJECTIVES = ("ppo", "reinforce")


def leave_one_out_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """A_i = r_i − mean of the other k−1 rewards of the same prompt (rows grouped by prompt)."""
    if k < 2:
        raise ValueError(f"leave-one-out needs k ≥ 2 completions per prompt, got {k}")
    grouped = rewards.reshape(-1, k)
    others = (grouped.sum(-1, keepdim=True) - grouped) / (k - 1)
    return (grouped - others).reshape(-1)


def spread(total: float, total_squares: float, count: float) -> float:
    """The unbiased standard deviation from Σ x, Σ x² and the count (0 for fewer than two values)."""
    if count < 2:
        return 0.0
    mean = total / count
    return math.sqrt(max((total_squares - count * mean * mean) / (count - 1), 0.0))


def standardized_advantages(advantages: torch.Tensor, total: float, total_squares: float, count: float,
                            eps: float = 1e-4) -> torch.Tensor:
    """(A − mean) / (std + eps), mean and (unbiased) std over the whole sampled batch, given as
    Σ A, Σ A² and the count over every process (TRL's ``normalize_advantages``). J then reads in
    units of the batch's spread rather than of the reward, so one step size serves rewards of any
    scale (a reward model's logits, a judge's [−1, 1] score)."""
    if count < 2:
        return advantages - total / max(count, 1)
    return (advantages - total / count) / (spread(total, total_squares, count) + eps)


def surrogate_loss(logp: torch.Tensor, logp_old: torch.Tensor, advantages: torch.Tensor, *,
                   kind: str = "ppo", clip: float = 0.2) -> torch.Tensor:
    """The loss to minimise (−J's improvement), averaged over completions."""
    if kind == "ppo":
        ratio = torch.exp(logp - logp_old)
        unclipped = -advantages * ratio
        clipped = -advantages * ratio.clamp(1 - clip, 1 + clip)
        return torch.maximum(unclipped, clipped).mean()
    if kind == "reinforce":
        return -(advantages * logp).mean()
    raise ValueError(f"objective {kind!r} is not one of {OBJECTIVES}")


@dataclass
class ScoredBatch:
    """A rollout with everything J needs that does not depend on θ."""

    rollout: Rollout
    logp_old: torch.Tensor
    advantages: torch.Tensor
    scores: torch.Tensor       # R(x, y)
    kl: torch.Tensor           # Σ_t (log π_old − log π_ref) per completion
    rewards: torch.Tensor      # scores − β kl
    dropped_prompts: int = 0   # prompts whose rewards were not finite
    sampling: SamplingDistribution | None = None  # the distribution the completions were drawn from


def reward_function_scores(reward_funcs, rollout: Rollout) -> torch.Tensor:
    """Σ_f f(prompt, completion) per completion (float64; NaN where a function raised or was not finite)."""
    values = torch.zeros(len(rollout.completions), dtype=torch.float64)
    for row, text in enumerate(rollout.completions):
        prompt = rollout.prompts[row // rollout.k]
        for function in reward_funcs:
            try:
                value = float(function(prompt, text))
            except Exception:  # a failing reward drops its prompt group below (counted), never the run
                value = math.nan
            values[row] += value
    return values


@torch.no_grad()
def score_rollout(pair, rollout: Rollout, *, beta: float, chunk_size: int = 64, reward_model: bool = True,
                  reward_funcs=(), sampling: SamplingDistribution | None = None) -> ScoredBatch:
    """π_old (sampling distribution) and π_ref log-probs, rewards and advantages; non-finite groups dropped."""
    if not reward_model and not reward_funcs:
        raise ValueError("no reward: reward_model is off and there are no reward functions")
    args = (rollout.input_ids, rollout.attention_mask, rollout.prompt_length, rollout.completion_mask, chunk_size)
    with pair.adapter(pair.policy_adapter):
        logp_raw, logp_old = completion_logprobs_with_sampling(pair, *args, sampling)
    with pair.reference():
        logp_ref = completion_logprobs(pair, *args)
    scores = torch.zeros_like(logp_raw)
    if reward_model:
        scores = scores + reward_scores(pair, rollout.input_ids, rollout.attention_mask).to(logp_raw.dtype)
    if reward_funcs:
        scores = scores + reward_function_scores(reward_funcs, rollout).to(scores)
    kl = logp_raw - logp_ref
    rewards = scores - beta * kl
    finite = torch.isfinite(rewards).reshape(-1, rollout.k).all(-1) & torch.isfinite(logp_old).reshape(
        -1, rollout.k).all(-1)
    keep = [i for i, ok in enumerate(finite.tolist()) if ok]
    dropped = len(rollout.prompts) - len(keep)
    if dropped:
        rows = torch.tensor([i * rollout.k + j for i in keep for j in range(rollout.k)], dtype=torch.long,
                            device=rewards.device)
        rollout = rollout.select_prompts(keep)
        logp_old, scores, kl, rewards = logp_old[rows], scores[rows], kl[rows], rewards[rows]
    advantages = leave_one_out_advantages(rewards, rollout.k) if keep else rewards
    return ScoredBatch(rollout, logp_old, advantages, scores, kl, rewards, dropped, sampling)


def advantage_moments(batch: ScoredBatch, reduce=lambda sums: sums) -> list[float]:
    """[Σ A, Σ A², n] of the batch's advantages; ``reduce`` sums them over processes
    (``DataParallel.sum``) so that every process reads the global batch's."""
    a = batch.advantages.double()
    return reduce([float(a.sum()), float((a * a).sum()), float(a.numel())])


def with_standardized_advantages(batch: ScoredBatch, reduce=lambda sums: sums, moments=None) -> ScoredBatch:
    """``batch`` with ``standardized_advantages`` over the global batch (``advantage_moments``,
    or the ``moments`` already gathered)."""
    moments = moments if moments is not None else advantage_moments(batch, reduce)
    return dataclasses.replace(batch, advantages=standardized_advantages(batch.advantages, *moments))


def policy_loss(pair, batch: ScoredBatch, *, kind: str = "ppo", clip: float = 0.2,
                chunk_size: int = 64) -> torch.Tensor:
    """J at the current policy weights: the same function for the ZO closure and for backward."""
    if batch.advantages.numel() == 0:
        raise ValueError("the batch has no completions left (every reward was NaN/inf)")
    r = batch.rollout
    with pair.adapter(pair.policy_adapter):
        logp = completion_logprobs(pair, r.input_ids, r.attention_mask, r.prompt_length, r.completion_mask,
                                   chunk_size, sampling=batch.sampling)
    loss = surrogate_loss(logp, batch.logp_old, batch.advantages, kind=kind, clip=clip)
    # ZO takes a difference of two nearby losses: never hand it less than fp32
    return loss if loss.dtype == torch.float64 else loss.float()


def mean_finite(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if finite.numel() else math.nan
