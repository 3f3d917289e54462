"""Sequence log-probabilities and reward scores from hidden states.

The vocabulary projection runs over chunks of the sequence, so at most a
[batch, chunk, vocab] logits tensor exists (never [batch, seq, vocab]); with gradients on,
each chunk is recomputed in backward (activation checkpointing) so chunks do not pile up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, so left padding does not shift them."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def hidden_states(pair, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last hidden states of the active adapter (or the reference inside ``pair.reference()``)."""
    output = pair.decoder()(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    return output.last_hidden_state


def _chunk_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias)
    if logits.dtype != torch.float64:
        logits = logits.float()  # the log-softmax in fp32 at least, whatever the model dtype
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def token_logprobs(hidden: torch.Tensor, output_embeddings: torch.nn.Module, targets: torch.Tensor,
                   chunk_size: int = 64) -> torch.Tensor:
    """log p(targets[:, t] | hidden[:, t]) for every t, projecting ``chunk_size`` positions at a time."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    weight, bias = output_embeddings.weight, getattr(output_embeddings, "bias", None)
    pieces = []
    for start in range(0, hidden.shape[1], chunk_size):
        h, t = hidden[:, start:start + chunk_size], targets[:, start:start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            pieces.append(checkpoint(_chunk_token_logprobs, h, weight, bias, t, use_reentrant=False))
        else:
            pieces.append(_chunk_token_logprobs(h, weight, bias, t))
    return torch.cat(pieces, dim=1)


def completion_logprobs(pair, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                        completion_mask: torch.Tensor, chunk_size: int = 64) -> torch.Tensor:
    """Σ over completion tokens of log π(y_t | x, y_<t), one value per row (fp32 or fp64).

    ``input_ids`` = [left-padded prompt (``prompt_length``) | completion]; ``completion_mask``
    marks the completion tokens that count (up to and including the first end-of-sequence).
    """
    hidden = hidden_states(pair, input_ids, attention_mask)
    # position t predicts token t+1: the completion is predicted from prompt_length-1 .. T-2
    predicting = hidden[:, prompt_length - 1:-1]
    targets = input_ids[:, prompt_length:]
    per_token = token_logprobs(predicting, pair.output_embeddings(), targets, chunk_size)
    return (per_token * completion_mask.to(per_token.dtype)).sum(-1)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (right padding after the completion)."""
    length = attention_mask.shape[1]
    return length - 1 - attention_mask.long().flip(-1).argmax(-1)


def reward_scores(pair, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """R(x, y): the value head on the last real token's hidden state, reward adapter active."""
    with pair.adapter(pair.reward_adapter):
        hidden = hidden_states(pair, input_ids, attention_mask)
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return pair.value_head(hidden[rows, last_token_index(attention_mask)])
