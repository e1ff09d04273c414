"""Resident training: the whole model, its gradients and AdamW state on one device.

The reference the streamer must match, and the baseline it is benchmarked against.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from models import GPT, Documents, loss_fn
from streamer.optim import OptimConfig, decays
from streamer.stats import StepStats


def autocast_for(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA when asked; float32 runs need no context."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class ResidentEngine:
    def __init__(self, model: GPT, optim: OptimConfig, device: torch.device, dtype: torch.dtype,
                 separator: int | None = None) -> None:
        self.model = model.to(device)
        # Attention within documents, each ended by this token ([Note: documents in a
        # window] in models/gpt.py); None: across the whole window.
        self.separator = separator
        self.device, self.dtype, self.optim = device, dtype, optim
        params = list(self.model.named_parameters())
        groups = [
            {"params": [p for n, p in params if decays(n, p)], "weight_decay": optim.weight_decay},
            {"params": [p for n, p in params if not decays(n, p)], "weight_decay": 0.0},
        ]
        self.optimizer = torch.optim.AdamW(
            groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=True
        )

    def step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float) -> StepStats:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        total_loss = 0.0
        for x, y in micro_batches:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast_for(self.device, self.dtype):
                loss = loss_fn(self._logits(x), y)
            (loss / len(micro_batches)).backward()
            total_loss += loss.item()
        max_norm = self.optim.grad_clip if self.optim.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        skipped = not math.isfinite(grad_norm) or not math.isfinite(total_loss)
        if not skipped:
            self.optimizer.step()
        cuda = self.device.type == "cuda"
        peak = torch.cuda.max_memory_allocated(self.device) if cuda else 0
        return StepStats(loss=total_loss / len(micro_batches), grad_norm=grad_norm, skipped=skipped,
                         peak_device_bytes=peak,
                         peak_reserved_bytes=torch.cuda.max_memory_reserved(self.device) if cuda else 0)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, documents=None if self.separator is None else Documents.of(x, self.separator))

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
        """The summed token loss over `batches` and the number of tokens, weights unchanged."""
        sums = []
        for x, y in batches:
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with autocast_for(self.device, self.dtype):
                sums.append(loss_fn(self._logits(x), y).double() * y.numel())
        return float(torch.stack(sums).sum()) if sums else 0.0, sum(y.numel() for _, y in batches)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu() for k, v in self.model.state_dict().items()}

    def shards(self) -> list:
        """The final weights as one shard (see `streamer.train.save_final`)."""
        return [self.state_dict]

    def close(self) -> None:
        """Nothing to release: the model is freed with the engine."""

    # --- checkpoint state ----------------------------------------------------------

    def checkpoint_bytes(self) -> int:
        """The data bytes `save_state` writes: the state dict and AdamW's two moments."""
        return (sum(t.numel() * t.element_size() for t in self.model.state_dict().values())
                + 2 * sum(p.numel() * p.element_size() for p in self.model.parameters()))

    def save_state(self, folder: Path) -> tuple[dict[str, dict], dict]:
        """Write the model's state dict and AdamW's per-parameter state (exp_avg,
        exp_avg_sq and step, each keyed `KIND/parameter name`) as safetensors; returns
        {file: size and sha256} and the engine's own state."""
        from streamer.checkpoint import write_tensors

        model = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        optim = {f"{kind}/{name}": value.detach().cpu()
                 for name, p in self.model.named_parameters()
                 for kind, value in self.optimizer.state.get(p, {}).items() if torch.is_tensor(value)}
        files = {"model.safetensors": write_tensors(folder / "model.safetensors", model),
                 "optimizer.safetensors": write_tensors(folder / "optimizer.safetensors", optim)}
        return files, {}

    def load_state(self, folder: Path, state: dict, saved_world: int = 1) -> None:
        """Restore a verified checkpoint written by `save_state` for the same model (by
        one process: resident training has no other)."""
        from streamer.checkpoint import CorruptCheckpointError, TensorFile

        model = TensorFile(folder / "model.safetensors")
        try:
            self.model.load_state_dict(model.read_all(), strict=True)
        except RuntimeError as exc:  # missing, unexpected or misshapen tensors
            raise CorruptCheckpointError(f"checkpoint file '{model.path}' does not fit this model: "
                                         f"{str(exc).splitlines()[0]}") from None
        optim = TensorFile(folder / "optimizer.safetensors")
        by_param: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in optim.read_all().items():
            kind, _, name = key.partition("/")
            by_param.setdefault(name, {})[kind] = value
        params = dict(self.model.named_parameters())
        if not set(by_param) <= set(params):
            raise CorruptCheckpointError(f"checkpoint file '{optim.path}' holds state for parameters this model "
                                         f"lacks: {sorted(set(by_param) - set(params))[:3]}")
        self.optimizer.state.clear()
        for name, kinds in by_param.items():
            p = params[name]
            # `step` stays a host scalar, as AdamW keeps it; moments live beside the weights.
            self.optimizer.state[p] = {kind: value if kind == "step" else value.to(p.device)
                                       for kind, value in kinds.items()}
