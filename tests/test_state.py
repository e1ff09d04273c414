"""State formats: stochastic bf16 rounding, 8-bit log-coded moments, the compact update."""

from __future__ import annotations

import pytest
import torch

from streamer.optim import OptimConfig, adamw_update_
from streamer.state import BLOCK, FORMATS, decode, encode, random_bits, round_bf16_stochastic


def coded(name: str, x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    codes = torch.empty(x.numel(), dtype=torch.uint8)
    scales = torch.empty(-(-x.numel() // BLOCK))
    encode(name, x, codes, scales, random_bits(x.shape, 8, torch.Generator().manual_seed(seed)))
    return decode(name, codes, scales)


def test_compact_state_is_about_six_bytes_per_parameter() -> None:
    assert FORMATS["fp32"].bytes_per_param() == 16
    assert 6.0 < FORMATS["compact"].bytes_per_param() < 6.05


def test_compact8_keeps_the_gradient_in_about_one_byte() -> None:
    assert 5.0 < FORMATS["compact8"].bytes_per_param() < 5.05
    assert FORMATS["compact8"].bytes_per_param(("grad",)) == pytest.approx(1 + 4 / 256)


def test_an_8bit_gradient_is_within_half_a_code_of_the_value_and_keeps_zeros_and_signs() -> None:
    """compact8's gradient: each value within 4.5% of itself (codes 9% apart, rounded to
    the nearest), no bias to speak of, zeros exact, signs kept; the same bytes every
    time (no random bits), whether coded in one piece or the store's chunks."""
    fmt = FORMATS["compact8"]
    generator = torch.Generator().manual_seed(0)
    n = 256 * 4000 + 100  # a ragged last block
    grad = torch.randn(n, generator=generator) * torch.exp(2 * torch.randn(n, generator=generator))
    grad[::9] = 0.0

    def coded(g: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {"grad": torch.empty(n, dtype=torch.uint8), "grad_scale": torch.empty(-(-n // 256))}
        fmt.store_grad(g, out)
        return out

    first, again = coded(grad), coded(grad.clone())
    assert all(torch.equal(first[k], again[k]) for k in first)
    back = fmt.gradient(first)
    assert torch.equal(back[grad == 0], torch.zeros_like(back[grad == 0]))
    padded = torch.cat([grad.abs(), torch.zeros(-n % 256)])
    block_max = padded.view(-1, 256).amax(1).repeat_interleave(256)[:n]
    in_range = grad.abs() >= block_max * 2**-16
    ratio = back[in_range] / grad[in_range]
    assert ratio.min() > 1 - 0.046 and ratio.max() < 1 + 0.046
    assert abs(ratio.mean().item() - 1) < 2e-3
    assert (back[~in_range].abs() <= block_max[~in_range] * 2**-16).all()  # below the range: zero or the least code


def test_stochastic_bf16_rounding_picks_a_neighbour_and_is_unbiased() -> None:
    x = torch.full((200_000,), 1.0 + 2**-9)  # a quarter of the way from bf16 1.0 to its neighbour 1 + 2^-7
    rounded = round_bf16_stochastic(x, random_bits(x.shape, 16, torch.Generator().manual_seed(0))).float()
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert rounded.mean().item() == pytest.approx(1.0 + 2**-9, abs=2e-5)
    negative = round_bf16_stochastic(-x, random_bits(x.shape, 16, torch.Generator().manual_seed(1))).float()
    assert negative.mean().item() == pytest.approx(-(1.0 + 2**-9), abs=2e-5)


def test_small_updates_still_move_bf16_weights() -> None:
    """1,000 updates of 1e-4 each, every one below half a bf16 spacing at 1.0: round to
    nearest never moves the weight; stochastic rounding follows float32 on average."""
    generator = torch.Generator().manual_seed(0)
    weights = torch.ones(4096, dtype=torch.bfloat16)
    nearest = torch.ones(4096, dtype=torch.bfloat16)
    for _ in range(1000):
        weights = round_bf16_stochastic(weights.float() + 1e-4, random_bits(weights.shape, 16, generator))
        nearest = (nearest.float() + 1e-4).to(torch.bfloat16)
    assert nearest.float().mean().item() == 1.0
    assert weights.float().mean().item() == pytest.approx(1.1, abs=0.005)


@pytest.mark.parametrize("name", ["exp_avg", "exp_avg_sq"])
def test_moment_codes_are_within_one_level_and_unbiased(name: str) -> None:
    torch.manual_seed(0)
    magnitudes = torch.exp2(torch.empty(BLOCK * 40 + 17).uniform_(-12, 0))  # a partial last block
    x = magnitudes * (torch.randint(0, 2, magnitudes.shape) * 2 - 1) if name == "exp_avg" else magnitudes
    once = coded(name, x)
    assert torch.equal(torch.sign(once), torch.sign(x))
    assert ((once - x).abs() / x.abs()).max() < 0.15  # one level: 9% (first moment), 7% (second)
    average = torch.stack([coded(name, x, seed) for seed in range(200)]).mean(0)
    assert ((average - x).abs() / x.abs()).mean() < 0.005


def test_second_moment_never_decodes_to_zero() -> None:
    """A root far below its block's largest becomes the smallest level: AdamW's
    denominator stays above eps and the step stays small."""
    x = torch.full((BLOCK,), 1e-30)
    x[0] = 1.0
    out = coded("exp_avg_sq", x)
    assert (out[1:] > 0).all() and out[1:].max() <= 2**-23
    assert out[0] == 1.0


def test_zero_moments_stay_zero() -> None:
    for name in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(coded(name, torch.zeros(BLOCK + 3)), torch.zeros(BLOCK + 3))


def compact_buffers(param: torch.Tensor) -> dict[str, torch.Tensor]:
    fmt = FORMATS["compact"]
    buffers = {b.name: torch.zeros(b.numel(param.numel()), dtype=b.dtype) for b in fmt.buffers}
    buffers["param"].copy_(param)
    return buffers


def test_compact_update_follows_float32_adamw_on_a_quadratic() -> None:
    """Minimising |w - target|^2 from the same start: the compact state's weights end
    within bf16 resolution of float32 AdamW's, and both reach the target."""
    torch.manual_seed(0)
    cfg = OptimConfig(weight_decay=0.0)
    target = 0.3 * torch.randn(3 * BLOCK)
    exact = {n: torch.zeros(3 * BLOCK) for n in ("param", "grad", "exp_avg", "exp_avg_sq")}
    compact = compact_buffers(exact["param"])
    for step in range(1, 301):
        lr = 0.02 * (1 - step / 301)  # decays to almost nothing: both settle
        exact["grad"].copy_(2 * (exact["param"] - target))
        adamw_update_(exact["param"], exact["grad"], exact["exp_avg"], exact["exp_avg_sq"], step=step, lr=lr,
                      cfg=cfg, decay_numel=0)
        compact["grad"].copy_(2 * (compact["param"].float() - target))
        FORMATS["compact"].update_(compact, step=step, lr=lr, cfg=cfg, decay_numel=0, grad_scale=1.0, seed=step)
    assert (exact["param"] - target).abs().max() < 0.02
    assert (compact["param"].float() - target).abs().max() < 0.05
    assert (compact["param"].float() - exact["param"]).abs().mean() < 0.01


def test_a_fused_update_that_does_not_match_is_not_used(monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture) -> None:
    """A device whose fused kernel differs from the ops, or cannot run it at all (no
    CuPy, a compile error), updates with the ops and says why, once per device."""
    from streamer import state

    calls = []

    def differs(fmt: object, device: torch.device) -> list[str]:
        calls.append(device)
        if device.index == 1:
            raise ImportError("CUDA tensors need CuPy: pip install cupy-cuda12x")
        return ["exp_avg: 40 of 10317 differ, by up to 3"]

    monkeypatch.setattr(state, "check_fused_update", differs)
    monkeypatch.setattr(state, "_FUSED_AGREES", {})
    for device in (torch.device("cuda", 0), torch.device("cuda", 0), torch.device("cuda", 1)):
        assert not state.fused_update_agrees(FORMATS["compact8"], device)
    assert calls == [torch.device("cuda", 0), torch.device("cuda", 1)]
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    assert "does not match the PyTorch ops on cuda:0 (exp_avg: 40 of 10317 differ, by up to 3)" in err[0]
    assert "ImportError: CUDA tensors need CuPy" in err[1] and "updating with the ops" in err[1]
    # Told to keep the ops (STREAMER_FUSED_UPDATE=0), a device is neither checked nor fused.
    monkeypatch.setenv(state.FUSED_ENV, "0")
    assert not state.use_fused(FORMATS["compact8"], torch.device("cuda", 2))
    assert len(calls) == 2 and capsys.readouterr().err == ""
    # A CPU device runs the ops unless told to run the kernels' host emulation.
    monkeypatch.delenv(state.FUSED_ENV)
    assert not state.use_fused(FORMATS["compact8"], torch.device("cpu"))
    monkeypatch.setenv(state.FUSED_ENV, "host")
    assert state.use_fused(FORMATS["compact8"], torch.device("cpu"))
    assert not state.use_fused(FORMATS["fp32"], torch.device("cpu"))


def test_fused_differences_allows_last_bit_steps_only() -> None:
    """A weight or code one step apart here and there is a last-bit difference; two
    steps apart anywhere, or one step apart in more than one in a thousand, is not."""
    from streamer.state import fused_differences, sample_state

    fmt = FORMATS["compact8"]
    expected = sample_state(fmt, 20 * BLOCK, torch.device("cpu"))

    def off(name: str, index: slice, by: int = 1) -> list[str]:
        got = {key: value.clone() for key, value in expected.items()}
        view = got[name].view(torch.int16) if name == "param" else got[name]
        view[index] += by
        return fused_differences(fmt, expected, got)

    assert fused_differences(fmt, expected, expected) == []
    assert off("param", slice(0, 3)) == []
    assert off("param", slice(0, 100)) and off("param", slice(7, 8), by=2)
    assert off("exp_avg_sq", slice(0, 1000)) and off("exp_avg", slice(5, 6), by=3)
    got = {key: value.clone() for key, value in expected.items()}
    got["exp_avg_scale"][4] *= 1.001
    assert fused_differences(fmt, expected, got) == ["exp_avg_scale: up to 0.001 apart"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_updates_use_the_fused_kernel() -> None:
    """On a GPU with CuPy the compact formats' update is the fused kernel by default."""
    from streamer.state import fused_update_agrees

    for name in ("compact", "compact8"):
        assert fused_update_agrees(FORMATS[name], torch.device("cuda", torch.cuda.current_device()))
