"""`streamer eval`: a run's exported weights give the held-out loss the run's last
evaluation printed, held whole or streamed; a Hugging Face checkpoint's loss on a
token file is the transformers model's own; bad input is one line and exit 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from streamer.cli import main
from streamer.data import eval_windows
from streamer.train import TrainConfig, train

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _eval(capsys, *args: str) -> dict:  # noqa: ANN001
    capsys.readouterr()  # what ran before (a streamed run's first line, its plan)
    assert main(["eval", *args, "--device", "cpu", "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _last_eval(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in reversed(rows) if "eval_loss" in r)


@pytest.mark.parametrize("engine", [dict(mode="resident"), dict(mode="stream", offload="disk", state="compact8")])
def test_a_runs_final_weights_give_its_last_held_out_loss(tmp_path: Path, token_file: Path, engine: dict,
                                                          capsys) -> None:
    """From the run folder, with no flag: the run's data, windows and tokens. The
    streamed run keeps bfloat16 weights (compact8), and its export is what it
    evaluated. Held whole and streamed, the same loss."""
    run = tmp_path / "run"
    train(TrainConfig(model="tiny-neox", steps=6, batch_size=2, grad_accum=2, seq_len=32, data=str(token_file),
                      eval_every=3, holdout=0.05, out=str(run), progress=False, **engine))
    logged = _last_eval(run)
    held = _eval(capsys, str(run))
    assert held["tokens"] == logged["eval_tokens"] == 4 * 32 and held["held_out"] is True
    assert held["loss"] == pytest.approx(logged["eval_loss"], abs=1e-5)
    streamed = _eval(capsys, str(run / "final"), "--mode", "stream")
    assert streamed["mode"] == "stream" and streamed["loss"] == held["loss"]
    from_disk = _eval(capsys, str(run / "final"), "--mode", "disk")
    assert from_disk["mode"] == "disk" and from_disk["loss"] == held["loss"]
    more = _eval(capsys, str(run), "--tokens", "320", "--batch-size", "3")  # flags over the run's settings
    assert more["tokens"] == 320 and more["sequences"] == 10 and more["loss"] != held["loss"]
    assert _eval(capsys, str(run), "--holdout", "0.1")["held_out"] is False  # reaches text it trained on


@pytest.mark.parametrize("model", ["tiny", "tiny-gptj", "tiny-neox"])
def test_a_checkpoints_loss_is_the_hugging_face_models_own(tmp_path: Path, token_file: Path, model: str,
                                                           hugging_face_checkpoint, capsys) -> None:
    """--holdout 1 reads evenly spaced windows over all of the file."""
    from streamer.data import load_tokens

    reference = hugging_face_checkpoint(model, tmp_path)
    got = _eval(capsys, str(tmp_path), "--data", str(token_file), "--holdout", "1", "--seq-len", "48",
                "--tokens", "240", "--batch-size", "2")
    x, y = eval_windows(load_tokens(token_file, 256), 48, 5)
    with torch.no_grad():
        logits = reference(torch.from_numpy(x)).logits
    expected = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), torch.from_numpy(y).reshape(-1)).item()
    assert got["tokens"] == 240 and got["holdout"] == 1 and got["held_out"] is None  # no run's weights
    assert got["loss"] == pytest.approx(expected, abs=1e-5)


def test_the_result_reads_as_one_line(tmp_path: Path, token_file: Path, capsys) -> None:
    run = tmp_path / "run"
    train(TrainConfig(model="tiny", steps=2, batch_size=2, seq_len=32, data=str(token_file), out=str(run),
                      progress=False))
    assert main(["eval", str(run), "--device", "cpu"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert line.startswith("tiny (resident on cpu): loss ") and "64 tokens (2 windows of 32 from the last 1% of" in line
    assert line.endswith("; the run trained on these tokens (it held out none: see --eval-every)")
    assert _eval(capsys, str(run), "--holdout", "1")["held_out"] is False


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, token_file: Path, fails_in_one_line) -> None:
    from models import ModelConfig

    (tmp_path / "neox").mkdir()
    (tmp_path / "neox" / "config.json").write_text(json.dumps(ModelConfig.from_name("pythia-160m").to_dict()))
    run = tmp_path / "run"
    train(TrainConfig(model="tiny", steps=1, batch_size=1, seq_len=16, data=str(token_file), out=str(run),
                      progress=False))
    moved = tmp_path / "moved"  # a run whose data path no longer leads to its data
    moved.mkdir()
    settings = json.loads((run / "run.json").read_text())
    settings["train"]["data"] = str(tmp_path / "elsewhere" / "small.npy")
    (moved / "run.json").write_text(json.dumps(settings))
    (moved / "final").symlink_to(run / "final")
    cpu = ["--device", "cpu"]
    fails_in_one_line("eval", {
        "no weights there": ([str(tmp_path / "absent"), *cpu], ["absent': no folder"]),
        "a second folder without weights": ([str(run), str(tmp_path / "absent"), *cpu], ["absent': no folder"]),
        "a fraction of nothing": ([str(run), "--holdout", "0", *cpu], ["--holdout must be a fraction above 0"]),
        "more than all": ([str(run), "--holdout", "1.5", *cpu], ["at most 1 (all of the data)"]),
        "past the context": ([str(run), "--seq-len", "300", *cpu], ["exceeds tiny's context of 256"]),
        "no tokens": ([str(run), "--tokens", "0", *cpu], ["--tokens must be a positive integer"]),
        "byte text for a large vocabulary": ([str(tmp_path / "neox"), *cpu], ["pass --data"]),
        "no such data": ([str(run), "--data", str(tmp_path / "none.npy"), *cpu], ["none.npy' not found"]),
        "the run's data gone": ([str(moved), *cpu], ["small.npy' is not there"]),
    })


def test_passes_of_any_size_sum_to_the_same_loss() -> None:
    """However the windows are grouped into passes and micro-batches (ragged ones
    included), every window counts once."""
    from models import GPT, ModelConfig
    from streamer.evaluate import evaluate
    from streamer.inference import ResidentWeights

    model = GPT(ModelConfig.from_name("tiny-gptj")).eval()
    model.init_weights(0)
    x = torch.randint(0, 256, (7, 16), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 256, (7, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = F.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1), reduction="sum").item()
    for batch, per_pass in [(7, None), (1, 1), (2, 2), (2, 4), (3, 6), (4, None)]:
        total, count = evaluate(ResidentWeights(model), x, y, batch, per_pass)
        assert count == 7 * 16 and total == pytest.approx(expected, rel=1e-6), (batch, per_pass)


def test_a_streamed_pass_takes_what_the_device_holds() -> None:
    """gpt-neox-20b with 38 GB free beside its two units: all 64 windows of 2048 in one
    pass; with 12 GB, passes of whole micro-batches that fit; held whole, a micro-batch
    a pass."""
    from types import SimpleNamespace

    from models import ModelConfig
    from streamer.evaluate import EvalConfig, boundary_bytes, windows_per_pass, working_bytes

    cfg, bf16, gib = ModelConfig.from_name("gpt-neox-20b"), torch.bfloat16, 2**30
    streamed = SimpleNamespace(mode="stream", cfg=cfg, dtype=bf16)
    ecfg = EvalConfig(data=(), weights=None, seq_len=2048, holdout=0.01, tokens=64 * 2048, batch_size=4)
    assert windows_per_pass(streamed, ecfg, 64, 38 * gib) == 64
    small = windows_per_pass(streamed, ecfg, 64, 12 * gib)
    assert 4 <= small < 64 and small % 4 == 0
    assert working_bytes(cfg, bf16, ecfg) + small * boundary_bytes(cfg, bf16, 2048) <= 0.9 * 12 * gib
    assert windows_per_pass(SimpleNamespace(mode="resident", cfg=cfg, dtype=bf16), ecfg, 64, 80 * gib) == 4


@pytest.mark.parametrize("engine", [dict(mode="resident"), dict(mode="stream", offload="ram", state="compact")])
def test_a_checkpoint_gives_the_held_out_loss_logged_at_its_step(tmp_path: Path, token_file: Path, engine: dict,
                                                                 capsys) -> None:
    """DIR/checkpoints/step-N holds the weights after step N: evaluated with the run's
    settings (from its manifest) they give the loss the run logged there, the last
    checkpoint the final weights' loss; sample and export read it too."""
    from streamer.data import ByteTokenizer

    run = tmp_path / "run"
    train(TrainConfig(model="tiny-gptj", steps=4, batch_size=2, seq_len=32, data=str(token_file), eval_every=2,
                      checkpoint_every=2, keep=2, out=str(run), progress=False, **engine))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    at_2 = _eval(capsys, str(run / "checkpoints" / "step-00000002"))
    assert at_2["held_out"] is True and at_2["loss"] == pytest.approx(logged[min(logged)], abs=1e-5)
    at_4 = _eval(capsys, str(run / "checkpoints" / "step-00000004"), "--mode", "stream")
    assert at_4["loss"] == pytest.approx(_eval(capsys, str(run))["loss"], abs=1e-6) and at_4["loss"] != at_2["loss"]
    # Streamed from the checkpoint's files, a unit read for every pass: the same loss.
    from_disk = _eval(capsys, str(run / "checkpoints" / "step-00000004"), "--mode", "disk")
    assert from_disk["mode"] == "disk" and from_disk["loss"] == at_4["loss"]
    # Both at once, a run's curve: one result each, in the order given, each the loss alone.
    both = _eval(capsys, *(str(run / "checkpoints" / f"step-0000000{n}") for n in (2, 4)))
    assert [r["weights"] for r in both] == [str(run / "checkpoints" / f"step-0000000{n}") for n in (2, 4)]
    assert [r["loss"] for r in both] == pytest.approx([at_2["loss"], at_4["loss"]], abs=1e-6)
    assert main(["eval", str(run / "checkpoints" / "step-00000002"), str(run), "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(run / "checkpoints" / "step-00000002"), str(run)]

    assert main(["sample", str(run / "checkpoints" / "step-00000004"), "--tokens", "10", "--temperature", "0",
                 "--device", "cpu"]) == 0
    from_checkpoint = capsys.readouterr().out
    assert main(["sample", str(run), "--tokens", "10", "--temperature", "0", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == from_checkpoint
    assert from_checkpoint.startswith("def ") and len(ByteTokenizer().encode(from_checkpoint)) >= 14


def test_a_damaged_checkpoint_is_refused_in_one_line(tmp_path: Path, token_file: Path, fails_in_one_line) -> None:
    run = tmp_path / "run"
    train(TrainConfig(model="tiny", mode="stream", offload="ram", steps=2, batch_size=1, seq_len=16,
                      data=str(token_file), checkpoint_every=2, out=str(run), progress=False))
    folder = run / "checkpoints" / "step-00000002"
    damaged = folder / "unit-00001-rank0.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 0xFF
    damaged.write_bytes(bytes(data))
    fails_in_one_line("eval", {"a flipped bit": ([str(folder), "--device", "cpu"],
                                                 ["unit-00001-rank0.safetensors' is corrupt"])})


def test_several_folders_are_checked_before_any_is_read(tmp_path: Path, token_file: Path, capsys) -> None:  # noqa: ANN001
    """`streamer eval` on a run's checkpoints finds one whose file is cut short, or a
    folder with no weights, before it spends minutes on the others: no loss is printed."""
    run = tmp_path / "run"
    train(TrainConfig(model="tiny", mode="stream", offload="ram", steps=2, batch_size=1, seq_len=16,
                      data=str(token_file), checkpoint_every=1, out=str(run), progress=False))
    capsys.readouterr()
    first, second = run / "checkpoints" / "step-00000001", run / "checkpoints" / "step-00000002"
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text((run / "final" / "config.json").read_text())
    assert main(["eval", str(first), str(tmp_path / "no-weights"), "--device", "cpu"]) == 2
    assert capsys.readouterr().out == ""
    cut = second / "unit-00003-rank0.safetensors"
    os.truncate(cut, cut.stat().st_size - 10)
    assert main(["eval", str(first), str(second), "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "unit-00003-rank0.safetensors' is truncated" in captured.err


def test_a_mixture_runs_held_out_loss_is_read_back(tmp_path: Path, token_file: Path, capsys,
                                                  fails_in_one_line) -> None:
    """A run on two files in shares 1:3 holds out each one's tail and evaluates both by
    those shares, logging each file's loss too; `streamer eval` on the run reads the same
    windows (the run's files and shares) and gives its last held-out losses. Other
    shares are other windows."""
    import sysconfig

    from streamer.data import prepare

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    other = tmp_path / "other.npy"
    prepare(other, [stdlib / "textwrap.py", stdlib / "argparse.py"])
    run = tmp_path / "run"
    train(TrainConfig(model="tiny", steps=4, batch_size=2, seq_len=32, data=[str(token_file), str(other)],
                      data_weights=[1.0, 3.0], eval_every=2, eval_tokens=8 * 32, holdout=0.05, out=str(run),
                      progress=False))
    logged = _last_eval(run)
    reads = json.loads((run / "run.json").read_text())["data_reads"]
    assert [(r["file"], r["share"]) for r in reads] == [(str(token_file), 0.25), (str(other), 0.75)]
    assert reads[0]["times_read"] == pytest.approx(4 * 2 * 32 * 0.25 / reads[0]["training_tokens"])
    held = _eval(capsys, str(run))
    assert held["tokens"] == logged["eval_tokens"] == 8 * 32 and held["held_out"] is True
    assert held["loss"] == pytest.approx(logged["eval_loss"], abs=1e-5) and held["data"] == f"{token_file} + {other}"
    # Each file's loss, logged and read back: 2 windows of the first file's tail, 6 of the other's.
    assert held["by_file"] == pytest.approx(logged["eval_loss_by_file"], abs=1e-5)
    assert list(held["by_file"]) == [str(token_file), str(other)]
    assert held["loss"] == pytest.approx((2 * held["by_file"][str(token_file)] + 6 * held["by_file"][str(other)]) / 8)
    reweighed = _eval(capsys, str(run), "--data-weights", "3", "1")
    assert reweighed["held_out"] is None and reweighed["loss"] != held["loss"]
    assert main(["sample", str(run), "--tokens", "3", "--device", "cpu"]) == 0  # the files' tokenizer: bytes
    assert capsys.readouterr().out.startswith("def ")
    data = ["--data", str(token_file), str(other)]
    fails_in_one_line("train", {
        "weights for one file": (["--data", str(token_file), "--data-weights", "1", "--out", str(tmp_path / "a")],
                                 ["--data-weights", "two or more"]),
        "too few weights": ([*data, "--data-weights", "1", "--out", str(tmp_path / "b")],
                            ["1 weights for 2 data files"]),
        "a weight of zero": ([*data, "--data-weights", "1", "0", "--out", str(tmp_path / "c")],
                             ["must be positive numbers"]),
    })
    fails_in_one_line("eval", {"too many weights": ([str(run), "--data-weights", "1", "2", "3"],
                                                    ["3 weights for 2 data files"])})
    assert not any((tmp_path / name).exists() for name in "abc")


def test_a_run_with_held_out_files_of_its_own(tmp_path: Path, token_file: Path, capsys) -> None:
    """--eval-data: training reads all of --data (no tail held out), each evaluation
    reads windows over all of the held-out file, and `streamer eval` of the run reads
    those windows again by default; given the training data instead, it says the run
    trained on it."""
    import sysconfig

    from streamer.data import eval_windows, load_tokens, prepare

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    held = tmp_path / "held.npy"
    prepare(held, [stdlib / "shlex.py", stdlib / "string.py"])
    run = tmp_path / "run"
    cfg = TrainConfig(model="tiny", steps=4, batch_size=2, seq_len=32, data=str(token_file), eval_data=str(held),
                      eval_every=2, eval_tokens=6 * 32, out=str(run), progress=False)
    train(cfg)
    reads = json.loads((run / "run.json").read_text())["data_reads"]
    assert reads[0]["training_tokens"] == load_tokens(token_file, 256).size  # all of it
    x, _ = eval_windows(load_tokens(held, 256), 32, 6)  # evenly spaced over all of the held-out file
    passes = cfg.eval_passes(load_tokens(token_file, 256), held_out=load_tokens(held, 256))
    assert torch.equal(torch.cat([batch for group in passes for batch, _ in group]), torch.from_numpy(x))
    logged = _last_eval(run)
    evaluated = _eval(capsys, str(run))
    assert evaluated["data"] == str(held) and evaluated["holdout"] == 1 and evaluated["held_out"] is True
    assert evaluated["tokens"] == logged["eval_tokens"] == 6 * 32
    assert evaluated["loss"] == pytest.approx(logged["eval_loss"], abs=1e-5)
    assert main(["eval", str(run), "--data", str(token_file), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.rstrip().endswith(f"the run trained on these tokens (it held out files of its "
                                                     f"own: {held})")


def test_a_run_with_attention_within_documents_is_measured_so(tmp_path: Path, documents_file: Path,
                                                              capsys) -> None:
    """A run trained with --document-mask: `streamer eval` masks as it did, held whole and
    streamed, and gives its logged held-out loss, which attention across the windows'
    documents (`--document-mask no`) would not; the flags alone give the same."""
    run = tmp_path / "run"
    train(TrainConfig(model="tiny", mode="stream", steps=6, batch_size=2, seq_len=64, data=str(documents_file),
                      document_mask=True, eval_every=3, eval_tokens=1024, holdout=0.05, out=str(run), progress=False))
    logged = _last_eval(run)
    held = _eval(capsys, str(run))
    assert held["document_mask"] is True and held["loss"] == pytest.approx(logged["eval_loss"], abs=1e-5)
    streamed = _eval(capsys, str(run / "final"), "--mode", "stream")
    assert streamed["loss"] == pytest.approx(held["loss"], abs=1e-6)
    across = _eval(capsys, str(run), "--document-mask", "no")
    assert across["document_mask"] is False and abs(across["loss"] - held["loss"]) > 1e-3
    flags = ("--data", str(documents_file), "--holdout", "0.05", "--tokens", "1024", "--seq-len", "64")
    assert _eval(capsys, str(run / "final"), *flags, "--document-mask", "yes")["loss"] == held["loss"]
