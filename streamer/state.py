"""State formats: how each parameter's training state is kept in the host store.

- `fp32` (16 bytes per parameter): float32 master weight, gradient and both AdamW
  moments. Exact: the streamer matches resident training to float32 rounding.
- `compact` (about 6 bytes per parameter): a bfloat16 master weight written back with
  stochastic rounding, a bfloat16 gradient, and both moments in 8 bits with one float32
  scale per block of `BLOCK` elements. A 20B model's state is then 115 GiB, not 307.

[Note: why stochastic rounding, and why logarithmic 8-bit moments]
A bf16 weight has 8 significant bits: an update smaller than half its spacing (about
0.4% of the weight) rounds back to the same value every time, so with round-to-nearest
small learning rates stop training altogether. Rounding up with probability equal to
the remainder's share of the spacing makes the stored weight unbiased: it follows the
float32 trajectory in expectation, and its error grows like a random walk, not a bias.

The moments have the same problem at 8 bits (an EMA with beta2 = 0.95 moves each value
by at most 5% per step) and another: the second moment spans many octaves within a
block, and a linear code sends the small ones to zero, where AdamW's denominator is
`eps` and the update explodes. So both moments are coded on a log scale relative to
their block's largest magnitude (`LEVELS_PER_OCTAVE` levels per octave over `OCTAVES`
octaves), rounded stochastically between neighbouring levels so each value is
unbiased. The second moment is stored as its square root (half the octaves), and a
nonzero root below the code's range is stored as the smallest level: a larger
denominator, so a smaller step, never a blow-up. The first moment below the range
rounds to zero or the smallest level, unbiased.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from streamer.optim import OptimConfig, adamw_update_

BLOCK = 256  # elements per moment scale: small enough to follow local magnitudes
OCTAVES = {"exp_avg": 16, "exp_avg_sq": 24}  # each code's range below its block's largest value
LEVELS = {"exp_avg": 127, "exp_avg_sq": 255}  # nonzero codes: sign + 7 bits, and 8 bits


@dataclass(frozen=True)
class Buffer:
    """One flat buffer of a unit's state: one value per element, or per `BLOCK` (a scale)."""

    name: str
    dtype: torch.dtype
    per_block: bool = False

    def numel(self, elements: int) -> int:
        return -(-elements // BLOCK) if self.per_block else elements

    def offset(self, first: int) -> int:
        """Index in this buffer of element `first` (a block boundary for scales)."""
        if not self.per_block:
            return first
        assert first % BLOCK == 0, "scaled buffers are read and written in whole blocks"
        return first // BLOCK

    @property
    def itemsize(self) -> int:
        return torch.tensor([], dtype=self.dtype).element_size()


@dataclass(frozen=True)
class StateFormat:
    name: str
    buffers: tuple[Buffer, ...]

    def buffer(self, name: str) -> Buffer:
        return next(b for b in self.buffers if b.name == name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.buffers)

    def expand(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """The buffers that hold `names`: a coded moment brings its block scales."""
        return tuple(n for base in names for n in (base, f"{base}_scale") if n in self.names)

    def bytes_per_param(self) -> float:
        return sum(b.itemsize / (BLOCK if b.per_block else 1) for b in self.buffers)

    def update_(self, buffers: dict[str, torch.Tensor], *, step: int, lr: float, cfg: OptimConfig,
                decay_numel: int, grad_scale: float, seed: int) -> None:
        """One AdamW step, in place, on one chunk of a unit's buffers (all of them)."""
        if self.name == "fp32":
            adamw_update_(buffers["param"], buffers["grad"], buffers["exp_avg"], buffers["exp_avg_sq"], step=step,
                          lr=lr, cfg=cfg, decay_numel=decay_numel, grad_scale=grad_scale)
            return
        generator = torch.Generator().manual_seed(seed)
        param = buffers["param"].float()
        exp_avg = decode("exp_avg", buffers["exp_avg"], buffers["exp_avg_scale"])
        exp_avg_sq = decode("exp_avg_sq", buffers["exp_avg_sq"], buffers["exp_avg_sq_scale"]).square_()
        adamw_update_(param, buffers["grad"].float(), exp_avg, exp_avg_sq, step=step, lr=lr, cfg=cfg,
                      decay_numel=decay_numel, grad_scale=grad_scale)
        buffers["param"].copy_(round_bf16_stochastic(param, generator))
        encode("exp_avg", exp_avg, buffers["exp_avg"], buffers["exp_avg_scale"], generator)
        encode("exp_avg_sq", exp_avg_sq.sqrt_(), buffers["exp_avg_sq"], buffers["exp_avg_sq_scale"], generator)


FORMATS = {
    "fp32": StateFormat("fp32", tuple(Buffer(n, torch.float32) for n in ("param", "grad", "exp_avg", "exp_avg_sq"))),
    "compact": StateFormat("compact", (
        Buffer("param", torch.bfloat16),
        Buffer("grad", torch.bfloat16),
        Buffer("exp_avg", torch.uint8),
        Buffer("exp_avg_sq", torch.uint8),
        Buffer("exp_avg_scale", torch.float32, per_block=True),
        Buffer("exp_avg_sq_scale", torch.float32, per_block=True),
    )),
}


def round_bf16_stochastic(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """float32 -> bfloat16, rounding away from zero with probability equal to the
    dropped low 16 bits' share: adding 16 random bits to the float32 pattern carries
    into the kept bits exactly that often (the pattern is sign-magnitude)."""
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, generator=generator)
    rounded = (bits + noise).bitwise_and_(-65536)  # keep the high 16 bits
    return rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low bits are zero


def _levels_per_octave(name: str) -> float:
    """Code 1 is 2^-octaves of the block's largest magnitude, the top code is exactly it."""
    return (LEVELS[name] - 1) / OCTAVES[name]


def _blocks(x: torch.Tensor) -> torch.Tensor:
    """`x` as rows of BLOCK elements, the last row zero-padded."""
    pad = -x.numel() % BLOCK
    return torch.nn.functional.pad(x, (0, pad)).view(-1, BLOCK) if pad else x.view(-1, BLOCK)


def decode(name: str, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values of a coded moment: code 0 is zero, code c >= 1 is
    scale x 2^((c - 1) / levels_per_octave - octaves), negative when signed and c > 128."""
    k, octaves = _levels_per_octave(name), OCTAVES[name]
    signed = name == "exp_avg"
    table = torch.zeros(256)
    magnitude = torch.arange(1, LEVELS[name] + 1, dtype=torch.float64)
    table[1 : LEVELS[name] + 1] = torch.exp2((magnitude - 1) / k - octaves).float()
    if signed:
        table[129:] = -table[1:128]
    values = table[codes.long()]
    return (_blocks(values) * scales.unsqueeze(1)).view(-1)[: codes.numel()]


def encode(name: str, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
           generator: torch.Generator) -> None:
    """Code `x` into `codes` (uint8) and `scales` (one per block), each value rounded
    stochastically between its two neighbouring levels so it is unbiased (see the note
    at the top)."""
    k, octaves, top = _levels_per_octave(name), OCTAVES[name], LEVELS[name]
    magnitude = x.abs()
    block_max = _blocks(magnitude).amax(1)
    scales.copy_(block_max)
    safe = torch.where(block_max > 0, block_max, torch.ones_like(block_max))
    ratio = (_blocks(magnitude) / safe.unsqueeze(1)).view(-1)[: x.numel()]
    # Level position: 0 at the smallest level, top - 1 at the block's largest value.
    position = (torch.log2(ratio) + octaves) * k
    low = position.floor().clamp_(min=-1, max=top - 1)
    low_value = torch.exp2(low / k - octaves)
    step = low_value * (2 ** (1 / k) - 1)
    # Below the range, the neighbours are zero and the smallest level.
    below = low < 0
    low_value = torch.where(below, torch.zeros_like(low_value), low_value)
    step = torch.where(below, torch.full_like(step, math.exp2(-octaves)), step)
    up = torch.rand(x.shape, generator=generator) < (ratio - low_value) / step
    code = (low + 1 + up).clamp_(max=top)
    code = torch.where(ratio > 0, code, torch.zeros_like(code))
    if name == "exp_avg_sq":
        code = torch.where(ratio > 0, code.clamp(min=1), code)  # never a zero denominator
    else:
        code = torch.where(x < 0, code + 128 * (code > 0), code)
    codes.copy_(code.to(torch.uint8))
