"""SIGKILL of `zopro-train` (a subprocess) mid-iteration, inside a reward refinement and inside a
checkpoint write; `--resume` then ends bit for bit where the uninterrupted run ends.

The kills come from the loop's test-only hook (``checkpoint.kill_point``): the process SIGKILLs
itself at a named point when ZOPRO_TEST_KILL_<POINT>=<value> is set, so each kill lands at the
same place every time. The tiny task: iteration 0 first order, iteration 1 guided ZOPrO, two
steps each (global steps 0–3), the LLM judge on the tiny model.
"""

import glob
import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from zopro_kernels.rloo.checkpoint import load_checkpoint
from zopro_kernels.rloo.cli import main

from .test_cli import REPO, write_tiny_task

WALL_CLOCK = ("seconds", "train_seconds", "peak_memory_bytes")  # differ between processes, nothing else may


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The tiny task's config and its uninterrupted run (another string hash seed than the
    interrupted runs': nothing may depend on the order of a set)."""
    root = tmp_path_factory.mktemp("kill")
    config = write_tiny_task(root)
    values = yaml.safe_load(config.read_text()) | {"iterations": 2, "steps_per_iteration": 2, "plot": False}
    config.write_text(yaml.safe_dump(values))
    result = zopro_train(config, root / "uninterrupted", hash_seed=0)
    assert result.returncode == 0, result.stderr[-3000:]
    return config, root / "uninterrupted"


def zopro_train(config, output, *args, kill=None, hash_seed=1):
    """`zopro-train` in a fresh interpreter; ``kill``: {"AFTER_STEP": 2} sets ZOPRO_TEST_KILL_AFTER_STEP=2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZOPRO_TEST_KILL_")}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONHASHSEED": str(hash_seed)}
    env |= {f"ZOPRO_TEST_KILL_{point}": str(v) for point, v in (kill or {}).items()}
    command = [sys.executable, "-m", "zopro_kernels.rloo.cli", "--config", str(config), "--set", f"output_dir={output}",
               *args]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def killed(result):
    assert result.returncode == -9, result.stderr[-3000:]  # SIGKILL: no handler, no finally ran


def records(output) -> list[dict]:
    with open(os.path.join(output, "metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def without_wall_clock(rows) -> list[str]:
    """Each record as JSON without its wall-clock fields (JSON: NaN equals NaN)."""
    return [json.dumps({k: v for k, v in row.items() if k not in WALL_CLOCK}, sort_keys=True) for row in rows]


def assert_equal_states(got, expected, where="state"):
    """Tensors equal bit for bit (torch.equal), everything else equal, wall clock aside."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.dtype == expected.dtype and torch.equal(got, expected), where
    elif isinstance(expected, dict):
        assert set(got) == set(expected), (where, sorted(set(got) ^ set(expected)))
        for key, value in expected.items():
            if key not in WALL_CLOCK:
                assert_equal_states(got[key], value, f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), where
        for i, (a, b) in enumerate(zip(got, expected)):
            assert_equal_states(a, b, f"{where}[{i}]")
    else:
        assert json.dumps(got) == json.dumps(expected), (where, got, expected)


def assert_same_run(got, expected):
    """The checkpoints (adapters, value head, ZOPrO's master/Δπ/ΔR/snapshot/position, AdamW,
    counters, history), the exported final adapters and metrics.jsonl of two runs agree."""
    mine, theirs = (load_checkpoint(os.path.join(d, "checkpoint.pt")) for d in (got, expected))
    assert mine["next_iteration"] == 2 and mine["global_step"] == 4
    assert mine["zo"]["zopro"]["global_step"] == 2  # the ZO steps: iteration 1's
    arenas = {key for entry in mine["zo"]["state"].values() for key in entry}
    assert arenas == {"master", "policy_delta", "reward_delta", "snapshot"}  # all four are compared
    mine["config"].pop("output_dir"), theirs["config"].pop("output_dir")
    assert_equal_states(mine, theirs)
    for role in ("policy", "reward"):
        for file in glob.glob(os.path.join(expected, "adapters", "final", role, "*.safetensors")):
            other = os.path.join(got, "adapters", "final", role, os.path.basename(file))
            assert open(other, "rb").read() == open(file, "rb").read(), other
    rows = records(got)
    assert [r["step"] for r in rows if "event" not in r] == [0, 1, 2, 3]  # each step exactly once
    assert without_wall_clock(rows) == without_wall_clock(records(expected))
    assert not [f for f in os.listdir(got) if ".tmp" in f]


def test_a_kill_after_a_guided_step_mid_iteration_resumes_bit_for_bit(task, tmp_path):
    config, uninterrupted = task
    output = tmp_path / "run"
    # global step 2 is step 1 of 2 of iteration 1 (guided ZOPrO): its record written, then SIGKILL
    killed(zopro_train(config, output, kill={"AFTER_STEP": 2}))
    rows = records(output)
    assert rows[-1]["step"] == 2 and rows[-1]["mode"] == "zopro" and rows[-1]["step_in_iteration"] == 0
    assert load_checkpoint(str(output / "checkpoint.pt"))["next_iteration"] == 1  # iteration 0's
    with open(output / "metrics.jsonl", "a") as handle:  # and a record the crash tore half-way
        handle.write('{"iteration": 1, "rollout": 1, "mode": "zo')
    resumed = zopro_train(config, output, "--resume")  # a fresh process: it knows only the files
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "at iteration 1" in resumed.stdout
    assert_same_run(output, uninterrupted)


def test_kills_inside_the_refinement_and_inside_the_checkpoint_write_resume_bit_for_bit(task, tmp_path):
    config, uninterrupted = task
    output = tmp_path / "run"
    # iteration 1's steps done, its reward refinement has moved R: SIGKILL before anything of it is logged
    killed(zopro_train(config, output, kill={"IN_REFINEMENT": 1}))
    assert [r["step"] for r in records(output) if "event" not in r] == [0, 1, 2, 3]
    assert [r["iteration"] for r in records(output) if r.get("event") == "iteration"] == [0]
    # the rerun of iteration 1 ends; its checkpoint is written to the temporary file, not yet renamed: SIGKILL
    killed(zopro_train(config, output, "--resume", kill={"IN_CHECKPOINT": 2}))
    assert [r["iteration"] for r in records(output) if r.get("event") == "iteration"] == [0, 1]
    assert load_checkpoint(str(output / "checkpoint.pt"))["next_iteration"] == 1  # the old one, whole
    (stale,) = glob.glob(str(output / "checkpoint.pt.tmp-*"))  # the new one, never renamed
    assert load_checkpoint(stale)["next_iteration"] == 2
    # resumed here, in a process that has already run the task once (its global RNG has moved on)
    assert main(["--config", str(config), "--resume", "--set", f"output_dir={output}"]) == 0
    assert_same_run(output, uninterrupted)
