"""Per-iteration checkpoints, written atomically: a temporary file, flushed, then renamed.

A kill at any moment leaves either the previous checkpoint or the new one, never a torn file.
Directories (the exported adapters) the same way: written into a temporary directory beside
the target, flushed, then renamed to it.

Also what a resume must agree on with the checkpoint's config (``RESUME_MUST_MATCH``,
``resume_differences``), and ``kill_point``, the test-only hook that SIGKILLs the process at a
named point (tests/rloo/test_kill.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import os
import shutil
import signal

import torch

from .config import TrainConfig, canonical_keys

# TrainConfig keys a resume may change: where the outputs go and how they are shown, where and
# how fast the run computes, and how long it runs (extending ``iterations`` is how a finished run
# goes on). The steps, samples, rewards and weights that the resumed iterations compute do not
# depend on them (``device``, ``backend`` and ``threads`` only through float rounding: moving a run to another
# machine is legitimate, not a different run).
RESUME_MAY_CHANGE = ("output_dir", "cache_dir", "progress", "plot", "save_adapters", "report_to", "logging_dir",
                     "snapshot_every", "device", "backend", "threads", "time_budget_s", "iterations")
# Every other key decides the trajectory: what is trained on, the model and adapters, sampling,
# objective, optimiser and reward-model settings, the seed, and the held-out splits (which also
# decide the training prompts) and their paired evaluations. A resume whose config differs from
# the checkpoint's in one of them would silently diverge from the uninterrupted run: refused,
# unless the key is named in the resume's override. A key that an older checkpoint's config
# lacks is compared with its default (the value that run had); a key in neither list (a new one)
# is compared too. tests/rloo/test_resume.py checks that the two lists split TrainConfig's keys.
RESUME_MUST_MATCH = (
    "model", "prompts", "judge", "judge_order", "prompt_words", "max_prompts", "prompt_template",
    "dtype", "load_in_4bit", "lora_r", "lora_alpha", "lora_targets", "policy_adapter", "reward_adapter",
    "shared_lora_init",
    "num_generations", "max_completion_length", "max_prompt_tokens", "max_length", "temperature", "top_k",
    "top_p", "beta", "objective", "clip", "normalize_advantages", "logprob_chunk", "num_iterations",
    "reward_model", "reward_funcs",
    "optimizer", "first_iteration", "prompt_fraction", "batch_prompts", "steps_per_iteration", "lr",
    "max_projected_grad",
    "direction_norm", "rescale_guided_lr", "directions", "spsa_lr", "eps", "adamw_lr", "weight_decay",
    "alpha", "granularity",
    "guided", "judge_queries", "trim_delta", "link", "weibull_shape", "two_sided", "perturbation", "blocks",
    "block_tensors", "rank_policies", "judge_temperature",  # the preference-only modes
    "reward_lr", "reward_epochs", "reward_batch_size", "reward_max_grad_norm", "reward_warmup",
    "reward_warmup_prompts",
    "seed", "eval_prompts", "validation_prompts", "num_generations_eval", "eval_split", "start_from",
)
# Of those, the keys an override cannot change: the checkpoint's tensors and optimizer state
# were made under them (shapes, adapter names, the ZO noise seed, ZOPrO's layout settings), so
# the resumed run could not follow the new value. Start a new run (or ``start_from``) instead.
RESUME_NOT_OVERRIDABLE = ("model", "dtype", "load_in_4bit", "lora_r", "lora_targets", "policy_adapter",
                          "reward_adapter", "seed", "optimizer", "granularity", "direction_norm", "directions")


def _plain(value):
    """Tuples as lists (a YAML list and a tuple given in Python are the same setting)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def resume_differences(stored: dict, config: TrainConfig) -> dict:
    """``{key: (checkpoint's value, config's value)}`` for every key a resume must not change
    silently (all but ``RESUME_MAY_CHANGE``) where the checkpoint's stored config differs from
    ``config``; old key names are read as TRL's, a key the stored config lacks is its default."""
    stored = canonical_keys(stored, warn=False)  # a checkpoint from before the renames too
    current = config.to_dict()
    differences = {}
    for field in dataclasses.fields(TrainConfig):
        if field.name in RESUME_MAY_CHANGE:
            continue
        if field.name in stored:
            before = stored[field.name]
        else:
            before = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if _plain(before) != _plain(current[field.name]):
            differences[field.name] = (before, current[field.name])
    return differences


def override_keys(override) -> tuple[str, ...]:
    """A resume's override as TRL's key names: "lr,eps", or a list of names (old names read as
    the new ones); an unknown key, or one that cannot be overridden, is an error."""
    if override is None:
        return ()
    names = override.split(",") if isinstance(override, str) else [n for item in override for n in item.split(",")]
    names = [n.strip() for n in names if n.strip()]
    names = list(canonical_keys(dict.fromkeys(names), warn=False))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"resume override: unknown config key(s) {unknown}")
    fixed = [n for n in names if n in RESUME_NOT_OVERRIDABLE]
    if fixed:
        raise ValueError(f"resume override: {fixed} cannot be changed on resume (the checkpoint's tensors and "
                         f"optimizer state were made under them): start a new run, or one with start_from")
    return tuple(names)


def kill_point(name: str, value) -> None:
    """TEST-ONLY hook: SIGKILL this process here when the environment has
    ``ZOPRO_TEST_KILL_<name>=<value>`` (tests/rloo/test_kill.py: a kill after a step's record,
    inside a refinement, inside a checkpoint write). Unset, it does nothing; never set it in a
    real run."""
    wanted = os.environ.get(f"ZOPRO_TEST_KILL_{name}")
    if wanted is not None and wanted == str(value):
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(state: dict, path: str):
    """``state`` to ``path`` atomically: a temporary file beside it, fsynced, renamed over it,
    then the directory fsynced (the rename itself survives a crash). Temporary files that an
    earlier kill left behind are removed."""
    for stale in glob.glob(f"{glob.escape(path)}.tmp-*"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(stale)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        kill_point("IN_CHECKPOINT", state.get("next_iteration"))  # test-only: the new file written, not renamed
        os.replace(temporary, path)
        _fsync(os.path.dirname(os.path.abspath(path)))
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
