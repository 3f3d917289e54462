"""The RLOO loop data parallel over processes (gloo, CPU): weights stay identical on every process,
first-order updates equal one process holding all the examples, metrics are reduced, rank 0 alone
writes, disagreements are errors, and the command line runs under torchrun."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .helpers import PROMPTS, make_pair, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _init(rank, world, store):
    os.environ.setdefault("TRITON_INTERPRET", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)


class RankJudge:
    """Scores every completion with the process's rank: the reduced mean over two equal shares is 0.5."""

    def __init__(self, rank):
        self.rank = rank

    def score(self, prompt, response):
        return float(self.rank)

    def __call__(self, prompt, a, b):
        return int(len(a) < len(b))  # a verdict that depends on the samples (both orders occur)


class Recorder:
    def __init__(self):
        self.calls = 0

    def record(self, role, tensors, iteration, step):
        self.calls += 1


def _loop_worker(rank, world, store, out, optimizer):
    _init(rank, world, store)
    from zopro_kernels.rloo.cli import train

    recorder = Recorder()
    config = tiny_config(out / "run", optimizer=optimizer, batch_prompts=2 * world, reward_batch_size=3)
    trainer = train(config, pair=make_pair(), prompts=PROMPTS, judge=RankJudge(rank), recorder=recorder)
    pair = trainer.pair
    final = {**{f"policy/{k}": v for k, v in pair.policy_tensors().items()},
             **{f"reward/{k}": v for k, v in pair.reward_tensors().items()},
             **{f"head/{k}": v.detach().clone() for k, v in pair.value_head.state_dict().items()}}
    torch.save({"final": final, "recorder_calls": recorder.calls, "counters": trainer.counters,
                "zo_bytes": trainer.zo.communicated_bytes if trainer.zo is not None else 0},
               out / f"rank{rank}.pt")
    dist.barrier()  # tear the group down together (a rank exiting early can abort the other)
    dist.destroy_process_group()


def test_data_parallel_loop_keeps_processes_identical_and_reduces_metrics(tmp_path, optimizer="zopro"):
    world = 2
    mp.spawn(_loop_worker, args=(world, tmp_path / "store", tmp_path, optimizer), nprocs=world)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    initial = make_pair()
    start = {**{f"policy/{k}": v for k, v in initial.policy_tensors().items()},
             **{f"reward/{k}": v for k, v in initial.reward_tensors().items()}}
    for key, value in results[0]["final"].items():
        assert torch.equal(value, results[1]["final"][key]), key  # bit-identical on both processes
    assert any(not torch.equal(results[0]["final"][k], v) for k, v in start.items() if k.startswith("policy/"))
    assert any(not torch.equal(results[0]["final"][k], v) for k, v in start.items() if k.startswith("reward/"))
    assert results[0]["counters"] == results[1]["counters"]
    assert results[0]["recorder_calls"] > 0 and results[1]["recorder_calls"] == 0  # rank 0 records
    # rank 0 alone wrote the outputs: each step once, with metrics reduced over both processes
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == [0, 1, 2, 3]
    assert [r["mode"] for r in steps] == ["adamw", "adamw", "zopro" if optimizer == "zopro" else "spsa",
                                          "zopro" if optimizer == "zopro" else "spsa"]
    assert all(r["processes"] == world and r["task_score"] == 0.5 for r in steps)
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["task_score"] for r in evals] == [0.5, 0.5, 0.5]
    iterations = [r for r in records if r.get("event") == "iteration"]
    # pairs: every process judged its share of the iteration's prompts (18 training prompts × 0.5 → 5 + 4)
    assert [r["pairs"] for r in iterations] == [9, 9]
    assert (tmp_path / "run" / "checkpoint.pt").exists()
    assert sorted(os.listdir(tmp_path / "run" / "adapters")) == ["final", "iteration-0", "iteration-1"]  # rank 0
    # the ZO steps sent 32 bytes each (J₊, J₋, seed, step), plus one 40-byte layout check (seed, step,
    # numel, count, shape/dtype hash)
    assert results[0]["zo_bytes"] == 2 * 32 + 40


def _refine_worker(rank, world, store, out, counts):
    _init(rank, world, store)
    from zopro_kernels.rloo.parallel import DataParallel
    from zopro_kernels.rloo.refine import reward_optimizer, refine_reward_model

    pair = make_pair()
    offset = sum(counts[:rank])
    pairs = _pairs().subset(torch.arange(offset, offset + counts[rank]))
    losses = refine_reward_model(pair, pairs, reward_optimizer(pair, 1e-2), epochs=2, batch_size=3, seed=5,
                                 parallel=DataParallel())
    torch.save({"reward": pair.reward_tensors(), "losses": losses}, out / f"refine{rank}.pt")
    dist.barrier()  # tear the group down together (a rank exiting early can abort the other)
    dist.destroy_process_group()


def _pairs(n=7):
    from zopro_kernels.rloo.refine import PreferencePairs

    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(3, 30, (2 * n, 6), generator=generator)
    mask = torch.ones_like(ids)
    mask[1::3, :2] = 0  # some left padding
    return PreferencePairs(ids[:n], mask[:n], ids[n:], mask[n:])


@pytest.mark.parametrize("counts", [(4, 3), (7, 0), (2, 2, 3)])
def test_split_refinement_equals_one_process_holding_every_pair(tmp_path, counts):
    """The reward model's update (and so ΔR) does not depend on how the pairs are split."""
    from zopro_kernels.rloo.refine import reward_optimizer, refine_reward_model

    world = len(counts)
    mp.spawn(_refine_worker, args=(world, tmp_path / "store", tmp_path, counts), nprocs=world)
    pair = make_pair()
    losses = refine_reward_model(pair, _pairs(), reward_optimizer(pair, 1e-2), epochs=2, batch_size=3, seed=5)
    expected = pair.reward_tensors()
    results = [torch.load(tmp_path / f"refine{r}.pt") for r in range(world)]
    for result in results:
        assert len(result["losses"]) == len(losses) == 6
        assert torch.allclose(torch.tensor(result["losses"]), torch.tensor(losses), rtol=1e-5, atol=1e-6)
        for key, value in expected.items():
            assert torch.allclose(result["reward"][key], value, rtol=1e-4, atol=1e-6), key
            assert torch.equal(result["reward"][key], results[0]["reward"][key])


def _disagreement_worker(rank, world, store, out):
    _init(rank, world, store)
    from zopro_kernels.rloo.loop import RLOOTrainer
    from .helpers import word_count_judge

    messages = {}
    cases = {"config": (dict(lr=1e-2 * (1 + rank)), PROMPTS, 0),
             "prompt list": ({}, PROMPTS[rank:], 0),
             "base model weights": ({}, PROMPTS, rank),
             "multiple": (dict(batch_prompts=3), PROMPTS, 0)}
    for name, (overrides, prompts, seed) in cases.items():
        try:
            RLOOTrainer(tiny_config(out / name, **overrides), make_pair(seed=seed), prompts, word_count_judge())
            messages[name] = None
        except (RuntimeError, ValueError) as error:
            messages[name] = str(error)
    torch.save(messages, out / f"messages{rank}.pt")
    dist.barrier()  # tear the group down together (a rank exiting early can abort the other)
    dist.destroy_process_group()


def test_processes_that_disagree_are_an_error_on_every_process(tmp_path):
    mp.spawn(_disagreement_worker, args=(2, tmp_path / "store", tmp_path), nprocs=2)
    for rank in range(2):
        messages = torch.load(tmp_path / f"messages{rank}.pt")
        for what in ("config", "prompt list", "base model weights"):
            assert messages[what] is not None and f"disagree on the {what}: ranks [1]" in messages[what]
        assert "must be a multiple of the number of processes (2)" in messages["multiple"]


def test_zopro_train_runs_under_torchrun(tmp_path):
    """The command line itself, two processes launched by torchrun (gloo on a CPU machine)."""
    from .test_cli import write_tiny_task

    config = write_tiny_task(tmp_path)
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "zopro_kernels.rloo.cli", "--config", str(config),
               "--set", "judge=vader", "iterations=2", "batch_prompts=4", "plot=false"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("| iteration | mode |") == 1  # the summary is printed by rank 0 only
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    steps = [r for r in records if "step" in r]
    assert [(r["step"], r["mode"], r["processes"]) for r in steps] == [(0, "adamw", 2), (1, "zopro", 2)]
    assert (tmp_path / "run" / "checkpoint.pt").exists()
