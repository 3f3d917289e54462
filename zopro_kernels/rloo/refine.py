"""Bradley–Terry refinement of the reward model (reward adapter + value head), first order.

    loss = −log σ(R(x, y_accepted) − R(x, y_rejected))
"""

from __future__ import annotations

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
    margin = (reward_scores(pair, pairs.accepted_ids, pairs.accepted_mask)
              - reward_scores(pair, pairs.rejected_ids, pairs.rejected_mask))
    keep = torch.isfinite(margin).nonzero().flatten().cpu()
    return pairs.subset(keep), len(pairs) - len(keep)


@torch.no_grad()
def pair_accuracy(pair, pairs: PreferencePairs, batch_size: int = 32) -> float:
    """Share of pairs the reward model orders as the judge did."""
    correct = 0
    for start in range(0, len(pairs), batch_size):
        part = pairs.subset(torch.arange(start, min(start + batch_size, len(pairs))))
        margin = (reward_scores(pair, part.accepted_ids, part.accepted_mask)
                  - reward_scores(pair, part.rejected_ids, part.rejected_mask))
        correct += int((margin > 0).sum())
    return correct / max(len(pairs), 1)


def refine_reward_model(pair, pairs: PreferencePairs, optimizer: torch.optim.Optimizer, *, epochs: int = 1,
                        batch_size: int = 8, seed: int = 0) -> list[float]:
    """A few epochs of Bradley–Terry on the pairs; returns the loss of each minibatch."""
    losses = []
    if len(pairs) == 0:
        return losses
    generator = torch.Generator().manual_seed(seed)
    pair.value_head.train()
    for _ in range(epochs):
        order = torch.randperm(len(pairs), generator=generator)
        for start in range(0, len(pairs), batch_size):
            optimizer.zero_grad(set_to_none=True)
            loss = bradley_terry_loss(pair, pairs.subset(order[start:start + batch_size]))
            if not torch.isfinite(loss):
                raise FloatingPointError("Bradley–Terry loss is not finite; lower the reward learning rate")
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
    optimizer.zero_grad(set_to_none=True)
    return losses
