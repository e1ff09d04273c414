"""The learning-rate schedule and AdamW over flat buffers.

Resident training uses `torch.optim.AdamW`; the streamer updates each unit's flat
master buffer with `adamw_update_`, which performs the same operations in the same
order, so the two modes agree to float32 rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr: float = 1e-4  # cosine floor: a tenth of the peak, as in the GPT-3 paper
    warmup_steps: int = 20
    total_steps: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95  # GPT-3's choice: steadier than 0.999 at large batch
    eps: float = 1e-8
    grad_clip: float = 1.0  # global L2 norm; 0 disables clipping


def lr_at(step: int, cfg: OptimConfig) -> float:
    """Linear warmup over `warmup_steps`, then cosine decay to `min_lr` at `total_steps`."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.total_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def clip_coefficient(grad_norm: float, max_norm: float) -> float:
    """The factor `torch.nn.utils.clip_grad_norm_` applies: never above 1."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (grad_norm + 1e-6))


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to matrices and embeddings, not to biases or norm gains."""
    return param.dim() >= 2


def adamw_update_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    cfg: OptimConfig,
    decay_numel: int,
    grad_scale: float = 1.0,
) -> None:
    """One AdamW step in place on flat float32 buffers.

    `param[:decay_numel]` is weight-decayed, the rest is not (the store packs decayed
    tensors first). `grad` is scaled in place by `grad_scale` (the clip coefficient):
    it is the store's own accumulator, consumed by this update.
    """
    if grad_scale != 1.0:
        grad.mul_(grad_scale)
    if cfg.weight_decay and decay_numel:
        param[:decay_numel].mul_(1.0 - lr * cfg.weight_decay)
    exp_avg.lerp_(grad, 1.0 - cfg.beta1)
    exp_avg_sq.mul_(cfg.beta2).addcmul_(grad, grad, value=1.0 - cfg.beta2)
    bias_correction1 = 1.0 - cfg.beta1**step
    bias_correction2_sqrt = math.sqrt(1.0 - cfg.beta2**step)
    # The denominator reuses `grad` as scratch: the gradient is no longer needed, and
    # the hot loop then allocates nothing.
    denom = torch.sqrt(exp_avg_sq, out=grad).div_(bias_correction2_sqrt).add_(cfg.eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)
