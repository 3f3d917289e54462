"""zopro-analyze on a real RLOO loop run: the tiny random Llama of tests/rloo trained by ZOPrO,
recorded through the loop's ``recorder=`` hook (start state, iteration ends, every k steps)."""

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")


def test_analyze_a_recorded_loop_run(tmp_path):
    from tests.rloo.helpers import PROMPTS, make_pair, tiny_config, word_count_judge
    from zopro_kernels.analysis import TrajectoryRecorder
    from zopro_kernels.analysis.cli import main as analyze
    from zopro_kernels.rloo.cli import train

    run_dir = tmp_path / "run"
    recorder = TrajectoryRecorder(run_dir / "trajectory")
    config = tiny_config(run_dir, iterations=3, steps_per_iteration=2, snapshot_every=1, optimizer="zopro")
    train(config, pair=make_pair(), prompts=PROMPTS, judge=word_count_judge(), recorder=recorder)
    recorder.close()

    index = json.loads((run_dir / "trajectory" / "index.json").read_text())
    roles = {e["role"] for e in index["snapshots"]}
    assert roles == {"policy", "reward"}
    assert analyze([str(run_dir), "-o", str(tmp_path / "report")]) in (0, None)
    report = tmp_path / "report"
    assert (report / "summary.md").read_text().strip()
    assert (report / "report.html").stat().st_size > 1000
    metrics = json.loads((report / "metrics" / "metrics.json").read_text())
    # Per iteration pair, globally and for each of the 28 LoRA tensors (ΔR_t vs Δπ_t+1 and friends).
    assert len(metrics["pairs"]) > 28 and len(metrics["trajectory"]) == 29 and metrics["summary"]
    assert (report / "metrics_over_iterations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
