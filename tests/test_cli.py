"""The `streamer` command as a user runs it: its exit codes and what it prints. Most
commands run through `streamer.cli.main` in this process, as `python -m streamer` runs
it (an exception escaping it would be a traceback); one runs as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main

from models import REGISTRY


def streamer(*args: str, cache: Path, env: dict[str, str] | None = None,
             process: bool = False) -> subprocess.CompletedProcess:
    # A private cache: no test may fall back on (or rebuild) the user's default corpus.
    env = {"XDG_CACHE_HOME": str(cache), **(env or {})}
    if process:
        return subprocess.run([sys.executable, "-m", "streamer", *args], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=120)
    return run_main(list(args), env)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    ("flags", "fragments"),
    [
        (["--model", "gpt3-x1"], ["'gpt3-xl'", "streamer models"]),
        (["--steps", "0"], ["--steps", "positive"]),
        (["--batch-size", "-4"], ["--batch-size", "positive"]),
        (["--seq-len", "257"], ["--seq-len 257", "256"]),
        (["--steps", "ten"], ["--steps", "invalid int value"]),
        (["--mode", "stream", "--host-memory", "-1"], ["--host-memory", "positive"]),
    ],
)
def test_train_user_errors(flags: list[str], fragments: list[str], token_file: Path, tmp_path: Path) -> None:
    result = streamer(
        "train", "--data", str(token_file), "--out", str(tmp_path / "run"), *flags, cache=tmp_path / "cache"
    )
    assert_user_error(result, *fragments)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_resume_tells_the_flags_given_from_those_left_to_the_record() -> None:
    """What `train --resume` takes from the run's record is what the command leaves out,
    whatever the value given (a default's too), however abbreviated; and the flags a
    launcher hands its ranks set exactly the values filled in."""
    from streamer.cli import as_flags, given_flags, train_parser

    given = given_flags(["--check", "2", "--no-document-mask", "--steps", "300", "--out", "x", "--resume"])
    assert given == {"checkpoint_every", "document_mask", "steps", "out", "resume"}
    filled = {"model": "gpt3-125m", "data": ["a b.npy", "c.npy"], "document_mask": False, "save_final": False,
              "lr": 1e-4, "min_lr": None, "max_memory": 30.5, "schedule": "wsd"}
    parsed = vars(train_parser().parse_args(as_flags(filled)))
    assert {dest: parsed[dest] for dest in filled} == filled
    assert as_flags(filled, changed_only=True) == ["--model", "gpt3-125m", "--data", "a b.npy", "c.npy", "--lr",
                                                   "0.0001", "--schedule", "wsd", "--max-memory", "30.5",
                                                   "--no-save-final"]


def test_plan_puts_the_update_where_the_step_is_shorter(tmp_path: Path) -> None:
    """`streamer plan` plans --update-on auto both ways and says what the other place would
    cost; a CPU profile's host and device are one processor: the host, nothing weighed."""
    result = streamer("plan", "--model", "gpt-neox-20b", "--device", "h100", "--state", "compact8", "--json",
                      cache=tmp_path)
    plan = json.loads(result.stdout)
    assert plan["update_on"] == "device" and plan["other_update_on"]["update_on"] == "host"
    assert plan["other_update_on"]["predicted_step_s"] > 10 * plan["predicted_step_s"]
    text = streamer("plan", "--model", "gpt-neox-20b", "--device", "h100", "--state", "compact8", cache=tmp_path)
    assert "  AdamW on the device (--update-on auto): on the host the step would take " in text.stdout
    cpu = json.loads(streamer("plan", "--model", "gpt3-125m", "--json", cache=tmp_path).stdout)
    assert cpu["update_on"] == "host" and cpu["other_update_on"] is None
    held = json.loads(streamer("plan", "--model", "gpt3-125m", "--held-units", "2", "--json", cache=tmp_path).stdout)
    assert held["update_on"] == "device" and held["held_units"] == 2
    # train decides as plan does: held units update on the device, with no --update-on
    trained = streamer("train", "--mode", "stream", "--held-units", "2", "--steps", "1", "--batch-size", "2",
                       "--seq-len", "32", "--out", str(tmp_path / "run"), "--no-progress", cache=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert json.loads((tmp_path / "run" / "run.json").read_text())["update_on"] == "device"


def test_a_dry_run_checks_and_plans_and_writes_nothing(token_file: Path, tmp_path: Path) -> None:
    """`train --dry-run`: the checks a run makes and a streamed run's plan, measured on
    this machine; no output folder appears. On a run to resume: the settings it takes
    from the record and the checkpoint it would go on from. A bad input is still one
    line."""
    out = tmp_path / "run"
    flags = ["--mode", "stream", "--offload", "ram", "--batch-size", "2", "--seq-len", "32", "--steps", "2",
             "--data", str(token_file), "--no-progress"]
    planned = streamer("train", *flags, "--out", str(out), "--dry-run", cache=tmp_path)
    assert planned.returncode == 0, planned.stderr
    lines = planned.stdout.splitlines()
    assert lines[0] == (f"dry run: tiny (496,704 parameters), stream on cpu in float32, 64 tokens a step for 2 "
                        f"steps; {out} starts afresh; nothing written")
    assert lines[1].startswith("plan: fp32 state in RAM, AdamW on the host, prefetch ")
    assert lines[-1].startswith("  peak memory (what --max-memory limits) ")
    assert not out.exists()
    assert streamer("train", *flags, "--out", str(out), "--checkpoint-every", "2",
                    cache=tmp_path).returncode == 0
    resumed = streamer("train", "--out", str(out), "--resume", "--steps", "4", "--time-limit", "1h", "--dry-run",
                       cache=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith(f"resuming {out} with the settings it recorded: ")
    assert f"{out} resumes from step-00000002; nothing written" in resumed.stdout
    # A job of an hour: the last start-up, then the steps left, at the times the checkpoint
    # recorded, within it; the same run without more --steps has nothing left to do.
    [job] = [line for line in resumed.stdout.splitlines() if line.startswith("--time-limit 3600 s: start-up about ")]
    assert "then the 2 steps left, then it finishes (the slowest step so far " in job
    finished = streamer("train", "--out", str(out), "--resume", "--time-limit", "1h", "--dry-run", cache=tmp_path)
    assert "the checkpoint is the run's last step (2): nothing is left to train" in finished.stdout
    assert "settings differ from those the run recorded (steps 2 -> 4)" in resumed.stdout
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert_user_error(streamer("train", *flags, "--seq-len", "999", "--dry-run", cache=tmp_path),
                      "--seq-len 999 exceeds tiny's context of 256")


def test_train_missing_data_file(tmp_path: Path) -> None:
    missing = tmp_path / "absent.npy"
    result = streamer("train", "--data", str(missing), "--out", str(tmp_path / "run"), cache=tmp_path / "cache")
    assert_user_error(result, str(missing), "streamer prepare")


def test_models_lists_every_entry(tmp_path: Path) -> None:
    result = streamer("models", cache=tmp_path, process=True)  # `python -m streamer` itself
    assert result.returncode == 0, result.stderr
    listed = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    assert listed == list(REGISTRY)


def test_models_json(tmp_path: Path) -> None:
    result = streamer("models", "--json", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["name"] for row in rows] == list(REGISTRY)
    gpt3_xl = next(row for row in rows if row["name"] == "gpt3-xl")
    assert gpt3_xl["n_params"] == 1_315_723_264


def test_plan_json(tmp_path: Path) -> None:
    result = streamer("plan", "--model", "gpt3-xl", "--device", "h100", "--json", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    keys = {"n_params", "device_bytes", "host_bytes", "disk_bytes", "min_tokens_per_step", "predicted_step_s"}
    assert keys <= set(plan)
    assert plan["n_params"] == 1_315_723_264
    assert plan["predicted_step_s"] > 0


def test_plan_fits_a_memory_limit_by_recomputing(tmp_path: Path) -> None:
    free = streamer("plan", "--model", "gpt3-2.7b", "--tokens-per-step", "1024", "--seq-len", "256",
                    "--offload", "disk", "--json", cache=tmp_path)
    tight = streamer("plan", "--model", "gpt3-2.7b", "--tokens-per-step", "1024", "--seq-len", "256",
                     "--offload", "disk", "--max-memory", "6", "--json", cache=tmp_path)
    assert free.returncode == 0 and tight.returncode == 0, tight.stderr
    free, tight = json.loads(free.stdout), json.loads(tight.stdout)
    assert free["kept_graphs"] == 32 and 0 < tight["kept_graphs"] < 32
    assert tight["device_bytes"] + tight["host_bytes"] <= 6 * 2**30 < free["device_bytes"] + free["host_bytes"]
    too_small = streamer("plan", "--model", "gpt3-2.7b", "--tokens-per-step", "1024", "--seq-len", "256",
                         "--offload", "disk", "--max-memory", "1", cache=tmp_path)
    assert_user_error(too_small, "--max-memory is 1.0 GiB", "lower --batch-size")


def test_plan_refuses_bad_counts_in_one_line(fails_in_one_line) -> None:  # noqa: ANN001
    """A count of 0 is refused, not read as the default; a step of less than a sequence
    names --tokens-per-step, the flag at fault; a limit that is not a number is refused."""
    plan = ["--model", "gpt3-125m", "--device", "h100"]
    fails_in_one_line("plan", {
        "no sequence": ([*plan, "--seq-len", "0"], ["--seq-len must be in 1..2048 for gpt3-125m, got 0"]),
        "no micro-batch": ([*plan, "--micro-tokens", "0"], ["--micro-tokens must be whole sequences", "got 0"]),
        "less than a sequence": ([*plan, "--tokens-per-step", "1000"],
                                 ["--tokens-per-step must be whole sequences, a positive multiple of --seq-len "
                                  "(2048), got 1000"]),
        "micro-batches that do not divide the step": (
            [*plan, "--seq-len", "1024", "--tokens-per-step", "4096", "--micro-tokens", "3072"],
            ["--micro-tokens 3072 does not divide --tokens-per-step 4096"]),
        "a limit that is not a number": ([*plan, "--max-memory", "nan"], ["--max-memory must be a positive number"]),
        "a store under a folder that is not there": ([*plan, "--store-dir", "/nonexistent/store"],
                                                     ["no folder '/nonexistent' to make it in"]),
    })


def test_a_reader_that_leaves_ends_the_command_quietly(tmp_path: Path) -> None:
    """`streamer status run | head -1`, and any command whose reader closes the pipe:
    the command stops as one killed by SIGPIPE would (exit 141), with no traceback."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "streamer", "models"], stdout=write, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)})
    finally:
        os.close(write)
    assert done.returncode == 128 + signal.SIGPIPE and done.stderr == ""


def test_plan_recommends_what_a_memory_limit_holds(tmp_path: Path) -> None:
    """Without --tokens-per-step, the plan is for the recommended tokens, which a
    --max-memory limit bounds: each count is weighed with the graphs it can keep, and
    none past where even recomputing every block does not fit."""
    for extra in ([], ["--update-on", "device", "--state", "compact8"]):
        run = streamer("plan", "--model", "gpt3-xl", "--device", "h100", "--max-memory", "20", *extra, "--json",
                       cache=tmp_path)
        assert run.returncode == 0, run.stderr
        plan = json.loads(run.stdout)
        assert plan["tokens_per_step"] == plan["recommended_tokens_per_step"]
        assert plan["device_bytes"] <= 20 * 2**30


def test_plan_sizes_the_working_set_by_the_micro_batch(tmp_path: Path) -> None:
    """A 20B step of 24 sequences run as micro-batches of one holds one sequence's
    logits, not 24: the memory freed keeps more graphs (less recompute) in a smaller
    footprint; a micro-batch that does not divide the step is refused."""
    args = ("plan", "--model", "gpt-neox-20b", "--device", "h200", "--tokens-per-step", "49152",
            "--seq-len", "2048", "--offload", "ram", "--json")
    whole = streamer(*args, cache=tmp_path)
    micro = streamer(*args, "--micro-tokens", "2048", cache=tmp_path)
    assert whole.returncode == 0 and micro.returncode == 0, micro.stderr
    whole, micro = json.loads(whole.stdout), json.loads(micro.stdout)
    assert micro["kept_graphs"] > whole["kept_graphs"]
    assert micro["device_bytes"] < whole["device_bytes"]
    assert micro["compute_s"] < whole["compute_s"]
    assert_user_error(streamer(*args, "--micro-tokens", "10240", cache=tmp_path),
                      "--micro-tokens 10240 does not divide --tokens-per-step 49152")
    assert_user_error(streamer(*args, "--micro-tokens", "3000", cache=tmp_path), "--micro-tokens must be whole "
                      "sequences")


def test_plan_splits_the_store_by_the_host_memory_given(tmp_path: Path) -> None:
    """A VM whose RAM grows as it is used reports little available at start: the
    planner must plan with the memory the user says the machine has. Less host memory
    keeps fewer units in RAM and puts more on disk; a non-positive amount is refused."""
    args = ("plan", "--model", "gpt-neox-20b", "--device", "h200", "--state", "compact", "--offload", "split",
            "--update-on", "device", "--tokens-per-step", "49152", "--micro-tokens", "2048", "--seq-len", "2048",
            "--json")
    runs = [streamer(*args, "--host-memory", gib, cache=tmp_path) for gib in ("128", "96")]
    assert all(r.returncode == 0 for r in runs), runs[1].stderr
    big, small = (json.loads(r.stdout) for r in runs)
    assert big["ram_units"] == 40  # 0.8 x 128 GiB holds 40 of the 46 units' compact state (2.54 GiB each)
    assert small["ram_units"] == 30
    assert small["disk_bytes"] > big["disk_bytes"]
    assert small["predicted_step_s"] > big["predicted_step_s"]
    assert_user_error(streamer(*args, "--host-memory", "0", cache=tmp_path), "--host-memory", "positive")


def test_plan_weighs_a_split_state_against_the_smaller_format(tmp_path: Path) -> None:
    """The compact state of a 20B model leaves 6 units on disk of a 128 GiB host; the
    plan says what compact8 would do instead: all in RAM, and a faster step. A state
    that fits RAM has nothing to weigh; one that fits nowhere weighs every smaller one."""
    args = ("plan", "--model", "gpt-neox-20b", "--device", "h200", "--update-on", "device", "--tokens-per-step",
            "49152", "--micro-tokens", "2048", "--seq-len", "2048", "--max-memory", "37", "--host-memory", "128")
    compact = streamer(*args, "--state", "compact", "--json", cache=tmp_path)
    assert compact.returncode == 0, compact.stderr
    split = json.loads(compact.stdout)
    assert split["offload"] == "split" and split["smaller_state"]["offload"] == "ram"
    assert split["smaller_state"]["predicted_step_s"] < split["predicted_step_s"]
    text = streamer(*args, "--state", "compact", cache=tmp_path).stdout
    assert "--state compact8 (5.05 bytes/parameter) would keep all in RAM: predicted step" in text
    assert json.loads(streamer(*args, "--state", "compact8", "--json", cache=tmp_path).stdout)["smaller_state"] is None
    # float32 (306 GiB) fits no tier of this host: both smaller formats are weighed.
    text = streamer(*args, cache=tmp_path).stdout
    assert "does not fit: gpt-neox-20b needs 306.3 GiB for its state" in text
    assert "--state compact (6.03 bytes/parameter) would fit, with 40 units in RAM" in text
    assert "--state compact8 (5.05 bytes/parameter) would fit, with all in RAM" in text


def test_the_machine_wide_host_memory_setting_plans_this_machine(tmp_path: Path) -> None:
    """$STREAMER_HOST_MEMORY_GIB stands for this machine's memory wherever a run reads
    it (here the cpu profile, which plans this machine); a bad value is one line."""
    args = ("plan", "--model", "gpt3-2.7b", "--device", "cpu", "--tokens-per-step", "1024", "--seq-len", "256",
            "--json")
    small = streamer(*args, cache=tmp_path, env={"STREAMER_HOST_MEMORY_GIB": "4"})
    big = streamer(*args, cache=tmp_path, env={"STREAMER_HOST_MEMORY_GIB": "4096"})
    assert small.returncode == 0 and big.returncode == 0, small.stderr
    # gpt3-2.7b's float32 state is 39.5 GiB: it fits 80% of 4 TiB, not of 4 GiB.
    assert json.loads(big.stdout)["offload"] == "ram"
    assert json.loads(small.stdout)["offload"] == "disk"
    bad = streamer(*args, cache=tmp_path, env={"STREAMER_HOST_MEMORY_GIB": "lots"})
    assert_user_error(bad, "STREAMER_HOST_MEMORY_GIB", "'lots'")


def test_a_bad_choice_of_update_kernels_is_one_line_before_anything_is_written(tmp_path: Path) -> None:
    out = tmp_path / "run"
    bad = streamer("train", "--steps", "1", "--out", str(out), cache=tmp_path, env={"STREAMER_FUSED_UPDATE": "false"})
    assert_user_error(bad, "STREAMER_FUSED_UPDATE must be 0", "or host", "'false'")
    assert not out.exists()


def test_plan_unknown_device_profile(tmp_path: Path) -> None:
    assert_user_error(streamer("plan", "--device", "tpu9", cache=tmp_path), "'tpu9'", "h100")


def test_plan_measures_a_device_it_has_not_a_profile(tmp_path: Path) -> None:
    """--measure times this machine: a profile's name, or a GPU the machine lacks, is
    refused rather than silently measuring the CPU."""
    assert_user_error(streamer("plan", "--device", "h100", "--measure", cache=tmp_path), "--device h100",
                      "drop --measure")
    if not torch.cuda.is_available():
        assert_user_error(streamer("plan", "--device", "cuda", "--measure", cache=tmp_path), "needs a CUDA device")


def test_prepare_a_folder(tmp_path: Path) -> None:
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "one.txt").write_text("hello\n")
    (tmp_path / "text" / "two.txt").write_text("world\n")
    out = tmp_path / "tokens.npy"
    result = streamer("prepare", str(tmp_path / "text"), "--out", str(out), cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr
    assert "12 tokens" in result.stdout and "2 files" in result.stdout
    assert np.load(out).astype(np.uint8).tobytes() == b"hello\nworld\n"


def _interrupt_in_start_up(args: list[str], signum: int, cache: Path) -> subprocess.CompletedProcess:
    """`python -m streamer train --nproc 2 ...`, sent `signum` as soon as torchrun has
    started its ranks (they are then importing torch: seconds from their first step)."""
    import psutil

    launcher = subprocess.Popen([sys.executable, "-m", "streamer", "train", *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**os.environ, "XDG_CACHE_HOME": str(cache)})
    deadline = time.monotonic() + 60
    while not any(p.children() for p in psutil.Process(launcher.pid).children()) and time.monotonic() < deadline:
        time.sleep(0.02)
    launcher.send_signal(signum)
    out, err = launcher.communicate(timeout=120)
    return subprocess.CompletedProcess(launcher.args, launcher.returncode, out, err)


def test_a_signal_in_the_ranks_start_up_stops_them_with_one_line(token_file: Path, tmp_path: Path) -> None:
    """Before its steps, a run of several processes has no handlers for a stop in good
    order: the signal ends the ranks quietly (no traceback from them or torchrun) and the
    launcher says once what it stopped, with 128 + its number. A new run leaves nothing
    on disk; a resumed one keeps its checkpoint and says how to go on."""
    flags = ["--mode", "stream", "--offload", "ram", "--nproc", "2", "--batch-size", "2", "--seq-len", "32",
             "--data", str(token_file), "--no-progress"]
    fresh = _interrupt_in_start_up([*flags, "--steps", "4", "--out", str(tmp_path / "new")], signal.SIGINT, tmp_path)
    assert fresh.returncode == 128 + signal.SIGINT, fresh.stderr
    assert "Traceback" not in fresh.stderr and "FAILED" not in fresh.stderr
    assert fresh.stderr.strip().splitlines()[-1] == ("streamer: SIGINT stopped the run during its start-up, before "
                                                     "its first step: nothing was trained")
    assert not (tmp_path / "new").exists()

    run = tmp_path / "run"
    assert streamer("train", *flags[:4], *flags[6:], "--steps", "2", "--checkpoint-every", "2", "--out", str(run),
                    cache=tmp_path).returncode == 0
    resumed = _interrupt_in_start_up(["--out", str(run), "--resume", "--nproc", "2", "--steps", "4"], signal.SIGTERM,
                                     tmp_path)
    assert resumed.returncode == 128 + signal.SIGTERM, resumed.stderr
    assert "Traceback" not in resumed.stderr and "FAILED" not in resumed.stderr
    assert resumed.stderr.strip().splitlines()[-1] == (
        f"streamer: SIGTERM stopped the run during its start-up, before this job's first step: `streamer train "
        f"--out {run} --resume` goes on from its last checkpoint")
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000002"]


def test_a_stop_signal_outside_the_steps_ends_train_as_ctrl_c_does(tmp_path: Path, monkeypatch, capsys) -> None:  # noqa: ANN001
    """SIGTERM (or SIGUSR1) before a run's steps, whose default action would kill the
    process as it fills its store, raises in train as Ctrl-C does, so that what the run
    made is removed (tests/test_train.py), and ends it with 128 + the signal's number."""
    import streamer.train
    from streamer.cli import main

    def start_up(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        pytest.fail("the signal did not interrupt")

    monkeypatch.setattr(streamer.train, "train", start_up)
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        assert main(["train", "--out", str(tmp_path / "run")]) == 128 + signal.SIGTERM
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert capsys.readouterr().err.strip().splitlines()[-1] == "streamer: interrupted by SIGTERM"


def test_a_resident_runs_record_fills_no_stream_setting(token_file: Path, tmp_path: Path) -> None:
    """A resident run recorded the stream engine's settings at their defaults of the day
    (--update-on host, before auto): a resume takes none of them, which a resident run
    would refuse."""
    import streamer.checkpoint as checkpoint

    out = tmp_path / "run"
    flags = ["--batch-size", "2", "--seq-len", "32", "--data", str(token_file), "--no-progress"]
    assert streamer("train", *flags, "--steps", "1", "--checkpoint-every", "1", "--out", str(out),
                    cache=tmp_path).returncode == 0
    folder = out / "checkpoints" / "step-00000001"
    manifest = checkpoint.read_manifest(folder)
    manifest["train"]["update_on"] = "host"
    manifest.pop("manifest_sha256", None)
    (folder / "manifest.json").write_text(json.dumps({**manifest,
                                                      "manifest_sha256": checkpoint._manifest_digest(manifest)}))
    resumed = streamer("train", "--out", str(out), "--resume", "--steps", "2", "--no-progress", cache=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "--update-on" not in resumed.stdout.splitlines()[0]


def test_a_resume_names_the_flag_that_chose_another_architecture(token_file: Path, tmp_path: Path) -> None:
    """A run whose architecture --init-from chose, resumed with weights of another one
    given to --init-from: the refusal names --init-from, not a --model never given."""
    flags = ["--batch-size", "2", "--seq-len", "32", "--data", str(token_file), "--no-progress"]
    for model, out in (("tiny", "first"), ("tiny-gptj", "other")):
        assert streamer("train", *flags, "--model", model, "--steps", "1", "--out", str(tmp_path / out),
                        cache=tmp_path).returncode == 0
    run = tmp_path / "run"
    assert streamer("train", *flags, "--init-from", str(tmp_path / "first"), "--steps", "1", "--checkpoint-every",
                    "1", "--out", str(run), cache=tmp_path).returncode == 0
    resumed = streamer("train", "--out", str(run), "--resume", "--init-from", str(tmp_path / "other"), "--steps", "2",
                       cache=tmp_path)
    assert_user_error(resumed, f"not of --init-from {tmp_path / 'other'}", "resume with --model tiny and no "
                      "--init-from")
