"""The GPT family (GPT-3, GPT-J, GPT-NeoX) in one file.

The model is a sequence of *units*: the embedding, each transformer block, and the
final norm with the output head. Units are what the streamer moves between host and
device, so each is an ordinary module with no reference to the others; the only
cross-unit link, a tied output head, is passed in explicitly as `tied_weight`.
The same object also runs as a plain `nn.Module`: `model(idx) -> logits`.

Generation passes each block a `KVCache`: the keys and values of the positions already
seen, so that a new token attends to them without the prompt being run again. Training
on packed documents may pass every unit `Documents`: where each window's documents
begin, so that none attends across a boundary.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Documents:
    """The documents packed into a batch of windows, for attention that stays inside each.

    [Note: documents in a window]
    Training windows are cut from token files where documents follow one another, each
    ended by a separator (`streamer prepare --separator`). By default a position attends
    to every earlier one in its window, across document boundaries too, as GPT-3 and
    GPT-NeoX were trained. With `Documents` (`streamer train --document-mask`) a position
    attends only to the earlier positions of its own document, and learned position
    embeddings count from the document's start, so that each document is computed as if
    it were alone in the window (tests/test_gpt.py checks it against running each one by
    itself). Rotary positions need no reset: the attention between two positions depends
    on their distance only. A separator belongs to the document it ends, and the token
    after it starts the next one. The mask costs one boolean per pair of positions per
    window, and takes the attention off the fused causal kernel onto the one that reads
    a mask."""

    mask: torch.Tensor  # [B, 1, T, T] bool: whether position i may attend to position j
    positions: torch.Tensor  # [B, T] each position's place within its document

    @classmethod
    def of(cls, idx: torch.Tensor, separator: int) -> Documents:
        """The documents of windows `idx` [B, T] whose documents each end in `separator`."""
        seq_len = idx.shape[1]
        places = torch.arange(seq_len, device=idx.device)
        starts = torch.zeros_like(idx, dtype=torch.bool)
        starts[:, 0] = True
        starts[:, 1:] = idx[:, :-1] == separator
        document = starts.cumsum(1)
        first = torch.where(starts, places, 0).cummax(1).values  # where each position's document starts
        mask = (document[:, :, None] == document[:, None, :]) & (places[:, None] >= places[None, :])
        return cls(mask.unsqueeze(1), places - first)


class Embedding(nn.Module):
    """Unit 0: token (and, for learned positions, position) embeddings."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.wpe = nn.Embedding(cfg.block_size, cfg.d_model) if cfg.positional == "learned" else None

    def forward(self, idx: torch.Tensor, start: int = 0, documents: Documents | None = None) -> torch.Tensor:
        """`start`: the position of idx's first token (a cache's length when generating);
        `documents`: positions count from each document's start instead."""
        x = self.wte(idx)
        if self.wpe is not None:
            positions = (documents.positions if documents is not None
                         else torch.arange(start, start + idx.shape[1], device=idx.device))
            x = x + self.wpe(positions)
        return x


class KVCache:
    """One block's keys and values for the positions generated so far, [B, H, T, head_dim]
    each, in room for `capacity` positions allocated once."""

    def __init__(self, cfg: ModelConfig, batch: int, capacity: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        shape = (batch, cfg.n_head, capacity, cfg.head_dim)
        self.keys = torch.empty(shape, device=device, dtype=dtype)
        self.values = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new positions' k and v; returns every position's."""
        stop = self.length + k.shape[2]
        if stop > self.keys.shape[2]:
            raise ValueError(f"the cache holds {self.keys.shape[2]} positions, not {stop}")
        self.keys[:, :, self.length : stop] = k
        self.values[:, :, self.length : stop] = v
        self.length = stop
        return self.keys[:, :, :stop], self.values[:, :, :stop]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # q, k and v in one matmul: one large GEMM is faster than three small ones.
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.attn_bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.attn_bias)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, documents: Documents | None = None
                ) -> torch.Tensor:
        cfg = self.cfg
        batch, seq_len, _ = x.shape
        start = cache.length if cache is not None else 0
        q, k, v = self.qkv(x).view(batch, seq_len, 3, cfg.n_head, cfg.head_dim).permute(2, 0, 3, 1, 4)
        if cfg.rotary_dim:
            # A generating model's positions run up to its context: one table, sliced
            # (each row is computed alone, so a slice equals a shorter table).
            length = cfg.block_size if cache is not None else seq_len
            cos, sin = _rotary_tables(length, cfg.rotary_dim, cfg.rotary_base, cfg.rotary_style, x.device)
            cos, sin = cos[start : start + seq_len], sin[start : start + seq_len]
            q = apply_rotary(q, cos, sin, cfg.rotary_style)
            k = apply_rotary(k, cos, sin, cfg.rotary_style)
        if cache is not None:
            k, v = cache.extend(k, v)
        if documents is not None:  # each position sees its own document only
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=documents.mask)
        elif start == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif seq_len == 1:  # one new position sees every key: no mask, so the fused kernels apply
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # new positions after cached ones: position start + i sees keys 0..start + i
            mask = torch.ones(seq_len, start + seq_len, dtype=torch.bool, device=x.device).tril(start)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(batch, seq_len, cfg.d_model))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc_in = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.mlp_bias)
        self.fc_out = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.mlp_bias)
        # GPT-2/3, GPT-J and GPT-NeoX 20B use the tanh approximation; Pythia the exact erf form.
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

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, documents: Documents | None = None
                ) -> torch.Tensor:
        if not self.parallel:
            x = x + self.attn(self.ln_1(x), cache, documents)
            return x + self.mlp(self.ln_2(x))
        h = self.ln_1(x)
        return x + self.attn(h, cache, documents) + self.mlp(h if self.ln_2 is None else self.ln_2(x))


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

    def forward(self, idx: torch.Tensor, caches: list[KVCache] | None = None,
                documents: Documents | None = None) -> torch.Tensor:
        """Logits for every position of idx; with `caches` (one per block), idx follows
        the positions they hold, and its keys and values are added to them; with
        `documents`, each document of idx is computed as if alone ([Note: documents in a
        window])."""
        start = caches[0].length if caches else 0
        if start + idx.shape[1] > self.cfg.block_size:
            raise ValueError(f"sequence of {start + idx.shape[1]} exceeds the context of {self.cfg.block_size}")
        x = self.units[0](idx, start, documents)
        for i, block in enumerate(self.units[1:-1]):
            x = block(x, caches[i] if caches else None, documents)
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
