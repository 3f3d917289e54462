"""Per-iteration checkpoints, written atomically: a temporary file, flushed, then renamed.

A kill at any moment leaves either the previous checkpoint or the new one, never a torn file.
"""

from __future__ import annotations

import os

import torch


def save_checkpoint(state: dict, path: str):
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def load_checkpoint(path: str) -> dict | None:
    """The saved state, or None when no checkpoint exists yet."""
    if not os.path.exists(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise RuntimeError(f"checkpoint {path!r} could not be read ({error}); "
                           f"delete it to start over") from error
