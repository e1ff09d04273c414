"""`streamer status`: one run through every state it can be in (running, killed,
stopped by its time limit, finished), each read from what the run wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_main


def status(out: Path) -> tuple[dict, list[str]]:
    """The status as JSON and as the lines a person reads."""
    as_json, as_text = run_main(["status", str(out), "--json"]), run_main(["status", str(out)])
    assert as_json.returncode == 0 and as_text.returncode == 0, as_json.stderr + as_text.stderr
    return json.loads(as_json.stdout), as_text.stdout.splitlines()


def rows(out: Path) -> int:
    path = out / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def test_status_follows_a_run_through_its_states(token_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train = ["train", "--model", "tiny", "--steps", "400", "--batch-size", "2", "--seq-len", "32",
             "--data", str(token_file), "--out", str(out), "--device", "cpu", "--no-progress",
             "--checkpoint-every", "5", "--eval-every", "5", "--resume"]
    process = subprocess.Popen([sys.executable, "-m", "streamer", *train], stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while rows(out) < 7:
            assert process.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.05)
        running, lines = status(out)
        process.send_signal(signal.SIGKILL)  # a scheduler's kill: no word from the run
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    assert running["state"] == "running" and running["process"]["pid"] == process.pid
    assert lines[0] == f"run {out}: tiny, resident on cpu in float32"
    assert lines[1].startswith(f"running (pid {process.pid}): ")
    assert running["steps_done"] >= 7 and running["checkpoints"][-1] >= "step-00000005"
    assert 0 < running["step_s"] and running["left_s"] == pytest.approx(running["step_s"] * (400 - running[
        "steps_done"]))

    killed, lines = status(out)
    newest = killed["checkpoints"][-1]
    assert killed["state"] == "ended" and killed["steps_done"] >= running["steps_done"]
    assert lines[1].startswith(f"not finished, killed or failed: no process runs it: {killed['steps_done']} of 400 "
                               f"steps; the last step ended ")
    assert lines[1].endswith(f"`streamer train --out {out} --resume` goes on from {newest}")
    assert killed["eval"] and killed["eval"][0] == {"step": 4, "loss": killed["eval"][0]["loss"]}
    assert any(line.startswith(f"loss {killed['first_loss']:.3f} -> {killed['loss']:.3f}") and "held-out" in line
               for line in lines)

    steps = train.index("--steps") + 1
    longer = [*train[:steps], "100000", *train[steps + 1:]]  # a resume may go on for longer
    assert run_main([*longer, "--time-limit", "9s"]).returncode == 75  # until a step and a checkpoint no longer fit
    stopped, lines = status(out)
    done = stopped["steps_done"]
    assert stopped["state"] == "stopped" and done > int(newest.removeprefix("step-"))
    assert lines[1] == (f"stopped by its --time-limit after {done:,} of 100,000 steps; checkpoint "
                        f"step-{done:08d}: `streamer train --out {out} --resume` goes on")
    assert lines[-1].startswith("time limit 9.0 s (the last job's ended by 20")

    finish = [*train[:steps], str(done + 2), *train[steps + 1:]]
    assert run_main(finish).returncode == 0
    finished, lines = status(out / "final")  # the final weights' folder names its run
    assert finished["state"] == "finished" and finished["steps_done"] == done + 2
    assert finished["final"] and finished["left_s"] is None
    assert lines[1] == f"finished: {done + 2:,} of {done + 2:,} steps; final weights in {out / 'final'}"
    assert not any("steps left" in line for line in lines)
    both = run_main(["status", str(out), str(out), "--json"])  # several runs: a list, one each
    assert both.returncode == 0 and [s["state"] for s in json.loads(both.stdout)] == ["finished", "finished"]
    # A record from before runs wrote their process and end: its rows and export tell.
    record = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({k: v for k, v in record.items() if k not in ("finished", "process")}))
    assert status(out)[0]["state"] == "finished"


def test_status_of_a_streamed_run_gives_its_plan(token_file: Path, tmp_path: Path) -> None:
    """A streamed run's status says the plan it started with, as its first line did:
    where the state lives, where AdamW ran, the predicted step, to set beside the
    measured speed."""
    out = tmp_path / "run"
    done = run_main(["train", "--mode", "stream", "--offload", "disk", "--steps", "2", "--batch-size", "2",
                     "--seq-len", "32", "--data", str(token_file), "--out", str(out), "--no-progress"])
    assert done.returncode == 0, done.stderr
    record, lines = status(out)
    assert record["plan"]["offload"] == "disk" and record["update_on"] == "host"
    plan = next(line for line in lines if line.startswith("plan: "))
    assert plan.startswith("plan: fp32 state on disk, AdamW on the host, prefetch ")
    assert plan == done.stdout.splitlines()[0]  # the line the run started with
    # Several runs side by side, a line each (a sweep): here the same run twice.
    brief = run_main(["status", str(out), str(out), "--brief"])
    header, *lines = brief.stdout.splitlines()
    assert header.split() == ["run", "model", "state", "steps", "loss", "held-out", "tokens/s", "left"]
    assert [line.split()[:5] for line in lines] == [[str(out), "tiny", "finished", "2/2",
                                                     f"{record['recent_loss']:.3f}"]] * 2
    # A sweep's glob that takes in a folder holding no run shows the runs, and says so.
    (tmp_path / "stray").mkdir()
    swept = run_main(["status", str(out), str(tmp_path / "stray"), "--brief"])
    assert swept.returncode == 0 and len(swept.stdout.splitlines()) == 2
    assert swept.stderr.strip() == (f"streamer: warning: left out: '{tmp_path / 'stray'}' holds no training run (no "
                                    "run.json): give the --out folder of a `streamer train`")


def test_status_of_a_folder_without_a_run_is_one_line(tmp_path: Path, fails_in_one_line) -> None:  # noqa: ANN001
    (tmp_path / "garbled").mkdir()
    (tmp_path / "garbled" / "run.json").write_text("{not json")
    # A whole line of metrics that is no row (a torn last line is a row being written).
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "run.json").write_text(json.dumps({"train": {"steps": 4}, "model": {}}))
    (tmp_path / "damaged" / "metrics.jsonl").write_text('{"step": 0, "loss": 5.0}\n{"step": 1, "loss": 4\n')
    fails_in_one_line("status", {
        "no run": ([str(tmp_path)], ["holds no training run (no run.json)", "--out folder"]),
        "garbled record": ([str(tmp_path / "garbled")], ["is not a training run's record"]),
        "a damaged metrics line": ([str(tmp_path / "damaged")], ["metrics.jsonl' line 2 is not a metrics row",
                                                                 "remove that line"]),
    })
