"""The benchmark scripts run end to end (tiny shapes, CPU) and write their results."""

import json
import math
import os
import re
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
    assert result.name.startswith("passes-cpu-torch-")
    data = json.loads(result.read_text())
    assert data["environment"]["torch"] and len(data["results"]) == len(rows) == 15
    assert all(r["median_ms"] > 0 and r["ns/value"] > 0 for r in rows)
    assert [t["target"] for t in data["targets"]][0] == "guided perturb ≤ 100 ms"
    assert result.with_suffix(".md").read_text().count("| tiny |") == 15 + len(data["targets"])


def test_bench_passes_cpu_backends_and_thread_scaling_in_one_run(tmp_path):
    """--backend cpu torch --threads 1 2: every backend and baseline timed at each thread count in
    one process, one passes-cpu-<date> file with the scaling and the CPU targets ("auto" stands
    in for "cpu": the compiled backend where it is built, else the reference)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_passes
    finally:
        sys.path.pop(0)
    before = torch.get_num_threads()
    rows = bench_passes.main(["--arch", "tiny", "--device", "cpu", "--backend", "auto", "torch", "--threads", "1", "2",
                              "--reps", "1", "--out", str(tmp_path)])
    assert torch.get_num_threads() == before
    (result,) = tmp_path.glob("passes-*.json")
    assert re.fullmatch(r"passes-cpu-\d{4}-\d{2}-\d{2}\.json", result.name)
    data = json.loads(result.read_text())
    per_count = 1 + 2 * 11 + 3  # copy, 11 rows per backend, 3 baselines
    assert len(rows) == 2 * per_count and sorted({r["threads"] for r in rows}) == [1, 2]
    assert {r["backend"] for r in rows} == {None, "auto", "torch"}
    assert len(data["scaling"]) == per_count and all(s["speedup"] > 0 for s in data["scaling"])
    assert len(data["targets"]) == 2 * 3 and {t["threads"] for t in data["targets"]} == {2}
    text = result.with_suffix(".md").read_text()
    assert "Thread scaling (1 → 2 threads)" in text and "CPU targets" in text
    assert "| tiny | 2 | auto: zopro (fp32 guidance) perturb |" in text


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


# -- bench_reward and sweep ---------------------------------------------------------------------

def _eval(split, iteration, step, seconds, scores, per_prompt=2):
    """An evaluation record as ``RLOOTrainer.evaluate`` logs it."""
    return {"event": "eval", "split": split, "iteration": iteration, "task_score": sum(scores) / len(scores),
            "train_seconds": seconds, "global_step": step, "samples_per_prompt": per_prompt, "scores": scores}


def _write_jsonl(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_read_evals_takes_one_split_per_prompt_means_in_step_order(tmp_path):
    bench_reward = _bench("bench_reward")
    path = _write_jsonl(tmp_path / "metrics.jsonl", [
        {"iteration": 0, "step": 1, "mode": "adamw", "J": 0.1},  # step records are skipped
        _eval("held_out", -1, 0, 0.0, [0.0, 1.0, 0.5, 0.5]),
        _eval("validation", -1, 0, 0.0, [1.0, 1.0, 0.0, 0.0, 0.2, 0.4]),
        _eval("held_out", 1, 8, 20.0, [1.0, 0.0, 0.25, 0.25]),  # logged out of order: sorted by step
        {"event": "iteration", "iteration": 0, "eval_task_score": 0.5},
        _eval("held_out", 0, 4, 10.0, [0.2, 0.4, -1.0, 1.0]),
        _eval("validation", 0, 4, 10.0, [0.0, 0.0, 1.0, 1.0, 0.6, 0.8]),
        {"event": "iteration", "iteration": 0, "eval_task_score": 0.5},
    ])
    held_out = bench_reward.read_evals(path)
    assert [(e["iteration"], e["step"], e["seconds"]) for e in held_out] == [(-1, 0, 0.0), (0, 4, 10.0), (1, 8, 20.0)]
    assert [e["prompts"] for e in held_out] == [[0.5, 0.5], [pytest.approx(0.3), 0.0], [0.5, 0.25]]
    assert [e["score"] for e in held_out] == [0.5, pytest.approx(0.15), 0.375]
    validation = bench_reward.read_evals(path, "validation")
    assert [e["prompts"] for e in validation] == [[1.0, 0.0, pytest.approx(0.3)], [0.0, 1.0, pytest.approx(0.7)]]
    assert bench_reward.differences(validation[1], validation[0]) == [-1.0, 1.0, pytest.approx(0.4)]
    with pytest.raises(ValueError, match="different prompt sets"):
        bench_reward.differences(validation[0], held_out[0])
    # an eval record without a split is a held-out one (loops before the validation split)
    record = _eval("held_out", -1, 0, 0.0, [1.0, 0.0])
    untagged = _write_jsonl(tmp_path / "untagged.jsonl", [{k: v for k, v in record.items() if k != "split"}])
    assert bench_reward.read_evals(untagged)[0]["prompts"] == [0.5]
    with pytest.raises(ValueError, match="no validation evaluation"):
        bench_reward.read_evals(untagged, "validation")
    older = _write_jsonl(tmp_path / "older.jsonl", [{"event": "eval", "iteration": -1, "task_score": 0.3,
                                                    "train_seconds": 0.0, "global_step": 0}])
    with pytest.raises(ValueError, match="lack per-sample scores"):
        bench_reward.read_evals(older)


def test_interval_is_a_two_level_bootstrap_over_seeds_then_prompts():
    interval = _bench("bench_reward").interval
    assert interval({0: [0.3] * 5}) == {"mean": pytest.approx(0.3), "low": pytest.approx(0.3),
                                        "high": pytest.approx(0.3), "seeds": 1}
    # resampled means of four prompts are k/4 with k ~ Binomial(4, 1/4): P(0) = 0.32 > 2.5 %,
    # P(≥ 3/4) = 0.051 > 2.5 % > P(1) = 0.004, so the 95 % interval is [0, 0.75]
    one = interval({7: [0.0, 0.0, 0.0, 1.0]})
    assert one == {"mean": 0.25, "low": 0.0, "high": 0.75, "seeds": 1}
    # two seeds: resampling the seeds draws A twice (mean +1) or B twice (−1) a quarter of the time each;
    # resampling prompts alone would give the interval [0, 0]
    two = interval({0: [1.0, 1.0, 1.0], 1: [-1.0, -1.0, -1.0]})
    assert two == {"mean": 0.0, "low": -1.0, "high": 1.0, "seeds": 2}
    noisy = {0: [0.1, -0.3, 0.7, 0.2], 1: [0.5, 0.0, -0.1, 0.9], 2: [0.3, 0.3, -0.2, 0.4]}
    assert interval(noisy, seed=5) == interval(noisy, seed=5)
    assert interval(noisy, seed=5)["low"] < interval(noisy)["mean"] < interval(noisy, seed=5)["high"]
    assert interval({})["mean"] is None and interval({0: []})["low"] is None


def _ev(step, seconds, prompts):
    """A ``read_evals`` entry."""
    return {"iteration": None, "step": step, "seconds": seconds, "score": sum(prompts) / len(prompts),
            "prompts": prompts}


# per seed: a start run (step 0, then its end at step 4) shared by the methods; ZOPrO and MeZO then
# evaluate at steps 6 and 8, AdamW stops at step 6 (so the equal-steps budget is 6)
START = {0: [_ev(0, 0, [0.0, 0.2]), _ev(4, 40, [0.2, 0.4])], 1: [_ev(0, 0, [0.1, 0.3]), _ev(4, 40, [0.1, 0.5])]}
AFTER = {"zopro": {0: [_ev(6, 50, [0.4, 0.4]), _ev(8, 60, [0.6, 0.8])],
                   1: [_ev(6, 50, [0.3, 0.7]), _ev(8, 60, [0.5, 0.9])]},
         "mezo": {0: [_ev(6, 50, [0.2, 0.6]), _ev(8, 60, [0.3, 0.5])],
                  1: [_ev(6, 50, [0.1, 0.5]), _ev(8, 60, [0.2, 0.6])]},
         "adamw": {0: [_ev(6, 90, [0.5, 0.7])], 1: [_ev(6, 90, [0.4, 0.4])]}}


def _synthetic_runs(methods=("zopro", "mezo", "adamw")):
    return {m: {s: START[s] + AFTER[m][s] for s in (0, 1)} for m in methods}


def test_reward_aggregation_matches_hand_computed_values():
    bench_reward = _bench("bench_reward")
    approx = pytest.approx
    result = bench_reward.aggregate(_synthetic_runs(), {0: 4, 1: 4})
    assert result["step_budget"] == 6 and result["start_step"] == {0: 4, 1: 4}
    zo, mezo, adamw = (result["methods"][m] for m in ("zopro", "mezo", "adamw"))
    # ZOPrO, per prompt: from the start (step 0) to the end .6 .6 | .4 .6; over the ZO phase (from step 4)
    # .4 .4 | .4 .4; at equal steps (step 6) .4 .2 | .2 .4
    assert zo["gain"]["mean"] == approx(0.55) and zo["gain"]["low"] > 0.3 and zo["gain"]["high"] <= 0.6 + 1e-9
    assert zo["phase_gain"] == {"mean": approx(0.4), "low": approx(0.4), "high": approx(0.4), "seeds": 2}
    assert zo["gain_at_equal_steps"]["mean"] == approx(0.3)
    assert zo["per_seed"][0] | {"gain_interval": None} == {
        "start": approx(0.1), "parted": approx(0.3), "final": approx(0.7), "gain": approx(0.6),
        "phase_gain": approx(0.4), "gain_at_equal_steps": approx(0.3), "train_seconds": 60, "steps": 8,
        "gain_per_hour": approx(36.0), "gain_interval": None}  # 0.6 in 60 s
    assert zo["gain_per_hour"] == {"mean": approx(33.0), "std": approx(18 ** 0.5), "n": 2}  # 36 and 30
    assert (zo["start"]["mean"], zo["final"]["mean"], zo["train_seconds"]["mean"]) == (approx(0.15), approx(0.7), 60)
    # MeZO: .3 .3 | .1 .3 from the start, .1 everywhere over the phase, .2 .4 | 0 .2 at step 6
    assert (mezo["gain"]["mean"], mezo["phase_gain"]["mean"], mezo["gain_at_equal_steps"]["mean"]) == (
        approx(0.25), approx(0.1), approx(0.2))
    # AdamW ends at the budget: its gain is its gain at equal steps (.5 .5 | .3 .1)
    assert adamw["gain"]["mean"] == approx(0.35) == adamw["gain_at_equal_steps"]["mean"]
    assert adamw["phase_gain"]["mean"] == approx(0.2) and adamw["per_seed"][1]["steps"] == 6
    paired = {p["versus"]: p for p in result["paired"]}
    # each pair at the last step both evaluated at, whatever AdamW's end: ZOPrO − MeZO at step 8
    # .3 .3 | .3 .3; ZOPrO − AdamW at step 6: −.1 −.3 | −.1 .3
    assert paired["mezo"]["per_seed"] == {0: approx(0.3), 1: approx(0.3)} and paired["mezo"]["step"] == 8
    assert paired["mezo"]["mean"] == approx(0.3) and paired["mezo"]["quantity"] == "score_at_equal_steps"
    assert paired["adamw"]["per_seed"] == {0: approx(-0.2), 1: approx(0.1)} and paired["adamw"]["mean"] == approx(-0.05)
    assert paired["adamw"]["step"] == 6 and result["unpaired_at_equal_steps"] == []
    json.dumps(result)  # written as the results file

    checks = {c["target"]: c["met"] for c in bench_reward.target_checks(result)}
    assert checks == {"adamw held-out gain > 0, interval excluding 0": True,
                      "zopro held-out gain > 0, interval excluding 0": True,
                      "ZOPrO − MeZO at equal steps > 0, paired interval excluding 0": True}
    # better on the mean, but the paired interval holds 0 (AdamW's runs as the MeZO): not met
    mixed = _synthetic_runs(("zopro", "adamw"))
    mixed["mezo"] = mixed.pop("adamw")
    (mixed_check,) = [c for c in bench_reward.target_checks(bench_reward.aggregate(mixed, {0: 4, 1: 4}))
                      if c["target"].startswith("ZOPrO − MeZO")]
    assert mixed_check["value"]["low"] < 0 < mixed_check["value"]["high"] and mixed_check["met"] is False
    # a method whose iterations end elsewhere (here only at step 5) shares no evaluation with ZOPrO after
    # the start: said, not compared at step 4, and ZOPrO − MeZO stays at step 8
    short = _synthetic_runs(("zopro", "mezo"))
    short["zorank"] = {s: START[s] + [_ev(5, 45, [0.9, 0.9])] for s in (0, 1)}
    with_short = bench_reward.aggregate(short, {0: 4, 1: 4})
    assert [p["versus"] for p in with_short["paired"]] == ["mezo"] and with_short["paired"][0]["step"] == 8
    assert with_short["unpaired_at_equal_steps"] == ["zorank"] and with_short["step_budget"] == 4
    # a ZOPrO worse than MeZO (the two swapped): not met
    swapped = _synthetic_runs()
    swapped["zopro"], swapped["mezo"] = swapped["mezo"], swapped["zopro"]
    worse = bench_reward.aggregate(swapped, {0: 4, 1: 4})
    (paired_check,) = [c for c in bench_reward.target_checks(worse) if c["target"].startswith("ZOPrO − MeZO")]
    assert paired_check["value"]["mean"] == approx(-0.3) and paired_check["met"] is False  # at step 8
    # a MeZO 0.1 below ZOPrO on every prompt after the start: met, the interval collapsed on 0.1
    lower = _synthetic_runs(("zopro",))
    lower["mezo"] = {s: START[s] + [_ev(e["step"], e["seconds"], [v - 0.1 for v in e["prompts"]])
                                    for e in AFTER["zopro"][s]] for s in (0, 1)}
    better = bench_reward.aggregate(lower, {0: 4, 1: 4})
    assert better["step_budget"] == 8 and better["paired"][0]["low"] == approx(0.1)
    assert all(c["met"] for c in bench_reward.target_checks(better))
    # a gain interval reaching 0 is not "excluding 0"
    assert bench_reward.target_checks({"methods": {"adamw": {"gain": {"mean": 0.1, "low": 0.0, "high": 0.2}}},
                                       "paired": []})[0]["met"] is False
    with pytest.raises(ValueError, match="not before training"):
        bench_reward.aggregate({"zopro": {0: START[0][1:] + AFTER["zopro"][0]}}, {0: 4})


def test_reward_markdown_reports_every_method_and_interval():
    bench_reward, results_io = _bench("bench_reward"), _bench("results_io")
    result = bench_reward.aggregate(_synthetic_runs(), {0: 4, 1: 4})
    checks = bench_reward.target_checks(result)
    env = results_io.environment("cpu", ["benchmarks/bench_reward.py"])
    config = {"judge": "vader", "eval_prompts": 64, "num_generations_eval": 4,
              "prompts": "rotten-tomatoes-negative", "model": "smollm2-135m-instruct", "lora_r": 16,
              "steps_per_iteration": 3, "batch_prompts": 8, "num_generations": 4}
    table = bench_reward.markdown(result, checks, env, config, {"zopro": {"lr": 1e-6}}, "functions",
                                  [{"wall_seconds": 60.0}, {"wall_seconds": 120.0}])
    lines = table.splitlines()
    rows = {m: [line for line in lines if line.startswith(f"| {m} | ")] for m in result["methods"]}
    for method, m in result["methods"].items():
        assert bench_reward._ci(m["gain"]) in rows[method][0]
    assert rows["zopro"][0].startswith("| zopro | 0.150 ± 0.071 | 0.700 ± 0.000 | +0.550 [")
    assert "| +0.400 [+0.400, +0.400] | +0.300 [" in rows["zopro"][0]  # the ZO phase: 0.4 on every prompt
    assert rows["zopro"][0].endswith("| 60 ± 0 | 33.000 ± 4.243 |")
    assert "| +0.100 [+0.100, +0.100] | +0.200 [" in rows["mezo"][0]
    assert rows["adamw"][0].startswith("| adamw | 0.150 ± 0.071 | 0.500 ± 0.141 | +0.350 [")
    # the paired table, each pair at its last shared step: ZOPrO − MeZO +0.3 at step 8, ZOPrO − AdamW −0.05
    # (−0.2 and +0.1) at step 6
    assert rows["mezo"][1].startswith("| mezo | 8 | +0.300 [") and rows["mezo"][1].endswith("| +0.300, +0.300 |")
    assert rows["adamw"][1].startswith("| adamw | 6 | -0.050 [") and rows["adamw"][1].endswith("| -0.200, +0.100 |")
    assert "- zopro: seed 0: 0.100 → 0.300 → 0.700; seed 1: 0.200 → 0.300 → 0.700" in table
    assert "2 runs, 3 min in all (1.5 min per run" in table and "reward mode **functions**" in table
    assert '`{"zopro": {"lr": 1e-06}}`' in table and "gain at step 6 (the last all evaluated at)" in table
    assert table.count("| yes |") == 3 and table.count("| no |") == 0


def test_reward_settings_come_from_a_sweep_file_or_plain_json(tmp_path):
    bench_reward = _bench("bench_reward")
    (tmp_path / "sweep.json").write_text(json.dumps({"environment": {}, "results": {}, "chosen": {"zopro": {"lr": 3}}}))
    (tmp_path / "plain.json").write_text(json.dumps({"mezo": {"spsa_lr": 1e-5}}))
    assert bench_reward.load_settings(str(tmp_path / "sweep.json")) == {"zopro": {"lr": 3}}
    assert bench_reward.load_settings(str(tmp_path / "plain.json")) == {"mezo": {"spsa_lr": 1e-5}}
    assert bench_reward.load_settings(None) == {}
    base = {"lr": 1.0, "eps": 1e-3, "optimizer": "zopro", "iterations": 9, "eval_split": "both"}
    config = bench_reward.method_config(base, {"zopro": {"lr": 3}}, "zopro", 2, tmp_path, 1, zo_iterations=2)
    assert config | {"output_dir": None, "start_from": None} == base | {
        "lr": 3, "seed": 2, "iterations": 3, "eval_split": "held_out", "threads": 1, "progress": False, "plot": False,
        "save_adapters": False, "output_dir": None, "start_from": None}
    assert config["start_from"] == str(tmp_path / "start-seed2")
    assert config["output_dir"] == str(tmp_path / "zopro-seed2")
    start = bench_reward.start_config(base, {"num_iterations": 4}, 2, tmp_path, 1)
    assert (start["optimizer"], start["first_iteration"], start["iterations"], start["eval_split"]) == (
        "zopro", "adamw", 1, "both") and start["num_iterations"] == 4 and "start_from" not in start


def test_sweep_grids_points_and_choice(tmp_path):
    sweep = _bench("sweep")
    assert sweep.parse_grid("zopro:lr=1e-6,3e-6:eps=1e-4") == ("zopro", [{"lr": 1e-6, "eps": 1e-4},
                                                                         {"lr": 3e-6, "eps": 1e-4}])
    method, points = sweep.parse_grid("mezo:spsa_lr=1e-5,1e-4:eps=1e-3,1e-2:direction_norm=noise")
    assert method == "mezo" and all(isinstance(p["spsa_lr"], float) and isinstance(p["eps"], float) for p in points)
    assert [(p["spsa_lr"], p["eps"]) for p in points] == [(1e-5, 1e-3), (1e-5, 1e-2), (1e-4, 1e-3), (1e-4, 1e-2)]
    assert points[0]["direction_norm"] == "noise"
    assert sweep.parse_grid("adamw:adamw_lr=1e-3:rescale_guided_lr=true:directions=2")[1] == [
        {"adamw_lr": 1e-3, "rescale_guided_lr": True, "directions": 2}]
    for bad in ("sgd:lr=1e-3", "zopro", "zopro:lr", "zopro:lr=", "zopro:=1e-3"):
        with pytest.raises(SystemExit, match="--grid"):
            sweep.parse_grid(bad)

    grid = (sweep.parse_grid("zopro:lr=1e-6,3e-6,1e-5:eps=1e-5,1e-4,1e-3")[1]
            + sweep.parse_grid("zopro:lr=0.5,2:directions=1,2:direction_norm=noise,policy_delta")[1])
    names = [sweep.point_name("zopro", p) for p in grid]
    assert len(set(names)) == len(names) == 17
    assert all(re.fullmatch(r"[A-Za-z0-9._+-]+", n) for n in names), names
    assert names[0] == "sweep-zopro-lr1e-06-eps1e-05"

    results = {"zopro": [{"settings": {"lr": 1}, "gain": 0.1}, {"settings": {"lr": 2}, "gain": 0.3},
                         {"settings": {"lr": 3}, "gain": -0.2}],
               "mezo": [{"settings": {"spsa_lr": 1}, "gain": math.nan}, {"settings": {"spsa_lr": 2}, "gain": -0.5},
                        {"settings": {"spsa_lr": 3}, "gain": -0.4}],
               "adamw": []}
    assert sweep.choose(results) == {"zopro": {"lr": 2}, "mezo": {"spsa_lr": 3}}  # a NaN gain is never chosen

    start = _write_jsonl(tmp_path / "start.jsonl", [
        _eval("held_out", -1, 0, 0.0, [0.0, 0.0]), _eval("validation", -1, 0, 0.0, [0.0, 0.0, 0.0, 0.0]),
        _eval("validation", 0, 4, 5.0, [0.2, 0.4, 0.1, 0.1])])
    run = _write_jsonl(tmp_path / "run.jsonl", [json.loads(line) for line in start.read_text().splitlines()] + [
        _eval("validation", 1, 6, 8.0, [0.6, 0.4, 0.1, 0.3]), _eval("validation", 2, 8, 9.0, [0.5, 0.5, 0.3, 0.3])])
    # the run's last validation evaluation (per prompt .5, .3) over the start's last (.3, .1)
    gain = sweep.validation_gain({0: (run, start)})
    assert gain["gain"] == pytest.approx(0.2) and gain["start"] == pytest.approx(0.2)
    assert gain["final"] == pytest.approx(0.4) and gain["interval"]["low"] == pytest.approx(0.2)
    # two seeds: seed 1's start ends at (.0, .2), its run at (.3, −.1): gains +.3, −.3, mean 0;
    # the point's gain is the mean of the seeds' means, (0.2 + 0.0) / 2
    start1 = _write_jsonl(tmp_path / "start1.jsonl", [_eval("validation", 0, 4, 5.0, [0.0, 0.0, 0.2, 0.2])])
    run1 = _write_jsonl(tmp_path / "run1.jsonl", [_eval("validation", 1, 6, 8.0, [0.3, 0.3, -0.1, -0.1])])
    pooled = sweep.validation_gain({1: (run1, start1), 0: (run, start)})
    assert pooled["per_seed"] == pytest.approx({0: 0.2, 1: 0.0}) and list(pooled["per_seed"]) == [0, 1]
    assert pooled["gain"] == pytest.approx(0.1) and pooled["start"] == pytest.approx(0.15)
    assert pooled["final"] == pytest.approx(0.25) and pooled["interval"]["seeds"] == 2
    assert -0.3 <= pooled["interval"]["low"] < 0.1 < pooled["interval"]["high"] <= 0.3 + 1e-12  # seed 1 drawn twice, +.3 twice


def _tiny_task(tmp_path, settings: dict) -> Path:
    """The tiny Llama and the test prompts on disk, and a config file naming them (VADER judge)."""
    pytest.importorskip("peft")
    pytest.importorskip("vaderSentiment")
    yaml = pytest.importorskip("yaml")
    from tests.rloo.helpers import PROMPTS, make_base

    model, tokenizer = make_base(seed=0)
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS))
    config = {"model": str(tmp_path / "model"), "prompts": str(tmp_path / "prompts.jsonl"), "judge": "vader"}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config | settings))
    return tmp_path / "config.yaml"


def test_bench_reward_and_sweep_share_the_start_run(tmp_path):
    config = {"num_generations": 2, "max_completion_length": 3, "max_prompt_tokens": 8, "max_length": 32, "batch_prompts": 2,
              "steps_per_iteration": 1, "num_iterations": 2, "prompt_fraction": 0.25, "lora_r": 4, "lora_alpha": 8,
              "reward_epochs": 1, "eval_prompts": 4, "validation_prompts": 4, "num_generations_eval": 2,
              "reward_warmup": False, "threads": 1, "adamw_lr": 0.05, "lr": 0.01, "spsa_lr": 0.01, "eps": 0.01}
    config_path = _tiny_task(tmp_path, config)
    bench_reward, sweep = _bench("bench_reward"), _bench("sweep")
    runs, out = tmp_path / "runs", tmp_path / "results"
    common = ["--config", str(config_path), "--start-set", "num_iterations=3", "steps_per_iteration=1", "--threads", "1",
              "--runs-dir", str(runs), "--out", str(out)]
    # MeZO runs one iteration more: compared at equal steps at ZOPrO's last step, at equal cost too
    args = common + ["--reward-mode", "functions", "--methods", "zopro", "mezo", "--seeds", "3",
                     "--zo-iterations-of", "mezo=2"]
    result = bench_reward.main(args)

    here = runs / "functions"
    start_dir = here / "start-seed3"
    logs = {d.name: (d / "train.log").read_text() for d in here.iterdir()}
    assert sorted(logs) == ["mezo-seed3", "start-seed3", "zopro-seed3"]
    start = {split: bench_reward.read_evals(start_dir / "metrics.jsonl", split) for split in ("held_out", "validation")}
    # the start: evaluations before and after its one first-order iteration of 1 rollout × 3 steps (--start-set)
    assert [e["step"] for e in start["held_out"]] == [0, 3] == [e["step"] for e in start["validation"]], logs
    evals = {}
    for method in ("zopro", "mezo"):
        evals[method] = bench_reward.read_evals(here / f"{method}-seed3" / "metrics.jsonl")
        assert evals[method][:2] == start["held_out"]  # the start's evaluations, copied
        # then iterations of 1 rollout × 2 steps: one for ZOPrO, two for MeZO
        assert [e["step"] for e in evals[method]] == {"zopro": [0, 3, 5], "mezo": [0, 3, 5, 7]}[method]
        assert len(evals[method][-1]["prompts"]) == 4
        # the methods evaluate the held-out split only: their validation evaluations are the start's
        assert bench_reward.read_evals(here / f"{method}-seed3" / "metrics.jsonl", "validation") == start["validation"]
    assert result["step_budget"] == 5 and result["start_step"] == {3: 3}
    assert sorted(result["methods"]) == ["mezo", "zopro"] and result["paired"][0]["versus"] == "mezo"
    zo = result["methods"]["zopro"]
    assert zo["per_seed"][3]["start"] == pytest.approx(start["held_out"][0]["score"])
    assert zo["per_seed"][3]["parted"] == pytest.approx(start["held_out"][1]["score"])
    assert zo["gain"]["mean"] == pytest.approx(evals["zopro"][-1]["score"] - start["held_out"][0]["score"])
    assert result["paired"][0]["mean"] == pytest.approx(evals["zopro"][-1]["score"] - evals["mezo"][2]["score"])
    # at equal cost MeZO is read at step 5 too (its step 7 spent more than ZOPrO's phase)
    at_cost = {p["quantity"]: p for p in result["paired_at_equal_cost"]}
    assert sorted(at_cost) == ["score_at_equal_judge_queries", "score_at_equal_sequence_passes"]
    assert all(p["steps"]["mean"] == 5 and p["mean"] == pytest.approx(result["paired"][0]["mean"])
               and p["budget"] == p["spent"] for p in at_cost.values())
    assert result["methods"]["mezo"]["costs"]["steps"]["mean"] == 4
    assert 0 < zo["train_seconds"]["mean"] < 600
    # its phase: one rollout of 2 prompts × k=2, scored by the judge, reused for 2 ZO steps
    assert {k: v["mean"] for k, v in zo["costs"].items() if k != "peak_memory_bytes"} == {
        "steps": 2, "completions": 4, "judge_queries": 4, "sequence_passes": 4 * 3 + 2 * 2 * 4}
    (path,) = out.glob("reward-*-functions-*.json")
    data = json.loads(path.read_text())
    assert data["reward_mode"] == "functions" and data["config"]["reward_model"] is False
    assert data["config"]["eval_prompts"] == 4 and data["config"]["reward_funcs"] == ["judge"]
    assert len(data["evaluations"]["zopro"]["3"]) == 3 and [r["returncode"] for r in data["runs"]] == [0, 0, 0]
    assert "| zopro |" in path.with_suffix(".md").read_text() and path.with_suffix(".png").stat().st_size > 1000
    assert "| zopro | 2 | 4 | 4 | 28 |" in path.with_suffix(".md").read_text()  # the cost table
    assert "| mezo | judge queries | 4 | 4 (5) |" in path.with_suffix(".md").read_text()
    record = start_dir / bench_reward.RUN_RECORD
    before = (record.stat().st_mtime_ns, record.read_text(), (start_dir / "metrics.jsonl").read_text())

    again = bench_reward.main(args + ["--aggregate-only"])  # reads the finished runs, runs nothing
    assert json.dumps(again) == json.dumps(result)
    # a method's runs under another name (a variant of its settings beside the others)
    (here / "mezo-seed3").rename(here / "mezo-variant-seed3")
    renamed = bench_reward.main(args + ["--aggregate-only", "--run-name-of", "mezo=mezo-variant"])
    assert json.dumps(renamed["paired"]) == json.dumps(result["paired"])
    (here / "mezo-variant-seed3").rename(here / "mezo-seed3")
    # each run records its settings; asking for other settings in the same runs dir stops before anything runs
    assert json.loads((here / "zopro-seed3" / bench_reward.RUN_SETTINGS).read_text())["eps"] == 0.01
    with pytest.raises(SystemExit, match=r"start-seed3 holds a run with other settings \(eps differ"):
        bench_reward.main(args + ["--set", "eps=0.02"])
    with pytest.raises(SystemExit, match=r"mezo-seed3 holds a run with other settings \(iterations differ"):
        bench_reward.main(args + ["--zo-iterations-of", "mezo=3"])
    assert (record.stat().st_mtime_ns, record.read_text()) == before[:2]

    chose = sweep.main(common + ["--reward-mode", "functions", "--grid", "zopro:lr=1e-3,1e-2", "--seed", "3"])
    assert (record.stat().st_mtime_ns, record.read_text(), (start_dir / "metrics.jsonl").read_text()) == before
    (sweep_path,) = out.glob("sweep-*-functions-*.json")
    data = json.loads(sweep_path.read_text())
    assert data["chosen"]["zopro"] in ({"lr": 1e-3}, {"lr": 1e-2}) and data["chosen"] == chose["chosen"]
    for point in data["results"]["zopro"]:
        metrics = here / f"{sweep.point_name('zopro', point['settings'])}-seed3" / "metrics.jsonl"
        validation = bench_reward.read_evals(metrics, "validation")
        assert validation[:2] == start["validation"] and validation[-1]["step"] == 5
        assert point["gain"] == pytest.approx(validation[-1]["score"] - validation[1]["score"])
    assert "**chosen**" in sweep_path.with_suffix(".md").read_text()
    with pytest.raises(ValueError, match="unknown config key"):  # a typo fails before anything runs
        sweep.main(common + ["--grid", "zopro:lrr=1e-3", "--seed", "4"])
    assert not (runs / "functions" / "start-seed4").exists()

    modelled = bench_reward.main(common + ["--reward-mode", "model", "--methods", "zopro", "mezo", "--seeds", "3"])
    (path,) = out.glob("reward-*-model-*.json")
    data = json.loads(path.read_text())
    assert data["config"]["reward_model"] is True and data["config"]["reward_funcs"] == []
    assert modelled["step_budget"] == 5 and sorted(modelled["methods"]) == ["mezo", "zopro"]
    lines = (runs / "model" / "start-seed3" / "metrics.jsonl").read_text().splitlines()
    refinements = [json.loads(line) for line in lines if '"event": "iteration"' in line]
    assert len(refinements) == 1 and "bt_loss_first" in refinements[0]  # the reward model was refined
    # its accuracy on fresh pairs is reported per reward model: R_0 from the start, R_1 after each method
    accuracy = modelled["reward_model_accuracy"]
    assert accuracy["rows"]["R_0"]["per_seed"][3] == [refinements[0]["fresh_pair_accuracy"]]
    for method in ("zopro", "mezo"):
        lines = (runs / "model" / f"{method}-seed3" / "metrics.jsonl").read_text().splitlines()
        last = [json.loads(line) for line in lines if '"event": "iteration"' in line][-1]
        assert last["iteration"] == 1 and accuracy["rows"][f"after {method}"]["per_seed"][3] == [
            last["fresh_pair_accuracy"]]
    assert "| R_0 |" in path.with_suffix(".md").read_text()

    # the direction probe reads the start run's checkpoint and config, and never moves the weights
    probe = _bench("probe_direction")
    checkpoint = (start_dir / "checkpoint.pt").read_bytes()
    summary = probe.main(["--run", str(here / "start-seed3"), "--batches", "2", "--out", str(out), "--threads", "1"])
    assert (start_dir / "checkpoint.pt").read_bytes() == checkpoint
    (probe_path,) = out.glob("direction-*.json")
    rows = json.loads(probe_path.read_text())["results"]
    assert len(rows) == 2 and all(math.isfinite(r["along_policy_delta"]) and math.isfinite(r["random"]) for r in rows)
    assert summary["along_policy_delta"]["mean"] == pytest.approx(sum(r["along_policy_delta"] for r in rows) / 2)
    assert 0 <= summary["random"]["continue_share"] <= 1


def test_a_finished_run_is_reused_only_with_the_settings_it_ran_with(tmp_path, capsys):
    bench_reward = _bench("bench_reward")
    from zopro_kernels.rloo.config import TrainConfig

    out = tmp_path / "zopro-seed0"
    out.mkdir()
    config = TrainConfig().to_dict() | {"lr": 1e-5, "iterations": 2, "output_dir": str(out), "threads": 1,
                                        "start_from": str(tmp_path / "start-seed0")}
    bench_reward._TRUSTED_BY_NAME.clear()  # other tests' runs
    assert not bench_reward.finished(config)  # no metrics yet
    lines = [{"event": "iteration", "iteration": 1, "global_step": 4}, {"event": "eval", "step": 4}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert bench_reward.finished(config)  # no recorded settings: an older run, trusted by its name
    assert bench_reward.finished(config)
    assert capsys.readouterr().out == ""  # said once, in one line for every such run
    bench_reward.say_trusted_by_name()
    bench_reward.say_trusted_by_name()
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 1 and "1 run(s)" in said[0] and said[0].endswith(": zopro-seed0")
    recorded = bench_reward.run_settings(config)
    assert "output_dir" not in recorded and "threads" not in recorded and recorded["lr"] == 1e-5
    (out / bench_reward.RUN_SETTINGS).write_text(json.dumps(recorded))
    # where it lives and how many threads it ran on do not change what it computed
    moved = config | {"threads": 4, "output_dir": str(out), "start_from": "/elsewhere/start-seed0"}
    assert bench_reward.finished(moved)
    with pytest.raises(SystemExit, match=r"other settings \(eps, lr differ"):
        bench_reward.finished(config | {"lr": 3e-5, "eps": 0.5})
    with pytest.raises(SystemExit, match=r"iterations differ"):  # not finished at 3 iterations, and not these
        bench_reward.finished(config | {"iterations": 3})
    # a key the record lacks (added to the config since) matches its default only
    key = "num_generations"
    (out / bench_reward.RUN_SETTINGS).write_text(json.dumps({k: v for k, v in recorded.items() if k != key}))
    assert bench_reward.finished(config)
    with pytest.raises(SystemExit, match=key):
        bench_reward.finished(config | {key: config[key] + 1})
    assert bench_reward.settings_mismatch({"a": 1}, {"a": 1, "b": 2}) == ["b"]  # not a config key: no default
    (out / "metrics.jsonl").write_text(json.dumps(lines[1]) + "\n")  # killed before its last iteration:
    assert not bench_reward.finished(config)  # run again, same settings
    assert not (out / "bench_run.json").exists()  # checking never writes


def test_fresh_pair_accuracy_per_reward_model_and_pooled_over_pairs():
    bench_reward = _bench("bench_reward")
    records = [{"event": "reward_warmup", "iteration": 0, "pairs": 400, "fresh_pair_accuracy": 0.45},  # R's init
               {"event": "iteration", "iteration": 0, "pairs": 20, "fresh_pair_accuracy": 0.55},
               {"event": "eval", "iteration": 0, "task_score": 0.1},
               {"event": "iteration", "iteration": 1, "pairs": 10, "fresh_pair_accuracy": 0.9},
               {"event": "iteration", "iteration": 2, "pairs": 0, "fresh_pair_accuracy": None}]  # all ties
    assert bench_reward.fresh_pair_estimates(records) == [(0.55, 20), (0.9, 10)]
    assert bench_reward.fresh_pair_estimates(records, first_iteration=1) == [(0.9, 10)]
    # R_0: 11 of 20 and 4 of 10 right; after zopro: 18 of 20 (seed 0) and 9 of 10 (seed 1)
    result = bench_reward.fresh_pair_accuracy({"R_0": {0: [(0.55, 20)], 1: [(0.4, 10)]},
                                               "after zopro": {0: [(0.9, 20)], 1: [(0.9, 10)]}})
    r0, after, every = result["rows"]["R_0"], result["rows"]["after zopro"], result["all"]
    assert r0["mean"] == pytest.approx(0.475) and r0["pooled"] == pytest.approx(15 / 30) and r0["pairs"] == 30
    assert (r0["low"], r0["high"]) == pytest.approx(bench_reward.wilson(15, 30))
    assert after["mean"] == pytest.approx(0.9) and after["pooled"] == pytest.approx(27 / 30)
    assert every["per_seed"] == {0: [0.55, 0.9], 1: [0.4, 0.9]} and every["estimates"] == 4
    assert every["mean"] == pytest.approx(0.6875) and every["pooled"] == pytest.approx(42 / 60)
    checks = bench_reward.target_checks({"methods": {}, "paired": [], "reward_model_accuracy": result})
    assert len(checks) == 1 and checks[0]["met"]
    assert "pooled 0.700" in checks[0]["shown"] and "of 4 estimates" in checks[0]["shown"]
    low = bench_reward.fresh_pair_accuracy({"R_0": {0: [(0.6, 20)]}})
    assert not bench_reward.target_checks({"methods": {}, "paired": [], "reward_model_accuracy": low})[0]["met"]


def test_reward_model_study_wilson_interval_matches_hand_computed_values():
    study = _bench("reward_model_study")
    low, high = study.wilson(5, 10)  # p = 0.5, n = 10: centre 0.5, half-width 1.96·√(0.025 + 0.0096)/1.384
    assert (low, high) == (pytest.approx(0.2366, abs=1e-4), pytest.approx(0.7634, abs=1e-4))
    assert study.wilson(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and study.wilson(10, 10)[1] == pytest.approx(1.0)
    assert all(math.isnan(v) for v in study.wilson(0, 0))


def test_reward_model_study_fits_every_setting_from_the_same_start(tmp_path):
    config_path = _tiny_task(tmp_path, {"max_completion_length": 3, "max_prompt_tokens": 8, "max_length": 32,
                                        "lora_r": 4, "lora_alpha": 8, "eval_prompts": 4, "validation_prompts": 4,
                                        "reward_batch_size": 2, "threads": 1})
    study = _bench("reward_model_study")
    args = ["--config", str(config_path), "--warmup", "6", "12", "--lr", "0.01", "0.01",
            "--test-rounds", "2", "--threads", "1", "--out", str(tmp_path)]
    rows = study.main(args)
    assert [(r["warmup_prompts"], r["lr"]) for r in rows] == [(6, 0.01), (6, 0.01), (12, 0.01), (12, 0.01)]
    # the same setting twice gives the same fit: each starts from R's initialisation, not the last fit
    for first, again in (rows[0:2], rows[2:4]):
        assert {k: v for k, v in first.items() if k != "fit_seconds"} == {
            k: v for k, v in again.items() if k != "fit_seconds"}
    assert 0 < rows[0]["pairs"] < rows[2]["pairs"] <= 12  # a prefix of the pool, ties dropped
    assert all(r["low"] <= r["test_accuracy"] <= r["high"] and math.isfinite(r["bt_loss_last"]) for r in rows)
    (path,) = tmp_path.glob("reward-model-*.json")
    data = json.loads(path.read_text())
    assert data["results"] == json.loads(json.dumps(rows)) and 0 < data["test_pairs"] <= 8
    assert path.with_suffix(".md").read_text().count("| 6 |") == 2
    assert all(r["max_grad_norm"] is None for r in rows)  # no clip unless asked
    assert study._norm("none") is None and study._norm("1.5") == 1.5
    with pytest.raises(SystemExit, match="validation split"):
        study.main(args + ["--set", "validation_prompts=0"])


def test_start_set_adds_to_the_default_start_rather_than_replacing_it():
    bench_reward = _bench("bench_reward")
    assert bench_reward.start_overrides([]) == {"num_iterations": 4, "steps_per_iteration": 3}
    assert bench_reward.start_overrides(["reward_warmup_prompts=1024"]) == {
        "num_iterations": 4, "steps_per_iteration": 3, "reward_warmup_prompts": 1024}
    assert bench_reward.start_overrides(["steps_per_iteration=12", "num_iterations=2"]) == {
        "num_iterations": 2, "steps_per_iteration": 12}


def test_a_seeds_runs_start_when_its_start_is_done_not_after_every_start(monkeypatch):
    import threading

    bench_reward = _bench("bench_reward")
    seed0_ran, launched = threading.Event(), []

    def fake_launch(config):
        launched.append(config["name"])
        if config["name"] == "start-1":  # a slow start: seed 0's runs should fill the other slot meanwhile
            config["saw_seed0"] = seed0_ran.wait(timeout=5)
        if config["name"] == "start-2":
            raise RuntimeError("start-2 failed")
        if config["name"] == "zopro-0":
            seed0_ran.set()
        return {}

    monkeypatch.setattr(bench_reward, "launch", fake_launch)
    monkeypatch.setattr(bench_reward, "finished", lambda config: False)
    starts = {s: {"name": f"start-{s}", "seed": s} for s in (0, 1, 2)}
    configs = [{"name": f"{m}-{s}", "seed": s} for s in (0, 1, 2) for m in ("zopro", "mezo")]
    with pytest.raises(RuntimeError, match="start-2 failed"):
        bench_reward.run_all(starts, configs, jobs=2)
    assert starts[1]["saw_seed0"]  # zopro-0 ran while start-1 was still running
    # starts first, then each seed's runs in the given order; seed 2's start failed, so its runs never ran
    assert set(launched) == {"start-0", "start-1", "start-2", "zopro-0", "mezo-0", "zopro-1", "mezo-1"}
    assert launched[:2] == ["start-0", "start-1"] and launched.index("zopro-0") < launched.index("mezo-0")
    assert launched.index("zopro-1") < launched.index("mezo-1")


def test_a_run_dir_another_live_process_is_running_is_never_launched_again(tmp_path, monkeypatch):
    bench_reward = _bench("bench_reward")
    out = tmp_path / "zopro-seed0"
    out.mkdir()
    (out / "train.log").write_text("the other process's log")
    finished_child = subprocess.Popen([sys.executable, "-c", "pass"])
    finished_child.wait()
    dead = finished_child.pid
    launched = []

    class FakeRun:  # the --run-one subprocess
        pid = 999_999_999

        def __init__(self, argv, **kwargs):
            launched.append(argv)

        def wait(self):
            return 0

    monkeypatch.setattr(bench_reward.subprocess, "Popen", FakeRun)
    config = {"output_dir": str(out), "optimizer": "zopro", "seed": 0}
    lock = out / bench_reward.RUN_LOCK
    # held by a live benchmark, or by a live run whose benchmark was killed: refused, nothing touched
    for holder in (bench_reward.holder_of(os.getpid()), bench_reward.holder_of(dead, os.getpid())):
        lock.write_text(json.dumps(holder))
        with pytest.raises(RuntimeError, match=f"being run by process {holder['pid']}"):
            bench_reward.launch(config)
        assert (out / "train.log").read_text() == "the other process's log" and not launched
        assert json.loads(lock.read_text()) == holder
    # left by processes that are gone: taken over, run, and released
    lock.write_text(json.dumps(bench_reward.holder_of(dead, dead)))
    record = bench_reward.launch(config)
    assert record["returncode"] == 0 and len(launched) == 1 and not lock.exists()
    assert (out / bench_reward.RUN_RECORD).exists() and (out / bench_reward.RUN_SETTINGS).exists()


def test_phase_costs_count_what_each_method_spent_after_the_start():
    bench_reward = _bench("bench_reward")
    base = {"batch_prompts": 8, "num_generations": 4, "directions": 1, "rank_policies": 4,
            "reward_model": False, "reward_funcs": ["judge"]}
    start = [{"iteration": 0, "rollout": r, "step": 2 * r + i, "peak_memory_bytes": 9e9} for r in range(2) for i in range(2)]
    start.append({"event": "iteration", "iteration": 0, "global_step": 4, "pairs": 50, "judge_ties": 3})
    # the phase: 3 rollouts of N·k = 32 completions, each reused twice (6 ZO steps)
    phase = [{"iteration": 1, "rollout": r, "step": 4 + 2 * r + i, "peak_memory_bytes": 100 + r}
             for r in range(3) for i in range(2)]
    refined = {"event": "iteration", "iteration": 1, "global_step": 10, "pairs": 20, "judge_ties": 3, "judge_failures": 1}
    zopro = bench_reward.phase_costs(base | {"optimizer": "zopro"}, start + phase + [refined], 4)
    # 96 completions, each scored by the judge; passes: 96 × (generation, π_old, reference) + 6 steps × 2 × 32
    assert zopro == {"steps": 6, "completions": 96, "judge_queries": 96, "sequence_passes": 96 * 3 + 6 * 64,
                     "peak_memory_bytes": 102}
    model = base | {"optimizer": "adamw", "reward_model": True, "reward_funcs": []}
    adamw = bench_reward.phase_costs(model, start + phase + [refined], 4)
    # the reward model scores every completion (a 4th pass), AdamW's step is 3 passes, the judge only
    # answers the refinement's 24 comparisons (pairs + ties + failures) of this phase, not the start's
    assert (adamw["judge_queries"], adamw["sequence_passes"]) == (24, 96 * 4 + 6 * 3 * 32)
    two = bench_reward.phase_costs(base | {"optimizer": "mezo", "directions": 2}, start + phase, 4)
    assert two["sequence_passes"] == 96 * 3 + 6 * 4 * 32  # q = 2 directions: 4 objective passes a step
    steps = [{"iteration": 1, "step": 4 + i, "judge_queries": 8 + i, "peak_memory_bytes": 50} for i in range(5)]
    zpg = bench_reward.phase_costs(base | {"optimizer": "zpg"}, start + steps, 4)
    assert zpg == {"steps": 5, "completions": 80, "judge_queries": 50, "sequence_passes": 80, "peak_memory_bytes": 50}
    zorank = bench_reward.phase_costs(base | {"optimizer": "zorank", "rank_policies": 6}, start + steps, 4)
    assert (zorank["completions"], zorank["sequence_passes"]) == (5 * 6 * 8, 5 * 6 * 8)


def test_costs_at_each_evaluation_and_the_comparison_at_equal_cost():
    bench_reward = _bench("bench_reward")
    approx = pytest.approx
    base = {"batch_prompts": 8, "num_generations": 4, "directions": 1, "reward_model": False, "reward_funcs": ["judge"]}
    start = [{"iteration": 0, "rollout": 0, "step": i} for i in range(4)]
    # ZOPrO: 2 rollouts of 32 completions, each reused twice, evaluated after the start (step 4) and at 6, 8
    phase = [{"iteration": 1, "rollout": r, "step": 4 + 2 * r + i} for r in range(2) for i in range(2)]
    evals = [_ev(0, 0, [0.0]), _ev(4, 40, [0.0]), _ev(6, 50, [0.0]), _ev(8, 60, [0.0])]
    costed = bench_reward.with_costs(base | {"optimizer": "zopro"}, start + phase, evals, 4)
    assert [e["judge_queries"] for e in costed] == [0, 0, 32, 64]
    assert [e["sequence_passes"] for e in costed] == [0, 0, 32 * 3 + 2 * 64, 64 * 3 + 4 * 64]
    assert costed[2]["score"] == evals[2]["score"] and "judge_queries" not in evals[2]  # a copy
    # zpg: 8 judge queries and 16 generations a step, evaluated at steps 6, 8, 10 (its second iteration)
    steps = [{"iteration": 1 + (i >= 4), "step": 4 + i, "judge_queries": 8} for i in range(6)]
    zpg = bench_reward.with_costs(base | {"optimizer": "zpg"}, start + steps,
                                  [_ev(0, 0, [0.0]), _ev(4, 40, [0.0]), _ev(6, 50, [0.0]), _ev(8, 60, [0.0]),
                                   _ev(10, 70, [0.0])], 4)
    assert [e["judge_queries"] for e in zpg] == [0, 0, 16, 32, 48]
    assert [e["sequence_passes"] for e in zpg] == [0, 0, 32, 64, 96]

    def run(costs, finals):  # held-out evaluations with given (judge queries, passes) and scores of 2 prompts
        head = [_ev(0, 0, [0.0, 0.2]) | dict.fromkeys(bench_reward.COST_UNITS, 0),
                _ev(4, 40, [0.2, 0.4]) | dict.fromkeys(bench_reward.COST_UNITS, 0)]
        return head + [_ev(6 + 2 * i, 50, p) | dict(zip(bench_reward.COST_UNITS, c)) for i, (c, p) in
                       enumerate(zip(costs, finals))]

    runs = {"zopro": {0: run([(32, 224), (64, 448)], [[0.3, 0.5], [0.6, 0.8]])},
            # as many judge queries, fewer passes: compared at its last evaluation (step 10) both ways
            "zpg": {0: run([(16, 32), (32, 64), (64, 128)], [[0.1, 0.1], [0.5, 0.5], [0.4, 0.6]])},
            # dearer per step in passes: at equal passes only its first evaluation fits in ZOPrO's 448
            "adamw": {0: run([(32, 256), (64, 512)], [[0.9, 0.9], [1.0, 1.0]])}}
    paired = {(p["versus"], p["quantity"]): p for p in bench_reward.paired_at_equal_cost(runs)}
    queries = paired["zpg", "score_at_equal_judge_queries"]
    assert queries["per_seed"] == {0: approx(0.2)} and queries["mean"] == approx(0.2)  # .6 .8 − .4 .6
    assert (queries["budget"]["mean"], queries["spent"]["mean"], queries["steps"]["mean"]) == (64, 64, 10)
    assert paired["zpg", "score_at_equal_sequence_passes"]["steps"]["mean"] == 10
    assert paired["adamw", "score_at_equal_judge_queries"]["per_seed"] == {0: approx(-0.3)}  # step 8: 1.0 1.0
    passes = paired["adamw", "score_at_equal_sequence_passes"]
    assert passes["per_seed"] == {0: approx(-0.2)} and passes["spent"]["mean"] == 256  # step 6: .9 .9
    assert bench_reward.paired_at_equal_cost({"zpg": runs["zpg"]}) == []  # nothing to compare with
    assert bench_reward.paired_at_equal_cost(_synthetic_runs()) == []  # evaluations without costs
    assert bench_reward.parse_zo_iterations_of(["zpg=2", "zorank=3"]) == {"zpg": 2, "zorank": 3}
    for bad in (["zpg"], ["zpg=0"], ["sgd=2"]):
        with pytest.raises(SystemExit, match="METHOD=N"):
            bench_reward.parse_zo_iterations_of(bad)
    assert bench_reward.parse_run_names_of(["zpg=zpg-two-sided"], ["zopro", "zpg"]) == {"zpg": "zpg-two-sided"}
    for bad in (["zpg"], ["zpg="], ["start=x"], ["zpg=../x"], ["zpg=.hidden"], ["zpg=a b"]):
        with pytest.raises(SystemExit, match="METHOD=NAME"):
            bench_reward.parse_run_names_of(bad, ["zpg"])
    for bad in (["zpg=start"], ["zpg=zopro"], ["zpg=x", "mezo=x"]):
        with pytest.raises(SystemExit, match="would be named"):
            bench_reward.parse_run_names_of(bad, ["zopro", "mezo", "zpg"])
