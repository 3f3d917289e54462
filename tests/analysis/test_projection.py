"""Projections: PCA against numpy's SVD; optional methods fail clearly when missing."""

import os
import sys

import numpy as np
import pytest

from zopro_kernels.analysis.projection import MissingDependencyError, pca, project, project_trajectory
from zopro_kernels.analysis.synthetic import write_synthetic_run
from zopro_kernels.analysis.trajectory import load_trajectory


@pytest.mark.parametrize("rows, columns", [(7, 3), (9, 500)], ids=["7x3", "9x500"])
@pytest.mark.parametrize("dims", [2, 3])
def test_pca_matches_numpy_svd(rows, columns, dims):
    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, columns)) * np.linspace(3, 0.1, columns)
    coordinates, ratios = pca(x, dims)
    centred = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    reference = u[:, :dims] * s[:dims]
    np.testing.assert_allclose(np.abs(coordinates), np.abs(reference), atol=1e-9)  # signs are a convention
    np.testing.assert_allclose(ratios, s[:dims] ** 2 / np.sum(s**2), atol=1e-12)
    np.testing.assert_allclose(coordinates @ coordinates.T, reference @ reference.T, atol=1e-9)


def test_pca_of_fewer_points_than_dims_pads_with_zeros():
    coordinates, ratios = pca(np.array([[0.0, 1.0, 2.0], [1.0, 1.0, 0.0]]), 3)
    assert coordinates.shape == (2, 3)
    assert np.allclose(coordinates[:, 1:], 0) and ratios[0] == pytest.approx(1.0)


def test_projection_input_errors():
    with pytest.raises(ValueError, match="unknown projection method"):
        project(np.zeros((4, 2)), "isomap")
    with pytest.raises(ValueError, match="dims must be 2 or 3"):
        project(np.zeros((4, 2)), "pca", 4)
    with pytest.raises(ValueError, match="at least 2 snapshots"):
        project(np.zeros((1, 2)), "pca")


@pytest.mark.parametrize("method, package", [("umap", "umap-learn"), ("tsne", "openTSNE")])
def test_missing_optional_package_is_named(monkeypatch, method, package):
    module = {"umap": "umap", "tsne": "openTSNE"}[method]
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    with pytest.raises(MissingDependencyError, match=f"pip install {package}"):
        project(np.random.default_rng(0).standard_normal((10, 4)), method)


def test_relative_projection_starts_both_roles_at_the_origin(tmp_path):
    trajectory = load_trajectory(write_synthetic_run(tmp_path, iterations=3, snapshots_per_iteration=2))
    projection = project_trajectory(trajectory, "pca", 2)
    for role in ("policy", "reward"):
        points, labels = projection.of_role(role)
        assert labels[0] == (0, 0)
        assert len(points) == len(trajectory.role(role).labels)
    # Both starts coincide (each role's displacement from its first snapshot is 0 there).
    np.testing.assert_allclose(projection.of_role("policy")[0][0], projection.of_role("reward")[0][0], atol=1e-12)


def _structured_points():
    # Two well-separated clusters: any sensible embedding keeps them apart.
    rng = np.random.default_rng(0)
    return np.concatenate([rng.standard_normal((12, 30)), 20 + rng.standard_normal((12, 30))])


def _clusters_stay_apart(coordinates):
    first, second = coordinates[:12], coordinates[12:]
    within = max(np.ptp(first, axis=0).max(), np.ptp(second, axis=0).max())
    between = np.linalg.norm(first.mean(axis=0) - second.mean(axis=0))
    return between > within


UMAP_OPT_IN = pytest.mark.skipif(
    not os.environ.get("ZOPRO_TEST_UMAP"),
    reason="umap-learn compiles with numba on first use (~40 s on 2 cores): set ZOPRO_TEST_UMAP=1 to run",
)


@pytest.mark.parametrize("method,module", [("tsne", "openTSNE"), pytest.param("umap", "umap", marks=UMAP_OPT_IN)])
@pytest.mark.parametrize("dims", [2, 3])
def test_optional_projection_when_installed(method, module, dims):
    pytest.importorskip(module, reason=f"{module} (optional extra) not installed")
    coordinates = project(_structured_points(), method, dims, seed=0)
    assert coordinates.shape == (24, dims) and np.isfinite(coordinates).all()
    assert _clusters_stay_apart(coordinates)
