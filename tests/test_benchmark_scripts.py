"""The benchmark scripts run end to end (tiny shapes, CPU) and write their results."""

import json
import subprocess
import sys
from pathlib import Path

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
