"""Models (one base, two adapters, reference), Bradley–Terry refinement, judges, NF4 base."""

import pytest
import torch

from zopro_kernels.rloo.judges import JudgeError, LLMPairwiseJudge, ScoreJudge, call_judge
from zopro_kernels.rloo.logprobs import completion_logprobs
from zopro_kernels.rloo.models import LoraSettings, PolicyAndReward, slot_name
from zopro_kernels.rloo.refine import PreferencePairs, pair_accuracy, refine_reward_model, reward_optimizer
from zopro_kernels.rloo.sampling import completion_mask_until_eos, sample_completions

from .helpers import PROMPTS, WORDS, make_base, make_pair, make_tokenizer, tiny_config


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


def test_reward_adapter_starts_as_a_copy_of_the_policy():
    """Shared LoRA init: ΔR and the policy's noise are compared slot by slot, so both adapters'
    B matrices must act in the same A basis (make_pair's random B are drawn afterwards)."""
    model, tokenizer = make_base(seed=0)
    pair = PolicyAndReward(model, tokenizer, LoraSettings(r=4, alpha=8), seed=0)
    assert pair.policy_parameters.keys() == pair.reward_parameters.keys()
    assert any(slot.endswith("lora_A") for slot in pair.policy_parameters)
    for slot, policy in pair.policy_parameters.items():
        reward = pair.reward_parameters[slot]
        assert torch.equal(reward, policy), slot
        assert reward is not policy and reward.data_ptr() != policy.data_ptr(), slot
    slot = next(s for s in pair.policy_parameters if s.endswith("lora_A"))
    with torch.no_grad():
        pair.reward_parameters[slot].add_(1.0)
    assert not torch.equal(pair.reward_parameters[slot], pair.policy_parameters[slot])  # distinct tensors

    model, tokenizer = make_base(seed=0)
    independent = PolicyAndReward(model, tokenizer, LoraSettings(r=4, alpha=8), seed=0, shared_lora_init=False)
    assert any(not torch.equal(independent.reward_parameters[s], p)
               for s, p in independent.policy_parameters.items() if s.endswith("lora_A"))
    # the flag leaves the (seeded) policy draws alone
    assert all(torch.equal(independent.policy_parameters[s], p) for s, p in pair.policy_parameters.items())


def test_helper_prompts_are_distinct_and_of_several_lengths(tmp_path):
    tokenizer = make_tokenizer()
    lengths = [len(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in PROMPTS]
    assert len(set(PROMPTS)) == len(PROMPTS)
    assert len(set(lengths)) >= 3, lengths  # batches of them are left padded
    assert all(1 <= n <= tiny_config(tmp_path).max_prompt_tokens for n in lengths), lengths
    assert all(w in WORDS and not w.isdigit() for p in PROMPTS for w in p.split())


def test_left_padding_leaves_completion_logprobs_unchanged():
    pair = make_pair(seed=0)
    lengths = [len(pair.tokenizer(p)["input_ids"]) for p in PROMPTS]
    prompts = [PROMPTS[lengths.index(min(lengths))], PROMPTS[lengths.index(max(lengths))]]
    rollout = sample_completions(pair, prompts, k=2, max_new_tokens=5, max_prompt_tokens=8, seed=0)
    p = rollout.prompt_length
    with torch.no_grad(), pair.adapter(pair.policy_adapter):
        batched = completion_logprobs(pair, rollout.input_ids, rollout.attention_mask, p,
                                      rollout.completion_mask, chunk_size=3)
        padded_rows = 0
        for row in range(rollout.input_ids.shape[0]):
            real = int(rollout.attention_mask[row, :p].sum())
            n = int(rollout.completion_mask[row].sum())
            assert n >= 1
            padded_rows += real < p
            # the row on its own: no left pad, nothing after its last scored completion token
            ids = rollout.input_ids[row:row + 1, p - real:p + n]
            mask = rollout.attention_mask[row:row + 1, p - real:p + n]
            assert mask.all()
            alone = completion_logprobs(pair, ids, mask, real, torch.ones(1, n, dtype=torch.long), chunk_size=3)
            torch.testing.assert_close(batched[row:row + 1], alone, rtol=1e-5, atol=1e-5)
    assert padded_rows == rollout.k  # the short prompt's rows were left padded


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


def test_refinement_clips_the_reward_gradient_norm_before_each_step():
    from zopro_kernels.rloo.refine import bradley_terry_loss

    pairs = synthetic_pairs(make_pair(seed=0).tokenizer, 8, seed=1)
    moved = {}
    for clip in (None, 1e-3):
        pair = make_pair(seed=0)
        parameters = list(pair.reward_parameters.values()) + list(pair.value_head.parameters())
        before = [p.detach().clone() for p in parameters]
        if clip is None:  # the reference: the gradient of the same minibatch, by hand
            bradley_terry_loss(pair, pairs).backward()
            norm = float(torch.sqrt(sum(p.grad.double().square().sum() for p in parameters if p.grad is not None)))
            pair.value_head.zero_grad(set_to_none=True)
            for p in parameters:
                p.grad = None
        # plain SGD, lr 1, one minibatch of all 8 pairs: the step is the (clipped) gradient itself
        refine_reward_model(pair, pairs, torch.optim.SGD(parameters, lr=1.0), epochs=1, batch_size=8, seed=0,
                            max_grad_norm=clip)
        moved[clip] = float(torch.sqrt(sum((p.detach() - b).double().square().sum()
                                           for p, b in zip(parameters, before))))
    assert norm > 1e-2  # the clip below binds
    assert moved[None] == pytest.approx(norm, rel=1e-4)
    assert moved[1e-3] == pytest.approx(1e-3, rel=1e-3)


def test_call_judge_checks_verdicts():
    judge = ScoreJudge(lambda p, r: len(r))
    assert call_judge(judge, "p", "long answer", "short") == 0 and call_judge(judge, "p", "a", "longer") == 1
    assert call_judge(lambda p, a, b: torch.tensor(1), "p", "a", "b") == 1
    assert call_judge(lambda p, a, b: None, "p", "a", "b") is None  # a tie: dropped by the loop
    for verdict in (2, "0", 0.5, True):
        with pytest.raises(JudgeError, match="must return 0"):
            call_judge(lambda p, a, b, v=verdict: v, "p", "a", "b")
    with pytest.raises(JudgeError, match="raised ZeroDivisionError"):
        call_judge(lambda p, a, b: 1 / 0, "p", "a", "b")
    with pytest.raises(JudgeError, match="ValueError: score is nan"):
        call_judge(ScoreJudge(lambda p, r: float("nan")), "p", "a", "b")


def test_llm_pairwise_judge_compares_the_logits_of_0_and_1():
    model, tokenizer = make_base(seed=3)
    judge = LLMPairwiseJudge(model, tokenizer, order="fixed")  # one query, as shown (see test_judges for "both")
    for a, b in [("good film", "bad film"), ("bad", "good"), ("the plot", "a scene"), ("fun", "dull")]:
        ids = judge.prompt_ids("the film is", a, b)
        assert ids.shape[1] > 50  # the template, not just the responses
        with torch.no_grad():
            last = model(input_ids=ids).logits[0, -1]
        vocab = tokenizer.get_vocab()
        margin = float(last[vocab["1"]] - last[vocab["0"]])
        expected = None if margin == 0 else int(margin > 0)
        assert judge("the film is", a, b) == expected
        assert call_judge(judge, "the film is", a, b) == expected  # the loop's checked call agrees
        assert expected is not None  # a real margin: swapping "0" and "1" in the judge would fail here


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

    # bitsandbytes' CPU 4-bit packing needs every layer's output size divisible by 32
    base, tokenizer = make_base(seed=0, hidden_size=64)
    base.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model, tokenizer = load_base_model(str(tmp_path), dtype="float32", load_in_4bit=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    pair = PolicyAndReward(model, tokenizer, LoraSettings(r=4, alpha=8), seed=0)
    assert pair.policy_parameters.keys() == make_pair().policy_parameters.keys()
    dense = make_pair(seed=0, hidden_size=64)  # the same base weights, dense: compare the reference log-probs
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
