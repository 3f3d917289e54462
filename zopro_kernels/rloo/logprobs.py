"""Sequence log-probabilities and reward scores from hidden states.

The vocabulary projection runs over chunks of the sequence, so at most a
[batch, chunk, vocab] logits tensor exists (never [batch, seq, vocab]); with gradients on,
each chunk is recomputed in backward (activation checkpointing) so chunks do not pile up.

Completions are drawn by ``model.generate(do_sample=True, temperature=…, top_k=…, top_p=…)``
(see ``sampling.py``), i.e. from the *warped* distribution softmax(warp(logits)), not from
softmax(logits). The PPO ratio π_θ/π_old and the importance weights are only on-policy if π_old
is that warped distribution, so the log-probs here can be taken under a
:class:`SamplingDistribution` that reproduces transformers' warpers exactly. The KL against the
reference is a statement about the models themselves and stays on the raw logits;
:func:`completion_logprobs_with_sampling` gives both from one forward pass.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class SamplingDistribution:
    """The distribution ``generate(do_sample=True, temperature, top_k, top_p)`` samples from.

    transformers (``GenerationMixin._get_logits_processor``) applies, in this order, and only when
    they are not no-ops: ``TemperatureLogitsWarper`` (T ≠ 1), ``TopKLogitsWarper`` (top_k ∉ {0,
    None}), ``TopPLogitsWarper`` (top_p < 1), then samples from the softmax of the result. ``top_k=0``
    (or ``None``) and ``top_p=1`` switch the filters off, as in ``generate``.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        temperature = float(self.temperature)
        if not (math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        top_k = 0 if self.top_k is None else self.top_k
        if isinstance(top_k, bool):
            raise ValueError(f"top_k must be an integer ≥ 0 (0 or None: no top-k), got {self.top_k!r}")
        try:
            top_k = operator.index(top_k)
        except TypeError:
            raise ValueError(f"top_k must be an integer ≥ 0 (0 or None: no top-k), got {self.top_k!r}") from None
        if top_k < 0:
            raise ValueError(f"top_k must be an integer ≥ 0 (0 or None: no top-k), got {self.top_k!r}")
        top_p = float(self.top_p)
        if not (0.0 < top_p <= 1.0):  # also refuses NaN
            raise ValueError(f"top_p must be in (0, 1] (1: no nucleus filter), got {self.top_p!r}")
        object.__setattr__(self, "temperature", temperature)
        object.__setattr__(self, "top_k", top_k)
        object.__setattr__(self, "top_p", top_p)

    @property
    def is_identity(self) -> bool:
        """True when generate samples from softmax(logits) itself (no warper is applied)."""
        return self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0


def _is_identity(sampling: SamplingDistribution | None) -> bool:
    return sampling is None or sampling.is_identity


def warp_logits(logits: torch.Tensor, sampling: SamplingDistribution) -> torch.Tensor:
    """The scores generate samples from: logits / T, then top-k, then top-p; filtered tokens −inf.

    The same operations as transformers' warpers (``min_tokens_to_keep=1``, as in plain sampling),
    on the last dimension of a tensor of any rank:

    * top-k keeps every token whose score is ≥ the k-th largest (ties at the k-th value survive);
    * top-p sorts ascending, removes tokens whose cumulative probability is ≤ 1 − top_p, and always
      keeps the most probable token.

    The kept set is a discrete choice: it is computed without gradient, and gradients flow only
    through the kept scores.
    """
    if sampling.temperature != 1.0:
        logits = logits / sampling.temperature
    with torch.no_grad():
        scores = logits.detach()
        remove = None
        if sampling.top_k:
            k = min(sampling.top_k, scores.shape[-1])
            remove = scores < torch.topk(scores, k)[0][..., -1, None]
            scores = scores.masked_fill(remove, -math.inf)
        if sampling.top_p < 1.0:
            sorted_scores, sorted_indices = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            sorted_remove = cumulative <= (1 - sampling.top_p)
            sorted_remove[..., -1:] = False  # min_tokens_to_keep = 1
            nucleus_remove = sorted_remove.scatter(-1, sorted_indices, sorted_remove)
            remove = nucleus_remove if remove is None else remove | nucleus_remove
    return logits if remove is None else logits.masked_fill(remove, -math.inf)


def sampled_logprobs(logits: torch.Tensor, targets: torch.Tensor, sampling: SamplingDistribution) -> torch.Tensor:
    """log softmax(warp_logits(logits))[targets]: −inf for a target outside the kept set."""
    warped = warp_logits(logits, sampling)
    return warped.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - warped.logsumexp(-1)


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


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias)
    if logits.dtype != torch.float64:
        logits = logits.float()  # the log-softmax in fp32 at least, whatever the model dtype
    return logits


def _chunk_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor) -> torch.Tensor:
    logits = _chunk_logits(hidden, weight, bias)
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def _chunk_sampled_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor,
                            sampling: SamplingDistribution) -> torch.Tensor:
    return sampled_logprobs(_chunk_logits(hidden, weight, bias), targets, sampling)


def _chunk_raw_and_sampled(hidden: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor,
                           sampling: SamplingDistribution) -> tuple[torch.Tensor, torch.Tensor]:
    # one projection, two log-probs: the raw one with exactly the ops of _chunk_token_logprobs
    logits = _chunk_logits(hidden, weight, bias)
    raw = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)
    return raw, sampled_logprobs(logits, targets, sampling)


def _chunked(function, hidden: torch.Tensor, output_embeddings: torch.nn.Module, targets: torch.Tensor,
             chunk_size: int, *extra):
    """``function(h, weight, bias, t, *extra)`` over chunks of positions, checkpointed under grad,
    concatenated along the sequence (a tuple result is concatenated element-wise)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    weight, bias = output_embeddings.weight, getattr(output_embeddings, "bias", None)
    pieces = []
    for start in range(0, hidden.shape[1], chunk_size):
        h, t = hidden[:, start:start + chunk_size], targets[:, start:start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            pieces.append(checkpoint(function, h, weight, bias, t, *extra, use_reentrant=False))
        else:
            pieces.append(function(h, weight, bias, t, *extra))
    if pieces and isinstance(pieces[0], tuple):
        return tuple(torch.cat(column, dim=1) for column in zip(*pieces))
    return torch.cat(pieces, dim=1)


def token_logprobs(hidden: torch.Tensor, output_embeddings: torch.nn.Module, targets: torch.Tensor,
                   chunk_size: int = 64, sampling: SamplingDistribution | None = None) -> torch.Tensor:
    """log p(targets[:, t] | hidden[:, t]) for every t, projecting ``chunk_size`` positions at a time.

    p is softmax(logits) when ``sampling`` is None or the identity (bit-identical to the plain
    computation), else the warped distribution generate sampled from (−inf outside its kept set).
    """
    if _is_identity(sampling):
        return _chunked(_chunk_token_logprobs, hidden, output_embeddings, targets, chunk_size)
    return _chunked(_chunk_sampled_logprobs, hidden, output_embeddings, targets, chunk_size, sampling)


def _completion_inputs(pair, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int):
    hidden = hidden_states(pair, input_ids, attention_mask)
    # position t predicts token t+1: the completion is predicted from prompt_length-1 .. T-2
    return hidden[:, prompt_length - 1:-1], input_ids[:, prompt_length:]


def _masked_sum(per_token: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    # torch.where, not a product: a masked token outside the kept set has log-prob −inf, and −inf·0 = NaN
    return torch.where(completion_mask.bool(), per_token, torch.zeros((), dtype=per_token.dtype,
                                                                      device=per_token.device)).sum(-1)


def completion_logprobs(pair, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_length: int,
                        completion_mask: torch.Tensor, chunk_size: int = 64,
                        sampling: SamplingDistribution | None = None) -> torch.Tensor:
    """Σ over completion tokens of log π(y_t | x, y_<t), one value per row (fp32 or fp64).

    ``input_ids`` = [left-padded prompt (``prompt_length``) | completion]; ``completion_mask``
    marks the completion tokens that count (up to and including the first end-of-sequence).
    With ``sampling`` (not the identity) π is the warped distribution the completions were sampled
    from (what the PPO ratio needs); otherwise the model's own softmax, computed exactly as before.
    """
    predicting, targets = _completion_inputs(pair, input_ids, attention_mask, prompt_length)
    per_token = token_logprobs(predicting, pair.output_embeddings(), targets, chunk_size, sampling)
    if _is_identity(sampling):
        return (per_token * completion_mask.to(per_token.dtype)).sum(-1)
    return _masked_sum(per_token, completion_mask)


def completion_logprobs_with_sampling(pair, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                                      prompt_length: int, completion_mask: torch.Tensor, chunk_size: int = 64,
                                      sampling: SamplingDistribution | None = None,
                                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw, sampled): per-row completion log-prob sums under softmax(logits) and under ``sampling``.

    One forward pass and one vocabulary projection per chunk serve both: ``raw`` is for the KL
    against the reference (a property of the models, independent of how we sampled), ``sampled``
    for π_old in the ratio (the distribution that actually drew the tokens). ``raw`` equals
    ``completion_logprobs(..., sampling=None)`` bit for bit; when ``sampling`` is None or the
    identity, ``sampled`` is the very same tensor as ``raw``.
    """
    predicting, targets = _completion_inputs(pair, input_ids, attention_mask, prompt_length)
    output_embeddings = pair.output_embeddings()
    if _is_identity(sampling):
        per_token = _chunked(_chunk_token_logprobs, predicting, output_embeddings, targets, chunk_size)
        raw = (per_token * completion_mask.to(per_token.dtype)).sum(-1)
        return raw, raw
    raw_tokens, sampled_tokens = _chunked(_chunk_raw_and_sampled, predicting, output_embeddings, targets,
                                          chunk_size, sampling)
    raw = (raw_tokens * completion_mask.to(raw_tokens.dtype)).sum(-1)
    return raw, _masked_sum(sampled_tokens, completion_mask)


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
