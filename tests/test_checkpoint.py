"""Checkpoints: bit-exact resume after a crash, fallback past corruption, a full disk,
`--keep`, partial folders, manifests that point outside, skipped non-finite steps, and
a run that a signal or its time limit stops after a step, with a checkpoint there."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import run_main

import streamer.checkpoint as checkpoint
from models import ModelConfig, loss_fn
from streamer.errors import Stopped, UserError
from streamer.train import TrainConfig, load_final, train

STEPS = 6
MODES = {"resident": ("resident", "auto", "fp32"), "stream-ram": ("stream", "ram", "fp32"),
         "stream-disk": ("stream", "disk", "fp32"), "stream-disk-compact": ("stream", "disk", "compact"),
         "stream-ram-compact8": ("stream", "ram", "compact8")}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """tiny's matmuls are too small to share threads on a 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(data: Path, out: Path, mode: str = "stream-disk", **overrides: object) -> TrainConfig:
    engine, offload, state = MODES[mode]
    settings = dict(model="tiny", mode=engine, offload=offload, state=state, steps=STEPS, batch_size=4, seq_len=32,
                    warmup=2, data=str(data), out=str(out), device="cpu", progress=False)
    return TrainConfig(**{**settings, **overrides})


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(out: Path, reference: Path) -> None:
    """Bit for bit: every step's loss and every final weight."""
    assert losses(out) == losses(reference)
    ours, theirs = load_final(out / "final"), load_final(reference / "final")
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert torch.equal(ours[name], theirs[name]), name


@pytest.fixture(scope="module")
def references(token_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted runs without checkpoints, one per mode."""
    root = tmp_path_factory.mktemp("reference")
    for mode in MODES:
        train(config(token_file, root / mode, mode))
    return {mode: root / mode for mode in MODES}


class Crash(Exception):
    pass


def crash_at(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the run die as it starts `step` (an exception: the in-process stand-in for a kill)."""
    import streamer.train as train_module

    real = train_module.micro_batches

    def batches(sampler, index, *args, **kwargs):  # noqa: ANN001, ANN202
        if index == step:
            raise Crash
        return real(sampler, index, *args, **kwargs)

    monkeypatch.setattr(train_module, "micro_batches", batches)


@pytest.mark.parametrize("mode", list(MODES))
def test_resume_after_a_crash_is_bit_exact(mode: str, references: dict[str, Path], token_file: Path,
                                           tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        crash_at(patch, 5)  # after the checkpoint at 4, one step past it
        with pytest.raises(Crash):
            train(config(token_file, out, mode, checkpoint_every=2))
    assert len(losses(out)) == 5
    train(config(token_file, out, mode, checkpoint_every=2, resume=True))
    assert_same_run(out, references[mode])
    assert [s for s, _ in checkpoint.complete(out)] == [4, 6]


def test_a_resume_given_only_its_directory_goes_on_as_recorded(references: dict[str, Path], token_file: Path,
                                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`streamer train --out DIR --resume` from another directory: the flags it leaves out
    take the run's recorded settings, a relative --data path included, and the run is the
    uninterrupted one bit for bit; a flag it gives wins, and the change is reported."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    command = ["train", "--model", "tiny", "--mode", "stream", "--offload", "disk", "--steps", str(STEPS),
               "--batch-size", "4", "--seq-len", "32", "--warmup", "2", "--data", os.path.relpath(token_file),
               "--out", "run", "--device", "cpu", "--no-progress", "--checkpoint-every", "2"]
    with pytest.MonkeyPatch.context() as patch:
        crash_at(patch, 5)
        with pytest.raises(Crash):
            run_main(command)
    monkeypatch.chdir(tmp_path / "elsewhere")
    resumed = run_main(["train", "--out", "../run", "--resume", "--no-progress"])
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith(f"resuming ../run with the settings it recorded: --model tiny --data {token_file} "
                                     "--seq-len 32 --steps 6 --batch-size 4 --warmup 2 --mode stream --device cpu "
                                     "--offload disk ")
    assert resumed.stderr == ""
    assert_same_run(tmp_path / "run", references["stream-disk"])
    longer = run_main(["train", "--out", "../run", "--resume", "--no-progress", "--steps", "8"])
    assert longer.returncode == 0, longer.stderr
    assert "--steps" not in longer.stdout.splitlines()[0]
    assert "(steps 6 -> 8)" in longer.stderr
    assert len(losses(tmp_path / "run")) == 8


def test_a_resume_finds_its_architecture_when_the_weights_it_came_from_are_gone(
        tmp_path: Path, hugging_face_checkpoint) -> None:  # noqa: ANN001
    """A run of an architecture no registry entry has, named by the weights it started
    from (--init-from DIR, no --model): with DIR moved away, `--resume` takes the
    architecture from the checkpoint it goes on from, and the run goes on."""
    import shutil

    weights = tmp_path / "own-model"
    hugging_face_checkpoint("tiny", weights, n_layer=3, d_model=64)
    common = ["--batch-size", "2", "--seq-len", "32", "--no-progress", "--out", str(tmp_path / "run")]
    assert run_main(["train", "--init-from", str(weights), "--steps", "2", "--checkpoint-every", "2",
                     *common]).returncode == 0
    shutil.rmtree(weights)
    resumed = run_main(["train", "--resume", "--steps", "4", *common])
    assert resumed.returncode == 0, resumed.stderr
    assert f"--model {tmp_path / 'run' / 'checkpoints' / 'step-00000002'}" in resumed.stdout
    assert len(losses(tmp_path / "run")) == 4
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["model"]["name"] == "own-model" and record["model"]["n_layer"] == 3


def test_resume_with_early_updates_is_the_same_run(references: dict[str, Path], token_file: Path,
                                                  tmp_path: Path) -> None:
    """The disk units' updates on their own lane (streamer.scheduler's [Note: early
    updates of the disk part]): a checkpoint waits for the lane's updates, a crash
    while the lane may still run leaves it to finish, and the resumed run is bit for bit
    the uninterrupted run that updated each unit at staging."""
    from streamer import planner

    step_visits = planner.step_visits

    def early(cfg, profile, tokens, seq_len, offload, depth, kept, state="fp32", ram_units=None, early_=None,
              held=0):
        return step_visits(cfg, profile, tokens, seq_len, offload, depth, kept, state, ram_units, True, held), True

    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(planner, "fastest_visits", early)
        crash_at(patch, 5)
        with pytest.raises(Crash):
            train(config(token_file, out, "stream-disk", checkpoint_every=2))
        patch.undo()
        patch.setattr(planner, "fastest_visits", early)
        train(config(token_file, out, "stream-disk", checkpoint_every=2, resume=True))
    assert all(json.loads(line)["early_updates"] for line in (out / "metrics.jsonl").read_text().splitlines())
    assert_same_run(out, references["stream-disk"])


def test_resume_with_held_updates_is_the_same_run(references: dict[str, Path], token_file: Path,
                                                 tmp_path: Path) -> None:
    """A checkpoint applies the held units' updates from their held state; a crash
    drops what was held; the resumed run is bit for bit the uninterrupted run that
    updated every unit from the store."""
    out, held = tmp_path / "run", dict(held_units=3, update_on="device")  # a CPU device's own cores update
    with pytest.MonkeyPatch.context() as patch:
        crash_at(patch, 5)
        with pytest.raises(Crash):
            train(config(token_file, out, "stream-ram", checkpoint_every=2, **held))
    train(config(token_file, out, "stream-ram", checkpoint_every=2, resume=True, **held))
    assert all(json.loads(line)["held_units"] == 3 for line in (out / "metrics.jsonl").read_text().splitlines())
    assert_same_run(out, references["stream-ram"])


# Kill points for a real SIGKILL, each installed in the child before it trains.
KILLER = """
import os, signal, sys
import streamer.checkpoint as checkpoint, streamer.store as store
point, count = sys.argv[1], int(sys.argv[2])
calls = [0]
def due():
    calls[0] += 1
    return calls[0] == count
def die():
    os.kill(os.getpid(), signal.SIGKILL)
if point == "checkpoint-write":  # mid-file, mid-checkpoint
    real_write = checkpoint._write_bytes
    def write(file, data):
        if due():
            real_write(file, data[: len(data) // 2]); file.flush(); die()
        real_write(file, data)
    checkpoint._write_bytes = write
elif point == "store-commit":  # mid-step, the disk store half rewritten
    real_pwrite = store.DiskStore._pwrite
    def pwrite(self, index, name, tensor, first):
        if name == "exp_avg" and due():
            real_pwrite(self, index, "param", tensor[: len(tensor) // 2] * 0 + 1e9, first); die()
        real_pwrite(self, index, name, tensor, first)
    store.DiskStore._pwrite = pwrite
elif point == "prune":  # the old checkpoint's manifest gone, its files not yet
    def remove(folder):
        (folder / checkpoint.MANIFEST).unlink(); die()
    checkpoint.remove_checkpoint = remove
from streamer.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_sigkill_at_several_points_resumes_exactly(references: dict[str, Path], token_file: Path,
                                                   tmp_path: Path) -> None:
    out = tmp_path / "run"
    argv = ["train", "--model", "tiny", "--mode", "stream", "--offload", "disk", "--steps", str(STEPS),
            "--batch-size", "4", "--seq-len", "32", "--warmup", "2", "--data", str(token_file), "--out", str(out),
            "--device", "cpu", "--no-progress", "--checkpoint-every", "2", "--keep", "1", "--resume"]
    # One thread, as in this process: float sums split over threads round differently.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # (kill point, which call of it kills, the complete checkpoints the kill leaves). A
    # checkpoint is 6 files of 4 writes; an update writes exp_avg once per unit.
    kills = [("checkpoint-write", 9, []),  # in unit 2's file of the first checkpoint
             ("store-commit", 14, [2]),  # in step 3, applying step 2's update
             ("prune", 1, [4])]  # deleting checkpoint 2 once 4 is complete (--keep 1)
    for point, count, survivors in kills:
        done = subprocess.run([sys.executable, "-c", KILLER, point, str(count), *argv], capture_output=True,
                              text=True, timeout=120, env=env)
        assert done.returncode == -signal.SIGKILL, (point, done.stderr[-2000:])
        assert [step for step, _ in checkpoint.complete(out)] == survivors, point
    finished = subprocess.run([sys.executable, "-m", "streamer", *argv], capture_output=True, text=True,
                              timeout=120, env=env)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert_same_run(out, references["stream-disk"])


def two_checkpoints(token_file: Path, out: Path, mode: str = "stream-disk") -> None:
    train(config(token_file, out, mode, steps=4, checkpoint_every=2))
    assert [s for s, _ in checkpoint.complete(out)] == [2, 4]


def test_corrupt_checkpoint_falls_back_with_a_warning(token_file: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    out, reference = tmp_path / "run", tmp_path / "reference"
    train(config(token_file, reference, steps=4))
    two_checkpoints(token_file, out)
    damaged = out / "checkpoints" / "step-00000004" / "unit-00002-rank0.safetensors"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    damaged.write_bytes(bytes(data))
    capsys.readouterr()
    train(config(token_file, out, steps=4, checkpoint_every=2, resume=True))
    warning = capsys.readouterr().err
    assert str(damaged) in warning and "falling back" in warning and "step-00000002" in warning
    assert_same_run(out, reference)


def test_truncated_file_is_named(token_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(config(token_file, out, "resident", steps=2, checkpoint_every=2))
    damaged = out / "checkpoints" / "step-00000002" / "optimizer.safetensors"
    os.truncate(damaged, damaged.stat().st_size - 3)
    with pytest.raises(checkpoint.CorruptCheckpointError, match="truncated") as error:
        train(config(token_file, out, "resident", steps=4, checkpoint_every=2, resume=True))
    assert str(damaged) in str(error.value) and "\n" not in str(error.value)


def test_disk_full_keeps_the_previous_checkpoint(token_file: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "run"
    real_write = checkpoint._write_bytes
    writes = [0]

    def write(file, data):  # noqa: ANN001, ANN202
        if (out / "checkpoints" / "step-00000004").exists():
            writes[0] += 1
            if writes[0] == 5:  # a few files into the second checkpoint
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(file, data)

    monkeypatch.setattr(checkpoint, "_write_bytes", write)
    with pytest.raises(UserError, match="no space left on device") as error:
        train(config(token_file, out, steps=4, checkpoint_every=2))
    assert "step-00000002 is intact" in str(error.value)
    assert not (out / "checkpoints" / "step-00000004").exists()
    folder = out / "checkpoints" / "step-00000002"
    checkpoint.verify_rank(folder, checkpoint.read_manifest(folder), 0)
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_a_time_limit_on_a_full_disk_is_one_line(token_file: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """--time-limit times a write first: where it fails, the run says so before any step."""
    def full(file, data):  # noqa: ANN001, ANN202
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "_write_bytes", full)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"--time-limit times a checkpoint's write into .* \(No space left on "
                                        r"device\): free space there") as error:
        train(config(token_file, out, "resident", checkpoint_every=2, time_limit_s=3600.0))
    assert "\n" not in str(error.value) and not (out / "metrics.jsonl").exists()  # before any step
    assert not list(out.glob(".checkpoint-probe*"))


def test_keep_deletes_older_checkpoints(token_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(config(token_file, out, "resident", steps=5, checkpoint_every=1, keep=2))
    assert [s for s, _ in checkpoint.step_folders(out)] == [4, 5]


def test_keep_every_keeps_milestones_for_good(token_file: Path, tmp_path: Path) -> None:
    """--keep-every 3: steps 3 and 6 stay past --keep 1; a stop off the grid (a signal in
    step 6, 0-based) is pruned like any other; a --keep-every the grid never reaches is
    refused."""
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        signal_at(patch, 6, signal.SIGTERM)
        with pytest.raises(Stopped):
            train(config(token_file, out, "resident", steps=9, checkpoint_every=1, keep=1, keep_every=3))
    assert [s for s, _ in checkpoint.step_folders(out)] == [3, 6, 7]
    train(config(token_file, out, "resident", steps=9, checkpoint_every=1, keep=1, keep_every=3, resume=True))
    assert [s for s, _ in checkpoint.step_folders(out)] == [3, 6, 9]
    with pytest.raises(UserError, match="--keep-every 3 names steps that --checkpoint-every 2 never checkpoints"):
        train(config(token_file, tmp_path / "other", checkpoint_every=2, keep_every=3))


def test_partial_checkpoints_are_ignored_and_removed(token_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    two_checkpoints(token_file, out, "resident")
    partial = out / "checkpoints" / "step-00000006"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"\0" * 10)  # a write cut short, no manifest
    train(config(token_file, out, "resident", steps=4, checkpoint_every=2, resume=True))
    assert not partial.exists()
    assert len(losses(out)) == 4


def rewrite_manifest(folder: Path, change: dict) -> None:
    """Edit a manifest and re-sign it, as a crafted checkpoint would be."""
    manifest = checkpoint.read_manifest(folder)
    manifest.update(change)
    body = {**manifest, "manifest_sha256": checkpoint._manifest_digest(manifest)}
    (folder / checkpoint.MANIFEST).write_text(json.dumps(body))


def test_manifest_paths_stay_inside_the_checkpoint(token_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(config(token_file, out, "resident", steps=2, checkpoint_every=2))
    folder = out / "checkpoints" / "step-00000002"
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    for name in ("../../../outside.safetensors", "/etc/passwd", "sub/../model.safetensors"):
        manifest = checkpoint.read_manifest(folder)
        rewrite_manifest(folder, {"files": {**manifest["files"], name: {"size": 1, "sha256": "0", "rank": 0}}})
        with pytest.raises(checkpoint.CorruptCheckpointError, match="refusing to read"):
            checkpoint.verify_rank(folder, checkpoint.read_manifest(folder), 0)
        rewrite_manifest(folder, {"files": manifest["files"]})
    os.symlink(tmp_path / "outside.safetensors", folder / "link.safetensors")
    with pytest.raises(checkpoint.CorruptCheckpointError, match="leads outside"):
        checkpoint.inside(folder, "link.safetensors")


def test_a_bit_flip_in_the_manifest_is_caught(token_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(config(token_file, out, "resident", steps=2, checkpoint_every=2))
    manifest = out / "checkpoints" / "step-00000002" / checkpoint.MANIFEST
    manifest.write_text(manifest.read_text().replace('"step": 2', '"step": 3'))
    with pytest.raises(checkpoint.CorruptCheckpointError, match="checksum"):
        checkpoint.read_manifest(manifest.parent)


# --- numerical faults --------------------------------------------------------------------


def nan_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return loss_fn(logits, targets) * float("nan")


def engine_state(engine: object) -> dict[str, torch.Tensor]:
    """Weights and optimizer state, whatever the engine."""
    if hasattr(engine, "optimizer"):
        state = {k: v.clone() for k, v in engine.model.state_dict().items()}
        for name, p in engine.model.named_parameters():
            state.update({f"{kind}/{name}": v.clone() for kind, v in engine.optimizer.state[p].items()})
        return state
    engine.flush()
    state = {"adam_step": torch.tensor(engine.adam_step)}
    for unit in range(engine.n_units):
        for name in ("param", "exp_avg", "exp_avg_sq"):
            state[f"{unit}/{name}"] = engine.store.open(unit, (name,), 0, engine.store.owned_numel(unit))[name].clone()
    return state


@pytest.mark.parametrize("mode", ["resident", "stream-ram", "stream-ram-held"])
def test_a_skipped_step_changes_nothing(mode: str, token_file: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Held units (see streamer.scheduler) drop what they held for the skipped update."""
    import streamer.resident
    import streamer.scheduler
    from streamer.data import BatchSampler, load_tokens
    from streamer.train import build_engine, micro_batches

    held = dict(held_units=3, update_on="device") if mode.endswith("-held") else {}
    cfg = config(token_file, tmp_path, mode.removesuffix("-held"), **held)
    engine = build_engine(cfg, cfg.validate(), tmp_path, torch.device("cpu"), torch.float32)
    sampler = BatchSampler(load_tokens(token_file, 256), cfg.seq_len, cfg.seed)
    try:
        assert not engine.step(micro_batches(sampler, 0, cfg), 1e-3).skipped
        before = engine_state(engine)
        monkeypatch.setattr(streamer.resident, "loss_fn", nan_loss)
        monkeypatch.setattr(streamer.scheduler, "loss_fn", nan_loss)
        assert engine.step(micro_batches(sampler, 1, cfg), 1e-3).skipped
        after = engine_state(engine)
    finally:
        engine.close()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


def test_max_skipped_steps_stops_the_run(token_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture) -> None:
    import streamer.resident

    monkeypatch.setattr(streamer.resident, "loss_fn", nan_loss)
    out = tmp_path / "run"
    with pytest.raises(UserError, match="3 steps in a row") as error:
        train(config(token_file, out, "resident", max_skipped_steps=3))
    assert "--max-skipped-steps 3" in str(error.value)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [True] * 3
    assert capsys.readouterr().err.count("update skipped") == 3


def test_data_parallel_checkpoints_resume_exactly(token_file: Path, tmp_path: Path) -> None:
    """Two gloo ranks: each writes its own shards, rank 0 the manifest; a shard corrupt on
    rank 1 alone makes both ranks fall back to the same earlier checkpoint."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "streamer", "train", "--model", "tiny-neox", "--mode", "stream", "--offload",
           "disk", "--steps", "6", "--batch-size", "2", "--seq-len", "32", "--warmup", "2", "--data",
           str(token_file), "--out", str(out), "--device", "cpu", "--no-progress", "--nproc", "2",
           "--checkpoint-every", "2", "--keep", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    uninterrupted, weights = losses(out), load_final(out / "final")
    folder = out / "checkpoints" / "step-00000004"
    manifest = checkpoint.read_manifest(folder)
    assert manifest["world"] == 2 and manifest["files"]["unit-00003-rank1.safetensors"]["rank"] == 1
    checkpoint.remove_checkpoint(out / "checkpoints" / "step-00000006")  # as if killed before it completed
    damaged = folder / "unit-00003-rank1.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:-8] + b"\xff" * 8)
    # Only the directory: the launcher takes the rest from the record, --nproc 2 included,
    # and hands it to both ranks.
    done = subprocess.run([sys.executable, "-m", "streamer", "train", "--out", str(out), "--resume"],
                          capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert all(flag in done.stdout for flag in ("--model tiny-neox ", "--mode stream ", "--nproc 2 "))
    assert "settings differ" not in done.stderr
    assert f"rank 1: checkpoint file '{damaged}' is corrupt" in done.stderr
    assert "resuming from step-00000002" in done.stderr
    assert losses(out) == uninterrupted
    resumed = load_final(out / "final")
    assert all(torch.equal(resumed[name], weights[name]) for name in weights)


def test_resuming_in_another_state_format_is_refused(token_file: Path, tmp_path: Path) -> None:
    """A compact run's checkpoint holds 8-bit moments: an fp32 run cannot continue it."""
    out = tmp_path / "run"
    train(config(token_file, out, "stream-disk-compact", steps=2, checkpoint_every=2))
    with pytest.raises(UserError, match="resume with --state compact"):
        train(config(token_file, out, "stream-disk", steps=4, checkpoint_every=2, resume=True))


def test_a_resumed_run_evaluates_as_an_unbroken_one(token_file: Path, tmp_path: Path) -> None:
    """The held-out losses too: the evaluation after the checkpointed step ran before the
    crash, and the resumed run evaluates the same windows with the same weights."""
    reference = tmp_path / "reference"
    train(config(token_file, reference, eval_every=2))
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        crash_at(patch, 5)
        with pytest.raises(Crash):
            train(config(token_file, out, checkpoint_every=2, eval_every=2))
    train(config(token_file, out, checkpoint_every=2, eval_every=2, resume=True))
    assert_same_run(out, reference)
    rows = [[json.loads(line).get("eval_loss") for line in (run / "metrics.jsonl").read_text().splitlines()]
            for run in (out, reference)]
    assert rows[0] == rows[1] and rows[0][1::2] == [r for r in rows[0] if r is not None]


@pytest.mark.parametrize(("before", "after", "reported"), [
    ({"eval_every": 0, "holdout": 0.01}, {"eval_every": 5, "holdout": 0.01}, "held-out fraction 0 -> 0.01"),
    ({"eval_every": 5, "holdout": 0.01}, {"eval_every": 5, "holdout": 0.05}, "held-out fraction 0.01 -> 0.05"),
    ({}, {"eval_every": 5, "holdout": 0.01}, "held-out fraction 0 -> 0.01"),  # a checkpoint from before evaluation
    ({"eval_every": 5, "holdout": 0.01}, {"eval_every": 50, "holdout": 0.01}, None),  # training reads the same
    ({"eval_every": 0, "holdout": 0.01}, {"eval_every": 0, "holdout": 0.05}, None),
])
def test_resuming_with_other_training_data_is_reported(before: dict, after: dict, reported: str | None) -> None:
    model = ModelConfig.from_name("tiny").to_dict()
    manifest = {"model": model, "mode": "stream", "world": 1, "train": {"model": "tiny", **before}}
    changed = checkpoint.check_compatible(manifest, Path("step-00000002"), model, "stream", 1,
                                          {"model": "tiny", **after})
    assert changed == ([reported] if reported else [])


def test_another_world_size_is_reported_with_the_global_batch() -> None:
    """The state is resharded (tests/test_parallel.py resumes 2 ranks on 1 and on 4),
    and the change is reported with the global batch, and for the compact formats with
    the moments' second coding."""
    model = ModelConfig.from_name("tiny").to_dict()
    train = {"model": "tiny", "batch_size": 2, "grad_accum": 2}
    manifest = {"model": model, "mode": "stream", "world": 2, "train": {**train, "state": "fp32"}}
    changed = checkpoint.check_compatible(manifest, Path("step-00000002"), model, "stream", 4,
                                          {**train, "batch_size": 1, "state": "fp32"})
    assert changed == ["batch_size 2 -> 1", "processes 2 -> 4 (global batch 8 -> 8 sequences)"]
    manifest["train"]["state"] = "compact8"
    assert checkpoint.check_compatible(manifest, Path("step-00000002"), model, "stream", 1,
                                       {**train, "state": "compact8"}) == [
        "processes 2 -> 1 (global batch 8 -> 4 sequences, the 8-bit moments coded again)"]


def signal_at(monkeypatch: pytest.MonkeyPatch, step: int, *signals: signal.Signals) -> None:
    """Send this process `signals` as step `step` starts, as a scheduler or Ctrl-C would."""
    import streamer.train as train_module

    real = train_module.micro_batches

    def batches(sampler, index, *args, **kwargs):  # noqa: ANN001, ANN202
        if index == step:
            for signum in signals:
                os.kill(os.getpid(), signum)
        return real(sampler, index, *args, **kwargs)

    monkeypatch.setattr(train_module, "micro_batches", batches)


@pytest.mark.parametrize("mode", ["resident", "stream-disk"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_goes_on(
        mode: str, references: dict[str, Path], token_file: Path, tmp_path: Path,
        capfd: pytest.CaptureFixture) -> None:
    """SIGTERM in step 2 (0-based): step 2 completes, a checkpoint after it (off the
    --checkpoint-every 4 grid) is written, the run says so and stops without final
    weights; --resume then gives the uninterrupted run, bit for bit."""
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        signal_at(patch, 2, signal.SIGTERM)
        with pytest.raises(Stopped) as stopped:
            train(config(token_file, out, mode, checkpoint_every=4))
    assert stopped.value.status == 128 + signal.SIGTERM
    assert str(stopped.value).startswith(f"stopped by SIGTERM after 3 of {STEPS} steps; checkpoint in "
                                         f"{out / 'checkpoints' / 'step-00000003'}: `streamer train --out {out} "
                                         f"--resume` goes on from there (a stop needs ")
    assert "SIGTERM: stopping after this step" in capfd.readouterr().err  # written to fd 2 itself
    assert len(losses(out)) == 3 and not (out / "final").exists() and not (out / "store").exists()
    assert [step for step, _ in checkpoint.complete(out)] == [3]
    recorded = json.loads((out / "run.json").read_text())["stopped"]
    assert recorded.items() >= {"signal": "SIGTERM", "steps_done": 3, "checkpoint": "step-00000003"}.items()
    assert 0 < recorded["checkpoint_s"] and 0 < recorded["slowest_step_s"]
    assert f"{recorded['slowest_step_s']:.1f} s for the slowest step so far" in str(stopped.value)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # as before the steps
    train(config(token_file, out, mode, checkpoint_every=4, resume=True))
    assert_same_run(out, references[mode])
    assert "stopped" not in json.loads((out / "run.json").read_text())
    assert [step for step, _ in checkpoint.complete(out)] == [3, 4]


def test_a_run_without_checkpoints_says_it_cannot_be_resumed(token_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        signal_at(patch, 1, signal.SIGINT)
        with pytest.raises(Stopped, match=r"after 2 of 6 steps, without a checkpoint .*cannot be resumed"):
            train(config(token_file, out))
    assert len(losses(out)) == 2 and not (out / "checkpoints").exists() and not (out / "final").exists()
    assert json.loads((out / "run.json").read_text())["stopped"]["checkpoint"] is None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_schedulers_warning_signal_stops_the_run_too(token_file: Path, tmp_path: Path) -> None:
    """SIGUSR1, what a batch scheduler sends ahead of a job's wall time when asked to:
    a stop after the step, with a checkpoint, and status 128 + 10."""
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        signal_at(patch, 1, signal.SIGUSR1)
        with pytest.raises(Stopped, match=r"^stopped by SIGUSR1 after 2 of 6 steps; checkpoint in ") as stopped:
            train(config(token_file, out, "resident", checkpoint_every=4))
    assert stopped.value.status == 128 + signal.SIGUSR1
    assert [step for step, _ in checkpoint.complete(out)] == [2]
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_a_second_signal_stops_at_once(token_file: Path, tmp_path: Path) -> None:
    """Ctrl-C twice: no waiting for the step's end, and no checkpoint."""
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        signal_at(patch, 1, signal.SIGINT, signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            train(config(token_file, out, checkpoint_every=4))
    assert len(losses(out)) == 1 and not checkpoint.complete(out)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_in_the_last_step_lets_the_run_finish(references: dict[str, Path], token_file: Path,
                                                      tmp_path: Path) -> None:
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        signal_at(patch, STEPS - 1, signal.SIGTERM)
        train(config(token_file, out))
    assert_same_run(out, references["stream-disk"])
    assert "stopped" not in json.loads((out / "run.json").read_text())


@pytest.mark.parametrize("target", ["launcher", "rank 1", "time limit"])
def test_two_ranks_stop_together_after_a_step(target: str, token_file: Path, tmp_path: Path) -> None:
    """`streamer train --nproc 2` stopped by SIGTERM, sent to the launcher (which sends it
    to the ranks, not to torchrun) or to one rank alone, or by a --time-limit that start-up
    alone exceeds: both ranks stop after the same step, write one checkpoint of both
    shards, and the launcher exits 128 + 15, or 75."""
    import psutil

    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "streamer", "train", "--model", "tiny-neox", "--mode", "stream", "--steps", "500",
           "--batch-size", "2", "--seq-len", "32", "--data", str(token_file), "--out", str(out), "--device", "cpu",
           "--no-progress", "--nproc", "2", "--checkpoint-every", "1000"]
    cmd += ["--time-limit", "1s"] if target == "time limit" else []
    launcher = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while target != "time limit" and not ((out / "metrics.jsonl").exists() and len(losses(out)) >= 2):
            assert launcher.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.05)
        if target == "launcher":
            launcher.send_signal(signal.SIGTERM)
        elif target == "rank 1":
            torchrun, = psutil.Process(launcher.pid).children()
            rank, = [p for p in torchrun.children() if p.environ().get("RANK") == "1"]
            rank.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
    stopped = json.loads((out / "run.json").read_text())["stopped"]
    done = stopped["steps_done"]
    if target == "time limit":  # the first step always runs: there is nothing to estimate it from
        assert launcher.returncode == 75 and done == 1, err[-2000:]
        assert stopped["time_limit"] and stopped["signal"] is None
        assert "stopped by --time-limit after 1 of 500 steps, with 0 s of it left" in err
    else:
        assert launcher.returncode == 128 + signal.SIGTERM, err[-2000:]
        assert 2 <= done < 500 and f"stopped by SIGTERM after {done} of 500 steps" in err
    assert len(losses(out)) == done
    assert [step for step, _ in checkpoint.complete(out)] == [done]
    manifest = checkpoint.read_manifest(out / "checkpoints" / stopped["checkpoint"])
    assert manifest["world"] == 2 and {f["rank"] for f in manifest["files"].values() if "rank" in f} == {0, 1}
    assert "Traceback" not in err and "ChildFailedError" not in err


class FakeClock:
    """A wall clock that runs `step_s` seconds a step (the step's own time on top), for
    TimeLimit to read: a time-limited run whose steps take minutes, in a test of seconds."""

    def __init__(self, patch: pytest.MonkeyPatch, step_s: float) -> None:
        import streamer.train as train_module

        self.now, real = 1e9, train_module.micro_batches

        def batches(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            self.now += step_s
            return real(*args, **kwargs)

        patch.setattr(train_module, "micro_batches", batches)
        patch.setattr(train_module.TimeLimit, "clock", staticmethod(lambda: self.now))


@pytest.mark.parametrize("mode", ["resident", "stream-disk"])
def test_a_time_limit_stops_in_time_with_a_checkpoint_and_resume_goes_on(
        mode: str, references: dict[str, Path], token_file: Path, tmp_path: Path) -> None:
    """Steps of 20 s under a limit of 100 s: after step 4 (and its periodic checkpoint)
    a fifth still fits with its checkpoint, after the fifth a sixth does not (the margin
    alone is 5 s): the run stops there, with a checkpoint off the --checkpoint-every 4
    grid, status 75, and says so; --resume gives the uninterrupted run, bit for bit."""
    out = tmp_path / "run"
    with pytest.MonkeyPatch.context() as patch:
        clock = FakeClock(patch, step_s=20.0)
        with pytest.raises(Stopped) as stopped:
            train(config(token_file, out, mode, checkpoint_every=4, time_limit_s=100.0), started_at=clock.now)
    assert stopped.value.status == 75
    assert str(stopped.value).startswith(f"stopped by --time-limit after 5 of {STEPS} steps, with 0 s of it left "
                                         f"(the next step and a checkpoint need about ")
    assert str(stopped.value).endswith(f" s); checkpoint in {out / 'checkpoints' / 'step-00000005'}: "
                                       f"`streamer train --out {out} --resume` goes on from there")
    assert len(losses(out)) == 5 and not (out / "final").exists()
    assert [step for step, _ in checkpoint.complete(out)] == [4, 5]
    assert not list(out.glob(".checkpoint-probe*"))
    run = json.loads((out / "run.json").read_text())
    assert run["time_limit"]["limit_s"] == 100.0
    assert run["stopped"].items() >= {"signal": None, "time_limit": True, "steps_done": 5,
                                      "checkpoint": "step-00000005"}.items()
    # The checkpoint records what a stop needs, and a resumed job decides from that:
    # the longest checkpoint before it (step 4's), so no probe is written.
    recorded = checkpoint.read_manifest(out / "checkpoints" / "step-00000005")["run"]
    assert 0 < recorded["slowest_step_s"] and 0 < recorded["checkpoint_s"]
    # A job whose start-up left no room for a step and its checkpoint would do nothing,
    # and its requeued successors too: it says so, and changes nothing, the run's record
    # of its stop included.
    record = (out / "run.json").read_bytes()
    with pytest.MonkeyPatch.context() as patch:
        clock = FakeClock(patch, step_s=20.0)
        with pytest.raises(UserError, match=r"^--time-limit 100 s leaves 4 s after start-up \(96 s\), and a step "
                                            r"with its checkpoint needs about \d+ s .*: give the job more time$"):
            train(config(token_file, out, mode, checkpoint_every=4, resume=True, time_limit_s=100.0),
                  started_at=clock.now - 96)
    assert len(losses(out)) == 5 and [step for step, _ in checkpoint.complete(out)] == [4, 5]
    assert (out / "run.json").read_bytes() == record
    with pytest.MonkeyPatch.context() as patch:
        import streamer.train as train_module

        patch.setattr(train_module, "probe_checkpoint_s", lambda *args: pytest.fail("probed again"))
        train(config(token_file, out, mode, checkpoint_every=4, resume=True, time_limit_s=3600.0))
    assert_same_run(out, references[mode])
    assert "stopped" not in json.loads((out / "run.json").read_text())


def test_a_time_limit_keeps_room_for_a_step_and_its_checkpoints() -> None:
    """The decision itself: a step and a checkpoint (two when one is due now), a quarter
    more of each, and 5 s; the estimate is the probe's until a checkpoint is measured,
    then the longest measured."""
    from streamer.train import TimeLimit

    limit = TimeLimit(100.0, started_at=0.0, checkpoint_s=10.0)
    with pytest.MonkeyPatch.context() as patch:
        now = [0.0]
        patch.setattr(TimeLimit, "clock", staticmethod(lambda: now[0]))
        assert limit.needed_s(8.0, 1) == 1.25 * (8 + 10) + 5  # 27.5
        now[0] = 72.0
        assert not limit.out_of_time(8.0, checkpoint_due=False)
        assert limit.out_of_time(8.0, checkpoint_due=True)  # 72 + 1.25 * 28 + 5 > 100
        now[0] = 73.0
        assert limit.out_of_time(8.0, checkpoint_due=False)
        limit.wrote_checkpoint(2.0)  # a measured one replaces the probe's estimate
        assert limit.checkpoint_s == 2.0 and not limit.out_of_time(8.0, checkpoint_due=False)
        limit.wrote_checkpoint(1.0)  # and the longest measured counts from then on
        assert limit.checkpoint_s == 2.0
        assert limit.left_s() == 27.0


def test_a_dry_run_says_how_many_steps_a_job_does(tmp_path: Path) -> None:
    """The job a --time-limit gives, resuming: the last start-up, then steps and their
    share of the checkpoints, until a stop's step and checkpoint must begin."""
    from streamer.train import TrainConfig, job_length

    (tmp_path / "run.json").write_text(json.dumps({"startup": {"total_s": 10.0}}))
    cfg = TrainConfig(time_limit_s=100.0, checkpoint_every=5)
    times = {"slowest_step_s": 2.0, "checkpoint_s": 4.0}
    line = job_length(cfg, times, tmp_path, steps_left=100)
    # 100 - 10 - (1.25 * (2 + 4) + 5) = 77.5 s of steps at 2 + 4 / 5 s each: 27, and the stop's
    assert line == ("--time-limit 100 s: start-up about 10 s (the last job's), then about 28 steps of the 100 left "
                    "(the slowest step so far 2 s, a checkpoint 4 s every 5) before it stops in time")
    assert "then about 0 steps" in job_length(TrainConfig(time_limit_s=20.0, checkpoint_every=5), times, tmp_path,
                                              steps_left=100)
    # A job with time for more steps than are left finishes; one with none left has nothing to do.
    assert "then the 28 steps left, then it finishes (" in job_length(cfg, times, tmp_path, steps_left=28)
    assert "nothing is left to train (raise --steps to go on)" in job_length(cfg, times, tmp_path, steps_left=0)


def test_a_time_limited_command_ends_within_its_limit(token_file: Path, tmp_path: Path) -> None:
    """For real: `streamer train --time-limit 12s` on a run far too long for it returns
    before 12 s have passed, with status 75 and a checkpoint that --resume takes up."""
    out = tmp_path / "run"
    args = ["train", "--model", "tiny", "--mode", "stream", "--steps", "100000", "--batch-size", "2",
            "--seq-len", "32", "--data", str(token_file), "--out", str(out), "--device", "cpu", "--no-progress",
            "--checkpoint-every", "1000"]
    started = time.monotonic()
    result = run_main([*args, "--time-limit", "12s"])
    assert time.monotonic() - started < 12.0 and result.returncode == 75, result.stderr
    done = json.loads((out / "run.json").read_text())["stopped"]["steps_done"]
    assert done >= 1 and [step for step, _ in checkpoint.complete(out)] == [done]
    assert result.stderr.strip().splitlines()[-1].startswith("streamer: stopped by --time-limit")
    result = run_main([*args[:6], str(done + 2), *args[7:], "--resume"])
    assert result.returncode == 0, result.stderr
    assert len(losses(out)) == done + 2


def test_a_wsd_run_resumed_with_more_steps_is_the_longer_run(token_file: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """--schedule wsd: a run of 6 steps, resumed from its checkpoint at 4 (before its
    decay) with --steps 10, is the uninterrupted run of 10, bit for bit; the change of
    length is reported."""
    wsd = dict(mode="resident", schedule="wsd", decay_fraction=0.3)
    longer = tmp_path / "longer"
    train(config(token_file, longer, steps=10, **wsd))
    out = tmp_path / "run"
    train(config(token_file, out, checkpoint_every=4, **wsd))
    def rates(run: Path) -> list[float]:
        return [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]

    assert rates(out)[:5] == rates(longer)[:5] and rates(out)[5] < rates(longer)[5]  # its own decay
    train(config(token_file, out, steps=10, checkpoint_every=4, resume=True, **wsd))
    said = capsys.readouterr().err
    assert "steps 6 -> 10" in said and "decay" not in said
    assert_same_run(out, longer)
    # From a checkpoint past the decay's start the longer run is not this one: it says so.
    decayed = tmp_path / "decayed"
    train(config(token_file, decayed, checkpoint_every=3, **wsd))
    capsys.readouterr()
    train(config(token_file, decayed, steps=10, checkpoint_every=3, resume=True, **wsd))
    assert ("checkpoint step-00000006 is past the start of the run's decay (step 4 of 6): the longer run goes on "
            "from decayed weights, not as a run of 10 steps would; a checkpoint of step 5 or earlier"
            in capsys.readouterr().err)
