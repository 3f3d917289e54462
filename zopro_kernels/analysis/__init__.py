"""Trajectory analysis of policy and reward LoRA weights (the method's section 3).

``TrajectoryRecorder`` saves snapshots during training; ``load_trajectory`` reads them back;
``compute_metrics``, ``project_trajectory`` and ``write_report`` turn a run into a report
(``zopro-analyze RUN_DIR``). Importing this package needs only torch and numpy: safetensors,
scipy and matplotlib are imported when recording, computing Procrustes or plotting.
"""

from .metrics import compute_metrics, write_metrics
from .projection import MissingDependencyError, project_trajectory
from .recorder import TrajectoryRecorder
from .report import write_report
from .synthetic import write_synthetic_run
from .trajectory import Trajectory, TrajectoryError, load_trajectory

__all__ = [
    "TrajectoryRecorder",
    "Trajectory",
    "TrajectoryError",
    "load_trajectory",
    "compute_metrics",
    "write_metrics",
    "project_trajectory",
    "MissingDependencyError",
    "write_report",
    "write_synthetic_run",
]
