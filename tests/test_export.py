"""`streamer export`: a run's final weights load in `transformers` and predict what the
run's own model does, in one file or in shards with an index, with the run's
tokenizer beside them; nothing already there is replaced."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_main

from models import GPT, ModelConfig
from streamer.cli import main
from streamer.inference import end_of_text
from streamer.train import TrainConfig, load_final, train

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _run(out: Path, model: str, **settings: object) -> Path:
    train(TrainConfig(model=model, steps=2, batch_size=2, seq_len=32, out=str(out), progress=False, **settings))
    return out


@pytest.mark.parametrize("model", ["tiny", "tiny-gptj", "tiny-neox"])
def test_the_export_predicts_what_the_run_does(tmp_path: Path, model: str, capsys) -> None:
    """One file, and shards of a few tensors each under their index: transformers'
    logits are the run's model's."""
    transformers = pytest.importorskip("transformers")
    run = _run(tmp_path / "run", model)
    ours = GPT(ModelConfig.from_name(model)).eval()
    ours.load_state_dict(load_final(run / "final"))
    idx = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(idx)
    for out, extra in ((tmp_path / "one", []), (tmp_path / "shards", ["--shard-size", "0.0001"])):
        assert main(["export", str(run), "--out", str(out), *extra]) == 0
        assert f"wrote {model} as a Hugging Face" in capsys.readouterr().out
        theirs = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad():
            torch.testing.assert_close(theirs(idx).logits, expected, atol=2e-5, rtol=0)
    index = json.loads((tmp_path / "shards" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == sorted(
        [*files, "config.json", "model.safetensors.index.json"]), "no provisional shard is left behind"
    assert sorted(p.name for p in (tmp_path / "one").iterdir()) == ["config.json", "model.safetensors"]


def test_a_compact_runs_export_keeps_its_bfloat16_weights(tmp_path: Path, capsys) -> None:
    """--dtype auto writes the weights as the run stored them (bf16 for compact8), and
    this project reads the export back as it reads any Hugging Face checkpoint; the
    checkpoint of the last step exports the same weights as final/."""
    from models.hf import load_hf

    run = _run(tmp_path / "run", "tiny-neox", mode="stream", offload="ram", state="compact8", checkpoint_every=2)
    stored = load_final(run / "final")
    for source, out in ((run / "final", tmp_path / "hf"), (run / "checkpoints" / "step-00000002", tmp_path / "ck")):
        assert main(["export", str(source), "--out", str(out)]) == 0
        assert "in bfloat16" in capsys.readouterr().out
        back = load_hf(out, torch.bfloat16).state_dict()
        assert back.keys() == stored.keys()
        for name, tensor in stored.items():
            assert torch.equal(back[name], tensor[: back[name].shape[0]].to(torch.bfloat16)), (source, name)


def test_the_runs_tokenizer_and_end_of_text_go_with_it(tmp_path: Path, capsys) -> None:
    """A run on data prepared with a tokenizer.json and a separator after each document:
    the export carries that file, so `streamer sample` on the export decodes text with
    it, as it does on the run, and names the separator its end-of-text token: the token
    at which `streamer sample` stops, on the export as on the run."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.trainers import BpeTrainer

    from streamer.data import prepare

    text = "the quick brown fox jumps over the lazy dog\n" * 200
    (tmp_path / "corpus.txt").write_text(text)
    tokenizer = tokenizers.Tokenizer(BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.train_from_iterator([text], BpeTrainer(vocab_size=200, special_tokens=["[UNK]", "<|endoftext|>"]))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    prepare(tmp_path / "tokens.npy", [tmp_path / "corpus.txt"], tmp_path / "tokenizer.json", separator="<|endoftext|>")
    run = _run(tmp_path / "run", "tiny", data=str(tmp_path / "tokens.npy"))
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    assert "with its tokenizer.json" in capsys.readouterr().out
    assert (tmp_path / "hf" / "tokenizer.json").read_bytes() == (tmp_path / "tokenizer.json").read_bytes()
    separator = tokenizer.token_to_id("<|endoftext|>")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == separator
    assert end_of_text(tmp_path / "hf") == end_of_text(run / "final", run) == end_of_text(run / "final", run / "final")
    assert end_of_text(run / "final") is None  # this project's own config.json names none: the run's data does
    greedy = ["--prompt", "the quick", "--tokens", "5", "--device", "cpu", "--temperature", "0"]
    assert main(["sample", str(tmp_path / "hf"), *greedy]) == 0
    from_export = capsys.readouterr().out
    assert from_export.startswith("the quick") and "�" not in from_export
    assert main(["sample", str(run), *greedy]) == 0  # the run itself: its data's tokenizer, found through run.json
    assert capsys.readouterr().out == from_export


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, fails_in_one_line) -> None:
    run = _run(tmp_path / "run", "tiny")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    new = str(tmp_path / "new")
    fails_in_one_line("export", {
        "a folder with files": ([str(run), "--out", str(tmp_path / "taken")], ["is not an empty folder"]),
        "no shard": ([str(run), "--out", new, "--shard-size", "0"], ["--shard-size must be"]),
        "no weights": ([str(tmp_path / "absent"), "--out", new], ["absent': no folder"]),
        "a dtype it lacks": ([str(run), "--out", new, "--dtype", "int8"], ["--dtype must be"]),
        "a tokenizer that is not there": ([str(run), "--out", new, "--tokenizer", str(tmp_path / "absent.json")],
                                          ["--tokenizer '", "absent.json' not found"]),
        "a tokenizer that is not one": ([str(run), "--out", new, "--tokenizer", str(tmp_path / "taken" / "keep.txt")],
                                        ["cannot read tokenizer"]),
    })
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert not (tmp_path / "new").exists() or not any((tmp_path / "new").iterdir())


def test_a_failed_export_leaves_no_checkpoint_behind(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """An export that fails part-way (here: the disk fills once the weights, config.json
    and the tokenizer are written) leaves --out as it found it, new or empty: nothing that
    looks like a checkpoint, and a retry into the same --out is not refused."""
    import models.hf

    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel

    tokenizer = tmp_path / "tokenizer.json"
    tokenizers.Tokenizer(WordLevel({"the": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tokenizer))
    run = _run(tmp_path / "run", "tiny")
    write_hf = models.hf.write_hf

    def then_the_disk_fills(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        write_hf(*args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(models.hf, "write_hf", then_the_disk_fills)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty"):
        failed = run_main(["export", str(run), "--out", str(out), "--tokenizer", str(tokenizer)])
        assert failed.returncode == 2 and "No space left on device" in failed.stderr
        assert not out.exists() if out.name == "new" else not any(out.iterdir())
    monkeypatch.undo()
    assert run_main(["export", str(run), "--out", str(tmp_path / "new"), "--tokenizer", str(tokenizer)]).returncode == 0
    assert {p.name for p in (tmp_path / "new").iterdir()} == {"config.json", "model.safetensors", "tokenizer.json"}


def test_written_weights_are_readable_by_others(tmp_path: Path) -> None:
    """A run's final/ and its export get the mode any new file gets (the umask's), not
    the owner-only one safetensors creates its files with: on a shared machine the
    others load them too."""
    from streamer.io import UMASK

    run = _run(tmp_path / "run", "tiny")
    assert main(["export", str(run), "--out", str(tmp_path / "hf")]) == 0
    for path in [*(run / "final").iterdir(), *(tmp_path / "hf").iterdir()]:
        assert path.stat().st_mode & 0o777 == 0o666 & ~UMASK, path
