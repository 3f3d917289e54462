"""Rollout reuse, on-policy π_old, reward functions, evaluation splits and start_from on the tiny Llama."""

import json
import math
import os

import pytest
import torch

from zopro_kernels.rloo import loop as loop_module
from zopro_kernels.rloo.cli import train
from zopro_kernels.rloo.logprobs import SamplingDistribution, completion_logprobs
from zopro_kernels.rloo.objective import policy_loss, score_rollout
from zopro_kernels.rloo.sampling import sample_completions

from .helpers import PROMPTS, make_pair, tiny_config, word_count_judge


def metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def run(tmp_path, pair=None, **overrides):
    return train(tiny_config(tmp_path, **overrides), pair=pair or make_pair(), prompts=PROMPTS,
                 judge=word_count_judge())


def test_one_rollout_serves_num_iterations_steps(tmp_path, monkeypatch):
    calls = []
    original = loop_module.sample_completions
    monkeypatch.setattr(loop_module, "sample_completions",
                        lambda *a, **kw: calls.append(kw["k"]) or original(*a, **kw))
    trainer = run(tmp_path, num_iterations=3, iterations=1, reward_warmup=False, eval_prompts=0, num_generations=3)
    steps = [m for m in metrics(tmp_path) if "step" in m]
    rollouts = trainer.steps
    assert len(steps) == 3 * rollouts and [m["reuse"] for m in steps] == [0, 1, 2] * rollouts
    # generation: one rollout per 3 steps (k completions), plus the refinement's pairs (k = 2)
    assert calls.count(trainer.config.num_generations) == rollouts
    assert trainer.zo is None or trainer.zo.steps_per_iteration == 3 * rollouts


def test_reused_rollouts_make_the_ppo_clip_bind(tmp_path):
    """One step per rollout: PPO at ρ = 1 has REINFORCE's gradient. Reused, π_old stays fixed at
    sampling time, ρ moves away from 1 and the clipped objective trains differently."""
    weights = {}
    for objective in ("ppo", "reinforce"):
        trainer = run(tmp_path / objective, num_iterations=4, iterations=1, steps_per_iteration=1,
                      optimizer="adamw", adamw_lr=0.2, objective=objective, reward_warmup=False, eval_prompts=0)
        weights[objective] = trainer.pair.policy_tensors()
        records = [m for m in metrics(tmp_path / objective) if "step" in m]
        weights[objective + "-J"] = [m["J"] for m in records]
    # the first step's objective value: −mean(A) = 0 for both (leave-one-out advantages sum to 0)
    assert weights["ppo-J"][0] == pytest.approx(0.0, abs=1e-6)
    assert weights["ppo-J"][1:] != weights["reinforce-J"][1:]
    assert any(not torch.allclose(weights["ppo"][k], weights["reinforce"][k], atol=1e-4) for k in weights["ppo"])


def test_pi_old_is_the_sampling_distribution():
    pair = make_pair()
    sampling = SamplingDistribution(temperature=0.7, top_k=5, top_p=0.9)
    rollout = sample_completions(pair, PROMPTS[:3], k=2, max_new_tokens=4, max_prompt_tokens=8, temperature=0.7,
                                 top_k=5, top_p=0.9, seed=1)
    batch = score_rollout(pair, rollout, beta=0.1, chunk_size=3, sampling=sampling)
    args = (rollout.input_ids, rollout.attention_mask, rollout.prompt_length, rollout.completion_mask, 3)
    with torch.no_grad(), pair.adapter(pair.policy_adapter):
        raw = completion_logprobs(pair, *args)
        sampled = completion_logprobs(pair, *args, sampling=sampling)
    assert torch.equal(batch.logp_old, sampled) and not torch.allclose(sampled, raw)
    with torch.no_grad(), pair.reference():
        reference = completion_logprobs(pair, *args)
    torch.testing.assert_close(batch.kl, raw - reference)  # the KL compares the models' own distributions
    # at the sampling weights ρ = 1 exactly, so the PPO objective is −mean(A) = 0
    with torch.no_grad():
        assert float(policy_loss(pair, batch, kind="ppo", chunk_size=3)) == pytest.approx(0.0, abs=1e-6)


def test_reward_functions_alone_need_no_reward_model(tmp_path):
    seen = []

    def length_reward(prompt, completion):
        seen.append((prompt, completion))
        return float(len(completion.split()))

    config = tiny_config(tmp_path, reward_model=False, reward_funcs=[length_reward], iterations=2)
    pair = make_pair()
    reward_before = pair.reward_tensors()
    trainer = train(config, pair=pair, prompts=PROMPTS, judge=word_count_judge())
    records = metrics(tmp_path)
    assert not any(m.get("event") == "reward_warmup" for m in records)
    iterations = [m for m in records if m.get("event") == "iteration"]
    assert all("pairs" not in m and "policy_delta_norm" in m for m in iterations)
    assert all(torch.equal(reward_before[k], v) for k, v in trainer.pair.reward_tensors().items())
    state = trainer.zo.state_dict()
    assert state["zopro"]["has_reward"] is False and state["zopro"]["has_policy"] is True
    steps = [m for m in records if "step" in m]
    assert seen and all(math.isfinite(m["reward_score"]) for m in steps)
    # the score is the reward function's: mean words per completion of the rollout
    assert steps[0]["reward_score"] >= 0


def test_reward_funcs_by_name_and_bad_names():
    from zopro_kernels.rloo.loop import resolve_reward_funcs

    judge = word_count_judge()
    (score,) = resolve_reward_funcs(["judge"], judge)
    assert score("p", "good good bad") == 1.0
    (imported,) = resolve_reward_funcs(["math:hypot"], judge)
    assert imported(3, 4) == 5.0
    with pytest.raises(ValueError, match="could not be imported"):
        resolve_reward_funcs(["math:nope"], judge)
    with pytest.raises(ValueError, match="no score"):
        resolve_reward_funcs(["judge"], lambda p, a, b: 0)
    with pytest.raises(ValueError, match="no reward"):
        tiny_config("unused", reward_model=False, reward_funcs=[])


def test_evaluation_splits_are_disjoint_and_paired(tmp_path):
    config = tiny_config(tmp_path, eval_prompts=3, validation_prompts=3, num_generations_eval=2, eval_split="both",
                         iterations=1, steps_per_iteration=1, reward_warmup=False)
    trainer = loop_module.RLOOTrainer(config, make_pair(), PROMPTS, word_count_judge())
    train_set, held, val = set(trainer.prompts), set(trainer.eval_prompts), set(trainer.validation_prompts)
    assert len(held) == len(val) == 3 and not (held & val) and not (train_set & (held | val))
    trainer.evaluate(-1)
    trainer.evaluate(-1)  # no training in between: the same samples, the same scores
    evals = [m for m in metrics(tmp_path) if m.get("event") == "eval"]
    assert [e["split"] for e in evals] == ["held_out", "validation"] * 2
    assert all(len(e["scores"]) == 3 * 2 for e in evals)
    assert evals[0]["scores"] == evals[2]["scores"] and evals[1]["scores"] == evals[3]["scores"]


@pytest.mark.parametrize("method", ["zopro", "mezo", "adamw"])
def test_start_from_a_shared_first_iteration(tmp_path, method):
    start = tmp_path / "start"
    run(start, iterations=1)  # iteration 0: AdamW; Δπ_0 and ΔR_0 handed to ZOPrO
    pair = make_pair()
    trainer = run(tmp_path / method, pair=pair, optimizer=method, iterations=2, start_from=str(start), eps=5e-3,
                  adamw_lr=3e-3)
    records, start_records = metrics(tmp_path / method), metrics(start)
    assert records[:len(start_records)] == start_records  # the shared part, as the start run logged it
    steps = [m for m in records[len(start_records):] if "step" in m]
    assert [m["iteration"] for m in steps] == [1] * len(steps)
    assert steps[0]["step"] == max(m["step"] for m in start_records if "step" in m) + 1
    assert {m["mode"] for m in steps} == {"zopro": {"zopro"}, "mezo": {"spsa"}, "adamw": {"adamw"}}[method]
    if trainer.zo is not None:
        state = trainer.zo.state_dict()["zopro"]
        assert state["has_policy"] is (method == "zopro") and state["has_reward"] is (method == "zopro")
        assert trainer.zo.param_groups[0]["eps"] == 5e-3  # this run's settings, not the start's
    if method == "adamw":
        assert trainer.adamw.param_groups[0]["lr"] == 3e-3 and {m["lr"] for m in steps} == {3e-3}
    with pytest.raises(ValueError, match="lora_r"):
        run(tmp_path / "other", optimizer=method, iterations=2, start_from=str(start), lora_r=2, lora_alpha=4)


def test_q_directions_and_direction_norm_reach_the_optimizer(tmp_path):
    trainer = run(tmp_path, directions=2, direction_norm="policy_delta", iterations=2, reward_warmup=False)
    assert trainer.zo.directions == 2 and trainer.zo.direction_norm == "policy_delta"
    iterations = [m for m in metrics(tmp_path) if m.get("event") == "iteration"]
    assert iterations[1]["policy_delta_norm"] > 0
    assert -1 <= iterations[1]["cos_policy_delta_previous_reward_delta"] <= 1  # ∠(ΔR_0, Δπ_1) logged
    assert 0 <= iterations[1]["fresh_pair_accuracy"] <= 1


def test_normalized_advantages_make_the_zo_step_independent_of_the_reward_scale(tmp_path):
    def characters(prompt, completion):
        return float(len(completion))

    def rescaled(prompt, completion):  # the same preferences in other units (a reward model's logits, say)
        return 100.0 * characters(prompt, completion) - 7.0

    moved, spreads = {}, {}
    for name, reward, normalize in (("characters", characters, True), ("rescaled", rescaled, True), ("raw", rescaled, False)):
        pair = make_pair()
        before = {k: v.clone() for k, v in pair.policy_tensors().items()}
        # one rollout reused for two steps: the same completions whatever the first step did
        config = tiny_config(tmp_path / name, optimizer="mezo", first_iteration="spsa", reward_model=False,
                             reward_funcs=[reward], beta=0.0, iterations=1, steps_per_iteration=1,
                             num_iterations=2, num_generations=3, eval_prompts=0,
                             normalize_advantages=normalize)
        trainer = train(config, pair=pair, prompts=PROMPTS, judge=word_count_judge())
        moved[name] = {k: v - before[k] for k, v in trainer.pair.policy_tensors().items()}
        spreads[name] = [m["advantage_std"] for m in metrics(tmp_path / name) if "step" in m]
    # each step records the advantages' spread as sampled (the reward's units), standardised or not
    assert len(spreads["raw"]) == 2 and spreads["characters"][0] > 0
    assert spreads["rescaled"] == pytest.approx([100 * v for v in spreads["characters"]], rel=1e-9)
    assert spreads["raw"] == pytest.approx(spreads["rescaled"], rel=1e-12)
    size = math.sqrt(sum(float(d.double().square().sum()) for d in moved["characters"].values()))
    assert size > 0
    difference = math.sqrt(sum(float((moved["characters"][k] - moved["rescaled"][k]).double().square().sum())
                               for k in moved["characters"]))
    assert difference <= 1e-3 * size  # the same step (up to the 1e-4 in std + 1e-4)
    raw = math.sqrt(sum(float(d.double().square().sum()) for d in moved["raw"].values()))
    assert raw > 10 * size or not math.isfinite(raw)  # without it the step grows with the reward's scale


def test_a_reward_model_that_does_not_fit_its_warm_up_pairs_is_said_and_counted(tmp_path, capsys):
    from zopro_kernels.rloo.judges import ScoreJudge

    longer = ScoreJudge(lambda prompt, response: len(response))  # few ties: enough pairs for the check
    # a learning rate too small to move R: it orders its own pairs no better than at its initialisation
    config = tiny_config(tmp_path, reward_warmup_prompts=96, reward_lr=1e-12, reward_epochs=2, iterations=1,
                         steps_per_iteration=1, eval_prompts=0)
    trainer = train(config, pair=make_pair(), prompts=PROMPTS, judge=longer)
    warmup = next(m for m in metrics(tmp_path) if m.get("event") == "reward_warmup")
    assert warmup["pairs"] >= 50 and len(warmup["bt_loss_epochs"]) == 2
    assert warmup["pair_accuracy_after"] < 0.6 and trainer.counters["reward_unfit"] == 1
    out = capsys.readouterr().out
    assert "did not fit them; lower reward_lr or set reward_max_grad_norm" in out
    # the warm-up, long and before the first step, is said as it starts and when it is done
    assert "reward warm-up: sampling, judging and fitting R_0 on 96 prompts' pairs (2 epoch(s))" in out
    assert f"R_0 orders {warmup['pair_accuracy_after']:.0%} of its {warmup['pairs']} pairs" in out
    assert warmup["seconds"] > 0
