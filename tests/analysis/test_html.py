"""The interactive page: self-contained, and rendering in headless Chromium without console errors."""

import shutil
import subprocess

import numpy as np
import pytest

from zopro_kernels.analysis.html_report import write_html
from zopro_kernels.analysis.metrics import compute_metrics
from zopro_kernels.analysis.projection import project_trajectory
from zopro_kernels.analysis.synthetic import write_synthetic_run
from zopro_kernels.analysis.trajectory import load_trajectory

from .test_report import assert_valid_nonblank_png

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium not found (Debian: apt-get install -y chromium)"
)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    directory = tmp_path_factory.mktemp("html")
    trajectory = load_trajectory(write_synthetic_run(directory / "run", iterations=4, snapshots_per_iteration=2))
    projections = [project_trajectory(trajectory, "pca", d) for d in (2, 3)]
    # A hostile title and tensor name must not break out of the page's markup or script.
    return write_html(
        compute_metrics(trajectory, permutations=9),
        projections,
        directory / "report.html",
        title="run </script><b>x</b>",
    )


def test_page_is_self_contained(page):
    text = page.read_text()
    for needle in ("<script src", "<link", "@import", "url(", "https://", "fetch(", "XMLHttpRequest"):
        assert needle not in text, needle
    # The only URL is the SVG namespace identifier, which is never fetched.
    assert text.count("http://") == text.count("http://www.w3.org/2000/svg")
    assert "</script><b>" not in text


def _chromium(*args, tmp_path):
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--enable-logging=stderr",
        "--v=0",
        *args,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def _console_messages(stderr: str) -> list[str]:
    # Chromium logs every console message (and uncaught exception) as "...:CONSOLE(...)] ...".
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@needs_chromium
def test_console_check_catches_a_broken_page(tmp_path):
    # Control: the detector below must see an uncaught error, or its silence proves nothing.
    broken = tmp_path / "broken.html"
    broken.write_text("<!DOCTYPE html><html><body><p>x</p><script>undefinedFunction();</script></body></html>")
    result = _chromium("--dump-dom", broken.as_uri(), tmp_path=tmp_path)
    assert any("undefinedFunction" in m for m in _console_messages(result.stderr)), result.stderr[-2000:]


@needs_chromium
def test_page_renders_in_headless_chromium_without_console_errors(page, tmp_path):
    dom = _chromium("--dump-dom", page.as_uri(), tmp_path=tmp_path)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert _console_messages(dom.stderr) == [], _console_messages(dom.stderr)
    assert 'data-rendered="true"' in dom.stdout  # the script ran to its last line
    assert dom.stdout.count("<circle") > 10 and dom.stdout.count("<polyline") >= 4  # points and curves drawn
    assert dom.stdout.count("<rect") >= 6 * 3  # the per-tensor heat map: 6 tensors × 3 iterations

    screenshot = tmp_path / "page.png"
    shot = _chromium(f"--screenshot={screenshot}", "--window-size=1100,1400", page.as_uri(), tmp_path=tmp_path)
    assert _console_messages(shot.stderr) == [], _console_messages(shot.stderr)
    assert_valid_nonblank_png(screenshot)
    import matplotlib.image

    rgb = matplotlib.image.imread(screenshot)[..., :3]
    # The policy blue (#1f77b4) and reward red (#d62728) of the plots are on screen.
    for colour in ((0x1F, 0x77, 0xB4), (0xD6, 0x27, 0x28)):
        close = np.all(np.abs(rgb - np.array(colour) / 255) < 0.06, axis=-1)
        assert close.sum() > 50, colour
