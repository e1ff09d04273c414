"""Shared by the benchmark scripts: machine description, JSON output, timing runs."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

import psutil
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """What the numbers were measured on, stated in every result file."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(info: dict) -> str:
    gpu = f", {info['gpu']}" if "gpu" in info else ""
    return f"{info['date']} on {info['cpu']} ({info['cores']} cores, {info['ram_gib']} GiB{gpu}), torch {info['torch']}"


def write_json(path: Path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def streamer_train_cmd(**flags: object) -> list[str]:
    """`python -m streamer train --flag value ...` (underscores become dashes; True is a
    bare switch), so the benchmarks time the command users run. No benchmark reads the
    final weights, so none exports them (gpt-j-6b's are 24 GB)."""
    cmd = [sys.executable, "-m", "streamer", "train", "--no-progress", "--no-save-final"]
    for name, value in flags.items():
        flag = "--" + name.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    return cmd


def pyplot():  # noqa: ANN201 - the matplotlib.pyplot module
    """matplotlib's pyplot on the file-only backend: benchmark machines have no screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
