"""A resume refuses a config that would silently diverge from the checkpoint's run, lets the
bookkeeping keys change, accepts a named override (and logs it), and reads old checkpoints.

No training here: a checkpoint is the state of a freshly built trainer, saved as if after iteration 0.
"""

import dataclasses
import json
import os
import shutil

import pytest

from zopro_kernels.rloo.checkpoint import (RESUME_MAY_CHANGE, RESUME_MUST_MATCH, RESUME_NOT_OVERRIDABLE,
                                           load_checkpoint, resume_differences, save_checkpoint)
from zopro_kernels.rloo.config import RENAMED, TrainConfig
from zopro_kernels.rloo.loop import RLOOTrainer

from .helpers import PROMPTS, make_pair, tiny_config, word_count_judge

STEP_0 = {"iteration": 0, "step": 0, "mode": "adamw", "J": 1.0}
STEP_1 = {"iteration": 1, "step": 1, "mode": "zopro", "J": 2.0}  # the interrupted iteration: dropped on resume


def trainer(output, **overrides) -> RLOOTrainer:
    return RLOOTrainer(tiny_config(output, **overrides), make_pair(), PROMPTS, word_count_judge())


def checkpointed(output, edit_config=None, **overrides):
    """A checkpoint after iteration 0 (``edit_config``: changes its stored config) and metrics
    with a record of iteration 0 and one of the interrupted iteration 1."""
    state = trainer(output, **overrides).state() | {"next_iteration": 1, "global_step": 1}
    if edit_config:
        state["config"] = edit_config(state["config"])
    save_checkpoint(state, os.path.join(output, "checkpoint.pt"))
    with open(os.path.join(output, "metrics.jsonl"), "w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in (STEP_0, STEP_1))


def metrics(output) -> list[dict]:
    with open(os.path.join(output, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def test_the_key_lists_split_every_config_key():
    keys = [f.name for f in dataclasses.fields(TrainConfig)]
    assert not set(RESUME_MUST_MATCH) & set(RESUME_MAY_CHANGE)
    # a new key must be put in one list on purpose (resume compares an unlisted one anyway)
    assert sorted(RESUME_MUST_MATCH + RESUME_MAY_CHANGE) == sorted(keys)
    assert set(RESUME_NOT_OVERRIDABLE) <= set(RESUME_MUST_MATCH)
    assert {"output_dir", "progress", "plot", "report_to", "logging_dir", "threads", "device", "save_adapters",
            "time_budget_s", "iterations"} <= set(RESUME_MAY_CHANGE)
    assert {"model", "seed", "optimizer", "lora_r", "lora_targets", "lr", "eps", "num_generations", "batch_prompts",
            "steps_per_iteration", "alpha", "objective", "beta", "granularity",
            "direction_norm"} <= set(RESUME_MUST_MATCH)


def test_a_changed_trajectory_key_refuses_naming_every_difference_with_both_values(tmp_path):
    checkpointed(tmp_path)
    with pytest.raises(ValueError) as refused:
        trainer(tmp_path, lr=0.5, eps=2e-3, num_generations=3, seed=7).resume()
    message = str(refused.value)
    for text in ("lr (checkpoint 0.01, config 0.5)", "eps (checkpoint 0.001, config 0.002)",
                 "num_generations (checkpoint 2, config 3)", "seed (checkpoint 0, config 7)",
                 "--resume-override num_generations,lr,eps", "['seed'] cannot be changed on resume"):
        assert text in message, (text, message)
    assert metrics(tmp_path) == [STEP_0, STEP_1]  # nothing was touched
    # every key the issue names (and the rest of the list) is compared, one change at a time
    stored = load_checkpoint(str(tmp_path / "checkpoint.pt"))["config"]
    for key, value in {"batch_prompts": 4, "steps_per_iteration": 3, "alpha": "constant", "objective": "reinforce",
                       "beta": 0.5, "granularity": "global", "direction_norm": "policy_delta",
                       "lora_targets": ["q_proj"],
                       "prompt_fraction": 0.25, "reward_lr": 0.5, "eval_prompts": 3, "temperature": 0.7}.items():
        changed = tiny_config(tmp_path, **{key: value})
        assert list(resume_differences(stored, changed)) == [key]
        assert resume_differences(stored, changed)[key] == (stored[key], value)


def test_bookkeeping_keys_may_change_and_the_run_may_move(tmp_path):
    checkpointed(tmp_path / "before")
    moved = tmp_path / "moved"  # the run directory copied elsewhere: output_dir differs
    shutil.copytree(tmp_path / "before", moved)
    resumed = trainer(moved, progress=True, plot=True, save_adapters=False, report_to="none", threads=1,
                      logging_dir=str(tmp_path / "tb"), device="cpu", time_budget_s=100.0, iterations=5,
                      snapshot_every=1, cache_dir=str(tmp_path / "cache"))
    assert resumed.resume() and resumed.next_iteration == 1
    assert metrics(moved) == [STEP_0]  # no override event: nothing of the trajectory changed


def test_an_override_resumes_takes_effect_and_is_logged(tmp_path):
    checkpointed(tmp_path)
    with pytest.raises(ValueError, match=r"differs from the checkpoint's in eps \(checkpoint 0.001, config 0.002\);"):
        trainer(tmp_path, lr=0.5, eps=2e-3).resume(override="lr")  # only what is named is accepted
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['learning_rate'\]"):
        trainer(tmp_path).resume(override=["learning_rate"])
    with pytest.raises(ValueError, match=r"\['lora_r'\] cannot be changed on resume"):
        trainer(tmp_path).resume(override="lora_r")
    resumed = trainer(tmp_path, lr=0.5, eps=2e-3, reward_lr=0.25, num_generations=3)
    assert resumed.resume(override=["lr,eps", "reward_lr", "k"])  # k: the old name of num_generations
    # the optimizers' restored settings are this config's, not the checkpoint's
    assert resumed.zo.param_groups[0]["eps"] == 2e-3 and resumed.reward_adamw.param_groups[0]["lr"] == 0.25
    records = metrics(tmp_path)
    assert records[:-1] == [STEP_0]  # the interrupted iteration dropped, then the override logged
    assert records[-1] == {"event": "resume_override", "iteration": 1, "global_step": 1, "changed": {
        "num_generations": {"checkpoint": 2, "config": 3}, "lr": {"checkpoint": 0.01, "config": 0.5},
        "eps": {"checkpoint": 0.001, "config": 0.002}, "reward_lr": {"checkpoint": 0.01, "config": 0.25}}}


def test_old_checkpoints_compare_through_the_renames_and_the_defaults(tmp_path):
    new_to_old = {new: old for old, new in RENAMED.items()}

    def as_written_long_ago(config):  # the old key names, and no keys that came later
        config = {new_to_old.get(key, key): value for key, value in config.items()}
        for key in ("num_iterations", "reward_funcs", "directions", "eval_split"):
            del config[key]
        return config

    checkpointed(tmp_path, edit_config=as_written_long_ago)
    stored = load_checkpoint(str(tmp_path / "checkpoint.pt"))["config"]
    assert {"k", "max_new_tokens", "eval_samples"} <= set(stored) and "num_iterations" not in stored
    assert trainer(tmp_path).resume()  # k=2 is num_generations=2; the missing keys had their defaults
    with pytest.raises(ValueError, match=r"num_generations \(checkpoint 2, config 3\), "
                                         r"num_iterations \(checkpoint 1, config 2\)"):
        trainer(tmp_path, num_generations=3, num_iterations=2).resume()
