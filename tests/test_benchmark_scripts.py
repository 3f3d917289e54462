"""The benchmark scripts run end to end (tiny shapes, CPU) and write their results."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# autouse: one torch thread for tiny models, restored after each test (the scripts' --threads must not leak)
from tests.rloo.conftest import one_cpu_thread  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


def test_bench_passes_smoke(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_passes
        from lora_shapes import lora_shapes
    finally:
        sys.path.pop(0)
    assert len(lora_shapes("llama-3.2-1b")) == 224
    assert sum(a * b for a, b in lora_shapes("llama-3.2-1b")) == 45_088_768
    assert len(lora_shapes("llama-3.1-8b")) == 448
    assert sum(a * b for a, b in lora_shapes("llama-3.1-8b")) == 167_772_160
    rows = bench_passes.main(["--arch", "tiny", "--device", "cpu", "--backend", "torch", "--reps", "2",
                              "--out", str(tmp_path)])
    (result,) = tmp_path.glob("passes-*.json")
    data = json.loads(result.read_text())
    assert data["environment"]["torch"] and len(data["results"]) == len(rows) == 14
    assert all(r["median_ms"] > 0 for r in rows)
    assert result.with_suffix(".md").read_text().count("| tiny |") == 14


def test_guided_vs_unguided_example(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "python" / "guided_vs_unguided.py"), "--steps", "120"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    assert "guided ZOPrO" in out and "unguided SPSA" in out


# -- shared results format ---------------------------------------------------------------------

def _bench(name):
    """A module of benchmarks/ (not a package: the scripts import each other by file name)."""
    import importlib

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


ENV_FIELDS = {"date", "command", "argv", "torch", "triton", "transformers", "bitsandbytes", "gpu", "driver", "device"}


def test_results_files_record_the_machine_and_the_exact_command(tmp_path):
    results_io = _bench("results_io")
    argv = results_io.command_argv("/x/benchmarks/bench_step.py", ["--arch", "tiny", "--out", "a b"])
    assert argv == ["benchmarks/bench_step.py", "--arch", "tiny", "--out", "a b"]
    env = results_io.environment("cpu", argv)
    assert ENV_FIELDS <= env.keys() and env["gpu"] is None and env["driver"] is None
    assert env["command"] == "benchmarks/bench_step.py --arch tiny --out 'a b'"  # shell-quoted: runnable as is
    stem = results_io.results_stem(tmp_path, "step", env, "nf4")
    assert stem.name == f"step-cpu-nf4-{env['date']}"
    path = results_io.write_results(stem, env, [{"a": 1}], "| a |\n", extra=[2])
    data = json.loads(path.read_text())
    assert data == {"environment": env, "results": [{"a": 1}], "extra": [2]}
    assert stem.with_suffix(".md").read_text() == "| a |\n"


# -- bench_step ---------------------------------------------------------------------------------

def test_tiny_step_models_have_the_lora_shapes_of_their_arch():
    pytest.importorskip("peft")
    step_models, lora_shapes = _bench("step_models"), _bench("lora_shapes")
    pair = step_models.policy_and_reward(step_models.random_llama("tiny", device="cpu"), r=8, alpha=16)
    shapes = lora_shapes.lora_shapes("tiny", rank=8)
    assert sorted(tuple(p.shape) for p in pair.policy_parameters.values()) == sorted(shapes)


def test_nf4_base_is_quantised_and_adapted_by_peft_bitsandbytes_layers():
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    step_models = _bench("step_models")
    model = step_models.random_llama("tiny", "nf4", device="cpu")
    linears = [m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in linears) == 14  # 7 per layer; the output head stays
    pair = step_models.policy_and_reward(model, r=4, alpha=8)
    layer = pair.model.get_base_model().model.layers[0].mlp.down_proj
    assert type(layer).__module__.startswith("peft.tuners.lora.bnb")
    logits = pair.model(input_ids=torch.randint(3, 512, (2, 6))).logits
    assert logits.shape == (2, 6, 512) and torch.isfinite(logits).all()


def test_bench_step_smoke_writes_json_markdown_and_plot(tmp_path):
    pytest.importorskip("peft")
    bench_step = _bench("bench_step")
    rows = bench_step.main(["--arch", "tiny", "--base", "bf16", "--device", "cpu", "--batch", "2", "--prompt-len", "6",
                            "--new-tokens", "3", "--k", "2", "--micro-batch", "2", "--reps", "1", "--warmup", "0",
                            "--methods", "zopro", "published", "adamw", "--backend", "torch", "--threads", "1",
                            "--out", str(tmp_path)])
    (path,) = tmp_path.glob("step-cpu-*.json")
    data = json.loads(path.read_text())
    assert ENV_FIELDS <= data["environment"].keys() and "--methods zopro published adamw" in data["environment"]["command"]
    assert [r["method"] for r in data["results"]] == ["zopro", "published", "adamw"] == [r["method"] for r in rows]
    for r in rows:
        assert r["step_with_generation_ms"] == pytest.approx(r["step_ms"] + r["generation_ms"])
        assert r["samples_per_s"] == pytest.approx(4 / (r["step_ms"] / 1e3))  # 2 prompts × k=2 per step
        # the forward passes timed alone: 3 scoring passes (measured in the step) + J once (AdamW) or twice (ZO)
        forwards = r["score_ms"] + (1 if r["method"] == "adamw" else 2) * r["plain_forward_ms"]
        assert r["non_forward_share"] == pytest.approx((r["step_ms"] - forwards) / r["step_ms"])
        assert r["trainable_values"] == sum(a * b for a, b in _bench("lora_shapes").lora_shapes("tiny"))
        assert r["memory_kind"].startswith("cpu")
    targets = {t["target"] for t in data["targets"]}
    assert targets == {"non-forward share of a ZOPrO step ≤ 2 %", "ZOPrO update ≤ 1.05 × two plain forwards",
                       "ZOPrO samples/s ≥ 1.5 × adamw"}  # no memory target from CPU RSS
    assert path.with_suffix(".md").read_text().count("| tiny | bf16 |") == 3 + 3
    assert path.with_suffix(".png").stat().st_size > 1000


def test_step_targets_say_by_how_much_they_are_missed():
    bench_step = _bench("bench_step")
    common = {"arch": "a", "base": "bf16", "memory_kind": "cuda max_memory_allocated"}
    rows = [common | {"method": "zopro", "non_forward_share": 0.05, "update_over_plain_forwards": 1.0,
                      "peak_memory_bytes": 30, "samples_per_s": 20.0},
            common | {"method": "adamw", "non_forward_share": 0.5, "update_over_plain_forwards": 3.0,
                      "peak_memory_bytes": 100, "samples_per_s": 10.0},
            common | {"method": "adamw-ckpt", "error": "out of memory"}]
    checks = {c["target"]: c for c in bench_step.target_checks(rows)}
    assert checks["non-forward share of a ZOPrO step ≤ 2 %"]["shortfall"] == pytest.approx(0.03)
    assert checks["ZOPrO update ≤ 1.05 × two plain forwards"]["met"] is True
    assert checks["ZOPrO peak memory ≤ 0.5 × adamw"]["value"] == pytest.approx(0.3)
    assert checks["ZOPrO samples/s ≥ 1.5 × adamw"]["met"] is True and checks["ZOPrO samples/s ≥ 1.5 × adamw"]["value"] == 2.0
    assert checks["ZOPrO peak memory ≤ 0.5 × adamw-ckpt"]["met"] is None  # first order did not fit at all


def test_step_results_of_several_commands_merge_into_one_file(tmp_path):
    bench_step = _bench("bench_step")
    stem = tmp_path / "step-gpu-2026-01-01"
    earlier = [{"arch": "a", "base": "bf16", "method": m, "step_ms": 1.0} for m in ("zopro", "adamw")]
    stem.with_suffix(".json").write_text(json.dumps({"environment": {"command": "first"}, "results": earlier,
                                                     "settings": {"batch": 64}}))
    fresh = [{"arch": "a", "base": "bf16", "method": "adamw", "step_ms": 2.0},
             {"arch": "a", "base": "nf4", "method": "zopro", "step_ms": 3.0}]
    rows, environments = bench_step.merged_rows(stem, fresh, {"batch": 64})
    assert [(r["base"], r["method"], r["step_ms"]) for r in rows] == [
        ("bf16", "zopro", 1.0), ("bf16", "adamw", 2.0), ("nf4", "zopro", 3.0)]  # re-measured rows replaced
    assert environments == [{"command": "first"}]
    with pytest.raises(SystemExit, match="other settings"):
        bench_step.merged_rows(stem, fresh, {"batch": 32})
    assert bench_step.merged_rows(tmp_path / "none", fresh, {}) == (fresh, [])


# -- bench_budget -------------------------------------------------------------------------------

def test_budget_search_doubles_then_bisects_to_the_threshold():
    search = _bench("bench_budget").largest_fitting_batch
    tried = []

    def fits(batch):
        tried.append(batch)
        return batch <= 37

    result = search(fits)
    # 1..32 fit, 64 does not; then (32+64)//2 = 48 ✗, 40 ✗, 36 ✓, 38 ✗, 37 ✓
    assert tried == [1, 2, 4, 8, 16, 32, 64, 48, 40, 36, 38, 37]
    assert (result.largest, result.first_failure, result.complete) == (37, 38, True)
    assert result.trials[:2] == [(1, True), (2, True)] and result.trials[6] == (64, False)

    tried.clear()
    assert search(fits, start=64).largest == 37 and tried == [64, 32, 48, 40, 36, 38, 37]
    tried.clear()
    assert search(fits, start=3, limit=20).largest == 20 and tried == [3, 6, 12, 20]  # the limit is tried last
    tried.clear()
    assert search(fits, start=8, resolution=8).largest == 32 and tried == [8, 16, 32, 64, 48, 40]
    never = search(lambda b: False, start=4)
    assert (never.largest, never.first_failure, [b for b, _ in never.trials]) == (0, 1, [4, 2, 1])


def test_budget_search_stopped_early_is_a_marked_lower_bound():
    bench_budget = _bench("bench_budget")
    calls = []

    def fits(batch):
        calls.append(batch)
        if len(calls) > 3:
            raise bench_budget.StopSearch
        return True

    result = bench_budget.largest_fitting_batch(fits)
    assert (result.largest, result.complete, len(result.trials)) == (4, False, 3)
    with pytest.raises(ValueError):
        bench_budget.largest_fitting_batch(fits, start=0)


def test_bench_budget_refuses_without_a_gpu_unless_dry_run(tmp_path):
    bench_budget = _bench("bench_budget")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the cap is possible")
    with pytest.raises(SystemExit, match="needs a CUDA device"):
        bench_budget.main(["--arch", "tiny", "--device", "cpu", "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())
    pytest.importorskip("peft")
    rows = bench_budget.main(["--arch", "tiny", "--device", "cpu", "--dry-run", "--batch", "1", "--prompt-len", "4",
                              "--new-tokens", "2", "--k", "2", "--methods", "zopro", "--max-batch", "2",
                              "--check-batch", "2", "--check-micro-batch", "2", "--generation-batch", "4", "--threads", "1",
                              "--out", str(tmp_path)])
    (path,) = tmp_path.glob("budget-cpu-*.json")
    data = json.loads(path.read_text())
    assert data["dry_run"] is True and data["budget_gib"] is None and ENV_FIELDS <= data["environment"].keys()
    search, check = data["results"]
    assert [t["batch"] for t in search["trials"]] == [1, 2] and search["largest_batch"] == 2 == len(rows)
    assert check == check | {"check_batch": 2, "micro_batch": 2, "fitted": True}
    assert data["models"][0]["generation"]["rows"] == 4


# -- bench_reward -------------------------------------------------------------------------------

def _write_metrics(path, evals, *, last_iteration):
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{"iteration": 0, "step": 0, "mode": "adamw", "J": 0.1}]  # step records are skipped
    for i, (step, seconds, score) in enumerate(evals):
        records.append({"event": "eval", "iteration": i - 1, "task_score": score, "train_seconds": seconds,
                        "global_step": step})
        if i:
            records.append({"event": "iteration", "iteration": i - 1, "eval_task_score": score})
    assert records[-1]["iteration"] == last_iteration
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


# (step, training seconds, held-out score) after 0, 1, 2 iterations; AdamW's steps take 3× as long
SYNTHETIC = {
    "zopro": {0: [(0, 0, .10), (4, 60, .20), (8, 120, .30)], 1: [(0, 0, .20), (4, 60, .20), (8, 120, .35)],
              2: [(0, 0, .30), (4, 60, .40), (8, 120, .40)]},
    "mezo": {0: [(0, 0, .10), (4, 60, .10), (8, 120, .15)], 1: [(0, 0, .20), (4, 60, .20), (8, 120, .20)],
             2: [(0, 0, .30), (4, 60, .35), (8, 120, .40)]},
    "adamw": {0: [(0, 0, .10), (4, 180, .30), (8, 360, .40)], 1: [(0, 0, .20), (4, 180, .25), (8, 360, .30)],
              2: [(0, 0, .30), (4, 180, .30), (8, 360, .50)]},
}


def test_reward_aggregation_matches_hand_computed_values(tmp_path):
    bench_reward = _bench("bench_reward")
    runs = {}
    for method, by_seed in SYNTHETIC.items():
        for seed, evals in by_seed.items():
            path = tmp_path / f"{method}-seed{seed}" / "metrics.jsonl"
            _write_metrics(path, evals, last_iteration=1)
            assert bench_reward.finished({"output_dir": str(path.parent), "iterations": 2})
            assert not bench_reward.finished({"output_dir": str(path.parent), "iterations": 3})
            runs.setdefault(method, {})[seed] = bench_reward.read_evals(path)
    result = bench_reward.aggregate(runs)
    zo, mezo, adamw = (result["methods"][m] for m in ("zopro", "mezo", "adamw"))
    assert (result["step_budget"], result["time_budget_s"]) == (8, 120)  # the shortest run's training time
    approx = pytest.approx
    # ZOPrO gains .20, .15, .10 in 120 s = 1/30 h: 6.0, 4.5, 3.0 per hour
    assert (zo["gain"]["mean"], zo["gain"]["std"]) == (approx(0.15), approx(0.05))
    assert (zo["gain_per_hour"]["mean"], zo["gain_per_hour"]["std"]) == (approx(4.5), approx(1.5))
    # AdamW gains .30, .10, .20 in 360 s = 0.1 h: 3, 1, 2 per hour
    assert (adamw["gain_per_hour"]["mean"], adamw["gain_per_hour"]["std"]) == (approx(2.0), approx(1.0))
    assert (mezo["gain_at_equal_steps"]["mean"], mezo["gain_at_equal_steps"]["std"]) == (approx(0.05), approx(0.05))
    # at T = 120 s AdamW has only its start evaluation: no gain yet
    assert adamw["gain_at_time_budget"]["mean"] == approx(0.0) and zo["gain_at_time_budget"]["mean"] == approx(0.15)
    assert zo["start"]["mean"] == approx(0.2) and zo["steps"]["mean"] == 8
    paired = {(p["versus"], p["quantity"]): p for p in result["paired"]}
    # ZOPrO − AdamW per hour, seed by seed: 3, 3.5, 1 → mean 2.5, std √1.75
    assert paired["adamw", "gain_per_hour"]["mean"] == approx(2.5)
    assert paired["adamw", "gain_per_hour"]["std"] == approx(1.75 ** 0.5)
    checks = {c["target"]: c for c in bench_reward.target_checks(result)}
    assert checks["ZOPrO held-out gain per hour ≥ first-order RLOO's"]["met"] is True
    assert checks["ZOPrO held-out gain at equal steps ≥ MeZO's"]["short_by"] == 0.0

    at_200 = bench_reward.aggregate(runs, time_budget_s=200)  # AdamW read at its 180 s evaluation: .2, .05, 0
    assert at_200["methods"]["adamw"]["gain_at_time_budget"]["mean"] == approx(0.25 / 3)
    assert at_200["methods"]["adamw"]["gain_at_time_budget"]["std"] == approx(0.0108333 ** 0.5, rel=1e-4)
    worse = bench_reward.aggregate({"zopro": runs["mezo"], "mezo": runs["zopro"]})
    (check,) = bench_reward.target_checks(worse)
    assert check["met"] is False and check["short_by"] == approx(0.10)


def test_reward_evaluations_need_the_training_time(tmp_path):
    bench_reward = _bench("bench_reward")
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"event": "eval", "iteration": -1, "task_score": 0.3}) + "\n")
    with pytest.raises(ValueError, match="train_seconds"):
        bench_reward.read_evals(path)
    assert bench_reward.mean_std([0.5]) == {"mean": 0.5, "std": None, "n": 1}


def test_bench_reward_runs_the_loop_and_aggregates(tmp_path):
    pytest.importorskip("peft")
    pytest.importorskip("vaderSentiment")
    yaml = pytest.importorskip("yaml")
    from tests.rloo.helpers import PROMPTS, make_base

    model, tokenizer = make_base(seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    config = {"model": str(tmp_path / "model"), "prompts": str(tmp_path / "prompts.jsonl"), "judge": "vader",
              "k": 2, "max_new_tokens": 3, "max_prompt_tokens": 8, "max_length": 32, "iterations": 2,
              "batch_prompts": 2, "steps_per_iteration": 1, "prompt_fraction": 0.25, "lora_r": 4, "lora_alpha": 8,
              "reward_epochs": 1, "eval_prompts": 4, "reward_warmup": False}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    bench_reward = _bench("bench_reward")
    args = ["--config", str(tmp_path / "config.yaml"), "--methods", "zopro", "--seeds", "3",
            "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "results")]
    result = bench_reward.main(args)
    log = (tmp_path / "runs" / "zopro-seed3" / "train.log").read_text()
    stats = result["methods"]["zopro"]
    assert stats["seeds"] == [3] and stats["steps"]["mean"] == 2, log
    assert 0 < stats["train_seconds"]["mean"] < 600
    (path,) = (tmp_path / "results").glob("reward-*.json")
    data = json.loads(path.read_text())
    assert data["config"]["eval_prompts"] == 4 and data["config"]["judge"] == "vader"
    assert len(data["evaluations"]["zopro"]["3"]) == 3 and data["runs"][0]["returncode"] == 0
    assert path.with_suffix(".png").stat().st_size > 1000
    again = bench_reward.main(args + ["--aggregate-only"])  # reads the finished run, runs nothing
    assert again["methods"]["zopro"]["final"] == stats["final"]
