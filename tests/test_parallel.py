"""Data-parallel streaming: N real gloo processes equal one process with N x the batch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from streamer.cli import main
from streamer.parallel import DataParallel
from streamer.train import load_final


def _train(out, model, nproc, batch, grad_sync="sparse", offload="ram", init_from=None, extra=()):
    cmd = [sys.executable, "-m", "streamer", "train", "--model", model, "--mode", "stream", "--steps", "4",
           "--batch-size", str(batch), "--grad-accum", "2", "--seq-len", "32", "--warmup", "2", "--grad-clip", "0.5",
           "--offload", offload, "--grad-sync", grad_sync, "--out", str(out), "--no-progress", "--nproc", str(nproc),
           "--eval-every", "2", "--checkpoint-every", "2", *(["--init-from", str(init_from)] if init_from else []),
           *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    # torchrun's summary ends stderr; a rank's own error (an abort's message) comes before it.
    assert done.returncode == 0, done.stderr[:4000] + "\n...\n" + done.stderr[-1500:]
    if "--resume" in extra:
        assert "processes" in done.stderr, "a resume on another world size is reported"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r.get("eval_loss")) for r in rows], load_final(out / "final")


@pytest.mark.parametrize(("model", "nproc", "grad_sync", "offload", "pretrained", "documents"), [
    ("tiny-neox", 2, "sparse", "ram", False, False),  # untied embedding: the hash-partitioned sparse path
    ("tiny-neox", 4, "dense", "disk", False, False),
    ("tiny", 4, "sparse", "ram", False, True),  # tied table: its gradient is dense, reduce-scattered
    ("tiny-gptj", 2, "sparse", "ram", True, False),  # every rank starts from a Hugging Face checkpoint
])
def test_n_ranks_equal_one_rank_with_n_times_the_batch(tmp_path, model, nproc, grad_sync, offload, pretrained,
                                                       documents, hugging_face_checkpoint, first_step_loss,
                                                       documents_file, capsys):
    """Float32 sums over ranks run in another order than within one process, so the
    agreement is to rounding (1e-5), not bit for bit. So do the held-out losses, each
    rank evaluating its share of the same windows; `streamer eval` of the ranks' run
    reads those windows, all of them, in one process, from its final weights or from a
    checkpoint's shards. With `documents`, attention within documents (--document-mask):
    each rank masks its own share of the batch, and the eval masks as the run did."""
    init_from = tmp_path / "hf" if pretrained else None
    if pretrained:
        reference = hugging_face_checkpoint(model, init_from)
    extra = ("--data", str(documents_file), "--document-mask") if documents else ()
    one, one_w = _train(tmp_path / "one", model, 1, 2 * nproc, offload=offload, init_from=init_from, extra=extra)
    many, many_w = _train(tmp_path / "many", model, nproc, 2, grad_sync, offload, init_from, extra=extra)
    if pretrained:  # the first step's loss, before any update, is the checkpoint's own
        expected = first_step_loss(lambda x: reference(x).logits, 32, 2 * nproc, 2, eval_every=2)
        assert one[0][0] == pytest.approx(expected, abs=1e-4)
    assert [loss for loss, _ in many] == pytest.approx([loss for loss, _ in one], abs=1e-5)
    assert [e for _, e in one][1::2] == pytest.approx([e for _, e in many][1::2], abs=1e-5)
    assert [e for _, e in many][::2] == [None, None]
    assert many_w.keys() == one_w.keys()
    for name in one_w:
        torch.testing.assert_close(many_w[name], one_w[name], atol=1e-5, rtol=0)
    assert main(["eval", str(tmp_path / "many"), "--device", "cpu", "--json"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["tokens"] == 2 * 2 * nproc * 32 and evaluated["loss"] == pytest.approx(many[-1][1], abs=1e-5)
    # A checkpoint's weights are gathered from every rank's shards of each unit.
    assert main(["eval", str(tmp_path / "many" / "checkpoints" / "step-00000002"), "--device", "cpu", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(many[1][1], abs=1e-5)


@pytest.mark.parametrize(("state", "tolerance", "worlds", "offload"), [("fp32", 1e-5, ((1, 4), (4, 1)), "disk"),
                                                                        ("compact8", 1e-2, ((1, 4),), "ram")])
def test_a_run_resumes_on_another_number_of_processes(tmp_path, state, tolerance, worlds, offload):
    """A 2-rank run's checkpoint after step 2, resumed by 1 process and by 4 (compact8:
    by 1) with the same global batch. Float32 state is resharded exactly, so the last steps' losses, the
    held-out loss and the final weights are the 2-rank run's (to float32 summation
    order). Compact8's bf16 weights are resharded exactly too (the first resumed step's
    loss is the run's to 1e-5); its moments, coded again in the new shards' blocks, and
    the stochastic rounding, drawn per shard, keep the rest within rounding's reach.
    A disk tier is rebuilt in the new layout, and removed with the old layout's
    leftover files when the run ends."""
    import shutil

    flags = ("--state", state)
    two, two_w = _train(tmp_path / "two", "tiny-neox", 2, 2, offload=offload, extra=flags)
    for nproc, batch in worlds:
        out = tmp_path / f"from-two-on-{nproc}"
        shutil.copytree(tmp_path / "two", out, ignore=shutil.ignore_patterns("step-00000004", "final"))
        resumed, resumed_w = _train(out, "tiny-neox", nproc, batch, offload=offload, extra=(*flags, "--resume"))
        assert not (out / "store").exists()  # the old layout's leftover and the new store: gone at the end
        assert resumed[:2] == two[:2], "the first steps are the checkpointed run's own rows"
        assert resumed[2][0] == pytest.approx(two[2][0], abs=1e-5), "the weights are the saved ones"
        assert [loss for loss, _ in resumed[2:]] == pytest.approx([loss for loss, _ in two[2:]], abs=tolerance)
        assert resumed[3][1] == pytest.approx(two[3][1], abs=tolerance)
        for name in two_w:
            # compact8: a few bfloat16 steps (2^-7 of a value each) apart at most
            torch.testing.assert_close(resumed_w[name].float(), two_w[name].float(), atol=tolerance,
                                       rtol=0 if state == "fp32" else 2**-5)


def test_shards_cover_each_unit_exactly_once():
    class FakeRank(DataParallel):
        def __init__(self, rank: int, world: int) -> None:
            self.active, self.rank, self.world, self.grad_sync = True, rank, world, "dense"

    for numel in (1, 7, 64, 1001):
        for world in (1, 2, 3, 4):
            shards = [FakeRank(r, world).shard(numel) for r in range(world)]
            covered = [i for s in shards for i in range(s.start, s.stop)]
            assert covered == list(range(numel))
            assert all(s.size * world >= numel for s in shards)
