"""`streamer status DIR`: where a training run stands, read from what it wrote.

A long run's folder answers the questions its owner asks between jobs: is it running,
did it finish, why did it stop, how far is it, is the loss still falling, how fast is
it going and how long is left, and which checkpoint a resume takes. Everything comes
from `run.json`, `metrics.jsonl` and the checkpoints' folders; nothing is written, so
it is safe beside a running process (it reads the rows whole up to the last newline).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

from streamer.errors import UserError

RECENT = 20  # rows the speed and the recent loss are taken over


def read_rows(path: Path) -> list[dict]:
    """The metrics rows written whole (a row being written is left out)."""
    if not path.is_file():
        return []
    text = path.read_text()
    rows = []
    for number, line in enumerate(text[: text.rfind("\n") + 1].splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("step"), int)):
            raise UserError(f"'{path}' line {number} is not a metrics row (a JSON object with its step): the file "
                            "was damaged or edited; restore it, or remove that line")
        rows.append(row)
    return rows


def _alive(process: dict) -> bool:
    """Whether the process run.json names still runs: on this host, with that pid,
    started no later than the run (a pid reused since is younger)."""
    import psutil

    if process.get("host") != socket.gethostname():
        return False
    try:
        return psutil.Process(int(process["pid"])).create_time() <= process["started"] + 1
    except (psutil.Error, KeyError, ValueError, TypeError):
        return False


def run_status(out: Path) -> dict:
    """Everything `status` says about the run in `out`, as data (`--json` prints it)."""
    from streamer.checkpoint import complete

    path = out / "run.json"
    if not path.is_file():
        hint = " (its final/ is: give the run's folder)" if (out.parent / "run.json").is_file() else ""
        raise UserError(f"'{out}' holds no training run (no run.json){hint}: give the --out folder of a "
                        f"`streamer train`")
    try:
        run = json.loads(path.read_text())
        train, model = run["train"], run["model"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(f"'{path}' is not a training run's record ({exc}): give the --out folder of a "
                        f"`streamer train`") from None
    rows = read_rows(out / "metrics.jsonl")
    done = rows[-1]["step"] + 1 if rows else 0
    process = run.get("process", {})
    # A run.json from before runs recorded their end says so by its rows and exports.
    exported = (out / "final" / "config.json").is_file() or not train.get("save_final", True)
    if "finished" in run or ("process" not in run and "stopped" not in run and done == train.get("steps")
                             and exported):
        state = "finished"
    elif "stopped" in run:
        state = "stopped"
    elif process and _alive(process):
        state = "running"
    elif process and process.get("host") != socket.gethostname():
        state = "unknown"  # another machine's process: this one cannot tell
    else:
        state = "ended"  # killed, or failed: a --resume goes on from the newest checkpoint
    recent = [row for row in rows[-RECENT:] if not row.get("skipped")]
    step_s = statistics.median(row["step_s"] for row in recent) if recent else None
    evals = [{"step": row["step"], "loss": row["eval_loss"]} for row in rows if "eval_loss" in row]
    checkpoints = [folder.name for _, folder in complete(out)]
    status = {
        "out": str(out), "state": state, "model": model.get("name") or train.get("model"), "mode": train.get("mode"),
        "world": run.get("world", 1), "device": run.get("device"), "dtype": run.get("dtype"),
        "steps": train.get("steps"), "steps_done": done,
        "loss": rows[-1]["loss"] if rows else None,
        "recent_loss": statistics.fmean(row["loss"] for row in recent) if recent else None,
        "first_loss": rows[0]["loss"] if rows else None,
        "eval": evals,
        "step_s": step_s,
        "tokens_per_s": statistics.median(row["tokens_per_s"] for row in recent) if recent else None,
        "mfu": statistics.median(row["mfu"] for row in recent) if recent and "mfu" in recent[-1] else None,
        "left_s": step_s * (train["steps"] - done) if step_s is not None and state != "finished" else None,
        "skipped_steps": sum(bool(row.get("skipped")) for row in rows),
        "checkpoints": checkpoints,
        "final": (out / "final" / "config.json").is_file(),
        "last_row_age_s": time.time() - (out / "metrics.jsonl").stat().st_mtime if rows else None,
        "process": process or None,
        "stopped": run.get("stopped"),
        "time_limit": run.get("time_limit"),
        "store": run.get("store"),
        "plan": run.get("plan"),  # a streamed run's, as it started
        "update_on": run.get("update_on"),
        "micro_tokens": train.get("batch_size", 0) * train.get("seq_len", 0),
    }
    return status


def _readable(seconds: float) -> str:
    """A span of time as a person reads it."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 48 * 3600 else f"{seconds / 86400:.1f} days"


def describe(s: dict) -> list[str]:
    """The status as lines for a person."""
    processes = f", {s['world']} processes" if s["world"] > 1 else ""
    lines = [f"run {s['out']}: {s['model']}, {s['mode']} on {s['device']} in {s['dtype']}{processes}"]
    progress = f"{s['steps_done']:,} of {s['steps']:,} steps"
    resume = f"`streamer train --out {s['out']} --resume`"
    newest = s["checkpoints"][-1] if s["checkpoints"] else None
    if s["state"] == "finished":
        lines.append(f"finished: {progress}; final weights " + (f"in {Path(s['out']) / 'final'}" if s["final"]
                                                                   else "not exported (--no-save-final)"))
    elif s["state"] == "stopped":
        stop = s["stopped"]
        why = f"by {stop['signal']}" if stop.get("signal") else "by its --time-limit"
        after = (f"checkpoint {stop['checkpoint']}: {resume} goes on" if stop.get("checkpoint")
                 else "no checkpoint: it cannot be resumed")
        lines.append(f"stopped {why} after {progress}; {after}")
    elif s["state"] == "running":
        age = f", the last step ended {_readable(s['last_row_age_s'])} ago" if s["last_row_age_s"] is not None else ""
        lines.append(f"running (pid {s['process']['pid']}): {progress}{age}")
    else:
        where = (f"on {s['process']['host']} (pid {s['process']['pid']}), which this machine cannot see"
                 if s["state"] == "unknown" else "killed or failed: no process runs it")
        age = f"; the last step ended {_readable(s['last_row_age_s'])} ago" if s["last_row_age_s"] is not None else ""
        go_on = (f"{resume} goes on from {newest}" if newest
                 else "no checkpoint to go on from (--checkpoint-every N writes them)")
        lines.append(f"not finished, {where}: {progress}{age}; {go_on}")
    if s["loss"] is not None:
        recent = f" (the last {min(RECENT, s['steps_done'])} steps' mean {s['recent_loss']:.3f})" \
            if s["recent_loss"] is not None and s["steps_done"] > 1 else ""
        held_out = ""
        if s["eval"]:
            first, last = s["eval"][0], s["eval"][-1]
            held_out = (f"; held-out {last['loss']:.3f} after {last['step'] + 1:,} steps"
                        + (f" (from {first['loss']:.3f} after {first['step'] + 1:,})" if len(s["eval"]) > 1 else ""))
        skipped = f"; {s['skipped_steps']} steps skipped (non-finite)" if s["skipped_steps"] else ""
        lines.append(f"loss {s['first_loss']:.3f} -> {s['loss']:.3f}{recent}{held_out}{skipped}")
    if s["step_s"] is not None:
        mfu = f", {s['mfu']:.1%} of the device's peak (MFU)" if s["mfu"] else ""
        left = (f"; {s['steps'] - s['steps_done']:,} steps left, about {_readable(s['left_s'])} of steps"
                if s["left_s"] else "")
        lines.append(f"speed {s['tokens_per_s']:,.0f} tokens/s, {_readable(s['step_s'])} a step (median of the last "
                     f"{min(RECENT, s['steps_done'])}){mfu}{left}")
    if s["plan"] and s["update_on"]:
        from streamer.planner import Plan, run_summary

        with contextlib.suppress(TypeError):  # a plan recorded by an older version, of other fields
            lines.append(run_summary(Plan(**s["plan"]), s["update_on"], s["micro_tokens"]))
    if s["checkpoints"]:
        lines.append(f"checkpoints {', '.join(s['checkpoints'])}" + (f" ({newest} is the newest)"
                                                                     if len(s["checkpoints"]) > 1 else ""))
    if s["time_limit"]:
        job = "this job's ends" if s["state"] == "running" else "the last job's ended by"
        lines.append(f"time limit {_readable(s['time_limit']['limit_s'])} ({job} {s['time_limit']['ends']})")
    return lines


def cmd_status(args: argparse.Namespace) -> None:
    """One run's status, or several runs' (a sweep: `streamer status runs/*`), each read
    before any is printed. Of several, a folder that holds no run (a stray file of the
    glob, a run refused before it began) is left out with a warning; if none holds
    one, the first's error is the command's."""
    statuses, errors = [], []
    for given in args.runs:
        out = Path(given)
        if out.name == "final" and (out.parent / "run.json").is_file():
            out = out.parent
        try:
            statuses.append(run_status(out))
        except UserError as exc:
            errors.append(exc)
    if not statuses or (errors and len(args.runs) == 1):
        raise errors[0]
    for error in errors:
        print(f"streamer: warning: left out: {error}", file=sys.stderr)
    if args.json:
        print(json.dumps(statuses[0] if len(statuses) == 1 else statuses, indent=2))
    elif args.brief:
        print("\n".join(table(statuses)))
    else:
        print("\n\n".join("\n".join(describe(status)) for status in statuses))


def table(statuses: list[dict]) -> list[str]:
    """Runs side by side, a line each (a sweep at a glance): state, steps, the last
    steps' mean loss, the newest held-out loss, speed and the time left."""
    rows = [("run", "model", "state", "steps", "loss", "held-out", "tokens/s", "left")]
    for s in statuses:
        rows.append((s["out"], s["model"], s["state"], f"{s['steps_done']:,}/{s['steps']:,}",
                     f"{s['recent_loss']:.3f}" if s["recent_loss"] is not None else "-",
                     f"{s['eval'][-1]['loss']:.3f}" if s["eval"] else "-",
                     f"{s['tokens_per_s']:,.0f}" if s["tokens_per_s"] is not None else "-",
                     _readable(s["left_s"]) if s["left_s"] else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) if i < 3 else cell.rjust(width) for i, (cell, width) in
                      enumerate(zip(row, widths))).rstrip() for row in rows]


def process_record() -> dict:
    """What run.json says of the process that runs the run (its lead rank), for `status`
    to tell a running run from one that was killed."""
    import psutil

    return {"host": socket.gethostname(), "pid": os.getpid(), "started": psutil.Process().create_time()}
