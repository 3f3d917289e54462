"""benchmarks/objective_progress.py: ΔJ per reused rollout, against a hand-built metrics file."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("objective_progress", ROOT / "benchmarks" / "objective_progress.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(directory: Path, js_by_rollout: dict[int, list[float]], kl=1.0):
    directory.mkdir(parents=True)
    records = [{"event": "eval", "iteration": -1, "task_score": 0.1}]
    step = 0
    for iteration in (0, 1):
        for rollout, js in js_by_rollout.items():
            for reuse, j in enumerate(js):
                records.append({"step": step, "iteration": iteration, "rollout": rollout, "reuse": reuse,
                                "J": j + (10.0 if iteration == 0 else 0.0), "kl": kl, "task_score": 0.2})
                step += 1
        records.append({"event": "iteration", "iteration": iteration, "global_step": step})
    (directory / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_delta_j_per_rollout_and_the_paired_first_rollout(tmp_path):
    script = load_script()
    base = tmp_path / "runs" / "functions"
    write_run(base / "zopro-seed0", {0: [0.0, -0.01, -0.03], 1: [0.5, 0.45]})
    write_run(base / "zopro-seed1", {0: [0.0, -0.02], 1: [0.1, 0.0]})
    write_run(base / "mezo-seed0", {0: [0.0, -0.001], 1: [0.2, 0.19]})
    write_run(base / "mezo-seed1", {0: [0.0, 0.001], 1: [0.3, 0.3]})
    script.main(["--runs-dir", str(tmp_path / "runs"), "--methods", "zopro", "mezo", "--out", str(tmp_path / "out")])
    (result,) = (tmp_path / "out").glob("objective-cpu-functions-*.json")
    summary = json.loads(result.read_text())["results"]
    zopro = summary["methods"]["zopro"]
    # iteration 0 (the shared first-order one) is left out; ΔJ = last − first reuse of each rollout
    assert zopro["per_seed"] == {"0": pytest.approx((-0.03 - 0.05) / 2), "1": pytest.approx((-0.02 - 0.1) / 2)}
    paired = summary["paired_first_rollout"]["mezo"]
    assert paired["per_seed"] == {"0": pytest.approx(-0.03 + 0.001), "1": pytest.approx(-0.02 - 0.001)}
    assert paired["zopro_lower_in_every_seed"] is True
    assert "| zopro |" in result.with_suffix(".md").read_text()


def test_a_rollout_cut_short_is_left_out(tmp_path):
    script = load_script()
    run = tmp_path / "zopro-seed0"
    write_run(run, {0: [0.0, -0.01], 1: [0.3]})
    assert [(r["rollout"], r["delta_J"]) for r in script.rollouts(run / "metrics.jsonl")] == [(0, pytest.approx(-0.01))]
