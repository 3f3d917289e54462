"""Per-iteration checkpoints, written atomically: a temporary file, flushed, then renamed.

A kill at any moment leaves either the previous checkpoint or the new one, never a torn file.
Directories (the exported adapters) the same way: written into a temporary directory beside
the target, flushed, then renamed to it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil

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


def _fsync(path: str):
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def atomic_directory(path: str):
    """Yields a temporary directory beside ``path`` to write into; when the block ends normally it
    is flushed and renamed to ``path``. An older ``path`` is moved aside first and removed after,
    so a kill leaves the old directory, the new one or (between the two renames) none, never a
    half-written one; a block that raises leaves ``path`` as it was. Temporary directories that
    an earlier kill left behind are removed (or put back, for an old one that has no successor)."""
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    for stale in glob.glob(os.path.join(parent, f".{glob.escape(name)}.tmp-*")):
        shutil.rmtree(stale, ignore_errors=True)
    for moved in glob.glob(os.path.join(parent, f".{glob.escape(name)}.old-*")):
        if os.path.exists(path):
            shutil.rmtree(moved, ignore_errors=True)
        else:  # a kill between the two renames: the last complete directory comes back
            os.replace(moved, path)
    temporary = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    os.makedirs(temporary)
    try:
        yield temporary
        for root, _, files in os.walk(temporary):
            for file in files:
                _fsync(os.path.join(root, file))
        if os.path.exists(path):
            old = os.path.join(parent, f".{name}.old-{os.getpid()}")
            os.replace(path, old)
            os.replace(temporary, path)
            shutil.rmtree(old)
        else:
            os.replace(temporary, path)
        _fsync(parent)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
