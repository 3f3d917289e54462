"""Log-probs under the distribution generate actually sampled from (temperature, top-k, top-p)."""

import math

import pytest
import torch
import torch.nn.functional as F

from zopro_kernels.rloo import logprobs as logprobs_module
from zopro_kernels.rloo.logprobs import (SamplingDistribution, completion_logprobs, completion_logprobs_with_sampling,
                                         hidden_states, position_ids_from_mask, sampled_logprobs, token_logprobs,
                                         warp_logits)
from zopro_kernels.rloo.sampling import sample_completions

from .helpers import PROMPTS, make_pair

DISTRIBUTIONS = [
    (1.0, 0, 1.0),    # identity
    (0.7, 5, 0.9),
    (1.3, 1, 1.0),    # k = 1: greedy
    (1.0, 0, 0.05),   # tiny nucleus: mostly the top token alone
    (0.5, 0, 0.8),
    (1.0, 3, 1.0),
    (2.0, 0, 0.6),
    (0.9, 1000, 0.95),  # k above the vocabulary size
    (1.5, 4, 0.3),
]


def transformers_logprobs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The reference: transformers' own warpers, in generate's order, then log_softmax (rows = 2-D)."""
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    shape = logits.shape
    scores = logits.reshape(-1, shape[-1])
    ids = torch.zeros(scores.shape[0], 1, dtype=torch.long)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(ids, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1)(ids, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1)(ids, scores)
    return scores.log_softmax(-1).reshape(shape)


def every_token_logprobs(logits: torch.Tensor, sampling) -> torch.Tensor:
    """sampled_logprobs for every vocabulary token as the target: [..., vocab]."""
    vocab = logits.shape[-1]
    expanded = logits.unsqueeze(-2).expand(*logits.shape[:-1], vocab, vocab)
    targets = torch.arange(vocab).expand(*logits.shape[:-1], vocab)
    return sampled_logprobs(expanded, targets, sampling)


def test_validation_and_identity():
    assert SamplingDistribution().is_identity and SamplingDistribution(1, None, 1).is_identity
    assert SamplingDistribution(1, None, 1).top_k == 0
    for not_identity in [(0.7, 0, 1.0), (1.0, 5, 1.0), (1.0, 0, 0.9)]:
        assert not SamplingDistribution(*not_identity).is_identity
    for temperature in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            SamplingDistribution(temperature=temperature)
    for top_k in (-1, 1.5, True, "3"):
        with pytest.raises(ValueError, match="top_k"):
            SamplingDistribution(top_k=top_k)
    for top_p in (0.0, -0.1, 1.01, math.nan):
        with pytest.raises(ValueError, match="top_p"):
            SamplingDistribution(top_p=top_p)
    with pytest.raises(Exception):  # frozen
        SamplingDistribution().temperature = 2.0


@pytest.mark.parametrize("vocab", [7, 33, 101])
@pytest.mark.parametrize("temperature,top_k,top_p", DISTRIBUTIONS)
def test_matches_transformers_warpers_float64(vocab, temperature, top_k, top_p):
    generator = torch.Generator().manual_seed(vocab)
    logits = 3 * torch.randn(2, 5, vocab, generator=generator, dtype=torch.float64)
    expected = transformers_logprobs(logits, temperature, top_k, top_p)
    sampling = SamplingDistribution(temperature, top_k, top_p)
    got = every_token_logprobs(logits, sampling)
    # the same kept set, exactly, and the same log-probs on it
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    assert (got[torch.isinf(got)] < 0).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # a distribution: Σ_vocab exp(log p) = 1, and exp(log p) is the warped softmax
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(2, 5, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(got.exp(), warp_logits(logits, sampling).softmax(-1), rtol=0, atol=1e-12)
    kept = torch.isfinite(got).sum(-1)
    if top_k == 1 or top_p == 0.05:
        assert (kept == 1).all() if top_k == 1 else (kept < vocab).all()
    if top_k and top_k < vocab:
        assert (kept <= top_k).all()
    if sampling.is_identity:
        assert torch.isfinite(got).all()


def test_top_k_keeps_ties_at_the_kth_value():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0, 2.0]], dtype=torch.float64)
    expected = transformers_logprobs(logits, 1.0, 2, 1.0)
    got = every_token_logprobs(logits, SamplingDistribution(top_k=2))
    assert torch.isfinite(got).tolist() == [[True, False, True, True, False, True]]  # 4 kept for k = 2
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def test_top_p_boundary_and_min_tokens_to_keep():
    # uniform over 4: the ascending cumulative probabilities are exactly 0.25, 0.5, 0.75, 1; transformers
    # removes those ≤ 1 − p = 0.5, so 2 tokens stay (a strict < would keep 3)
    uniform = torch.zeros(1, 4)
    got = every_token_logprobs(uniform, SamplingDistribution(top_p=0.5))
    expected = transformers_logprobs(uniform, 1.0, 0, 0.5)
    assert torch.isfinite(got).sum() == torch.isfinite(expected).sum() == 2
    torch.testing.assert_close(got[torch.isfinite(got)], torch.full((2,), math.log(0.5)))
    # a nucleus so small that 1 − p rounds to 1 in fp32: every cumulative probability is ≤ it,
    # and only min_tokens_to_keep = 1 saves the most probable token (no all −inf row, no NaN)
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    got = every_token_logprobs(logits, SamplingDistribution(top_p=1e-9))
    assert (torch.isfinite(got).sum(-1) == 1).all() and not torch.isnan(got).any()
    assert torch.equal(torch.isfinite(got).float().argmax(-1), logits.argmax(-1))
    torch.testing.assert_close(got, transformers_logprobs(logits, 1.0, 0, 1e-9), rtol=0, atol=0)


def test_order_is_temperature_then_top_k_then_top_p():
    # top-p on the temperature-scaled probabilities: at T = 1 the nucleus of p = 0.5 is {0},
    # at T = 2 the distribution is flatter and the nucleus grows to {0, 1}
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)
    cold = every_token_logprobs(logits, SamplingDistribution(1.0, 0, 0.5))
    hot = every_token_logprobs(logits, SamplingDistribution(2.0, 0, 0.5))
    assert torch.isfinite(cold).sum() == 1 and torch.isfinite(hot).sum() == 2
    # top-p after top-k: the nucleus is taken over the renormalised top-k probabilities
    after_k = every_token_logprobs(logits, SamplingDistribution(1.0, 2, 0.7))
    torch.testing.assert_close(after_k, transformers_logprobs(logits, 1.0, 2, 0.7), rtol=0, atol=1e-12)
    assert torch.isfinite(after_k).sum() == 1  # p(0 | top-2) = e/(e+1) ≈ 0.73 ≥ 0.7


def test_multinomial_frequencies_match_exp_logprobs():
    generator = torch.Generator().manual_seed(3)
    logits = 2 * torch.randn(1, 13, generator=generator)
    sampling = SamplingDistribution(0.8, 6, 0.9)
    probs = every_token_logprobs(logits, sampling).exp()[0]
    draws = torch.multinomial(warp_logits(logits, sampling).softmax(-1)[0], 40_000, replacement=True,
                              generator=generator)
    frequencies = torch.bincount(draws, minlength=13).double() / draws.numel()
    assert (frequencies[probs == 0] == 0).all()  # nothing is drawn outside the kept set
    assert (frequencies - probs.double()).abs().max() < 0.015


def test_token_logprobs_chunked_equal_the_reference_float64():
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.nn.Linear(8, 19, dtype=torch.float64)
    hidden = torch.randn(3, 7, 8, generator=generator, dtype=torch.float64)
    targets = torch.randint(19, (3, 7), generator=generator)
    with torch.no_grad():
        logits = embeddings(hidden)
    for distribution in DISTRIBUTIONS:
        sampling = SamplingDistribution(*distribution)
        expected = transformers_logprobs(logits, *distribution).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        for chunk in (1, 3, 100):
            got = token_logprobs(hidden, embeddings, targets, chunk, sampling=sampling)
            assert torch.equal(torch.isinf(got), torch.isinf(expected))
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


def rollout_of(pair, **sampling):
    return sample_completions(pair, PROMPTS[:4], k=3, max_new_tokens=6, max_prompt_tokens=8, seed=0, **sampling)


def args_of(rollout, chunk=2):
    return rollout.input_ids, rollout.attention_mask, rollout.prompt_length, rollout.completion_mask, chunk


def original_completion_logprobs(pair, input_ids, attention_mask, prompt_length, completion_mask, chunk_size):
    """The code before sampling distributions existed, verbatim (no gradient)."""
    hidden = hidden_states(pair, input_ids, attention_mask)
    predicting, targets = hidden[:, prompt_length - 1:-1], input_ids[:, prompt_length:]
    embeddings = pair.output_embeddings()
    pieces = []
    for start in range(0, predicting.shape[1], chunk_size):
        logits = F.linear(predicting[:, start:start + chunk_size], embeddings.weight, embeddings.bias)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        t = targets[:, start:start + chunk_size]
        pieces.append(logits.gather(-1, t.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1))
    per_token = torch.cat(pieces, dim=1)
    return (per_token * completion_mask.to(per_token.dtype)).sum(-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identity_sampling_is_bit_identical_to_none(dtype):
    pair = make_pair(dtype=dtype)
    rollout = rollout_of(pair)
    with torch.no_grad(), pair.adapter(pair.policy_adapter):
        original = original_completion_logprobs(pair, *args_of(rollout))
        plain = completion_logprobs(pair, *args_of(rollout))
        identity = completion_logprobs(pair, *args_of(rollout), sampling=SamplingDistribution())
        raw, sampled = completion_logprobs_with_sampling(pair, *args_of(rollout), sampling=SamplingDistribution())
        raw_none, sampled_none = completion_logprobs_with_sampling(pair, *args_of(rollout), sampling=None)
    for got in (plain, identity, raw, raw_none):
        assert torch.equal(got, original)
    assert sampled is raw and sampled_none is raw_none  # no second computation


def test_sampled_tokens_are_in_the_kept_set_and_raw_sums_are_unchanged():
    pair = make_pair()
    rollout = rollout_of(pair, temperature=0.7, top_k=5, top_p=0.9)
    sampling = SamplingDistribution(0.7, 5, 0.9)
    mask = rollout.completion_mask.bool()
    with torch.no_grad(), pair.adapter(pair.policy_adapter):
        hidden = hidden_states(pair, rollout.input_ids, rollout.attention_mask)
        p = rollout.prompt_length
        per_token = token_logprobs(hidden[:, p - 1:-1], pair.output_embeddings(), rollout.input_ids[:, p:], 2,
                                   sampling=sampling)
        raw, sampled = completion_logprobs_with_sampling(pair, *args_of(rollout), sampling=sampling)
        plain = completion_logprobs(pair, *args_of(rollout))
        alone = completion_logprobs(pair, *args_of(rollout), sampling=sampling)
        # a stricter distribution than the one that sampled: some sampled tokens fall outside it
        _, greedy = completion_logprobs_with_sampling(pair, *args_of(rollout), sampling=SamplingDistribution(top_k=1))
    assert mask.sum() > mask.shape[0]
    assert torch.isfinite(per_token[mask]).all()  # every sampled token was in the kept set
    assert torch.equal(raw, plain) and torch.equal(sampled, alone)
    assert torch.isfinite(sampled).all() and (sampled - raw).abs().max() > 1e-3  # warping matters
    torch.testing.assert_close(sampled, torch.where(mask, per_token, 0).sum(-1))
    assert (greedy == -math.inf).any() and not torch.isnan(greedy).any()


def reference_sampled_sums(pair, rollout, distribution):
    """Unchunked, unchecked: the model's full float64 logits through transformers' warpers."""
    logits = pair.model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                        position_ids=position_ids_from_mask(rollout.attention_mask)).logits.double()
    p = rollout.prompt_length
    logp = transformers_logprobs(logits[:, p - 1:-1], *distribution)
    logp = logp.gather(-1, rollout.input_ids[:, p:].unsqueeze(-1)).squeeze(-1)
    return torch.where(rollout.completion_mask.bool(), logp, 0).sum(-1)


def test_masked_tokens_outside_the_kept_set_count_zero_with_finite_gradients(monkeypatch):
    pair = make_pair(dtype=torch.float64)
    distribution = (1.0, 1, 1.0)  # greedy: every other token is −inf
    rollout = rollout_of(pair, top_k=1)
    # the last completion token becomes padding, replaced by a token that is not the argmax
    with torch.no_grad(), pair.adapter(pair.policy_adapter):
        last_logits = pair.model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                                 position_ids=position_ids_from_mask(rollout.attention_mask)).logits[:, -2]
    rollout.input_ids[:, -1] = last_logits.argmin(-1)
    rollout.completion_mask[:, -1] = 0
    rollout.attention_mask[:, -1] = 0
    calls = []
    real_checkpoint = logprobs_module.checkpoint
    monkeypatch.setattr(logprobs_module, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    parameters = [p for _, p in pair.named_policy_parameters()]
    with pair.adapter(pair.policy_adapter):
        raw, sampled = completion_logprobs_with_sampling(pair, *args_of(rollout, chunk=2),
                                                         sampling=SamplingDistribution(*distribution))
        assert len(calls) == math.ceil(rollout.completion_mask.shape[1] / 2)  # every chunk checkpointed
        grads = torch.autograd.grad(sampled.sum(), parameters)
        expected = reference_sampled_sums(pair, rollout, distribution)
        expected_grads = torch.autograd.grad(expected.sum(), parameters)
    assert torch.isfinite(sampled).all()  # −inf at masked positions did not become NaN
    torch.testing.assert_close(sampled, expected, rtol=1e-12, atol=1e-12)
    assert all(torch.isfinite(g).all() for g in grads)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_gradients_flow_through_sampled_logprobs_checkpointed():
    pair = make_pair(dtype=torch.float64)
    distribution = (0.7, 5, 0.9)
    rollout = rollout_of(pair, temperature=0.7, top_k=5, top_p=0.9)
    parameters = [p for _, p in pair.named_policy_parameters()]
    with pair.adapter(pair.policy_adapter):
        _, sampled = completion_logprobs_with_sampling(pair, *args_of(rollout, chunk=2),
                                                       sampling=SamplingDistribution(*distribution))
        assert sampled.requires_grad and torch.isfinite(sampled).all()
        grads = torch.autograd.grad(sampled.sum(), parameters)
        expected_grads = torch.autograd.grad(reference_sampled_sums(pair, rollout, distribution).sum(), parameters)
    assert all(torch.isfinite(g).all() for g in grads)
    assert max(g.abs().max() for g in grads) > 0
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
