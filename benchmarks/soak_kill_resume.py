"""Soak test: SIGKILL (or SIGTERM) training at random instants, resume, and check nothing was lost.

Each episode trains tiny with checkpoints every few steps under one mode (resident,
stream from RAM, stream from disk), always launched as `streamer train ... --resume`
the way a supervisor would restart it. Once the run has started training, the process
is SIGKILLed after a random delay drawn over its training time, so kills land mid-step,
mid-checkpoint, mid-update of the disk store and mid-export. After every kill:

- every complete checkpoint is verified (sizes, sha256, headers): a failure counts as
  a corrupt checkpoint (target: 0), and losing every checkpoint once one existed
  counts as lost progress;
- the metrics rows present must carry exactly the losses of an uninterrupted
  reference run (no checkpoints) for their steps.

A resume is exact when every row it wrote matched the reference bit for bit and its
episode finished with final weights equal to the reference's (target: all of them).
Each stop also counts the steps the resume must run again: the rows past the newest
checkpoint. With `--signal TERM` (or INT) the run is asked to stop, as a scheduler
pre-empting it would: once its steps have begun it finishes the step, writes a
checkpoint there and exits 143 (streamer.train's [Note: stopping on a signal]), so
no step is run again (target: 0); a signal during start-up still kills it.

    python benchmarks/soak_kill_resume.py --kills 50
    python benchmarks/soak_kill_resume.py --signal TERM --kills 30 --checkpoint-every 8
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, machine_line, write_json  # noqa: E402

import streamer.checkpoint as checkpoint  # noqa: E402
from streamer.data import prepare  # noqa: E402
from streamer.errors import UserError  # noqa: E402
from streamer.train import load_final  # noqa: E402

MODES = {
    "resident": ["--mode", "resident"],
    "stream-ram": ["--mode", "stream", "--offload", "ram"],
    "stream-disk": ["--mode", "stream", "--offload", "disk"],
}
# One thread in every process: float sums split over threads round differently, and
# tiny's matmuls gain nothing from a second thread.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def command(args: argparse.Namespace, data: Path, mode: str, out: Path, checkpoints: bool) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "streamer",
        "train",
        "--model",
        "tiny",
        *MODES[mode],
        "--steps",
        str(args.steps),
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--warmup",
        "4",
        "--data",
        str(data),
        "--out",
        str(out),
        "--device",
        "cpu",
        "--no-progress",
    ]
    if checkpoints:
        cmd += ["--checkpoint-every", str(args.checkpoint_every), "--keep", "2", "--resume"]
    return cmd


def losses(out: Path) -> dict[int, float]:
    """Step -> loss of every whole metrics row (a row torn by the kill is skipped)."""
    rows = {}
    path = out / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[row["step"]] = row["loss"]
    return rows


def reference(args: argparse.Namespace, data: Path, mode: str, scratch: Path) -> dict:
    """An uninterrupted run without checkpoints, and how long its training takes (from
    `run.json` appearing to the last metrics row)."""
    out = scratch / f"reference-{mode}"
    process = subprocess.Popen(
        command(args, data, mode, out, checkpoints=False),
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    while not (out / "run.json").exists() and process.poll() is None:
        time.sleep(0.002)
    started = time.perf_counter()
    while len(losses(out)) < args.steps and process.poll() is None:
        time.sleep(0.002)
    train_s = time.perf_counter() - started
    _, stderr = process.communicate()
    assert process.returncode == 0, stderr
    return {"losses": losses(out), "weights": load_final(out / "final"), "train_s": train_s}


def verify_all(out: Path) -> tuple[int, int]:
    """(complete checkpoints, corrupt ones among them)."""
    found = checkpoint.complete(out)
    corrupt = 0
    for _, folder in found:
        try:
            checkpoint.verify_rank(folder, checkpoint.read_manifest(folder), 0)
        except UserError:
            corrupt += 1
    return len(found), corrupt


def where(out: Path, steps: int) -> str:
    """Where the kill landed, judged from what it left behind."""
    root = checkpoint.checkpoints_root(out)
    partial = [p for p in root.glob("step-*") if not (p / checkpoint.MANIFEST).exists()] if root.exists() else []
    if partial or (root.exists() and any(".tmp" in p.name for p in root.rglob("*"))):
        return "mid-checkpoint"
    return "after training (export)" if len(losses(out)) >= steps else "mid-step"


def rows_match(out: Path, ref: dict) -> bool:
    rows = losses(out)
    return sorted(rows) == list(range(len(rows))) and all(ref["losses"][s] == loss for s, loss in rows.items())


def start_and_stop(cmd: list[str], out: Path, delay_s: float, signum: int) -> int | None:
    """Start a run; once it trains, send it `signum` after `delay_s`; its exit status,
    or None if it finished first."""
    marker = out / "run.json"
    before = marker.stat().st_mtime_ns if marker.exists() else 0
    process = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while process.poll() is None and not (marker.exists() and marker.stat().st_mtime_ns != before):
        time.sleep(0.005)
    try:
        process.wait(timeout=delay_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signum)
        process.wait()
    else:
        assert process.returncode == 0, process.stderr.read()  # it failed on its own
    if process.returncode != 0:
        return process.returncode
    # Finished before the signal, or (SIGTERM, SIGINT) took it in its last step, whose
    # end is the run's: nothing was stopped.
    return None


def episode(
    args: argparse.Namespace, data: Path, mode: str, ref: dict, out: Path, kills: int, rng: random.Random
) -> dict:
    """Kill one run `kills` times (fewer if it finishes first), then let it finish."""
    cmd = command(args, data, mode, out, checkpoints=True)
    result = {"mode": mode, "kills": 0, "where": {}, "resumes_rows_exact": 0, "corrupt": 0, "lost_progress": 0,
              "steps_redone": 0, "graceful": 0, "graceful_lossless": 0}
    ever_complete = False
    while result["kills"] < kills:
        # Over the training left from the newest checkpoint, plus a little for the export.
        resumed_at = max((step for step, _ in checkpoint.complete(out)), default=0)
        window = 1.1 * ref["train_s"] * (args.steps - resumed_at) / args.steps
        status = start_and_stop(cmd, out, rng.uniform(0, window), args.signum)
        if status is None:
            break
        result["kills"] += 1
        # A stop the run made itself: the status of the signal, and run.json saying so.
        stopped = json.loads((out / "run.json").read_text()).get("stopped") if status == 128 + args.signum else None
        landed = "stopped after a step" if stopped else where(out, args.steps)
        result["where"][landed] = result["where"].get(landed, 0) + 1
        newest = max((step for step, _ in checkpoint.complete(out)), default=0)
        redone = len(losses(out)) - newest  # rows past the newest checkpoint: steps a resume runs again
        result["steps_redone"] += redone
        if stopped:
            result["graceful"] += 1
            result["graceful_lossless"] += int(redone == 0 and stopped["steps_done"] == newest)
        complete, corrupt = verify_all(out)
        result["corrupt"] += corrupt
        result["lost_progress"] += int(ever_complete and complete == 0)
        ever_complete |= complete > 0
        # The rows now present include those of the run just killed: after the second
        # kill on, that run was a resume, and this judges it (the first was a fresh start).
        if result["kills"] > 1:
            result["resumes_rows_exact"] += int(rows_match(out, ref))
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    final = load_final(out / "final")
    result["final_exact"] = (
        rows_match(out, ref)
        and len(losses(out)) == args.steps
        and all(torch.equal(final[name], ref["weights"][name]) for name in ref["weights"])
    )
    # Each kill is followed by a resume, the last one judged by the finished run; an
    # episode's resumes count as exact only if it also ends on the reference's weights.
    result["resumes"] = result["kills"]
    exact = result["resumes_rows_exact"] + int(result["kills"] > 0 and result["final_exact"])
    result["resumes_exact"] = exact if result["final_exact"] else 0
    return result


def summarize(episodes: list[dict]) -> dict:
    by_mode: dict[str, dict] = {}
    for e in episodes:
        row = by_mode.setdefault(
            e["mode"],
            {
                "episodes": 0,
                "kills": 0,
                "resumes_exact": 0,
                "corrupt": 0,
                "lost_progress": 0,
                "finals_exact": 0,
                "steps_redone": 0,
                "graceful": 0,
                "graceful_lossless": 0,
                "where": {},
            },
        )
        row["episodes"] += 1
        row["finals_exact"] += int(e["final_exact"])
        for key in ("kills", "resumes_exact", "corrupt", "lost_progress", "steps_redone", "graceful",
                    "graceful_lossless"):
            row[key] += e[key]
        for landed, n in e["where"].items():
            row["where"][landed] = row["where"].get(landed, 0) + n
    return by_mode


def print_table(by_mode: dict) -> None:
    print(f"{'mode':<12}{'episodes':>9}{'stops':>7}{'exact':>7}{'corrupt':>9}{'lost':>6}{'finals':>8}"
          f"{'redone':>8}{'graceful':>10}  stop landed")
    for mode, row in by_mode.items():
        landed = ", ".join(f"{k} {v}" for k, v in sorted(row["where"].items()))
        print(
            f"{mode:<12}{row['episodes']:>9}{row['kills']:>7}{row['resumes_exact']:>7}{row['corrupt']:>9}"
            f"{row['lost_progress']:>6}{row['finals_exact']:>5}/{row['episodes']:<2}{row['steps_redone']:>8}"
            f"{row['graceful_lossless']:>6}/{row['graceful']:<3}  {landed}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=50)
    parser.add_argument("--kills-per-episode", type=int, default=5)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--checkpoint-every", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--signal", default="KILL", choices=["KILL", "TERM", "INT"],
                        help="KILL: no warning; TERM or INT: the run is asked to stop")
    parser.add_argument("--json", type=Path, default=None,
                        help="default: results/soak_kill_resume.json, or soak_sigterm_resume.json and so on")
    args = parser.parse_args()
    args.signum = int(getattr(signal, f"SIG{args.signal}"))
    if args.json is None:
        args.json = RESULTS / ("soak_kill_resume.json" if args.signal == "KILL" else
                               f"soak_sig{args.signal.lower()}_resume.json")
    rng = random.Random(args.seed)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        scratch = Path(tmp)
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        data = scratch / "data.npy"
        prepare(data, [stdlib / "textwrap.py", stdlib / "argparse.py"])
        refs = {mode: reference(args, data, mode, scratch) for mode in MODES}
        episodes, killed = [], 0
        while killed < args.kills:
            mode = list(MODES)[len(episodes) % len(MODES)]
            quota = min(args.kills_per_episode, args.kills - killed)
            result = episode(args, data, mode, refs[mode], scratch / f"episode-{len(episodes)}", quota, rng)
            episodes.append(result)
            killed += result["kills"]
            print(
                f"episode {len(episodes)} ({mode}): {result['kills']} kills, "
                f"final {'exact' if result['final_exact'] else 'DIFFERS'}, {result['corrupt']} corrupt",
                flush=True,
            )
    by_mode = summarize(episodes)
    totals = {
        "kills": killed,
        "resumes": sum(e["resumes"] for e in episodes),
        "resumes_exact": sum(e["resumes_exact"] for e in episodes),
        "corrupt_checkpoints": sum(e["corrupt"] for e in episodes),
        "lost_progress": sum(e["lost_progress"] for e in episodes),
        "finals_exact": sum(e["final_exact"] for e in episodes),
        "steps_redone": sum(e["steps_redone"] for e in episodes),
        "graceful_stops": sum(e["graceful"] for e in episodes),
        "graceful_lossless": sum(e["graceful_lossless"] for e in episodes),
        "episodes": len(episodes),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    info = machine()
    print(machine_line(info))
    print_table(by_mode)
    print(
        f"resumes exact: {totals['resumes_exact']}/{totals['resumes']}; checkpoints found corrupt: "
        f"{totals['corrupt_checkpoints']}; progress lost: {totals['lost_progress']}; steps run again: "
        f"{totals['steps_redone']}; stops the run made itself at a step's end: {totals['graceful_stops']} "
        f"({totals['graceful_lossless']} with nothing to run again); {totals['wall_s']} s"
    )
    write_json(
        args.json,
        {
            "machine": info,
            "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "totals": totals,
            "by_mode": by_mode,
            "episodes": episodes,
        },
    )


if __name__ == "__main__":
    main()
