"""The iterative loop on a tiny random Llama: iterations, guidance, kill/resume, bad input."""

import json
import math
import os

import pytest
import torch

from zopro_kernels.rloo.checkpoint import load_checkpoint
from zopro_kernels.rloo.cli import train
from zopro_kernels.rloo.judges import JudgeError

from .helpers import PROMPTS, make_pair, tiny_config, word_count_judge


class RecordingRecorder:
    def __init__(self):
        self.calls = []

    def record(self, role, tensors, iteration, step):
        self.calls.append((role, {k: v.clone() for k, v in tensors.items()}, iteration, step))

    def tensors(self, role, iteration):
        return [t for r, t, i, _ in self.calls if r == role and i == iteration][-1]


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def run(tmp_path, judge=None, recorder=None, resume=False, pair=None, **overrides):
    config = tiny_config(tmp_path, **overrides)
    return train(config, pair=pair or make_pair(), prompts=PROMPTS, judge=judge or word_count_judge(),
                 recorder=recorder, resume=resume)


@pytest.fixture(scope="module")
def two_iterations(tmp_path_factory):
    """One uninterrupted two-iteration ZOPrO run, shared by the tests that inspect it."""
    output = tmp_path_factory.mktemp("uninterrupted")
    recorder = RecordingRecorder()
    pair = make_pair()
    initial_policy = pair.policy_tensors()
    trainer = run(output, recorder=recorder, pair=pair, snapshot_every=1)
    return trainer, recorder, initial_policy, output


def test_two_iterations_with_a_programmatic_judge(two_iterations):
    trainer, recorder, initial_policy, output = two_iterations
    metrics = read_metrics(output)
    steps = [m for m in metrics if "step" in m]
    iterations = [m for m in metrics if m.get("event") == "iteration"]
    assert [m["mode"] for m in steps] == ["adamw", "adamw", "zopro", "zopro"]  # first order, then guided
    assert [m["step"] for m in steps] == [0, 1, 2, 3]
    assert [m["iteration"] for m in iterations] == [0, 1]
    for m in steps[2:]:
        assert math.isfinite(m["J_plus"]) and math.isfinite(m["J_minus"]) and m["g"] != 0
        assert 0 <= m["alpha"] < 1 and m["lr"] == trainer.config.lr
    for m in steps:
        assert math.isfinite(m["reward"]) and math.isfinite(m["kl"]) and m["seconds"] > 0
    for m in iterations:
        # ties (no preference) carry no label: dropped and counted
        assert m["pairs"] + m["judge_ties"] == trainer.chunk_size and m["judge_failures"] == 0
        assert m["pair_accuracy_after"] >= m["pair_accuracy_before"]  # refinement fits its pairs
    # the policy moved in both iterations, the reward adapter too
    assert any(not torch.equal(initial_policy[k], v) for k, v in recorder.tensors("policy", 0).items())
    assert any(not torch.equal(recorder.tensors("policy", 0)[k], v) for k, v in recorder.tensors("policy", 1).items())
    # recorder: both roles at the start and once per iteration, the policy also every step
    assert [(r, i, s) for r, _, i, s in recorder.calls if r == "reward"] == [("reward", -1, 0), ("reward", 0, 2),
                                                                           ("reward", 1, 4)]
    assert [(i, s) for r, _, i, s in recorder.calls if r == "policy"] == [(-1, 0), (0, 1), (0, 2), (1, 3), (1, 4)]
    assert all(torch.equal(initial_policy[k], v) for k, v in recorder.tensors("policy", -1).items())
    assert set(recorder.tensors("reward", 1)) == set(recorder.tensors("policy", 1)) == set(trainer.pair.policy_parameters)
    state = load_checkpoint(os.path.join(output, "checkpoint.pt"))
    assert state["next_iteration"] == 2 and state["global_step"] == 4


def test_guidance_maps_reward_and_policy_deltas_to_the_right_tensors(two_iterations):
    trainer, recorder, _, _ = two_iterations
    state = trainer.zo.state_dict()
    names = [slot for slot, _ in trainer.pair.named_policy_parameters()]
    checked = 0
    for index, slot in enumerate(names):
        entry = state["state"][index]
        expected_pi = recorder.tensors("policy", 1)[slot] - recorder.tensors("policy", 0)[slot]
        expected_r = recorder.tensors("reward", 1)[slot] - recorder.tensors("reward", 0)[slot]
        assert entry["policy_delta"].shape == trainer.pair.policy_parameters[slot].shape
        torch.testing.assert_close(entry["policy_delta"], expected_pi, rtol=0, atol=1e-7)
        torch.testing.assert_close(entry["reward_delta"], expected_r, rtol=0, atol=1e-7)
        checked += bool(expected_r.abs().max() > 0)
    assert checked > len(names) // 2  # ΔR is nonzero on most tensors, so a mix-up would show
    # the slot keys name the same module for both adapters
    model = trainer.pair.model
    for slot, parameter in trainer.pair.policy_parameters.items():
        module_path, matrix = slot.rsplit(".", 1)
        module = model.get_base_model().get_submodule(module_path)
        assert getattr(module, matrix)["policy"].weight is parameter
        assert getattr(module, matrix)["reward"].weight is trainer.pair.reward_parameters[slot]


class KillOnce:
    """A judge that raises KeyboardInterrupt (a kill) mid-way through iteration 1."""

    def __init__(self, output_dir):
        self.inner, self.output_dir, self.killed = word_count_judge(), output_dir, False
        self.score = self.inner.score

    def __call__(self, prompt, a, b):
        if not self.killed and os.path.exists(os.path.join(self.output_dir, "checkpoint.pt")):
            self.killed = True
            raise KeyboardInterrupt
        return self.inner(prompt, a, b)


def test_kill_and_resume_gives_the_uninterrupted_weights(two_iterations, tmp_path):
    reference, _, _, reference_dir = two_iterations
    judge = KillOnce(str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, judge=judge, snapshot_every=1)
    assert load_checkpoint(os.path.join(tmp_path, "checkpoint.pt"))["next_iteration"] == 1
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]
    resumed = run(tmp_path, judge=judge, resume=True, snapshot_every=1)  # a fresh model, as after a restart
    for role in ("policy", "reward"):
        expected = getattr(reference.pair, f"{role}_tensors")()
        got = getattr(resumed.pair, f"{role}_tensors")()
        assert all(torch.equal(got[k], expected[k]) for k in expected), role
    for key, value in reference.pair.value_head.state_dict().items():
        assert torch.equal(resumed.pair.value_head.state_dict()[key], value)
    # the metrics hold each step exactly once, as in the uninterrupted run
    drop = ("seconds", "peak_memory_bytes", "train_seconds")
    clean = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]
    assert clean(read_metrics(tmp_path)) == clean(read_metrics(reference_dir))


def test_failing_judges_are_skipped_and_counted_or_refused(tmp_path):
    calls = {"n": 0}

    def flaky(prompt, a, b):
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            raise RuntimeError("judge backend down")
        return 2 if calls["n"] % 3 == 1 else 1  # 2 is not a verdict

    trainer = run(tmp_path / "flaky", judge=flaky, iterations=1, steps_per_iteration=1)
    warm, it0 = [m for m in read_metrics(tmp_path / "flaky") if m.get("pairs") is not None]
    assert it0["judge_failures"] > 0
    assert it0["pairs"] + it0["judge_failures"] + it0["judge_ties"] == trainer.chunk_size
    assert trainer.counters["judge_failures"] == warm["judge_failures"] + it0["judge_failures"]
    with pytest.raises(JudgeError, match="every judge call failed.*returned 'x'"):
        run(tmp_path / "broken", judge=lambda p, a, b: "x", iterations=1, steps_per_iteration=1)


def test_nan_rewards_skip_steps_and_never_corrupt_a_checkpoint(tmp_path):
    pair = make_pair()
    with torch.no_grad():
        pair.value_head.linear.bias.fill_(float("nan"))
    trainer = run(tmp_path, pair=pair, iterations=1, reward_warmup=False, optimizer="zopro", first_iteration="spsa")
    steps = [m for m in read_metrics(tmp_path) if "step" in m]
    assert all(m.get("skipped") for m in steps) and trainer.counters["skipped_steps"] == len(steps)
    assert trainer.counters["nonfinite_reward_prompts"] == len(steps) * trainer.config.batch_prompts
    # refinement skipped every judged pair (ties never became pairs)
    assert trainer.counters["nonfinite_reward_pairs"] == trainer.chunk_size - trainer.counters["judge_ties"] > 0
    state = load_checkpoint(os.path.join(tmp_path, "checkpoint.pt"))
    assert all(torch.isfinite(t).all() for t in state["policy"].values())


def test_prompts_over_the_limit_are_skipped_and_all_over_is_an_error(tmp_path):
    long_prompt = " ".join(["film"] * 20)
    trainer = run(tmp_path / "some", iterations=1, steps_per_iteration=1, reward_warmup=False)
    assert trainer.counters["skipped_long_prompts"] == 0
    config = tiny_config(tmp_path / "all", iterations=1)
    with pytest.raises(ValueError, match="every prompt is over max_prompt_tokens=8"):
        train(config, pair=make_pair(), prompts=[long_prompt], judge=word_count_judge())
    from zopro_kernels.rloo.loop import RLOOTrainer

    mixed = RLOOTrainer(config, make_pair(), PROMPTS + [long_prompt], word_count_judge())
    assert mixed.counters["skipped_long_prompts"] == 1 and long_prompt not in mixed.prompts + mixed.eval_prompts


@pytest.mark.parametrize("optimizer", ["mezo", "adamw"])
def test_other_optimizer_modes_run_the_same_objective(tmp_path, optimizer):
    trainer = run(tmp_path, iterations=2, steps_per_iteration=1, optimizer=optimizer, first_iteration="spsa",
                  reward_warmup=False)
    modes = [m["mode"] for m in read_metrics(tmp_path) if "step" in m]
    assert modes == (["spsa", "spsa"] if optimizer == "mezo" else ["adamw", "adamw"])
    if optimizer == "mezo":  # unguided throughout: no Δπ, no ΔR handed over
        assert all("policy_delta" not in entry for entry in trainer.zo.state_dict()["state"].values())


def test_rescaled_guided_lr_keeps_the_first_guided_step_size(tmp_path):
    """η_t = lr·‖Δπ_0‖²/‖Δπ_{t−1}‖²: iteration 1 uses lr, iteration 2 the ratio from the weights."""
    recorder = RecordingRecorder()
    run(tmp_path, recorder=recorder, iterations=3, steps_per_iteration=1, rescale_guided_lr=True, reward_warmup=False,
        direction_norm="policy_delta")
    policy = {i: recorder.tensors("policy", i) for i in (-1, 0, 1)}
    squared = lambda a, b: sum(float((a[k].double() - b[k].double()).square().sum()) for k in a)
    first, second = squared(policy[0], policy[-1]), squared(policy[1], policy[0])
    lrs = [m["lr"] for m in read_metrics(tmp_path) if "step" in m]
    config = tiny_config(tmp_path)
    assert lrs[1] == config.lr
    assert lrs[2] == pytest.approx(config.lr * first / second, rel=1e-9) and first != second


def test_a_time_budget_ends_the_run_after_the_step_that_spends_it(tmp_path):
    trainer = run(tmp_path, time_budget_s=1e-9, iterations=3)
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records if "step" in r] == [0]  # one step, then the budget is spent
    (summary,) = [r for r in records if r.get("event") == "iteration"]
    assert summary["stopped"] == "time_budget" and summary["steps"] == 1 and "pairs" not in summary
    evals = [r for r in records if r.get("event") == "eval"]
    assert [(r["iteration"], r["global_step"]) for r in evals] == [(-1, 0), (0, 1)]
    assert evals[0]["train_seconds"] == 0 < evals[1]["train_seconds"] == summary["train_seconds"]
    assert load_checkpoint(os.path.join(tmp_path, "checkpoint.pt"))["next_iteration"] == 3  # nothing to resume
    assert trainer.history[-1]["stopped"] == "time_budget"
    with pytest.raises(ValueError, match="time_budget_s must be > 0"):
        tiny_config(tmp_path, time_budget_s=0)


def test_max_projected_grad_bounds_every_zo_step_of_the_loop(tmp_path):
    """The config's bound reaches the optimizer: with a bound far below the measured g, every ZO
    step logs g_clipped and moves θ by lr·bound·‖z‖ at most (‖z‖ = √d under "noise")."""
    bound = 1e-3
    recorder = RecordingRecorder()
    run(tmp_path, recorder=recorder, iterations=1, steps_per_iteration=2, optimizer="mezo", first_iteration="spsa",
        reward_warmup=False, spsa_lr=1.0, max_projected_grad=bound, snapshot_every=1)
    steps = [m for m in read_metrics(tmp_path) if "step" in m]
    assert steps and all(m["g_clipped"] == (abs(m["g"]) > bound) for m in steps)
    assert any(m["g_clipped"] for m in steps)
    snapshots = [t for role, t, _, _ in recorder.calls if role == "policy"]
    d = sum(t.numel() for t in snapshots[0].values())
    for before, after in zip(snapshots, snapshots[1:]):
        moved = math.sqrt(sum(float((after[k].double() - before[k].double()).square().sum()) for k in before))
        assert moved <= 1.0 * bound * math.sqrt(d) * 1.5  # ‖u‖/√d of one draw: within 1.5 for d in the thousands
    with pytest.raises(ValueError, match="max_projected_grad"):
        tiny_config(tmp_path, max_projected_grad=0.0)


@pytest.mark.parametrize("optimizer", ["mezo", "zpg"])
def test_the_backend_key_reaches_the_zo_passes(tmp_path, optimizer):
    from zopro_kernels.rloo.config import TrainConfig
    from zopro_kernels.rloo.loop import RLOOTrainer

    extra = dict(reward_model=False, reward_funcs=[]) if optimizer == "zpg" else {}
    config = tiny_config(tmp_path, optimizer=optimizer, backend="torch", **extra)
    trainer = RLOOTrainer(config, make_pair(), PROMPTS, word_count_judge())
    assert trainer.zo.backend == "torch"
    with pytest.raises(ValueError, match="backend 'jax'"):
        TrainConfig(**(tiny_config(tmp_path).to_dict() | {"backend": "jax"}))
