"""The RLOO objective: log-probs in chunks, advantages, and J shared by ZO and first order."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from zopro_kernels import ZOPrO
from zopro_kernels.rloo.logprobs import completion_logprobs, position_ids_from_mask
from zopro_kernels.rloo.objective import leave_one_out_advantages, policy_loss, score_rollout, surrogate_loss
from zopro_kernels.rloo.sampling import sample_completions

from .helpers import PROMPTS, make_pair


def rollout_of(pair, k=3, max_new_tokens=6, seed=0):
    return sample_completions(pair, PROMPTS[:3], k=k, max_new_tokens=max_new_tokens, max_prompt_tokens=8, seed=seed)


def reference_logprobs(pair, rollout):
    """Unchunked: the full [batch, seq, vocab] logits of the model's own forward, in float64."""
    with pair.adapter(pair.policy_adapter):
        logits = pair.model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                            position_ids=position_ids_from_mask(rollout.attention_mask)).logits.double()
    logp = logits.log_softmax(-1)[:, :-1].gather(-1, rollout.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    p = rollout.prompt_length
    return (logp[:, p - 1:] * rollout.completion_mask).sum(-1)


@pytest.mark.parametrize("chunk", [1, 4, 1000], ids=["chunk1", "chunk4", "unchunked"])
def test_chunked_logprobs_equal_unchunked_float64(chunk):
    pair = make_pair(dtype=torch.float64)
    rollout = rollout_of(pair)
    assert rollout.completion_mask.sum() > rollout.completion_mask.shape[0]  # several tokens per row
    expected = reference_logprobs(pair, rollout)
    with pair.adapter(pair.policy_adapter):
        got = completion_logprobs(pair, rollout.input_ids, rollout.attention_mask, rollout.prompt_length,
                                  rollout.completion_mask, chunk_size=chunk)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_chunked_logprob_gradients_equal_unchunked():
    pair = make_pair(dtype=torch.float64)
    rollout = rollout_of(pair)
    slot, parameter = pair.named_policy_parameters()[-1]
    grads = []
    for compute in (lambda: reference_logprobs(pair, rollout),
                    lambda: completion_logprobs(pair, rollout.input_ids, rollout.attention_mask,
                                                rollout.prompt_length, rollout.completion_mask, chunk_size=2)):
        with pair.adapter(pair.policy_adapter):
            (grad,) = torch.autograd.grad(compute().sum(), parameter)
        grads.append(grad)
    assert grads[0].abs().max() > 0, slot
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-12)


class LargestVocabTensor(TorchDispatchMode):
    """Records the largest memory (in rows of vocabulary size) behind any tensor whose last
    dimension is the vocabulary (storage, so broadcast views of the weight do not count)."""

    def __init__(self, vocab, weight):
        super().__init__()
        self.vocab, self.largest, self.weight_storage = vocab, 0, weight.untyped_storage().data_ptr()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if (isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab
                    and t.untyped_storage().data_ptr() != self.weight_storage):
                rows = t.untyped_storage().nbytes() // (self.vocab * t.element_size())
                self.largest = max(self.largest, rows)
        return out


def test_logprobs_never_build_batch_by_seq_by_vocab():
    pair = make_pair()
    rollout = rollout_of(pair, max_new_tokens=8)
    batch, chunk = rollout.input_ids.shape[0], 2
    assert rollout.input_ids.shape[1] - rollout.prompt_length > chunk
    mode = LargestVocabTensor(len(pair.tokenizer), pair.output_embeddings().weight)
    with mode, pair.adapter(pair.policy_adapter):
        completion_logprobs(pair, rollout.input_ids, rollout.attention_mask, rollout.prompt_length,
                            rollout.completion_mask, chunk_size=chunk).sum()
    assert 0 < mode.largest <= batch * chunk


def test_leave_one_out_advantages_match_the_definition():
    rewards = torch.tensor([1.0, 2.0, 6.0, -1.0, 0.5, 0.5], dtype=torch.float64)
    expected = []
    for group in rewards.reshape(2, 3):
        for i in range(3):
            others = [group[j] for j in range(3) if j != i]
            expected.append(group[i] - sum(others) / len(others))
    torch.testing.assert_close(leave_one_out_advantages(rewards, 3), torch.stack(expected))
    with pytest.raises(ValueError, match="k ≥ 2"):
        leave_one_out_advantages(rewards, 1)


def test_ppo_surrogate_clips_only_against_the_advantage():
    logp_old = torch.zeros(2, dtype=torch.float64)
    advantages = torch.tensor([1.0, -1.0], dtype=torch.float64)
    far = torch.log(torch.tensor([2.0, 2.0], dtype=torch.float64))  # ratio 2 for both
    # A>0: clipped at 1.2 (no credit beyond the clip); A<0: the unclipped −A·ρ = 2 dominates
    expected = (-1.0 * 1.2 + 1.0 * 2.0) / 2
    assert surrogate_loss(far, logp_old, advantages, kind="ppo", clip=0.2).item() == pytest.approx(expected)
    assert surrogate_loss(far, logp_old, advantages, kind="reinforce").item() == pytest.approx(
        -(advantages * far).mean().item())


@pytest.mark.parametrize("kind", ["ppo", "reinforce"])
def test_zo_objective_is_the_first_order_loss(kind):
    """Same batch: the ZO closure's J equals the loss backward sees and an independent reference,
    and the SPSA estimate g equals the directional derivative ∇J·z of that same J."""
    pair = make_pair(dtype=torch.float64)
    batch = score_rollout(pair, rollout_of(pair), beta=0.1, chunk_size=3)
    # independent reference of J from unchunked float64 log-probs
    logp = reference_logprobs(pair, batch.rollout)
    rewards = batch.scores - 0.1 * batch.kl
    advantages = leave_one_out_advantages(rewards, batch.rollout.k)
    if kind == "ppo":
        ratio = torch.exp(logp - batch.logp_old)
        expected = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(0.8, 1.2)).mean()
    else:
        expected = -(advantages * logp).mean()

    first_order = policy_loss(pair, batch, kind=kind, chunk_size=3)
    with torch.no_grad():
        zeroth_order = policy_loss(pair, batch, kind=kind, chunk_size=3)
    torch.testing.assert_close(first_order.detach(), expected, rtol=1e-12, atol=1e-14)
    assert zeroth_order.item() == first_order.item()

    named = pair.named_policy_parameters()
    grads = torch.autograd.grad(first_order, [p for _, p in named])
    before = [p.detach().clone() for _, p in named]
    # ε: Llama's RMSNorm computes in fp32 even in a float64 model, so J is fp32-accurate and a
    # smaller ε would measure its rounding; at 1e-4 the central difference is well inside 1e-4
    lr, eps = 1e-3, 1e-4
    optimizer = ZOPrO(named, lr=lr, eps=eps, seed=3, backend="torch")
    optimizer.step(lambda: policy_loss(pair, batch, kind=kind, chunk_size=3))
    g = optimizer.last_step["projected_grad"].item()
    assert g != 0
    # θ moved by −η g z, so ∇J·(θ_new − θ) = −η g (∇J·z) ≈ −η g²
    directional = sum((grad * (p.detach() - b)).sum() for grad, (_, p), b in zip(grads, named, before))
    assert directional.item() == pytest.approx(-lr * g * g, rel=1e-4)


def test_standardized_advantages_match_float64_mean_and_unbiased_std_over_the_global_batch():
    from zopro_kernels.rloo.objective import ScoredBatch, standardized_advantages, with_standardized_advantages

    advantages = torch.tensor([0.5, -1.0, 2.0, 0.25, -0.75, 3.0], dtype=torch.float32)
    reference = advantages.double()
    expected = (reference - reference.mean()) / (reference.std(unbiased=True) + 1e-4)
    a = advantages.double()
    got = standardized_advantages(advantages, float(a.sum()), float((a * a).sum()), a.numel())
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    assert got.dtype == advantages.dtype
    # two processes, each holding half: standardised by the sums over both, as the global batch is
    halves = [advantages[:2], advantages[2:]]
    sums = [sum(v) for v in zip(*[[float(h.double().sum()), float(h.double().square().sum()), h.numel()]
                                  for h in halves])]
    for half, rows in zip(halves, (slice(0, 2), slice(2, 6))):
        batch = ScoredBatch(rollout=None, logp_old=torch.zeros(len(half)), advantages=half, scores=half,
                            kl=torch.zeros(len(half)), rewards=half)
        scaled = with_standardized_advantages(batch, reduce=lambda mine: sums)
        torch.testing.assert_close(scaled.advantages.double(), expected[rows], rtol=1e-6, atol=1e-6)
        assert scaled.rewards is half  # only the advantages change
    # one completion, or all equal: centred, never divided by a zero spread
    assert standardized_advantages(torch.tensor([2.0]), 2.0, 4.0, 1).tolist() == [0.0]
    same = standardized_advantages(torch.full((4,), 3.0), 12.0, 36.0, 4)
    assert torch.equal(same, torch.zeros(4))
