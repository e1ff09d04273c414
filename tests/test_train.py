"""Resident training end to end on tiny: it learns, it is reproducible, it saves what it says."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models import GPT, ModelConfig, loss_fn
from streamer.data import BatchSampler, load_tokens
from streamer.errors import UserError
from streamer.train import TrainConfig, load_final, train

STEPS = 30  # enough for tiny to learn byte statistics well past chance
SHORT_STEPS = 12  # reproducibility checks: a high learning rate amplifies rounding over long runs

Run = tuple[Path, list[dict], dict[str, torch.Tensor]]


def run(data: Path, out: Path, **overrides: object) -> Run:
    settings = dict(
        model="tiny",
        steps=STEPS,
        batch_size=8,
        seq_len=64,
        warmup=5,
        data=str(data),
        out=str(out),
        device="cpu",
        progress=False,
    )
    train(TrainConfig(**{**settings, **overrides}))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, rows, load_file(str(out / "final" / "model.safetensors"))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """tiny's matmuls are too small to share: on a 2-core machine under load, two
    threads waiting on each other make these runs several times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_run(token_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return run(token_file, tmp_path_factory.mktemp("runs") / "base")


@pytest.fixture(scope="module")
def short_run(token_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return run(token_file, tmp_path_factory.mktemp("runs") / "short", steps=SHORT_STEPS)


def losses(rows: list[dict]) -> list[float]:
    return [row["loss"] for row in rows]


def test_the_start_up_and_the_plan_are_reported(token_file: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """run.json says how long the engine took to start and where the time went (for a
    20B state, allocating, page-locking and initialising take minutes), and what plan
    it runs; the run's first line says it too."""
    out = tmp_path / "split"
    train(TrainConfig(model="tiny", steps=1, batch_size=2, seq_len=64, data=str(token_file), out=str(out),
                      device="cpu", progress=False, mode="stream", offload="split"))
    info = json.loads((out / "run.json").read_text())
    first = capsys.readouterr().out.splitlines()[0]
    ram_units = info["plan"]["ram_units"]
    tiers = ("split, with room in RAM for all 6 units" if ram_units == 6
             else f"{ram_units} of 6 units in RAM, the rest on disk")
    assert first.startswith(f"plan: fp32 state {tiers}, AdamW on the host, prefetch ")
    startup = info["startup"]
    assert {"plan_s", "store_s", "page_lock_s", "initialise_s", "total_s"} <= set(startup)
    # The plan it started from is there too: what the tiers hold and what a step should cost.
    assert info["plan"]["offload"] == "split" and info["plan"]["ram_units"] <= info["plan"]["n_units"] == 6
    assert info["plan"]["predicted_step_s"] > 0
    assert info["page_locked"] is False  # only a CUDA run page-locks its RAM tier
    assert info["update_on"] == "host"  # --update-on auto on a CPU device: host and device are one
    parts = startup["plan_s"] + startup["store_s"] + startup["initialise_s"]
    assert 0 < parts <= startup["total_s"]
    resident = json.loads((run(token_file, tmp_path / "res", steps=1)[0] / "run.json").read_text())["startup"]
    assert set(resident) == {"total_s"}


def test_metrics_rows(base_run: Run) -> None:
    out, rows, _ = base_run
    run_info = json.loads((out / "run.json").read_text())
    assert [row["step"] for row in rows] == list(range(STEPS))
    for row in rows:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s", "mfu"} <= set(row)
        assert row["tokens"] == 8 * 64
        assert math.isfinite(row["loss"]) and not row["skipped"]
        assert row["tokens_per_s"] > 0
        # MFU is model FLOPs at the achieved rate over the peak the run measured.
        achieved = row["tokens_per_s"] * run_info["flops_per_token"]
        assert row["mfu"] == pytest.approx(achieved / run_info["peak_flops"])
    assert rows[4]["lr"] == pytest.approx(3e-3)  # the end of warmup reaches the peak
    assert rows[-1]["lr"] < rows[4]["lr"]


def test_loss_falls(base_run: Run) -> None:
    loss = losses(base_run[1])
    assert loss[0] == pytest.approx(math.log(256), abs=0.3), "a fresh model guesses bytes uniformly"
    assert sum(loss[-5:]) / 5 < loss[0] - 1.0


def test_final_weights_and_config(base_run: Run, token_file: Path) -> None:
    out, _, weights = base_run
    cfg = ModelConfig.from_dict(json.loads((out / "final" / "config.json").read_text()))
    assert cfg == ModelConfig.from_name("tiny")
    model = GPT(cfg)
    assert set(weights) == set(model.state_dict())
    model.load_state_dict(weights, strict=True)
    # The saved weights are the trained ones: they predict the data far better than chance.
    x, y = BatchSampler(load_tokens(token_file, 256), 64, seed=99).global_batch(0, 8)
    with torch.no_grad():
        loss = loss_fn(model(torch.from_numpy(x)), torch.from_numpy(y)).item()
    assert loss < math.log(256) - 1.0


def test_the_held_out_loss_is_measured_every_n_steps_and_falls(token_file: Path, tmp_path: Path) -> None:
    out, rows, _ = run(token_file, tmp_path / "eval", eval_every=5)
    evals = [row for row in rows if "eval_loss" in row]
    assert [row["step"] for row in evals] == [4, 9, 14, 19, 24, 29]  # every 5 steps, the last among them
    assert all(row["eval_tokens"] == 8 * 64 and row["eval_s"] > 0 for row in evals)  # one step's tokens
    # Text the model never trained on: it still learns the language, not the windows.
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5
    assert evals[-1]["eval_loss"] < math.log(256) - 1.0
    # The held-out loss is the final weights' loss on the tail's windows.
    cfg = TrainConfig(model="tiny", batch_size=8, seq_len=64, eval_every=5)
    model = GPT(ModelConfig.from_name("tiny"))
    model.load_state_dict(load_final(out / "final"))
    with torch.no_grad():
        passes = cfg.eval_passes(load_tokens(token_file, 256))
        expected = [loss_fn(model(x), y).item() for batches in passes for x, y in batches]
    assert evals[-1]["eval_loss"] == pytest.approx(sum(expected) / len(expected), abs=1e-5)


def test_the_last_step_is_always_evaluated(token_file: Path, tmp_path: Path) -> None:
    _, rows, _ = run(token_file, tmp_path / "eval", steps=5, eval_every=4, eval_tokens=1000)
    evals = [row for row in rows if "eval_loss" in row]
    assert [row["step"] for row in evals] == [3, 4]
    assert evals[0]["eval_tokens"] == 16 * 64  # 1000 tokens asked: whole sequences, rounded up


@pytest.mark.parametrize(("world", "windows"), [(1, 16), (2, 16), (3, 18), (4, 16)])
def test_evaluation_is_shared_among_ranks_in_passes_no_larger_than_a_step(token_file: Path, world: int,
                                                                         windows: int) -> None:
    """Every window once, on one rank; each pass at most a step's micro-batches; every
    rank as many passes (a streamed pass is a collective), here with a tail that holds
    fewer windows than asked for, so some ranks have fewer."""
    cfg = TrainConfig(model="tiny", batch_size=2, grad_accum=3, seq_len=64, eval_every=1, eval_tokens=1000)
    tokens = load_tokens(token_file, 256)
    shares = [cfg.eval_passes(tokens, rank, world) for rank in range(world)]
    assert len({len(passes) for passes in shares}) == 1
    assert all(sum(len(x) for x, _ in batches) <= 6 for passes in shares for batches in passes)
    assert all(len(x) <= 2 for passes in shares for batches in passes for x, _ in batches)
    seen = sorted(tuple(row.tolist()) for passes in shares for batches in passes for x, _ in batches for row in x)
    assert len(seen) == windows == len(set(seen))
    # A short tail: 3 disjoint windows for 16 asked; the ranks that get none still pass.
    cfg = TrainConfig(model="tiny", batch_size=2, seq_len=64, eval_every=1, eval_tokens=1000,
                      holdout=200 / tokens.size)
    shares = [cfg.eval_passes(tokens, rank, 4) for rank in range(4)]
    assert [sum(len(x) for batches in passes for x, _ in batches) for passes in shares] == [1, 1, 1, 0]
    assert [len(passes) for passes in shares] == [1, 1, 1, 1]


def test_same_seed_same_run(short_run: Run, token_file: Path, tmp_path: Path) -> None:
    _, rows, weights = short_run
    _, again_rows, again_weights = run(token_file, tmp_path / "again", steps=SHORT_STEPS)
    assert losses(again_rows) == losses(rows)
    assert all(torch.equal(again_weights[key], weights[key]) for key in weights)


def test_other_seed_differs(short_run: Run, token_file: Path, tmp_path: Path) -> None:
    # The first loss comes before any update, so it depends on the seed alone (init and batch).
    _, other_rows, _ = run(token_file, tmp_path / "other", seed=1, steps=1)
    assert other_rows[0]["loss"] != short_run[1][0]["loss"]


def test_gradient_accumulation_equals_the_larger_batch(short_run: Run, token_file: Path, tmp_path: Path) -> None:
    _, whole_rows, whole = short_run
    _, split_rows, split = run(token_file, tmp_path / "split", steps=SHORT_STEPS, batch_size=4, grad_accum=2)
    assert [row["tokens"] for row in split_rows] == [row["tokens"] for row in whole_rows]
    assert losses(split_rows) == pytest.approx(losses(whole_rows), abs=1e-5)
    # The norm before clipping: a sum of micro-batch gradients instead of a mean would double it.
    split_norms = [row["grad_norm"] for row in split_rows]
    assert split_norms == pytest.approx([row["grad_norm"] for row in whole_rows], rel=1e-4)
    for key in whole:
        torch.testing.assert_close(split[key], whole[key], rtol=0, atol=2e-5)


def test_out_dir_holding_a_run_is_refused(base_run: Run, token_file: Path) -> None:
    out = base_run[0]
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(UserError, match="holds another run"):
        run(token_file, out)
    assert (out / "metrics.jsonl").read_bytes() == before


def test_without_a_final_export_the_run_writes_only_its_metrics(token_file: Path, tmp_path: Path) -> None:
    """--no-save-final: a benchmark's 20B run would otherwise end by writing 41 GB."""
    out = tmp_path / "nofinal"
    train(TrainConfig(model="tiny", steps=2, batch_size=2, seq_len=64, data=str(token_file), out=str(out),
                      device="cpu", progress=False, save_final=False))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert not (out / "final").exists()


def test_a_compact_state_exports_its_bfloat16_master_weights(token_file: Path, tmp_path: Path) -> None:
    """The compact formats keep bf16 master weights: the export is those, at 2 bytes per
    parameter, and loads into the model as any checkpoint does."""
    out = tmp_path / "compact"
    train(TrainConfig(model="tiny", steps=2, batch_size=2, seq_len=64, data=str(token_file), out=str(out),
                      device="cpu", progress=False, mode="stream", offload="ram", state="compact8"))
    weights = load_final(out / "final")
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    model = GPT(ModelConfig.from_name("tiny"))
    model.load_state_dict(weights, strict=True)
    n = sum(t.numel() for t in weights.values())
    assert sum(f.stat().st_size for f in (out / "final").glob("*.safetensors")) < 2 * n + 2**16


def test_a_final_export_the_disk_cannot_hold_is_refused_before_anything_is_written(
    token_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import streamer.train

    real = shutil.disk_usage
    # Room for the disk tier's store of tiny, not for its weights beside it as well.
    store = 16 * sum(t.numel() for t in GPT(ModelConfig.from_name("tiny")).state_dict().values())
    monkeypatch.setattr(streamer.train.shutil, "disk_usage", lambda p: real(p)._replace(free=store + 2**20))
    out = tmp_path / "full"
    settings = dict(model="tiny", steps=2, batch_size=2, seq_len=64, data=str(token_file), out=str(out),
                    device="cpu", progress=False, mode="stream", offload="disk")
    refused = r"final weights need \d+\.\d MiB under .* beside its store's .*--no-save-final"
    with pytest.raises(UserError, match=refused):
        train(TrainConfig(**settings))
    assert not out.exists()
    train(TrainConfig(**settings, save_final=False))  # without the export it fits
    assert not (out / "final").exists()
    # With the store on a disk of its own (--store-dir), the export has --out's to itself.
    monkeypatch.setattr(streamer.train, "same_disk", lambda a, b: False)
    train(TrainConfig(**{**settings, "out": str(tmp_path / "apart")}, store_dir=str(tmp_path / "nvme")))
    assert (tmp_path / "apart" / "final").is_dir()


def test_a_killed_runs_store_counts_as_free_space(token_file: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A killed run leaves its store in --store-dir (streamer.store's [Note: the disk tier
    is scratch]); the run into the same --out writes over it, so a disk with room for
    the store only beside that leftover takes the run, which then leaves nothing there."""
    import shutil

    import streamer.train
    from streamer.store import store_root

    out, scratch = tmp_path / "run", tmp_path / "nvme"
    leftover = store_root(out, scratch)
    leftover.mkdir(parents=True)
    size = 16 * sum(t.numel() for t in GPT(ModelConfig.from_name("tiny")).state_dict().values())
    (leftover / "unit_00001.safetensors").write_bytes(b"\1" * size)  # real blocks, not a sparse file
    real = shutil.disk_usage
    monkeypatch.setattr(streamer.train.shutil, "disk_usage", lambda p: real(p)._replace(free=2**20))
    settings = dict(model="tiny", steps=2, batch_size=2, seq_len=64, data=str(token_file), device="cpu",
                    progress=False, mode="stream", offload="disk", save_final=False, store_dir=str(scratch))
    train(TrainConfig(**settings, out=str(out)))
    assert json.loads((out / "run.json").read_text())["store"] == str(leftover) and not leftover.exists()
    with pytest.raises(UserError, match="of disk for its state but"):  # without the leftover, too small
        train(TrainConfig(**settings, out=str(tmp_path / "other")))


def test_a_file_read_twice_over_or_more_is_said_before_the_run() -> None:
    """Each file's reads: the run's tokens times its share, over its training tokens;
    twice over or more is a warning naming the file, its share and what to change."""
    import numpy as np

    from streamer.data import Mixture
    from streamer.train import repetition_warnings

    cfg = TrainConfig(model="tiny", steps=100, batch_size=4, seq_len=64)  # 25,600 tokens a rank in all
    small, large = np.zeros(5_000, np.uint16), np.zeros(100_000, np.uint16)
    assert repetition_warnings(cfg, large, world=1) == []
    [one] = repetition_warnings(cfg, small, world=1)
    assert one.startswith("the data (5,000 training tokens) is read 5.1 times over by 100 steps of 256 tokens")
    mixture = Mixture((small, large), (0.25, 0.75), ("small.npy", "large.npy"))
    assert repetition_warnings(cfg, mixture, world=1) == []  # 6,400 of 5,000 tokens: 1.3 times
    [two] = repetition_warnings(cfg, mixture, world=2)  # two ranks read twice the tokens
    assert "data file 'small.npy' (5,000 training tokens, 25% of the windows) is read 2.6 times over" in two
    assert two.endswith("more text or a smaller share, if that is not meant")


def test_text_of_a_learned_tokenizer_trains_with_its_vocabulary(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    """Text prepared with a BPE of 300 tokens is refused by tiny's 256 with the flag that
    fixes it named; with --vocab-size 300 it trains, the final weights hold 300 rows and
    say so in config.json, and a resume keeps the vocabulary without being told."""
    import sysconfig

    from streamer.cli import main
    from streamer.data import prepare

    pytest.importorskip("tokenizers")
    text = Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py"
    prepare(tmp_path / "bpe.npy", [text], train_vocab=300)
    run = ["train", "--data", str(tmp_path / "bpe.npy"), "--batch-size", "2", "--seq-len", "32", "--no-progress"]
    assert main([*run, "--steps", "2", "--out", str(tmp_path / "refused")]) == 2
    assert "uses a vocabulary of 300 but the model has 256" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()
    out = tmp_path / "run"
    assert main([*run, "--steps", "2", "--vocab-size", "300", "--checkpoint-every", "2", "--out", str(out)]) == 0
    assert json.loads((out / "final" / "config.json").read_text())["vocab_size"] == 300
    assert load_final(out / "final")["units.0.wte.weight"].shape == (300, 96)
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--no-progress"]) == 0
    assert "--vocab-size 300" in capsys.readouterr().out.splitlines()[0]
    assert load_final(out / "final")["units.0.wte.weight"].shape == (300, 96)


def test_an_interrupted_start_up_leaves_nothing(token_file: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """Ctrl-C while a streamed run starts (filling a 20B store takes minutes) ends it
    as a refused run ends: its --out folder and its store (here on a --store-dir of
    its own, where it is hundreds of GB for 20B) are removed, the interrupt goes on."""
    import streamer.train
    from streamer.store import store_root

    start = streamer.train._start_engine

    def interrupted(cfg, checked, dp):  # noqa: ANN001, ANN202
        engine, *_ = start(cfg, checked, dp)  # the store is filled
        assert any(store_root(checked.out, cfg.store_dir).iterdir())
        engine.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(streamer.train, "_start_engine", interrupted)
    (tmp_path / "nvme").mkdir()
    cfg = TrainConfig(mode="stream", offload="disk", steps=2, batch_size=2, seq_len=32, data=str(token_file),
                      out=str(tmp_path / "run"), store_dir=str(tmp_path / "nvme"), progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    assert not (tmp_path / "run").exists() and not any((tmp_path / "nvme").iterdir())


def test_a_run_folder_is_its_final_weights(token_file: Path, tmp_path: Path) -> None:
    """--init-from a run's folder starts from its final/, as sample, eval and export read it."""
    first = run(token_file, tmp_path / "first", steps=2)[0]
    by_folder = TrainConfig(steps=1, batch_size=2, seq_len=32, data=str(token_file), progress=False, lr=1e-9,
                            init_from=str(first), out=str(tmp_path / "by-folder"))
    by_final = TrainConfig(**{**by_folder.__dict__, "init_from": str(first / "final"), "out": str(tmp_path / "f")})
    losses = [json.loads((train(cfg) / "metrics.jsonl").read_text().splitlines()[0])["loss"]
              for cfg in (by_folder, by_final)]
    assert losses[0] == losses[1] < 5.0  # trained weights, not a fresh initialisation (5.5 on bytes)


def test_more_evaluation_tokens_than_the_held_out_text_holds_is_said(token_file: Path, tmp_path: Path,
                                                                      capsys) -> None:  # noqa: ANN001
    """--eval-tokens beyond the held-out tail: the run says, before its first step, how
    many tokens each evaluation reads instead, and reads that many."""
    out = run(token_file, tmp_path / "run", steps=1, eval_every=1, eval_tokens=10**7, seq_len=64)[0]
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert (f"--eval-tokens 10,000,000: the data's held-out tail (--holdout 0.01) holds {row['eval_tokens'] // 64:,} "
            f"windows of 64, so each evaluation reads {row['eval_tokens']:,} tokens") in capsys.readouterr().err
