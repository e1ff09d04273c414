"""Shared by the benchmark scripts: machine description, JSON output, timing runs."""

from __future__ import annotations

import json
import os
import platform
import subprocess
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


def run_child(cmd: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a benchmark's child process with its output captured; if it fails, print the
    end of that output before raising, or a run on a machine that is gone afterwards
    leaves nothing to diagnose."""
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-4000:]
        print(f"{' '.join(map(str, cmd[:5]))} ... exited {done.returncode}; its last output:\n{tail}", file=sys.stderr)
        raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)
    return done


def pyplot():  # noqa: ANN201 - the matplotlib.pyplot module
    """matplotlib's pyplot on the file-only backend: benchmark machines have no screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
