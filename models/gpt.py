"""The GPT family (GPT-3, GPT-J, GPT-NeoX) in one file.

The model is a sequence of *units*: the embedding, each transformer block, and the
final norm with the output head. Units are what the streamer moves between host and
device, so each is an ordinary module with no reference to the others; the only
cross-unit link, a tied output head, is passed in explicitly as `tied_weight`.
The same object also runs as a plain `nn.Module`: `model(idx) -> logits`.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig


@functools.lru_cache(maxsize=16)
def _rotary_tables(
    seq_len: int, rotary_dim: int, base: float, style: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [seq_len, rotary_dim], laid out for the rotation style.

    Computed in float32 and cached per device: positions never change within a run.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    if style == "interleaved":  # GPT-J: each frequency covers a neighbouring pair
        angles = angles.repeat_interleave(2, dim=-1)
    else:  # GPT-NeoX: the first half and the second half share frequencies
        angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(device), angles.sin().to(device)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [B, H, T, head_dim]; the rest pass through."""
    rotary_dim = cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if style == "interleaved":
        pairs = torch.stack((-rot[..., 1::2], rot[..., ::2]), dim=-1).flatten(-2)
    else:
        half = rotary_dim // 2
        pairs = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    rotated = rot * cos.to(x.dtype) + pairs * sin.to(x.dtype)
    return torch.cat((rotated, rest), dim=-1)


class Embedding(nn.Module):
    """Unit 0: token (and, for learned positions, position) embeddings."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.positional == "learned" else None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        return x


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # q, k and v in one matmul: one large GEMM is faster than three small ones.
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.attn_bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.attn_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        batch, seq_len, _ = x.shape
        q, k, v = self.qkv(x).view(batch, seq_len, 3, cfg.n_head, cfg.head_dim).permute(2, 0, 3, 1, 4)
        if cfg.rotary_dim:
            cos, sin = _rotary_tables(seq_len, cfg.rotary_dim, cfg.rotary_base, cfg.rotary_style, x.device)
            q = apply_rotary(q, cos, sin, cfg.rotary_style)
            k = apply_rotary(k, cos, sin, cfg.rotary_style)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(batch, seq_len, cfg.d_model))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)
        # GPT-2/3 and GPT-J use the tanh approximation; GPT-NeoX the exact erf form.
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate=self.approximate))


class Block(nn.Module):
    """One transformer layer; sequential or parallel residual, one or two norms."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.parallel = cfg.parallel_residual
        self.ln_1 = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        shared = cfg.parallel_residual and cfg.shared_norm
        self.ln_2 = None if shared else nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.parallel:
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))
        h = self.ln_1(x)
        return x + self.attn(h) + self.mlp(h if self.ln_2 is None else self.ln_2(x))


class Head(nn.Module):
    """The last unit: final norm and output projection to (unpadded) vocabulary logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.vocab_size = cfg.vocab_size
        self.ln_f = nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
        self.lm_head = (
            None
            if cfg.tie_embeddings
            else nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=cfg.head_bias)
        )

    def forward(self, x: torch.Tensor, tied_weight: torch.Tensor | None = None) -> torch.Tensor:
        x = self.ln_f(x)
        logits = F.linear(x, tied_weight) if self.lm_head is None else self.lm_head(x)
        # Padding rows exist for matmul speed only; they are never a prediction.
        return logits if logits.shape[-1] == self.vocab_size else logits[..., : self.vocab_size]


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.units = nn.ModuleList(build_unit(cfg, i) for i in range(cfg.n_layer + 2))

    @property
    def embedding(self) -> Embedding:
        return self.units[0]

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.shape[1] > self.cfg.block_size:
            raise ValueError(f"sequence of {idx.shape[1]} exceeds the context of {self.cfg.block_size}")
        x = idx
        for unit in self.units[:-1]:
            x = unit(x)
        return self.units[-1](x, self.tied_weight())

    def tied_weight(self) -> torch.Tensor | None:
        return self.embedding.wte.weight if self.cfg.tie_embeddings else None

    def init_weights(self, seed: int) -> None:
        """Initialise every unit from its own generator (see `init_unit`)."""
        for index, unit in enumerate(self.units):
            init_unit(unit, self.cfg, seed, index)


def init_unit(unit: nn.Module, cfg: ModelConfig, seed: int, index: int) -> None:
    """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 x layers)
    so the residual stream's variance does not grow with depth.

    Each unit draws from a generator seeded by (seed, unit index), so a unit can be
    initialised alone, straight into a host store, and still equal the same unit of a
    whole model built in memory: the streamer never needs the whole model at once. The
    generator lives on the unit's device (a CUDA tensor refuses a CPU generator), so
    the same seed gives the same weights on the same kind of device.
    """
    device = next(unit.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
    residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layer)
    with torch.no_grad():
        for name, p in unit.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.split(".")[-2].startswith("ln_"):
                nn.init.ones_(p)
            elif name.endswith(("attn.proj.weight", "fc_out.weight")):
                nn.init.normal_(p, 0.0, residual_std, generator=generator)
            else:
                nn.init.normal_(p, 0.0, cfg.init_std, generator=generator)


def build_unit(cfg: ModelConfig, index: int) -> nn.Module:
    """Unit `index` alone: 0 is the embedding, 1..n_layer the blocks, n_layer + 1 the head."""
    if index == 0:
        return Embedding(cfg)
    if index <= cfg.n_layer:
        return Block(cfg)
    return Head(cfg)


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy, computed in float32 whatever the compute dtype."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
