"""``report_to: [tensorboard]``: every scalar of metrics.jsonl as a TensorBoard scalar.

The log directory is this run's (``logging_dir``, else ``$TENSORBOARD_LOGGING_DIR`` as
transformers reads it, else ``output_dir/runs``). metrics.jsonl is the record: at every start
(fresh, ``--resume``, ``start_from``) the event files this run wrote (listed in the directory's
``.zopro-event-files``; other runs' files are left alone) are replaced by one written
from the metrics file as it then stands (a resume drops the interrupted iteration's records,
``start_from`` brings the earlier run's), and every record logged afterwards is added to it. So
TensorBoard shows exactly the metrics file, never a step twice, whatever the event files' names.

Tags (x axis: the global optimisation step):

- step records: ``train/<key>`` at the record's ``step``;
- evaluations: ``eval/<split>/task_score`` at ``global_step``;
- iteration records: ``iteration/<key>``, reward warm-up: ``reward_warmup/<key>`` (any other
  event: ``<event>/<key>``) at ``global_step``.

Every int, float or bool value is written except ``step`` and ``global_step`` (the x axis); of
an evaluation only ``task_score`` (its per-sample ``scores`` list is not a scalar).
"""

from __future__ import annotations

import glob
import json
import math
import os

X_AXIS = ("step", "global_step")
MANIFEST = ".zopro-event-files"  # the event files this run wrote


def log_dir(config) -> str:
    return config.logging_dir or os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(config.output_dir, "runs")


def summary_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ImportError("report_to: ['tensorboard'] needs TensorBoard: pip install tensorboard "
                          "(or report_to: none)") from error
    return SummaryWriter


def scalars(record: dict) -> dict[str, float]:
    """The TensorBoard tags and values of one metrics record."""
    if "step" in record and "event" not in record:
        prefix, keys = "train/", record.keys()
    elif record.get("event") == "eval":
        prefix, keys = f"eval/{record.get('split', 'held_out')}/", ("task_score",)
    else:
        prefix, keys = f"{record.get('event', 'other')}/", record.keys()
    values = {}
    for key in keys:
        value = record.get(key)
        if key in X_AXIS or not isinstance(value, (int, float)):  # bools are ints: 0/1
            continue
        values[prefix + key] = float(value)
    return values


class TensorBoardLog:
    """A ``SummaryWriter`` fed with metrics records (see the module's docstring)."""

    def __init__(self, directory: str, records=()):
        writer_class = summary_writer_class()
        os.makedirs(directory, exist_ok=True)
        manifest = os.path.join(directory, MANIFEST)
        # Only the event files this log wrote before are replaced (a directory shared with other
        # runs keeps theirs): they are listed in the manifest.
        if os.path.exists(manifest):
            with open(manifest, encoding="utf-8") as handle:
                for name in handle.read().split():
                    path = os.path.join(directory, os.path.basename(name))
                    if os.path.exists(path):
                        os.remove(path)  # rewritten below from metrics.jsonl
        before = set(glob.glob(os.path.join(directory, "events.out.tfevents.*")))
        self.directory = directory
        self.writer = writer_class(log_dir=directory)
        self.next_step = 0
        for record in records:
            self.log(record)
        self.writer.flush()
        mine = sorted(set(glob.glob(os.path.join(directory, "events.out.tfevents.*"))) - before)
        with open(manifest, "w", encoding="utf-8") as handle:
            handle.write("\n".join(os.path.basename(path) for path in mine) + "\n")

    @classmethod
    def from_metrics(cls, directory: str, metrics_path: str) -> "TensorBoardLog":
        records = []
        if os.path.exists(metrics_path):
            with open(metrics_path, encoding="utf-8") as handle:
                records = [json.loads(line) for line in handle if line.strip()]
        return cls(directory, records)

    def step_of(self, record: dict) -> int:
        """A step record's ``step``; else ``global_step`` (records written before it was logged with
        iteration records: the step after the last step record)."""
        if "step" in record and "event" not in record:
            return int(record["step"])
        value = record.get("global_step")
        return int(value) if isinstance(value, (int, float)) and math.isfinite(value) else self.next_step

    def log(self, record: dict):
        step = self.step_of(record)
        if "step" in record and "event" not in record:
            self.next_step = step + 1
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step)

    def flush(self):
        self.writer.flush()

    def close(self):
        self.writer.close()
