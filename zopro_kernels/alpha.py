"""α schedules: how much of z follows the previous policy update Δπ within an iteration."""

from __future__ import annotations

import math
from typing import Callable

ALPHA_START = 1.0 - 1e-3
# "exp" reaches ALPHA_START * EXP_FLOOR at the end of the iteration.
EXP_FLOOR = 1e-3
NAMED = ("linear", "exp", "constant")


def needs_iteration_length(alpha) -> bool:
    return isinstance(alpha, str) and alpha in ("linear", "exp")


def validate_alpha(alpha):
    if isinstance(alpha, str):
        if alpha not in NAMED:
            raise ValueError(f"alpha must be one of {NAMED}, a float in [0, 1] or a callable; got {alpha!r}")
    elif callable(alpha):
        pass
    elif isinstance(alpha, (int, float)) and not isinstance(alpha, bool):
        _check_value(float(alpha), "alpha")
    else:
        raise TypeError(f"alpha must be a schedule name, a float or a callable, got {type(alpha).__name__}")


def alpha_at(alpha, step_in_iteration: int, steps_per_iteration: int | None) -> float:
    """α for the ``step_in_iteration``-th step (0-based) of the current iteration."""
    k = step_in_iteration
    if alpha == "constant":
        return ALPHA_START
    if alpha == "linear":
        return ALPHA_START * max(0.0, 1.0 - k / steps_per_iteration)
    if alpha == "exp":
        return ALPHA_START * EXP_FLOOR ** (k / steps_per_iteration)
    if callable(alpha):
        return _check_value(alpha(k), f"alpha({k})")
    return float(alpha)


def _check_value(value, what: str) -> float:
    value = float(value)
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ValueError(f"{what} must be in [0, 1], got {value}")
    return value


AlphaSchedule = str | float | Callable[[int], float]
