"""Models put to use (streamer/inference.py): a model streamed a unit at a time computes
what the model held whole does, from two device buffers; the mode is chosen by what
fits, and what fits nowhere is refused saying what to change."""

from __future__ import annotations

import pytest
import torch

from models import GPT, ModelConfig
from streamer.errors import UserError
from streamer.inference import ResidentWeights, StreamedWeights, choose_mode

CPU = torch.device("cpu")
GIB = 2**30


class _StateDict:
    """A `Pretrained` stand-in: a model's own tensors, by our names."""

    def __init__(self, model: GPT) -> None:
        self.state = model.state_dict()

    def into(self, name: str, target: torch.Tensor) -> None:
        target.copy_(self.state[name])

    def close(self) -> None:
        """Nothing to close: the tensors are the model's."""


def _forward(weights, idx: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    x = idx
    for _, unit in weights.units():
        x = unit(x)
    return x


@pytest.mark.parametrize("from_disk", [False, True], ids=["from-ram", "from-disk"])
@pytest.mark.parametrize("model", ["tiny", "tiny-gptj", "tiny-neox"])
def test_a_streamed_pass_computes_what_the_model_held_whole_does(model: str, from_disk: bool) -> None:
    """Bit for bit, pass after pass (the buffers are refilled in turn), with a tied
    head reading the table kept on the device (tiny) and without; the units come in
    forward order, one of each. From disk, the reads run ahead of the copies, pass
    after pass."""
    gpt = GPT(ModelConfig.from_name(model, n_layer=5)).eval()
    gpt.init_weights(1)
    held = ResidentWeights(gpt)
    streamed = StreamedWeights(_StateDict(gpt), gpt.cfg, CPU, torch.float32, from_disk=from_disk)
    assert streamed.mode == ("disk" if from_disk else "stream")
    assert [i for i, _ in streamed.units()] == list(range(gpt.cfg.n_layer + 2))
    idx = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = gpt(idx)
        for _ in range(3):
            assert torch.equal(_forward(streamed, idx), expected)
        assert torch.equal(_forward(held, idx), expected)
    streamed.close()


@pytest.mark.parametrize("from_disk", [False, True], ids=["from-ram", "from-disk"])
def test_a_pass_left_midway_does_not_disturb_the_next(from_disk: bool) -> None:
    """A caller that leaves a pass early (an error in a unit, a break): the next pass
    still hands out each unit with its own weights, whichever copies (and reads from
    disk) were in flight."""
    gpt = GPT(ModelConfig.from_name("tiny-neox", n_layer=5)).eval()
    gpt.init_weights(2)
    streamed = StreamedWeights(_StateDict(gpt), gpt.cfg, CPU, torch.float32, from_disk=from_disk)
    idx = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = gpt(idx)
        for leave_after in (0, 2, 5):
            x = idx
            for k, (_, unit) in enumerate(streamed.units()):
                x = unit(x)
                if k == leave_after:
                    break
            assert torch.equal(_forward(streamed, idx), expected), leave_after
    streamed.close()


@pytest.mark.parametrize("model", ["tiny", "tiny-neox"])
def test_the_device_holds_two_units_of_a_streamed_model(model: str) -> None:
    """Two buffers, each the largest unit's size, and a tied table kept apart."""
    gpt = GPT(ModelConfig.from_name(model, n_layer=8))
    streamed = StreamedWeights(_StateDict(gpt), gpt.cfg, CPU, torch.float32)
    units = [sum(p.numel() for p in unit.parameters()) for unit in gpt.units]
    ring = units[1:] if gpt.cfg.tie_embeddings else units
    assert streamed.device_bytes() == 4 * (2 * max(ring) + (units[0] if gpt.cfg.tie_embeddings else 0))
    assert streamed.device_bytes() < 0.5 * 4 * sum(units)


def test_auto_mode_holds_what_fits_and_streams_what_does_not() -> None:
    """gpt-neox-20b in bfloat16 (41 GB) on an 80 GB GPU is held; on a 40 GB one it is
    streamed from host memory, or from disk where host memory is short, as on a CPU
    too small to hold it; a GPU too small for even two units and the working memory is
    refused, and so is each mode asked for that does not fit, saying what to change."""
    cfg = ModelConfig.from_name("gpt-neox-20b")
    bf16, f32, work = torch.bfloat16, torch.float32, 2 * GIB
    assert choose_mode("auto", cfg, "cuda", bf16, work, 80 * GIB, 120 * GIB, lower="x") == "resident"
    assert choose_mode("auto", cfg, "cuda", bf16, work, 40 * GIB, 120 * GIB, lower="x") == "stream"
    assert choose_mode("stream", cfg, "cuda", bf16, work, 80 * GIB, 120 * GIB, lower="x") == "stream"
    assert choose_mode("auto", cfg, "cuda", bf16, work, 40 * GIB, 30 * GIB, lower="x") == "disk"
    assert choose_mode("auto", cfg, "cpu", f32, work, 20 * GIB, 20 * GIB, lower="x") == "disk"
    assert choose_mode("disk", cfg, "cuda", bf16, work, 80 * GIB, 120 * GIB, lower="x") == "disk"
    refusals = [
        (("stream", "cuda", bf16, work, 40 * GIB, 30 * GIB), "30.0 GiB available: .* --mode disk"),  # the host
        (("stream", "cpu", f32, work, 20 * GIB, 20 * GIB), "20.0 GiB available: .* --mode disk"),
        (("auto", "cuda", bf16, 40 * GIB, 40 * GIB, 120 * GIB), "ask for fewer --samples"),  # the device
        (("disk", "cpu", f32, 19 * GIB, 20 * GIB, 20 * GIB), "ask for fewer --samples or with --dtype bfloat16"),
        (("resident", "cuda", bf16, work, 40 * GIB, 120 * GIB), "--mode stream"),
    ]
    for (mode, device, dtype, working, free, host), hint in refusals:
        with pytest.raises(UserError, match=hint):
            choose_mode(mode, cfg, device, dtype, working, free, host, lower="fewer --samples")
