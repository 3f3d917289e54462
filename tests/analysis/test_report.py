"""The report folder and the zopro-analyze command: files, valid non-blank PNGs, consistent metrics."""

import csv
import json

import numpy as np
import pytest

from zopro_kernels.analysis.cli import main
from zopro_kernels.analysis.synthetic import write_synthetic_run

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    run_dir = write_synthetic_run(tmp_path_factory.mktemp("run"), iterations=5, snapshots_per_iteration=2)
    output = run_dir / "report"
    assert main([str(run_dir), "--output", str(output), "--permutations", "19"]) == 0
    return run_dir, output


def assert_valid_nonblank_png(path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    rgb = image[..., :3]
    not_white = np.any(rgb < 0.95, axis=-1).mean()
    assert not_white > 0.01, f"{path} is blank ({100 * not_white:.2f} % non-white pixels)"
    assert rgb.std() > 0.01


def test_report_folder_has_every_part(report):
    _, output = report
    for name in (
        "summary.md",
        "report.html",
        "metrics/metrics.json",
        "metrics/pairs.csv",
        "metrics/trajectory.csv",
        "metrics/delta_norms.csv",
        "metrics_over_iterations.png",
        "layer_angles.png",
        "trajectory_pca_2d.png",
        "trajectory_pca_3d.png",
    ):
        assert (output / name).is_file(), name


@pytest.mark.parametrize("name", ["metrics_over_iterations", "layer_angles", "trajectory_pca_2d", "trajectory_pca_3d"])
def test_plots_are_valid_nonblank_pngs(report, name):
    assert_valid_nonblank_png(report[1] / f"{name}.png")


def test_metrics_files_agree_and_show_the_synthetic_structure(report):
    _, output = report
    metrics = json.loads((output / "metrics" / "metrics.json").read_text())  # strict JSON: NaN would fail
    with (output / "metrics" / "pairs.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(metrics["pairs"]) > 0
    for row, entry in zip(rows, metrics["pairs"]):
        assert row["layer"] == entry["layer"] and float(row["angle_deg"]) == pytest.approx(entry["angle_deg"])
    # The synthetic run makes each Δπ_{t+1} orthogonal to ΔR_t and consecutive Δπ similar.
    assert metrics["summary"]["mean_angle_reward_then_policy_deg"] == pytest.approx(90, abs=1e-3)
    assert metrics["summary"]["mean_cosine_consecutive_policy"] > 0.5
    summary = (output / "summary.md").read_text()
    assert "nearly orthogonal" in summary and "![metrics_over_iterations](metrics_over_iterations.png)" in summary


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([str(tmp_path)]) == 2
    assert "trajectory/index.json" in capsys.readouterr().err
    assert main([str(tmp_path), "--projections", "isomap"]) == 2
    assert "unknown projection method" in capsys.readouterr().err


def test_cli_names_the_missing_package(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "umap", None)
    write_synthetic_run(tmp_path, iterations=2, snapshots_per_iteration=1)
    assert main([str(tmp_path), "--projections", "pca,umap"]) == 2
    assert "umap-learn" in capsys.readouterr().err
    assert not (tmp_path / "analysis").exists()  # refused before doing any work


def test_python_dash_m_entry_point(tmp_path):
    import subprocess
    import sys

    run_dir = write_synthetic_run(tmp_path, iterations=2, snapshots_per_iteration=1)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "zopro_kernels.analysis.cli",
            str(run_dir),
            "--no-html",
            "--dims",
            "2",
            "--no-per-layer",
            "--permutations",
            "9",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert (run_dir / "analysis" / "summary.md").is_file() and not (run_dir / "analysis" / "report.html").exists()


def test_report_on_a_bf16_projected_run(tmp_path):
    # The compact recording modes go through the whole pipeline; orthogonality survives bf16 to
    # within bf16's resolution and a projection to within its sqrt(2/D) error.
    import torch

    run_dir = write_synthetic_run(
        tmp_path, iterations=4, snapshots_per_iteration=2, dtype=torch.bfloat16, projection_dim=64
    )
    index = json.loads((run_dir / "trajectory" / "index.json").read_text())
    assert index["dtype"] == "bfloat16" and index["projection_dim"] == 64
    assert main([str(run_dir), "--dims", "2", "--permutations", "9", "--no-html"]) == 0
    metrics = json.loads((run_dir / "analysis" / "metrics" / "metrics.json").read_text())
    assert metrics["summary"]["mean_angle_reward_then_policy_deg"] == pytest.approx(90, abs=15)
    assert_valid_nonblank_png(run_dir / "analysis" / "trajectory_pca_2d.png")
