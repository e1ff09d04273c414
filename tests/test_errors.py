"""Every bad input to `streamer train`: exit code 2, one line on stderr saying what is
wrong and what to do, no traceback, and nothing on disk changed. One test per case;
the commands run in one fixture, through `streamer.cli.main` in this process, as
`python -m streamer` runs it (an exception escaping it would be a traceback)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_main

import streamer.checkpoint as checkpoint
from streamer.train import TrainConfig, train


@dataclass(frozen=True)
class Case:
    args: list[str]  # after 'train'; {run}: a copy of a finished run with one checkpoint; {tmp}: a scratch folder
    fragments: list[str]  # each must appear in the one stderr line
    setup: Callable[[Path, Path], None] | None = None  # (tmp, run) -> None
    two_gpus_no_cupy: bool = False  # pretend to be a machine with two GPUs and no CuPy


def _write_npy(name: str, array: np.ndarray) -> Callable[[Path, Path], None]:
    return lambda tmp, run: np.save(tmp / name, array)


def _unit_file(run: Path) -> Path:
    return run / "checkpoints" / "step-00000002" / "unit-00002-rank0.safetensors"


def _flip_a_bit(tmp: Path, run: Path) -> None:
    data = bytearray(_unit_file(run).read_bytes())
    data[-5] ^= 0x10
    _unit_file(run).write_bytes(bytes(data))


def _truncate(tmp: Path, run: Path) -> None:
    os.truncate(_unit_file(run), _unit_file(run).stat().st_size - 100)


def _craft_header(tmp: Path, run: Path) -> None:
    """A header promising more than the file holds, the manifest re-signed to match: only
    the header guard stands between this file and a huge allocation."""
    path = _unit_file(run)
    header = json.dumps({"param": {"dtype": "F32", "shape": [2**34], "data_offsets": [0, 2**36]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 64)
    folder = path.parent
    manifest = checkpoint.read_manifest(folder)
    manifest["files"][path.name].update(checkpoint.file_entry(path))
    body = {**manifest, "manifest_sha256": checkpoint._manifest_digest(manifest)}
    (folder / checkpoint.MANIFEST).write_text(json.dumps(body))


def _tokens_of(name: str, tokenizer: str, tmp: Path) -> None:
    """A token file whose sidecar names `tokenizer` (in `tmp`) as the one it was made with."""
    np.save(tmp / name, np.full(1000, 65, np.uint16))
    (tmp / f"{name}.json").write_text(json.dumps({"tokenizer": str(tmp / tokenizer), "vocab_size": 256}))


def _config_only(model: str, *extra: str) -> Callable[[Path, Path], None]:
    """A folder with `model`'s config.json (our format) and the named extra files."""
    def setup(tmp: Path, run: Path) -> None:
        from models import ModelConfig

        (tmp / "weights").mkdir()
        (tmp / "weights" / "config.json").write_text(json.dumps(ModelConfig.from_name(model).to_dict()))
        for name in extra:
            (tmp / "weights" / name).write_bytes(b"\x80\x04not really a pickle")
    return setup


STREAM = ["--mode", "stream", "--offload", "ram"]
RESUME = [*STREAM, "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--out", "{run}", "--resume"]
CASES = {
    "unknown model": Case(["--model", "gpt3-x1"], ["unknown model 'gpt3-x1'", "streamer models",
                                                   "or name a folder of weights"]),
    "--model a folder that is not there": Case(["--model", "{tmp}/absent"],
                                               ["--model '", "absent': no folder", "a folder of weights",
                                                "a registry name"]),
    "--model a folder without a config": Case(["--model", "{tmp}/weights"], ["no config.json in"],
                                              lambda tmp, run: (tmp / "weights").mkdir()),
    "zero steps": Case(["--steps", "0"], ["--steps must be a positive integer"]),
    "negative batch": Case(["--batch-size", "-4"], ["--batch-size must be a positive integer"]),
    "zero sequence length": Case(["--seq-len", "0"], ["--seq-len must be a positive integer"]),
    "sequence longer than the context": Case(["--seq-len", "257"], ["--seq-len 257 exceeds", "--seq-len 256"]),
    "data file missing": Case(["--data", "{tmp}/absent.npy"], ["absent.npy' not found", "streamer prepare"]),
    "data file empty": Case(["--data", "{tmp}/empty.npy"], ["is empty", "streamer prepare"],
                            lambda tmp, run: (tmp / "empty.npy").write_bytes(b"")),
    "a data file named twice": Case(["--data", "{tmp}/a.npy", "{tmp}/./a.npy"],
                                    ["--data names '", "a.npy' more than once", "--data-weights"],
                                    _write_npy("a.npy", np.full(1000, 65, np.uint16))),
    "data file of the wrong dtype": Case(["--data", "{tmp}/floats.npy"], ["float32", "streamer prepare"],
                                         _write_npy("floats.npy", np.zeros(1000, np.float32))),
    "--store-dir a file": Case(["--mode", "stream", "--offload", "disk", "--store-dir", "{tmp}/scratch"],
                               ["--store-dir", "scratch' is a file, not a folder"],
                               lambda tmp, run: (tmp / "scratch").write_bytes(b"")),
    "a decay fraction above 1": Case(["--schedule", "wsd", "--decay-fraction", "1.5"],
                                     ["--decay-fraction must be above 0 and at most 1", "got 1.5"]),
    "a time limit without units": Case(["--time-limit", "240", "--checkpoint-every", "10"],
                                       ["'240' is not a duration (say 240s or 240m)", "4h", "D-H:MM:SS"]),
    "a time limit of no time": Case(["--time-limit", "0h", "--checkpoint-every", "10"],
                                    ["'0h' is no time at all"]),
    "a time limit without checkpoints": Case(["--time-limit", "4h"],
                                             ["--time-limit stops the run with a checkpoint", "--checkpoint-every N"]),
    "--eval-data without --eval-every": Case(["--eval-data", "{tmp}/held.npy"],
                                             ["--eval-data is what the evaluations of --eval-every N read"]),
    "--eval-data missing": Case(["--eval-every", "2", "--eval-data", "{tmp}/absent.npy"],
                                ["absent.npy' not found", "streamer prepare"]),
    "--eval-data also trained on": Case(["--eval-every", "2", "--data", "{tmp}/a.npy", "--eval-data", "{tmp}/a.npy"],
                                        ["--eval-data file", "a.npy' is also a --data file", "hold out a file"],
                                        _write_npy("a.npy", np.full(1000, 65, np.uint16))),
    "--eval-data shorter than a sequence": Case(["--eval-every", "2", "--eval-data", "{tmp}/short.npy"],
                                                ["--eval-data file '", "short.npy' holds 20 tokens", "257"],
                                                _write_npy("short.npy", np.full(20, 65, np.uint16))),
    "--eval-data of another tokenizer": Case(["--eval-every", "2", "--eval-data", "{tmp}/other.npy"],
                                             ["prepared with different tokenizers", "other.tokenizer.json"],
                                             lambda tmp, run: _tokens_of("other.npy", "other.tokenizer.json", tmp)),
    "--document-mask on data without separators": Case(
        ["--document-mask"], ["--document-mask needs documents ended by a separator", "small.npy' has none",
                              "--separator TOKEN"]),
    "token ids beyond the vocabulary": Case(["--data", "{tmp}/big.npy"], ["token id 300 >=", "256"],
                                            _write_npy("big.npy", np.full(1000, 300, np.uint16))),
    "fewer steps than the checkpoint's": Case([*STREAM, "--steps", "1", "--batch-size", "2", "--seq-len", "32",
                                               "--out", "{run}", "--resume"],
                                              ["--steps 1 is fewer than the 2 steps checkpoint step-00000002 has done",
                                               "--steps 2 or more"]),
    "checkpoint of another vocabulary": Case([*RESUME, "--vocab-size", "512"],
                                             ["is of a vocabulary of 256, not 512", "resume with --vocab-size 256"]),
    "checkpoint of another model": Case([*RESUME, "--model", "tiny-neox"],
                                        ["of model 'tiny'", "--model tiny"]),
    "corrupt checkpoint file": Case(RESUME,
                                    ["unit-00002-rank0.safetensors' is corrupt", "start over"], _flip_a_bit),
    "truncated checkpoint file": Case(RESUME,
                                      ["unit-00002-rank0.safetensors' is truncated", "start over"], _truncate),
    "crafted safetensors header": Case(RESUME,
                                       ["not a valid safetensors file", "past the end"], _craft_header),
    "step larger than --max-memory": Case(["--mode", "stream", "--max-memory", "0.01"],
                                          ["needs about", "--max-memory is 0.01 GiB", "lower --batch-size"]),
    "non-positive --max-memory": Case(["--mode", "stream", "--max-memory", "0"],
                                      ["--max-memory must be a positive number of GiB"]),
    "held units with the update on the host": Case(["--mode", "stream", "--update-on", "host", "--held-units", "2"],
                                                       ["--held-units holds units for AdamW on the device",
                                                        "--update-on device"]),
    "held units past the head": Case(["--mode", "stream", "--update-on", "device", "--held-units", "9"],
                                     ["--held-units must be 0..5", "the head is never held"]),
    "held units with several processes": Case(["--mode", "stream", "--update-on", "device", "--held-units", "2",
                                               "--nproc", "2"], ["needs one process", "--nproc 1"]),
    "held units beyond the RAM tier": Case(["--mode", "stream", "--update-on", "device", "--offload", "disk",
                                            "--held-units", "2"], ["exceeds the 0 units in RAM", "lower it"]),
    "resident model larger than memory": Case(["--model", "gpt3-125m", "--host-memory", "1"],
                                              ["gpt3-125m held whole needs 1.9 GiB", "1.0 GiB",
                                               "train it with --mode stream"]),
    "plan larger than host memory": Case(["--model", "gpt-neox-20b", "--mode", "stream", "--offload", "ram"],
                                         ["GiB of host RAM", "--offload disk"]),
    "plan larger than the disk": Case(["--model", "gpt-neox-20b", "--mode", "stream", "--offload", "disk"],
                                      ["GiB of disk", "free disk space"]),
    "output directory not writable": Case(["--out", "{tmp}/a-file/run"], ["is a file", "choose another --out"],
                                          lambda tmp, run: (tmp / "a-file").write_text("")),
    "output directory holding another run": Case([*STREAM, "--out", "{run}"],
                                                 ["holds another run", "--resume"]),
    "resume without an output directory": Case(["--resume"], ["--resume needs", "--out"]),
    "sparse gradient sync without CuPy": Case(["--model", "tiny-neox", "--mode", "stream", "--device", "cuda",
                                               "--nproc", "2"], ["needs CuPy", "--grad-sync dense"],
                                              two_gpus_no_cupy=True),
    "more processes than CUDA devices": Case(["--mode", "stream", "--device", "cuda", "--nproc", "4"],
                                             ["4 processes need 4 CUDA devices", "--nproc 2"],
                                             two_gpus_no_cupy=True),
    "negative --eval-every": Case(["--eval-every", "-1"], ["--eval-every must be 0 (off) or a positive integer"]),
    "non-positive --eval-tokens": Case(["--eval-every", "5", "--eval-tokens", "0"],
                                       ["--eval-tokens must be a positive integer"]),
    "--holdout outside (0, 1)": Case(["--eval-every", "5", "--holdout", "1.5"],
                                     ["--holdout must be a fraction between 0 and 1"]),
    "held-out part shorter than a sequence": Case(["--eval-every", "5", "--holdout", "0.00001"],
                                                  ["held-out part of the data", "shorter than one sequence",
                                                   "a larger --holdout"]),
    "--init-from a folder that is not there": Case(["--init-from", "{tmp}/absent"],
                                                   ["--init-from '", "absent': no folder", "pretrained weights"]),
    "--init-from another architecture": Case(["--model", "tiny", "--init-from", "{tmp}/weights"],
                                             ["another architecture than tiny's", "positional 'rotary', not 'learned'",
                                              "--model it was made for"], _config_only("tiny-neox")),
    "--init-from a checkpoint of another model": Case(
        ["--model", "tiny-neox", "--init-from", "{run}/checkpoints/step-00000002"],
        ["another architecture than tiny-neox's", "one of its checkpoints"]),
    "--init-from a run without final weights": Case(
        ["--init-from", "{run}"], ["the run in '", "has no final weights", "pass one of its checkpoints, as ",
                                   "step-00000002"], lambda tmp, run: shutil.rmtree(run / "final")),
    "--init-from pickled weights": Case(["--init-from", "{tmp}/weights"],
                                        ["only pickled weights (pytorch_model.bin)", "convert the checkpoint"],
                                        _config_only("tiny", "pytorch_model.bin")),
    "a learning rate that is not a number": Case(["--lr", "nan"], ["--lr must be a positive number, got nan"]),
    "an infinite learning rate": Case(["--lr", "inf"], ["--lr must be a positive number, got inf"]),
    "a floor above the peak rate": Case(["--min-lr", "1"], ["--min-lr must be between 0 and --lr (0.003)"]),
    "a negative warmup": Case(["--warmup", "-1"], ["--warmup must be 0 or a positive number of steps"]),
    "a weight decay that is not a number": Case(["--weight-decay", "nan"], ["--weight-decay must be 0 (off)"]),
    "a negative gradient clip": Case(["--grad-clip", "-1"], ["--grad-clip must be 0 (off) or a positive number"]),
    "a negative seed": Case(["--seed", "-1"], ["--seed must be 0 or a positive integer, got -1"]),
    "--keep-every without checkpoints": Case(["--keep-every", "2"], ["--keep-every 2 keeps checkpoints that "
                                                                      "--checkpoint-every writes", "add"]),
    "stream flags in resident mode": Case(["--offload", "disk", "--max-memory", "1"],
                                          ["--offload, --max-memory are settings of the stream engine",
                                           "add --mode stream, or drop them"]),
    "the update on the host in resident mode": Case(["--update-on", "host"],
                                                    ["--update-on host is a setting of the stream engine"]),
    "a memory limit that is not a number": Case(["--mode", "stream", "--max-memory", "nan"],
                                                ["--max-memory must be a positive number of GiB, got nan"]),
    "a resident step larger than memory": Case(["--batch-size", "4096", "--host-memory", "4"],
                                               ["a step of tiny held whole, with micro-batches of 4096 x 256 tokens",
                                                "lower --batch-size", "--mode stream"]),
    "--store-dir under a folder that is not there": Case(
        ["--mode", "stream", "--offload", "disk", "--store-dir", "{tmp}/absent/store"],
        ["--store-dir", "no folder", "absent' to make it in", "create the folder first"]),
    "an unknown device": Case(["--device", "tpu"], ["--device must be auto, cpu, cuda or cuda:N, got 'tpu'"]),
    "a CUDA device past the last": Case(["--device", "cuda:3"], ["this machine has 2 CUDA device(s)", "cuda:1"],
                                        two_gpus_no_cupy=True),
    "CUDA asked for without CUDA": Case(["--device", "cuda"], ["no CUDA device", "--device cpu"]),
    "CUDA asked for without CUDA, several processes": Case(["--mode", "stream", "--device", "cuda", "--nproc", "2"],
                                                           ["no CUDA device", "--device cpu"]),
}


def snapshot(root: Path) -> dict[str, str]:
    """Every file under root with a hash of its bytes."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(token_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A stream run of tiny with one checkpoint (at step 2)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    train(TrainConfig(model="tiny", mode="stream", offload="ram", steps=2, batch_size=2, seq_len=32,
                      data=str(token_file), out=str(out), device="cpu", progress=False, checkpoint_every=2))
    return out


def run_case(name: str, case: Case, root: Path, finished: Path, token_file: Path, cache: Path) -> tuple:
    tmp = root / name.replace(" ", "-").replace(",", "")
    tmp.mkdir()
    run = tmp / "run"
    shutil.copytree(finished, run)
    if case.setup is not None:
        case.setup(tmp, run)
    args = [a.replace("{run}", str(run)).replace("{tmp}", str(tmp)) for a in case.args]
    if "--data" not in args:
        args += ["--data", str(token_file)]
    if "--out" not in args and "--resume" not in args:
        args += ["--out", str(tmp / "new")]
    before = snapshot(tmp)
    with pytest.MonkeyPatch.context() as patch:
        if case.two_gpus_no_cupy:
            patch.setattr(torch.cuda, "is_available", lambda: True)
            patch.setattr(torch.cuda, "device_count", lambda: 2)
            patch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
        result = run_main(["train", *args], {"XDG_CACHE_HOME": str(cache)})
    return result, before, snapshot(tmp)


@pytest.fixture(scope="module")
def outcomes(finished_run: Path, token_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root, cache = tmp_path_factory.mktemp("cases"), tmp_path_factory.mktemp("cache")
    return {name: run_case(name, case, root, finished_run, token_file, cache) for name, case in CASES.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, outcomes: dict) -> None:
    if "without CUDA" in name and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result, before, after = outcomes[name]
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("streamer: error: ")
    for fragment in CASES[name].fragments:
        assert fragment in lines[0]
    assert after == before, "the failed command changed files on disk"
