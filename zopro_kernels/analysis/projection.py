"""2D/3D projections of both trajectories into one shared space.

Policy and reward snapshots are projected together (one fit), so their positions are comparable.
PCA needs only numpy; UMAP (umap-learn) and t-SNE (openTSNE) are optional extras and are run on
the leading principal components (at most 50), as both libraries recommend for wide inputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .trajectory import Trajectory

METHODS = ("pca", "umap", "tsne")
_OPTIONAL_PACKAGES = {"umap": ("umap", "umap-learn"), "tsne": ("openTSNE", "openTSNE")}
_MANIFOLD_INPUT_DIMS = 50


class MissingDependencyError(ImportError):
    """An optional projection was asked for but its package is not installed."""


@dataclass
class Projection:
    method: str
    coordinates: np.ndarray  # [snapshots, dims], policy rows first, then reward rows
    roles: list[str]
    labels: list[tuple[int, int]]  # (iteration, step) of each row
    explained_variance_ratio: np.ndarray | None = None  # PCA only
    relative: bool = True  # displacements from each role's first snapshot

    @property
    def dims(self) -> int:
        return self.coordinates.shape[1]

    def of_role(self, role: str) -> tuple[np.ndarray, list[tuple[int, int]]]:
        rows = [i for i, r in enumerate(self.roles) if r == role]
        return self.coordinates[rows], [self.labels[i] for i in rows]


def require_package(method: str):
    """Import the package an optional method needs, or say which one to install."""
    import importlib

    module, distribution = _OPTIONAL_PACKAGES[method]
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise MissingDependencyError(
            f"{method} projections need the {distribution!r} package, which is not installed: "
            f"pip install {distribution} (or use method 'pca', which needs nothing extra)"
        ) from error


def available_methods() -> list[str]:
    methods = ["pca"]
    for method in ("umap", "tsne"):
        try:
            require_package(method)
            methods.append(method)
        except MissingDependencyError:
            pass
    return methods


def pca(matrix: np.ndarray, dims: int) -> tuple[np.ndarray, np.ndarray]:
    """Principal-component coordinates and explained-variance ratios of the rows.

    Through the n×n Gram matrix: rows are few (snapshots) and columns many (LoRA values), so an
    SVD of the data itself would allocate an n×d factor. Signs are fixed (largest coordinate of
    each component positive) so the same data always gives the same picture.
    """
    x = np.asarray(matrix, np.float64)
    x = x.reshape(len(x), -1) - x.reshape(len(x), -1).mean(axis=0)
    eigenvalues, eigenvectors = np.linalg.eigh(x @ x.T)
    order = np.argsort(eigenvalues)[::-1]
    eigenvalues, eigenvectors = np.maximum(eigenvalues[order], 0.0), eigenvectors[:, order]
    coordinates = np.zeros((len(x), dims))
    kept = min(dims, len(x))
    coordinates[:, :kept] = eigenvectors[:, :kept] * np.sqrt(eigenvalues[:kept])
    for column in range(kept):
        if coordinates[np.argmax(np.abs(coordinates[:, column])), column] < 0:
            coordinates[:, column] *= -1
    total = eigenvalues.sum()
    ratios = np.zeros(dims)
    if total > 0:
        ratios[:kept] = eigenvalues[:kept] / total
    return coordinates, ratios


def _umap(features: np.ndarray, dims: int, seed: int) -> np.ndarray:
    umap = require_package("umap")
    neighbours = max(2, min(15, len(features) - 1))
    reducer = umap.UMAP(n_components=dims, n_neighbors=neighbours, init="random", random_state=seed, n_jobs=1)
    return np.asarray(reducer.fit_transform(features), np.float64)


def _tsne(features: np.ndarray, dims: int, seed: int) -> np.ndarray:
    open_tsne = require_package("tsne")
    # openTSNE needs perplexity well below the number of points. Barnes-Hut, not FFT: FFT pays
    # a fixed interpolation-grid cost (~20 s for 26 points here) that only pays off for ~10^4
    # points and more, and it is 1D/2D only; trajectories have tens to hundreds of snapshots.
    perplexity = max(1.0, min(30.0, (len(features) - 1) / 3))
    tsne = open_tsne.TSNE(
        n_components=dims,
        perplexity=perplexity,
        negative_gradient_method="fft" if dims <= 2 and len(features) >= 10_000 else "bh",
        neighbors="exact",
        random_state=seed,
        n_jobs=1,
    )
    return np.asarray(tsne.fit(features), np.float64)


def project(matrix: np.ndarray, method: str = "pca", dims: int = 2, *, seed: int = 0) -> np.ndarray:
    """Coordinates of the rows of ``matrix`` in ``dims`` (2 or 3) dimensions."""
    if method not in METHODS:
        raise ValueError(f"unknown projection method {method!r}; choose from {METHODS}")
    if dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims}")
    if len(matrix) < 2:
        raise ValueError(f"a projection needs at least 2 snapshots, got {len(matrix)}")
    if method == "pca":
        return pca(matrix, dims)[0]
    if len(matrix) <= dims + 1:
        raise ValueError(f"{method} needs more than {dims + 1} snapshots for a {dims}D embedding, got {len(matrix)}")
    features, _ = pca(matrix, min(_MANIFOLD_INPUT_DIMS, len(matrix)))
    return (_umap if method == "umap" else _tsne)(features, dims, seed)


def project_trajectory(
    trajectory: Trajectory, method: str = "pca", dims: int = 2, *, seed: int = 0, relative: bool = True
) -> Projection:
    """Both roles' snapshots (every recorded step, not only iteration ends) in one space.

    ``relative``: project each role's displacement from its first snapshot. Policy and reward
    adapters start far apart, and in absolute coordinates that gap is the first principal
    component, squeezing both paths into lines; displacements compare how they move."""
    policy, reward = trajectory.policy.matrix, trajectory.reward.matrix
    if relative:
        policy, reward = policy - policy[0], reward - reward[0]
    matrix = np.concatenate([policy, reward])
    roles = ["policy"] * len(trajectory.policy.labels) + ["reward"] * len(trajectory.reward.labels)
    labels = list(trajectory.policy.labels) + list(trajectory.reward.labels)
    ratios = None
    if method == "pca":
        if len(matrix) < 2:
            raise ValueError("a projection needs at least 2 snapshots")
        coordinates, ratios = pca(matrix, dims)
    else:
        coordinates = project(matrix, method, dims, seed=seed)
    return Projection(
        method=method,
        coordinates=coordinates,
        roles=roles,
        labels=labels,
        explained_variance_ratio=ratios,
        relative=relative,
    )
