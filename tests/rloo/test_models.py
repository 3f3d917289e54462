"""Models (one base, two adapters, reference), Bradley–Terry refinement, judges, NF4 base."""

import pytest
import torch

from zopro_kernels.rloo.judges import JudgeError, LLMPairwiseJudge, ScoreJudge, call_judge
from zopro_kernels.rloo.logprobs import completion_logprobs
from zopro_kernels.rloo.models import LoraSettings, PolicyAndReward, slot_name
from zopro_kernels.rloo.refine import PreferencePairs, pair_accuracy, refine_reward_model, reward_optimizer
from zopro_kernels.rloo.sampling import completion_mask_until_eos, sample_completions

from .helpers import PROMPTS, make_base, make_pair


def test_slot_names_strip_the_adapter():
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.policy.weight"
    assert slot_name(name, "policy") == "model.layers.0.self_attn.q_proj.lora_A"
    assert slot_name(name, "reward") is None
    assert slot_name("base_model.model.model.layers.0.mlp.up_proj.base_layer.weight", "policy") is None


def test_reference_is_the_base_model_and_adapters_differ():
    base, _ = make_base(seed=0)
    untouched = {k: v.clone() for k, v in base.state_dict().items()}
    pair = make_pair(seed=0)
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    mask = torch.ones_like(ids)
    fresh, _ = make_base(seed=0)
    fresh.load_state_dict(untouched)
    with torch.no_grad():
        expected = fresh(input_ids=ids).logits
        with pair.reference():
            reference = pair.model(input_ids=ids, attention_mask=mask).logits
        with pair.adapter("policy"):
            policy = pair.model(input_ids=ids, attention_mask=mask).logits
        with pair.adapter("reward"):
            reward = pair.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(reference, expected)
    assert (policy - expected).abs().max() > 1e-4 and (reward - policy).abs().max() > 1e-4
    # one base in memory: no second copy of the base weights
    assert sum(p.numel() for n, p in pair.model.named_parameters() if "lora_" not in n) == sum(
        p.numel() for p in fresh.parameters())


def test_adapter_name_clash_is_refused():
    model, tokenizer = make_base()
    with pytest.raises(ValueError, match="different names"):
        PolicyAndReward(model, tokenizer, LoraSettings(r=2, alpha=4), policy_adapter="a", reward_adapter="a")
    pair = make_pair()
    with pytest.raises(ValueError, match=r"already has adapter\(s\) named \['policy'\]"):
        PolicyAndReward(pair.model, pair.tokenizer, LoraSettings(r=2, alpha=4), reward_adapter="other")


def test_completion_mask_stops_after_the_first_eos():
    ids = torch.tensor([[5, 1, 7, 1], [5, 6, 7, 8], [1, 0, 0, 0]])
    assert completion_mask_until_eos(ids, 1).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def synthetic_pairs(tokenizer, n, seed):
    """Accepted completions carry the word "good", rejected ones "bad"; everything else random."""
    generator = torch.Generator().manual_seed(seed)
    vocab = tokenizer.get_vocab()
    neutral = [vocab[w] for w in ("the", "film", "is", "a", "movie", "story", "plot", "actor", "scene", "and")]
    body = torch.tensor(neutral)[torch.randint(len(neutral), (n, 6), generator=generator)]
    position = torch.randint(3, 6, (n,), generator=generator)
    accepted, rejected = body.clone(), body.clone()
    accepted[torch.arange(n), position] = vocab["good"]
    rejected[torch.arange(n), position] = vocab["bad"]
    mask = torch.ones_like(body)
    return PreferencePairs(accepted, mask, rejected, mask.clone())


def test_refinement_raises_held_out_pair_accuracy():
    pair = make_pair(seed=0)
    train, held_out = synthetic_pairs(pair.tokenizer, 48, seed=1), synthetic_pairs(pair.tokenizer, 48, seed=2)
    before = pair_accuracy(pair, held_out)
    policy_before = pair.policy_tensors()
    losses = refine_reward_model(pair, train, reward_optimizer(pair, lr=3e-2), epochs=6, batch_size=8, seed=0)
    after = pair_accuracy(pair, held_out)
    assert after >= 0.9 and after > before + 0.2, (before, after)
    assert sum(losses[-6:]) < sum(losses[:6])
    assert all(torch.equal(policy_before[k], v) for k, v in pair.policy_tensors().items())  # policy untouched


def test_call_judge_checks_verdicts():
    judge = ScoreJudge(lambda p, r: len(r))
    assert call_judge(judge, "p", "long answer", "short") == 0 and call_judge(judge, "p", "a", "longer") == 1
    assert call_judge(lambda p, a, b: torch.tensor(1), "p", "a", "b") == 1
    for verdict in (2, "0", None, 0.5, True):
        with pytest.raises(JudgeError, match="must return 0"):
            call_judge(lambda p, a, b, v=verdict: v, "p", "a", "b")
    with pytest.raises(JudgeError, match="raised ZeroDivisionError"):
        call_judge(lambda p, a, b: 1 / 0, "p", "a", "b")
    with pytest.raises(JudgeError, match="ValueError: score is nan"):
        call_judge(ScoreJudge(lambda p, r: float("nan")), "p", "a", "b")


def test_llm_pairwise_judge_compares_the_logits_of_0_and_1():
    model, tokenizer = make_base(seed=3)
    judge = LLMPairwiseJudge(model, tokenizer)
    verdicts = []
    for a, b in [("good film", "bad film"), ("bad", "good"), ("the plot", "a scene"), ("fun", "dull")]:
        ids = judge.prompt_ids("the film is", a, b)
        assert ids.shape[1] > 50  # the template, not just the responses
        with torch.no_grad():
            last = model(input_ids=ids).logits[0, -1]
        vocab = tokenizer.get_vocab()
        expected = int(last[vocab["1"]] > last[vocab["0"]])
        assert judge("the film is", a, b) == expected
        verdicts.append(expected)
    assert call_judge(judge, "the film is", "good", "bad") in (0, 1)


def test_nf4_base_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as bnbf

    try:
        bnbf.quantize_4bit(torch.randn(64, 64), quant_type="nf4")
    except Exception as error:  # pragma: no cover - depends on the CPU build
        pytest.skip(f"bitsandbytes cannot quantize to NF4 on this CPU: {error}")
    from bitsandbytes.nn import Linear4bit

    from zopro_kernels import ZOPrO
    from zopro_kernels.rloo.models import load_base_model
    from zopro_kernels.rloo.objective import policy_loss, score_rollout

    base, tokenizer = make_base(seed=0)
    base.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tokenizer = load_base_model(str(tmp_path), dtype="float32", load_in_4bit=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    pair = PolicyAndReward(model, tokenizer, LoraSettings(r=4, alpha=8), seed=0)
    assert pair.policy_parameters.keys() == make_pair().policy_parameters.keys()
    dense = make_pair(seed=0)  # the same base weights, dense: compare the reference log-probs
    rollout = sample_completions(pair, PROMPTS[:2], k=2, max_new_tokens=4, max_prompt_tokens=8, seed=0)
    args = (rollout.input_ids, rollout.attention_mask, rollout.prompt_length, rollout.completion_mask, 2)
    with torch.no_grad(), pair.reference(), dense.reference():
        quantized, reference = completion_logprobs(pair, *args), completion_logprobs(dense, *args)
    assert torch.isfinite(quantized).all()
    # NF4 error: close to the dense base but not identical (it is really quantized)
    assert 0 < (quantized - reference).abs().max() < 0.2 * reference.abs().max()
    # the quantized base stays frozen; the LoRA policy trains through ZOPrO and through backward
    frozen = {n: p.clone() for n, p in pair.model.named_parameters() if "lora_" not in n}
    batch = score_rollout(pair, rollout, beta=0.1, chunk_size=2)
    loss = policy_loss(pair, batch, chunk_size=2)
    grads = torch.autograd.grad(loss, list(pair.policy_parameters.values()))
    assert any(g.abs().max() > 0 for g in grads)
    optimizer = ZOPrO(pair.named_policy_parameters(), lr=1e-2, eps=1e-3, seed=0)
    before = pair.policy_tensors()
    optimizer.step(lambda: policy_loss(pair, batch, chunk_size=2))
    assert torch.isfinite(optimizer.last_step["projected_grad"])
    assert any(not torch.equal(before[k], v) for k, v in pair.policy_tensors().items())
    assert all(torch.equal(p, frozen[n]) for n, p in pair.model.named_parameters() if "lora_" not in n)
