"""Jobs of a fixed wall time, requeued until a run ends: `--time-limit` against a kill.

A cluster runs a long training as a chain of jobs, each with a wall time at which the
scheduler kills it; a job script requeues the same command with `--resume` until the
run is done. This script plays that scheduler, for one run and two policies:

- `time-limit`: each job runs `streamer train ... --time-limit LIMIT`, which stops in
  time with a checkpoint and exits 75 (streamer.train's [Note: stopping in time]); the
  scheduler still kills a job that outlives its limit (an overrun; target: 0).
- `kill`: each job runs without it, and the scheduler kills it at the limit; the run
  goes on from its newest periodic checkpoint, and runs again every step after it.

Per policy: the jobs it took, the steps run again (target for `time-limit`: 0), the
overruns, the total wall time, and how much of each job's limit went unused. Both
policies write periodic checkpoints every `--checkpoint-every` steps; the run is the
same (model, data, steps), and its losses must be every step's, once.

    python benchmarks/bench_time_limit.py --model gpt3-125m --steps 40 --limit 75
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, machine_line, streamer_train_cmd, write_json  # noqa: E402

from streamer.checkpoint import complete  # noqa: E402
from streamer.data import prepare  # noqa: E402
from streamer.status import read_rows  # noqa: E402

OUT_OF_TIME = 75


def rows(out: Path) -> list[int]:
    """The steps of the whole metrics rows (a row torn by a kill is left out)."""
    return [row["step"] for row in read_rows(out / "metrics.jsonl")]


def newest_checkpoint(out: Path) -> int:
    return max((step for step, _ in complete(out)), default=0)


def job(cmd: list[str], limit_s: float, out: Path) -> dict:
    """One job: the command, killed if it is still running `limit_s` after its start."""
    start = newest_checkpoint(out)  # where its --resume starts (the rows after it are run again)
    started = time.monotonic()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())})
    try:
        _, err = process.communicate(timeout=limit_s)
        killed = False
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)  # a scheduler's end of the wall time
        _, err = process.communicate()
        killed = True
    wall_s = time.monotonic() - started
    if not killed and process.returncode not in (0, OUT_OF_TIME):
        raise SystemExit(f"a job failed on its own (status {process.returncode}):\n{err[-3000:]}")
    steps = rows(out)
    # A kill loses the rows past the newest checkpoint: the next job runs them again.
    redone = len(steps) - newest_checkpoint(out) if killed else 0
    return {"status": None if killed else process.returncode, "killed": killed, "wall_s": wall_s,
            "steps_run": len(steps) - start, "steps_redone": redone}


def run_policy(policy: str, args: argparse.Namespace, data: Path, scratch: Path) -> dict:
    out = scratch / policy
    flags = dict(model=args.model, mode="stream", offload=args.offload, steps=args.steps,
                 batch_size=args.batch_size, seq_len=args.seq_len, warmup=2, data=data, out=out,
                 device="cpu", checkpoint_every=args.checkpoint_every, keep=2, resume=True)
    jobs: list[dict] = []
    # A scheduler requeues every job that did not end well: the run is done when one
    # exits 0 (a kill after the last step, before the run ended, is requeued too).
    while not jobs or jobs[-1]["status"] != 0:
        # Every job is the same command, as a job script requeues it (the first, with
        # no checkpoint to resume, starts the run).
        extra = {"time_limit": f"{args.limit:g}s"} if policy == "time-limit" else {}
        result = job(streamer_train_cmd(**flags, **extra), args.limit, out)
        jobs.append(result)
        ended = "killed" if result["killed"] else f"status {result['status']}"
        again = f", {result['steps_redone']} to run again" if result["steps_redone"] else ""
        print(f"  {policy:<11} job {len(jobs):>2}: {result['wall_s']:6.1f} s, {result['steps_run']:>3} steps, "
              f"{ended}{again}", flush=True)
        if len(jobs) > 4 * args.steps:
            raise SystemExit(f"{policy}: no progress after {len(jobs)} jobs")
    steps = rows(out)
    # A resume truncates the rows past its checkpoint: what is left is every step once.
    assert sorted(steps) == list(range(args.steps)), f"{policy}: rows {steps}"
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return {"policy": policy, "jobs": len(jobs), "overruns": sum(j["killed"] for j in jobs),
            "steps_redone": sum(j["steps_redone"] for j in jobs), "wall_s": sum(j["wall_s"] for j in jobs),
            "limit_unused_s": sum(args.limit - j["wall_s"] for j in jobs[:-1]),  # the last job ends the run
            "final_loss": last["loss"], "per_job": jobs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt3-125m")
    parser.add_argument("--offload", default="disk", choices=["ram", "disk"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--limit", type=float, default=75.0, help="each job's wall time, seconds")
    parser.add_argument("--json", type=Path, default=RESULTS / "time_limit_cpu.json")
    args = parser.parse_args()
    info = machine()
    print(f"# {machine_line(info)}")
    print(f"{args.model} streamed from {args.offload}, {args.steps} steps, checkpoints every "
          f"{args.checkpoint_every}, jobs of {args.limit:.0f} s")
    with tempfile.TemporaryDirectory(prefix="time-limit-") as tmp:
        scratch = Path(tmp)
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        data = scratch / "data.npy"
        prepare(data, sorted(stdlib.glob("*.py"))[:60])
        results = [run_policy(policy, args, data, scratch) for policy in ("time-limit", "kill")]
    print(f"\n{'policy':<12}{'jobs':>6}{'overruns':>10}{'redone':>8}{'wall s':>9}{'unused s':>10}{'loss':>8}")
    for r in results:
        print(f"{r['policy']:<12}{r['jobs']:>6}{r['overruns']:>10}{r['steps_redone']:>8}{r['wall_s']:>9.1f}"
              f"{r['limit_unused_s']:>10.1f}{r['final_loss']:>8.3f}")
    write_json(args.json, {"machine": info, "config": {k: v for k, v in vars(args).items() if k != "json"},
                           "results": results})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
