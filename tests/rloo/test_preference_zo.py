"""The preference-only modes (zpg, zbcpg, zorank; guided) through the loop on the tiny Llama.

Two iterations of each mode with a simulated human (Bradley–Terry on a word count), a kill and
resume that gives the uninterrupted weights bit for bit, the VADER and LLM pairwise judges, the
config's checks and bench_reward's method list.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

import pytest
import torch

from zopro_kernels.rloo.checkpoint import load_checkpoint
from zopro_kernels.rloo.cli import build_judge, train
from zopro_kernels.rloo.config import TrainConfig
from zopro_kernels.rloo.judges import LLMPairwiseJudge, SimulatedHumanJudge, vader_judge

from .helpers import PROMPTS, make_base, make_pair, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def word_score(prompt, response):
    words = response.split()
    return words.count("good") + words.count("great") - words.count("bad") - words.count("awful")


class Judge:
    """A simulated human that can be killed once (KeyboardInterrupt) after the first checkpoint."""

    def __init__(self, output_dir=None, seed=0):
        self.inner = SimulatedHumanJudge(word_score, tau=0.5, seed=seed)
        self.output_dir, self.killed, self.batches = output_dir, False, 0

    def _maybe_kill(self):
        if (self.output_dir and not self.killed
                and os.path.exists(os.path.join(self.output_dir, "checkpoint.pt"))):
            self.killed = True
            raise KeyboardInterrupt

    def score(self, prompt, response):
        return self.inner.score(prompt, response)

    def judge_batch(self, prompts, first, second, *, queries=1, seed=0):
        self._maybe_kill()
        self.batches += 1
        return self.inner.judge_batch(prompts, first, second, queries=queries, seed=seed)

    def __call__(self, prompt, a, b):
        return self.inner(prompt, a, b)


MODES = {
    "zpg": dict(optimizer="zpg"),
    "zpg-two-sided": dict(optimizer="zpg", two_sided=True),
    "zbcpg": dict(optimizer="zbcpg", blocks=2),
    "zorank": dict(optimizer="zorank", rank_policies=3),
    "zpg-guided": dict(optimizer="zpg", guided=True),
}


def settings(name, **overrides):
    return dict(reward_model=False, judge_queries=2, lr=1e-3, eps=1e-2) | MODES[name] | overrides


class Recorder:
    def __init__(self):
        self.calls = []

    def record(self, role, tensors, iteration, step):
        self.calls.append((role, {k: v.clone() for k, v in tensors.items()}, iteration, step))


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def run(output_dir, name, *, judge=None, resume=False, recorder=None, pair=None, **overrides):
    config = tiny_config(output_dir, **settings(name, **overrides))
    return train(config, pair=pair or make_pair(), prompts=PROMPTS, judge=judge or Judge(), recorder=recorder,
                 resume=resume)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One uninterrupted two-iteration run of each mode (shared by the tests that inspect them)."""
    done = {}
    for name in MODES:
        output = tmp_path_factory.mktemp(name)
        pair, recorder = make_pair(), Recorder()
        before = {"policy": pair.policy_tensors(), "reward": pair.reward_tensors(),
                  "value_head": {k: v.clone() for k, v in pair.value_head.state_dict().items()}}
        trainer = run(output, name, recorder=recorder, pair=pair, snapshot_every=1)
        done[name] = (trainer, recorder, before, output)
    return done


@pytest.mark.parametrize("name", list(MODES))
def test_two_iterations_of_each_mode(runs, name):
    trainer, recorder, before, output = runs[name]
    config = trainer.config
    metrics = read_metrics(output)
    steps = [m for m in metrics if "step" in m and "event" not in m]
    mode = config.optimizer
    expected_modes = [mode, mode] + ([mode + "+guided"] * 2 if config.guided else [mode] * 2)
    assert [m["mode"] for m in steps] == expected_modes and [m["step"] for m in steps] == [0, 1, 2, 3]
    assert [m["iteration"] for m in metrics if m.get("event") == "iteration"] == [0, 1]
    policies = config.rank_policies if mode == "zorank" else 2
    pairs_per_prompt = policies * (policies - 1) // 2 if mode == "zorank" else 1
    for m in steps:
        assert m["peak_memory_bytes"] > 0 and m["seconds"] > 0 and m["judge_failures"] == 0 and m["updated"]
        assert m["judge_queries"] == config.batch_prompts * pairs_per_prompt * config.judge_queries
        assert math.isfinite(m["g"]) and math.isfinite(m["task_score"]) and m["lr"] == config.lr
        assert "J" not in m and "reward" not in m  # no RLOO objective, no reward
    if mode == "zorank":
        assert all(len(m["rank_weights"]) == policies for m in steps)
    # the policy moved at every step whose estimate is not 0 (a tie of the judge's draws can make it
    # 0: p̂ = ½); the reward adapter and the value head were never trained
    policy_steps = [tensors for role, tensors, _, _ in recorder.calls if role == "policy"]
    moved = [any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(policy_steps, policy_steps[1:])]
    signal = [any(abs(v) > 1e-9 for v in m.get("block_g", m.get("rank_weights", [m["g"]]))) for m in steps]
    assert moved == signal and sum(moved) >= 2
    assert all(torch.equal(v, before["reward"][k]) for k, v in trainer.pair.reward_tensors().items())
    assert all(torch.equal(v, before["value_head"][k]) for k, v in trainer.pair.value_head.state_dict().items())
    assert load_checkpoint(os.path.join(output, "checkpoint.pt"))["global_step"] == 4
    evaluations = [m for m in metrics if m.get("event") == "eval"]
    assert len(evaluations) == 3 and all(math.isfinite(m["task_score"]) for m in evaluations)
    assert trainer.adamw is None  # no first-order iteration 0 in these modes


def test_zbcpg_moves_only_the_blocks_of_each_step(runs):
    trainer, recorder, _, output = runs["zbcpg"]
    steps = [m for m in read_metrics(output) if "step" in m and "event" not in m]
    slots = list(trainer.pair.policy_parameters)  # the optimizer's order
    policy_steps = [tensors for role, tensors, _, _ in recorder.calls if role == "policy"]
    for record, (a, b) in zip(steps, zip(policy_steps, policy_steps[1:])):
        windows = record["blocks"]
        assert len(windows) == 2 and len(record["block_g"]) == 2
        allowed = {slots[i] for w in windows for i in range(2 * w, min(2 * w + 2, len(slots)))}
        changed = {k for k in a if not torch.equal(a[k], b[k])}
        assert changed and changed <= allowed, (changed, allowed)


def test_guided_iterations_start_along_the_last_update(runs):
    steps = [m for m in read_metrics(runs["zpg-guided"][3]) if "step" in m and "event" not in m]
    assert [m["alpha"] for m in steps[:2]] == [0.0, 0.0]  # iteration 0: no Δπ yet
    assert steps[2]["alpha"] == pytest.approx(1 - 1e-3) and 0 < steps[3]["alpha"] < steps[2]["alpha"]
    unguided = [m for m in read_metrics(runs["zpg"][3]) if "step" in m and "event" not in m]
    assert all(m["alpha"] == 0.0 for m in unguided)


@pytest.mark.parametrize("name", ["zpg", "zbcpg", "zorank", "zpg-guided"])
def test_kill_and_resume_gives_the_uninterrupted_weights(runs, tmp_path, name):
    reference, _, _, reference_dir = runs[name]
    judge = Judge(str(tmp_path))
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, name, judge=judge, snapshot_every=1)
    assert load_checkpoint(os.path.join(tmp_path, "checkpoint.pt"))["next_iteration"] == 1
    resumed = run(tmp_path, name, judge=judge, resume=True, snapshot_every=1)  # a fresh model, as after a restart
    expected, got = reference.pair.policy_tensors(), resumed.pair.policy_tensors()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert torch.equal(resumed.zo.state_dict()["state"][0]["master"], reference.zo.state_dict()["state"][0]["master"])
    drop = ("seconds", "peak_memory_bytes", "train_seconds")
    clean = lambda rows: [{k: v for k, v in r.items() if k not in drop} for r in rows]  # noqa: E731
    assert clean(read_metrics(tmp_path)) == clean(read_metrics(reference_dir))


def test_vader_and_the_llm_pairwise_judge_drive_the_new_modes(tmp_path):
    vader = pytest.importorskip("vaderSentiment")  # noqa: F841
    trainer = run(tmp_path / "vader", "zpg", judge=vader_judge(), iterations=1, steps_per_iteration=3,
                  batch_prompts=4, max_completion_length=8)
    steps = [m for m in read_metrics(tmp_path / "vader") if "step" in m and "event" not in m]
    # VADER is deterministic: asked once per pair, its verdict repeated judge_queries times
    assert all(m["judge_queries"] == 8 and m["judge_failures"] == 0 for m in steps)
    assert math.isfinite(trainer.history[-1]["eval_task_score"])
    model, tokenizer = make_base(seed=3)
    llm = LLMPairwiseJudge(model, tokenizer, use_chat_template=False)
    run(tmp_path / "llm", "zorank", judge=llm, iterations=1)
    steps = [m for m in read_metrics(tmp_path / "llm") if "step" in m and "event" not in m]
    assert all(m["judge_queries"] == 2 * 3 * 2 and m["judge_failures"] == 0 for m in steps)
    assert any(m["judge_ties"] < m["judge_queries"] for m in steps)  # the LLM decided some pairs


def test_every_judge_call_failing_is_an_error(tmp_path):
    def failing(prompt, a, b):
        raise RuntimeError("judge offline")

    with pytest.raises(Exception, match="every judge call failed"):
        run(tmp_path, "zpg", judge=failing, iterations=1)


def test_config_checks_of_the_preference_modes():
    base = dict(model="unused", prompts="unused", reward_model=False)
    for mode in ("zpg", "zbcpg", "zorank"):
        assert TrainConfig(optimizer=mode, **base).optimizer == mode
        with pytest.raises(ValueError, match="reward_model: false"):
            TrainConfig(optimizer=mode, model="unused", prompts="unused")
        with pytest.raises(ValueError, match="leave reward_funcs empty"):
            TrainConfig(optimizer=mode, reward_funcs=["judge"], **base)
        with pytest.raises(ValueError, match="num_iterations"):
            TrainConfig(optimizer=mode, num_iterations=2, **base)
    with pytest.raises(ValueError, match="guided applies to the preference-only modes"):
        TrainConfig(optimizer="zopro", guided=True)
    with pytest.raises(ValueError, match="rank_policies"):
        TrainConfig(optimizer="zorank", two_sided=True, rank_policies=3, **base)
    for key, bad in (("link", "probit"), ("trim_delta", 0.5), ("trim_delta", 0.0), ("judge_queries", 0),
                     ("perturbation", "uniform"), ("judge_temperature", 0.0), ("blocks", 0)):
        with pytest.raises(ValueError, match=key):
            TrainConfig(optimizer="zpg", **base, **{key: bad})
    judge = build_judge(TrainConfig(optimizer="zpg", judge="simulated:tests.rloo.test_preference_zo:word_score",
                                    judge_temperature=0.25, seed=5, **base))
    assert isinstance(judge, SimulatedHumanJudge) and judge.tau == 0.25 and judge.seed == 5
    assert judge.score("p", "good good bad") == 1.0
    with pytest.raises(ValueError, match="simulated:<vader"):
        build_judge(TrainConfig(judge="human"))


def test_bench_reward_takes_the_preference_methods():
    spec = importlib.util.spec_from_file_location("bench_reward_for_test", os.path.join(REPO, "benchmarks",
                                                                                        "bench_reward.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert set(bench.PREFERENCE_METHODS) <= set(bench.METHODS)
    assert bench.parse_args([]).methods == ["zopro", "mezo", "adamw"]
    assert bench.parse_args(["--methods", "zpg", "zorank"]).methods == ["zpg", "zorank"]
    base = TrainConfig(reward_model=False, reward_funcs=["judge"], num_iterations=4, steps_per_iteration=3).to_dict()
    for method in bench.PREFERENCE_METHODS:
        config = TrainConfig.from_dict(bench.method_config(base, {"zpg": {"guided": True, "lr": 0.5}}, method, 0,
                                                           "/tmp/runs", 1, 1))
        assert config.optimizer == method and not config.reward_model and config.reward_funcs == []
        assert config.num_iterations == 1 and config.steps_per_iteration == 12  # equal optimisation steps
        assert config.start_from.endswith("start-seed0")
        assert config.guided == (method == "zpg")
    with pytest.raises(SystemExit, match="reward-mode functions"):
        bench.main(["--reward-mode", "model", "--methods", "zpg", "--aggregate-only"])
