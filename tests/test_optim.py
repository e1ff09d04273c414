"""The schedule and the flat-buffer AdamW the streamer uses must match what torch does."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from streamer.optim import OptimConfig, adamw_update_, clip_coefficient, lr_at

SCHEDULE = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=110)


def test_warmup_rises_linearly_to_the_peak() -> None:
    assert lr_at(0, SCHEDULE) == pytest.approx(1e-4)  # never zero: step 0 already updates
    assert lr_at(4, SCHEDULE) == pytest.approx(5e-4)
    assert lr_at(9, SCHEDULE) == pytest.approx(1e-3)


def test_cosine_decays_from_peak_to_floor() -> None:
    assert lr_at(10, SCHEDULE) == pytest.approx(1e-3)
    assert lr_at(60, SCHEDULE) == pytest.approx((1e-3 + 1e-4) / 2)  # halfway down the cosine
    assert lr_at(110, SCHEDULE) == pytest.approx(1e-4)
    assert lr_at(500, SCHEDULE) == pytest.approx(1e-4)  # past the end: stays at the floor
    rates = [lr_at(step, SCHEDULE) for step in range(10, 111)]
    assert all(later <= earlier for earlier, later in pairwise(rates))


def test_wsd_holds_the_peak_then_decays_its_last_fraction_as_one_minus_sqrt() -> None:
    wsd = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=110, schedule="wsd", decay_fraction=0.2)
    assert lr_at(9, wsd) == pytest.approx(1e-3)  # the same warmup
    assert all(lr_at(step, wsd) == 1e-3 for step in range(10, 88))  # stable: 110 - 22
    assert lr_at(88, wsd) == pytest.approx(1e-3)
    assert lr_at(99, wsd) == pytest.approx(1e-4 + (1 - 0.5**0.5) * 9e-4)  # halfway through the decay
    assert lr_at(110, wsd) == pytest.approx(1e-4) and lr_at(500, wsd) == pytest.approx(1e-4)
    rates = [lr_at(step, wsd) for step in range(88, 111)]
    assert all(later < earlier for earlier, later in pairwise(rates))


def test_a_longer_wsd_run_reads_the_same_rates_until_the_shorter_one_decays() -> None:
    """What makes a WSD run extendable (resumed with more --steps): the rates before
    the decay do not depend on the length; a cosine run's do."""
    def rates(schedule: str, total: int) -> list[float]:
        cfg = OptimConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=total, schedule=schedule)
        return [lr_at(step, cfg) for step in range(80)]

    assert rates("wsd", 100) == rates("wsd", 1000)
    warmup_then_peak = [1e-3 * min(1, (s + 1) / 10) for s in range(80)]
    assert rates("constant", 100) == rates("constant", 1000) == pytest.approx(warmup_then_peak)
    assert rates("cosine", 100) != rates("cosine", 1000)


def test_the_decay_never_starts_inside_the_warmup() -> None:
    cfg = OptimConfig(lr=1e-3, min_lr=0.0, warmup_steps=10, total_steps=12, schedule="wsd", decay_fraction=1.0)
    assert [round(lr_at(step, cfg), 9) for step in range(9, 13)] == [1e-3, 1e-3, round(1e-3 * (1 - 0.5**0.5), 9), 0]


def test_no_warmup_starts_at_the_peak() -> None:
    assert lr_at(0, OptimConfig(lr=2e-3, warmup_steps=0, total_steps=50)) == pytest.approx(2e-3)


def torch_reference(decayed: torch.Tensor, plain: torch.Tensor, cfg: OptimConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        [{"params": [decayed], "weight_decay": cfg.weight_decay}, {"params": [plain], "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        foreach=False,
    )


@pytest.mark.parametrize("grad_scale", [1.0, 0.37])
def test_flat_adamw_matches_torch_adamw(grad_scale: float) -> None:
    """One flat buffer, decayed tensors first, against torch.optim.AdamW with two groups."""
    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    decay_numel, numel = 700, 1000
    flat = torch.randn(numel, generator=generator)
    exp_avg, exp_avg_sq = torch.zeros(numel), torch.zeros(numel)
    decayed = flat[:decay_numel].clone().requires_grad_()
    plain = flat[decay_numel:].clone().requires_grad_()
    reference = torch_reference(decayed, plain, cfg)

    for step in range(1, 8):
        lr = cfg.lr * (1.0 - 0.1 * step)  # a different rate every step, as the schedule gives
        grad = torch.randn(numel, generator=generator)
        decayed.grad, plain.grad = (grad[:decay_numel] * grad_scale).clone(), (grad[decay_numel:] * grad_scale).clone()
        for group in reference.param_groups:
            group["lr"] = lr
        reference.step()
        adamw_update_(
            flat,
            grad.clone(),
            exp_avg,
            exp_avg_sq,
            step=step,
            lr=lr,
            cfg=cfg,
            decay_numel=decay_numel,
            grad_scale=grad_scale,
        )

    torch.testing.assert_close(flat, torch.cat([decayed.detach(), plain.detach()]), rtol=0, atol=1e-6)
    state = reference.state[decayed]
    torch.testing.assert_close(exp_avg[:decay_numel], state["exp_avg"], rtol=0, atol=1e-6)
    torch.testing.assert_close(exp_avg_sq[:decay_numel], state["exp_avg_sq"], rtol=0, atol=1e-6)


def test_decay_boundary_is_respected() -> None:
    """With zero gradients only weight decay moves the parameters: exactly the first part."""
    cfg = OptimConfig(lr=0.5, weight_decay=0.1)
    flat = torch.ones(10)
    adamw_update_(flat, torch.zeros(10), torch.zeros(10), torch.zeros(10), step=1, lr=cfg.lr, cfg=cfg, decay_numel=4)
    torch.testing.assert_close(flat, torch.tensor([0.95] * 4 + [1.0] * 6))


@pytest.mark.parametrize("max_norm", [0.5, 1.0, 100.0])
def test_clip_coefficient_matches_clip_grad_norm(max_norm: float) -> None:
    generator = torch.Generator().manual_seed(1)
    params = [torch.zeros(shape, requires_grad=True) for shape in ((8, 4), (4,), (3, 3))]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    original = [p.grad.clone() for p in params]
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    coefficient = clip_coefficient(grad_norm, max_norm)
    assert coefficient <= 1.0
    for p, before in zip(params, original, strict=True):
        torch.testing.assert_close(p.grad, before * coefficient)


def test_zero_max_norm_disables_clipping() -> None:
    assert clip_coefficient(1e6, 0.0) == 1.0
