"""The loop's outputs in the ecosystem's formats: peft adapters, TensorBoard scalars, the run's
progress bar; checkpoints written under the old key names still resume and start runs."""

import contextlib
import io
import math
import os
import shutil
import sys
import warnings

import pytest
import torch

from zopro_kernels.rloo.checkpoint import atomic_directory, load_checkpoint, save_checkpoint
from zopro_kernels.rloo.config import RENAMED
from zopro_kernels.rloo.loop import RLOOTrainer

from .helpers import PROMPTS, make_base, make_pair, tiny_config, word_count_judge
from .test_loop import RecordingRecorder, read_metrics, run

INPUT = torch.tensor([[3, 5, 7, 11, 13, 17, 19, 23], [4, 6, 8, 10, 12, 14, 16, 18]])
MASK = torch.ones_like(INPUT)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A two-iteration ZOPrO run with adapters, TensorBoard and the progress bar (its stderr kept)."""
    pytest.importorskip("tensorboard")
    output = tmp_path_factory.mktemp("exported")
    recorder = RecordingRecorder()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        trainer = run(output, recorder=recorder, report_to=["tensorboard"], progress=True)
    return trainer, recorder, output, stderr.getvalue()


def policy_logits(model):
    with torch.no_grad():
        return model(input_ids=INPUT, attention_mask=MASK).logits


def load_peft(directory):
    from peft import PeftModel

    base, _ = make_base(seed=0)  # a fresh copy of the tiny base
    return PeftModel.from_pretrained(base, str(directory)).eval()


def test_adapters_load_with_peft_on_a_fresh_base_and_give_the_trained_outputs(exported):
    from zopro_kernels.rloo.logprobs import reward_scores
    from zopro_kernels.rloo.models import ValueHead

    trainer, recorder, output, _ = exported
    adapters = output / "adapters"
    assert sorted(os.listdir(adapters)) == ["final", "iteration-0", "iteration-1"]  # no temporary left
    # final: the trained policy, as the loop ends
    with trainer.pair.adapter(trainer.pair.policy_adapter):
        expected = policy_logits(trainer.pair.model)
    assert torch.equal(policy_logits(load_peft(adapters / "final" / "policy")), expected)
    # iteration 0: the policy as recorded at the end of iteration 0 (it moved on in iteration 1)
    at_iteration_0 = make_pair()
    at_iteration_0.load_adapter_tensors("policy", recorder.tensors("policy", 0))
    expected_0 = policy_logits(at_iteration_0.model)
    assert not torch.equal(expected_0, expected)
    assert torch.equal(policy_logits(load_peft(adapters / "iteration-0" / "policy")), expected_0)
    # the reward model: its adapter on a fresh base, and the value head saved beside it, score as trained
    reward = load_peft(adapters / "final" / "reward")
    head = ValueHead.from_pretrained(str(adapters / "final" / "reward"))
    with torch.no_grad():
        hidden = reward(input_ids=INPUT, attention_mask=MASK, output_hidden_states=True).hidden_states[-1]
        scores = head(hidden[:, -1])
        assert torch.allclose(scores, reward_scores(trainer.pair, INPUT, MASK), rtol=0, atol=1e-6)
    assert not torch.equal(policy_logits(reward), expected)  # the reward adapter is not the policy's


def test_a_failed_export_leaves_the_previous_directory_whole(exported, monkeypatch):
    trainer, _, output, _ = exported
    final = output / "adapters" / "final"
    before = {p: p.read_bytes() for p in final.rglob("*") if p.is_file()}
    assert {p.name for p in before} >= {"adapter_config.json", "adapter_model.safetensors", "value_head.safetensors"}

    def crash(directory):
        raise KeyboardInterrupt  # a kill after both adapters were written, before the value head

    monkeypatch.setattr(trainer.pair.value_head, "save_pretrained", crash)
    with torch.no_grad():
        next(iter(trainer.pair.policy_parameters.values())).add_(1.0)  # the next export would differ
    with pytest.raises(KeyboardInterrupt):
        trainer.export_adapters("final")
    assert {p: p.read_bytes() for p in final.rglob("*") if p.is_file()} == before
    assert sorted(os.listdir(output / "adapters")) == ["final", "iteration-0", "iteration-1"]
    with torch.no_grad():
        next(iter(trainer.pair.policy_parameters.values())).sub_(1.0)


def test_atomic_directory_replaces_whole_and_recovers_from_a_kill_between_renames(tmp_path):
    target = tmp_path / "final"
    with atomic_directory(str(target)) as scratch:
        open(os.path.join(scratch, "a"), "w").write("1")
        assert not target.exists()  # nothing under the name until the block ends
    with atomic_directory(str(target)) as scratch:
        open(os.path.join(scratch, "b"), "w").write("2")
    assert os.listdir(target) == ["b"] and os.listdir(tmp_path) == ["final"]
    os.replace(target, tmp_path / ".final.old-1")  # a kill after moving the old one aside
    os.makedirs(tmp_path / ".final.tmp-1")  # ... and its unfinished successor
    with pytest.raises(RuntimeError):
        with atomic_directory(str(target)):
            raise RuntimeError
    assert os.listdir(target) == ["b"] and os.listdir(tmp_path) == ["final"]


def expected_scalars(output) -> list:
    """(tag, step, value) for every scalar of metrics.jsonl, worked out here independently."""
    expected, step = [], 0
    for record in read_metrics(output):
        if "event" not in record:
            step = record["step"]
            expected += [(f"train/{key}", step, float(value)) for key, value in record.items()
                         if key != "step" and isinstance(value, (int, float))]
            step += 1
        elif record["event"] == "eval":
            expected.append((f"eval/{record['split']}/task_score", record["global_step"], record["task_score"]))
        else:
            assert record["global_step"] == step
            expected += [(f"{record['event']}/{key}", step, float(value)) for key, value in record.items()
                         if key != "global_step" and isinstance(value, (int, float))]
    return sorted(expected, key=lambda e: e[:2])


def assert_tensorboard_is_metrics_jsonl(output):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert len([f for f in os.listdir(output / "runs") if f.startswith("events.out.tfevents.")]) == 1
    accumulator = EventAccumulator(str(output / "runs"), size_guidance={"scalars": 0})
    accumulator.Reload()
    got = sorted(((tag, e.step, e.value) for tag in accumulator.Tags()["scalars"] for e in accumulator.Scalars(tag)),
                 key=lambda e: e[:2])
    expected = expected_scalars(output)
    assert [g[:2] for g in got] == [e[:2] for e in expected]  # every scalar, each once
    for (tag, step, value), (_, _, logged) in zip(expected, got):
        same = math.isnan(value) and math.isnan(logged) or logged == pytest.approx(value, rel=1e-6, abs=1e-30)
        assert same, (tag, step, logged, value)
    return {tag for tag, _, _ in expected}


def test_tensorboard_holds_every_scalar_of_metrics_jsonl(exported):
    tags = assert_tensorboard_is_metrics_jsonl(exported[2])
    assert {"train/J", "train/reward", "train/kl", "iteration/eval_task_score", "iteration/pair_accuracy_after",
            "reward_warmup/bt_loss_last", "eval/held_out/task_score"} <= tags


def test_tensorboard_after_a_kill_and_resume_is_the_metrics_file_again(tmp_path):
    from .test_loop import KillOnce

    pytest.importorskip("tensorboard")
    judge = KillOnce(str(tmp_path))
    with pytest.raises(KeyboardInterrupt):  # killed in iteration 1, after its steps were logged
        run(tmp_path, judge=judge, report_to=["tensorboard"], save_adapters=False)
    run(tmp_path, judge=judge, resume=True, report_to=["tensorboard"], save_adapters=False)
    assert_tensorboard_is_metrics_jsonl(tmp_path)  # the rerun steps once, not twice


def test_one_progress_bar_over_the_whole_run_with_the_held_out_score(exported):
    trainer, _, _, stderr = exported
    total = trainer.config.iterations * trainer.optimizer_steps  # every step of every iteration
    lines = [line for line in stderr.replace("\r", "\n").splitlines() if line.strip()]
    assert total == 4 and all(line.startswith("zopro-train:") for line in lines)
    assert f" 0/{total} " in lines[0] and all(f"/{total} " in line for line in lines)  # one bar, from the start
    assert lines[-1].startswith(f"zopro-train: 100%") and f" {total}/{total} " in lines[-1]
    assert "it=1" in lines[-1] and f"held_out={trainer.history[-1]['eval_task_score']:.3f}" in lines[-1]


def test_no_outputs_off_rank_0_or_when_switched_off(tmp_path, capsys):
    from zopro_kernels.rloo.parallel import DataParallel

    pytest.importorskip("tensorboard")
    other = DataParallel()
    other.rank = 1  # rank 1 of a world of one: computes, writes nothing
    config = tiny_config(tmp_path / "rank1", iterations=1, steps_per_iteration=1, reward_warmup=False,
                         report_to="tensorboard", progress=True)
    RLOOTrainer(config, make_pair(), PROMPTS, word_count_judge(), parallel=other).run()
    assert sorted(os.listdir(tmp_path / "rank1")) == []
    run(tmp_path / "off", iterations=1, steps_per_iteration=1, reward_warmup=False, save_adapters=False)
    assert sorted(os.listdir(tmp_path / "off")) == ["checkpoint.pt", "metrics.jsonl"]  # report_to: none
    assert "zopro-train:" not in capsys.readouterr().err  # progress: false (tiny_config), and rank 1


def test_missing_tensorboard_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as when not installed
    with pytest.raises(ImportError, match=r"pip install tensorboard"):
        RLOOTrainer(tiny_config(tmp_path, report_to=["tensorboard"]), make_pair(), PROMPTS, word_count_judge())


def test_checkpoints_with_the_old_key_names_resume_and_start_runs(exported, tmp_path):
    _, _, output, _ = exported
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(output / "metrics.jsonl", old / "metrics.jsonl")
    state = load_checkpoint(str(output / "checkpoint.pt"))
    new_to_old = {new: name for name, new in RENAMED.items()}
    state["config"] = {new_to_old.get(key, key): value for key, value in state["config"].items()}
    assert {"k", "max_new_tokens", "eval_samples"} <= set(state["config"])  # as written before the rename
    save_checkpoint(state, str(old / "checkpoint.pt"))
    with warnings.catch_warnings():
        # a stored config is not the user's to fix: read silently
        warnings.filterwarnings("error", message="config key", category=FutureWarning)
        resumed = run(old, resume=True, save_adapters=False)  # both iterations done: nothing to rerun
        assert resumed.next_iteration == 2 and resumed.global_step == 4
        started = run(tmp_path / "new", start_from=str(old), iterations=3, save_adapters=False)
    steps = [r for r in read_metrics(tmp_path / "new") if "event" not in r]
    assert [r["step"] for r in steps] == [0, 1, 2, 3, 4, 5] and started.global_step == 6
    with pytest.raises(ValueError, match="it has num_generations=2, this config has 3"):
        run(tmp_path / "other", start_from=str(old), iterations=3, num_generations=3)


def test_tensorboard_restart_replaces_only_its_own_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    from zopro_kernels.rloo.tracking import TensorBoardLog

    foreign = tmp_path / "events.out.tfevents.0.another-run"
    foreign.write_bytes(b"another run's events")
    first = TensorBoardLog(str(tmp_path), [{"step": 0, "loss": 1.0}])
    first.close()
    mine = {f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents.")} - {foreign.name}
    assert len(mine) == 1
    second = TensorBoardLog(str(tmp_path), [{"step": 0, "loss": 1.0}, {"step": 1, "loss": 0.5}])
    second.close()
    now = {f for f in os.listdir(tmp_path) if f.startswith("events.out.tfevents.")}
    assert foreign.name in now and foreign.read_bytes() == b"another run's events"  # left alone
    assert not (mine & now) and len(now) == 2  # its own earlier file replaced by one new file


def test_the_config_docs_example_loads_the_exported_policy(exported, tmp_path, monkeypatch):
    """docs/config.md's example, run as written from a directory where runs/sentiment is this run."""
    import re
    import shutil

    _, _, output, _ = exported
    page = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "config.md")
    (block,) = re.findall(r"```python\n(.*?)```", open(page, encoding="utf-8").read(), flags=re.S)
    shutil.copytree(output / "adapters", tmp_path / "runs" / "sentiment" / "adapters")
    monkeypatch.chdir(tmp_path)
    base, _ = make_base(seed=0)
    namespace = {"base": base}
    exec(re.sub(r"(?m)^  ", "", block), namespace)  # the block is indented in a list item
    # the same adapter as this file's own loader reads (other tests here rewrite final/ in place)
    expected = policy_logits(load_peft(output / "adapters" / "final" / "policy"))
    assert torch.equal(policy_logits(namespace["policy"].eval()), expected)
    assert not torch.equal(expected, policy_logits(make_base(seed=0)[0]))  # an adapter, not the bare base
