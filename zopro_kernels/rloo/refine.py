"""Bradley–Terry refinement of the reward model (reward adapter + value head), first order.

    loss = −log σ(R(x, y_accepted) − R(x, y_rejected))
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .logprobs import reward_scores


@dataclass
class PreferencePairs:
    """Accepted and rejected sequences ([prompt | completion] rows, same layout as a Rollout)."""

    accepted_ids: torch.Tensor
    accepted_mask: torch.Tensor
    rejected_ids: torch.Tensor
    rejected_mask: torch.Tensor

    def __len__(self) -> int:
        return self.accepted_ids.shape[0]

    def subset(self, rows: torch.Tensor) -> "PreferencePairs":
        return PreferencePairs(self.accepted_ids[rows], self.accepted_mask[rows],
                               self.rejected_ids[rows], self.rejected_mask[rows])


def reward_optimizer(pair, lr: float, weight_decay: float = 0.0) -> torch.optim.AdamW:
    parameters = list(pair.reward_parameters.values()) + list(pair.value_head.parameters())
    return torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)


def bradley_terry_loss(pair, pairs: PreferencePairs) -> torch.Tensor:
    margin = (reward_scores(pair, pairs.accepted_ids, pairs.accepted_mask)
              - reward_scores(pair, pairs.rejected_ids, pairs.rejected_mask))
    return -F.logsigmoid(margin.float()).mean()


@torch.no_grad()
def finite_pairs(pair, pairs: PreferencePairs) -> tuple[PreferencePairs, int]:
    """The pairs whose two reward scores are finite, and how many were dropped."""
    if len(pairs) == 0:
        return pairs, 0
    margin = (reward_scores(pair, pairs.accepted_ids, pairs.accepted_mask)
              - reward_scores(pair, pairs.rejected_ids, pairs.rejected_mask))
    keep = torch.isfinite(margin).nonzero().flatten().cpu()
    return pairs.subset(keep), len(pairs) - len(keep)


@torch.no_grad()
def pair_accuracy(pair, pairs: PreferencePairs, batch_size: int = 32, parallel=None) -> float:
    """Share of pairs the reward model orders as the judge did (over every process's pairs)."""
    correct = 0
    for start in range(0, len(pairs), batch_size):
        part = pairs.subset(torch.arange(start, min(start + batch_size, len(pairs))))
        margin = (reward_scores(pair, part.accepted_ids, part.accepted_mask)
                  - reward_scores(pair, part.rejected_ids, part.rejected_mask))
        correct += int((margin > 0).sum())
    if parallel is not None:
        correct, count = parallel.sum([correct, len(pairs)])
        return correct / max(count, 1)
    return correct / max(len(pairs), 1)


def refine_reward_model(pair, pairs: PreferencePairs, optimizer: torch.optim.Optimizer, *, epochs: int = 1,
                        batch_size: int = 8, seed: int = 0, parallel=None,
                        max_grad_norm: float | None = None) -> list[float]:
    """A few epochs of Bradley–Terry on the pairs; returns the loss of each minibatch.
    ``max_grad_norm``: the (process-summed) gradient's norm is clipped to it before each step
    (``torch.nn.utils.clip_grad_norm_``, as transformers' Trainer does for TRL's RewardTrainer).

    Data parallel (``parallel``): the pairs are every process's pairs, concatenated in rank
    order; all processes draw the same minibatches of that global list, each computes the loss
    of its own members (scaled by their share of the minibatch) and the gradients are summed —
    the same update as one process holding every pair, applied on every process.
    """
    losses = []
    counts = parallel.gather_int(len(pairs)) if parallel is not None else [len(pairs)]
    rank = parallel.rank if parallel is not None else 0
    total, offset = sum(counts), sum(counts[:rank])
    if total == 0:
        return losses
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    generator = torch.Generator().manual_seed(seed)
    pair.value_head.train()
    for _ in range(epochs):
        order = torch.randperm(total, generator=generator)
        for start in range(0, total, batch_size):
            chosen = order[start:start + batch_size]
            mine = chosen[(chosen >= offset) & (chosen < offset + len(pairs))] - offset
            optimizer.zero_grad(set_to_none=True)
            if len(mine):
                loss = bradley_terry_loss(pair, pairs.subset(mine))
                if len(mine) != len(chosen):
                    loss = loss * (len(mine) / len(chosen))
                if torch.isfinite(loss):
                    loss.backward()
            else:
                loss = torch.zeros(())
            value = parallel.sum_gradients(parameters, loss) if parallel is not None else float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError("Bradley–Terry loss is not finite; lower the reward learning rate")
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for p in parameters if p.grad is not None], max_grad_norm)
            optimizer.step()
            losses.append(value)
    optimizer.zero_grad(set_to_none=True)
    return losses
