"""What every benchmark records about its machine, and where its results go.

Each results file is ``<kind>-<device>[-<variant>]-<date>.json`` (plus ``.md`` and, where there is a
plot, ``.png``) holding ``{"environment": ..., "results": ..., **extra}``. The environment names the
GPU (or CPU), the driver, the versions of torch, triton, transformers and bitsandbytes, the date
and the exact command line.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def _version(module: str):
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken on this machine: recorded as absent
        return None


def _gpu_driver() -> str | None:
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def command_argv(script: str, argv: list[str] | None) -> list[str]:
    """The command line to record: ``sys.argv`` when run as a script, else the script and ``argv``
    (a call from Python, e.g. a test, recorded as the equivalent command)."""
    if argv is None:
        return list(sys.argv)
    return [f"benchmarks/{Path(script).name}", *map(str, argv)]


def environment(device, argv: list[str] | None = None) -> dict:
    """The machine and software a result was measured with, and the command that produced it."""
    device = torch.device(device)
    argv = list(sys.argv if argv is None else argv)
    info = {
        "date": dt.date.today().isoformat(),
        "time": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in argv),
        "argv": argv,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "bitsandbytes": _version("bitsandbytes"),
        "peft": _version("peft"),
        "device": str(device),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"gpu": torch.cuda.get_device_name(device), "gpu_memory_bytes": int(props.total_memory),
                 "cuda": torch.version.cuda, "driver": _gpu_driver()}
    else:
        info |= {"gpu": None, "gpu_memory_bytes": None, "cuda": torch.version.cuda, "driver": None}
    return info


def device_tag(env: dict) -> str:
    """``nvidia-h100-80gb-hbm3`` or ``cpu``: the device part of a results file name."""
    return (env.get("gpu") or "cpu").replace(" ", "-").replace("/", "-").lower()


def results_stem(out_dir, kind: str, env: dict, variant: str | None = None) -> Path:
    """``out_dir/<kind>-<device>[-<variant>]-<date>`` (the caller adds the suffix)."""
    parts = [kind, device_tag(env)] + ([variant] if variant else []) + [env["date"]]
    return Path(out_dir) / "-".join(parts)


def write_results(stem: Path, env: dict, results, markdown: str, **extra) -> Path:
    """``stem.json`` (environment, results, extra keys) and ``stem.md``; returns the JSON path."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    path = stem.with_suffix(".json")
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps({"environment": env, "results": results, **extra}, indent=2, default=str))
    os.replace(temporary, path)
    stem.with_suffix(".md").write_text(markdown)
    return path


def environment_line(env: dict) -> str:
    """One markdown line naming the machine, versions, date and command."""
    where = env.get("gpu") or f"CPU {env.get('cpu')} ({env.get('torch_threads')} threads)"
    driver = f", driver {env['driver']}" if env.get("driver") else ""
    return (f"{where}{driver}, {env['date']}; torch {env['torch']}, triton {env.get('triton')}, "
            f"transformers {env.get('transformers')}, bitsandbytes {env.get('bitsandbytes')}. "
            f"Command: `{env['command']}`")


def matplotlib_pyplot():
    """pyplot on the Agg backend, or None (with a note) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[benchmarks] no PNG: pip install matplotlib")
        return None
    return plt
