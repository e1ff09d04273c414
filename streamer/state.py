"""State formats: how each parameter's training state is kept in the host store.

- `fp32` (16 bytes per parameter): float32 master weight, gradient and both AdamW
  moments. Exact: the streamer matches resident training to float32 rounding.
- `compact` (about 6 bytes per parameter): a bfloat16 master weight written back with
  stochastic rounding, a bfloat16 gradient, and both moments in 8 bits with one float32
  scale per block of `BLOCK` elements. A 20B model's state is then 115 GiB, not 307.
- `compact8` (about 5 bytes per parameter): `compact` with the gradient in 8 bits too,
  on the first moment's signed log scale. A 20B model's state is then 97 GiB, which a
  128 GiB host holds in RAM, with no disk tier.

[Note: an 8-bit gradient, rounded to nearest]
The gradient is stored from the backward that makes it to the update that reads it,
once: its rounding error does not accumulate the way a stored weight's or moment's
does, so it rounds to the nearest code (no random bits to plumb through the device's
gradient path, and the same bytes whichever path wrote it). Codes lie 9% apart, so a
value moves by at most 4.5% of itself; AdamW divides the first moment by the root of
the second, and an error common to both cancels. Values more than half a code below
2^-16 of their block's largest are zero, as the first moment's are. The format is for
states that would otherwise need a disk tier: test_scheduler checks that it trains as
close to float32 as `compact` does, and bench_state_formats measures the gap.

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
their block's largest magnitude (`LEVELS` codes over `OCTAVES` octaves: 6.7% and 9%
apart), rounded stochastically between the two neighbouring codes. Rounding in the log
domain biases a value by at most 0.1% of it (a level is under 0.13 octave), far below
the code's spacing, and costs a fraction of value-exact rounding. The second moment is
stored as its square root (half the octaves), and a nonzero root below the code's
range is stored as the smallest level: a larger denominator, so a smaller step, never a
blow-up. A first moment below the range (2^-16 of its block's largest) is zero.

One draw of 32 random bits per element serves all three roundings (16 bits for the
weight, 8 for each moment): random numbers are a large share of the update's time.

[Note: the fused update, checked before use]
The compact formats' update as PyTorch ops is about eighty kernels per chunk, which
move some 480 bytes of device memory per parameter: on a GPU it is the update's whole
cost, and with AdamW on the device it decides how many tokens a step needs to hide it.
kernels/compact.py does the same arithmetic in one pass over memory (17 bytes per
parameter with the random bits).

The two cannot be bit-identical everywhere: torch's fused AdamW and the kernel may
round a float32 intermediate differently, and a libm's `log2f` may differ in its last
bit. A last-bit difference changes a stored value only where it straddles a rounding
boundary: a bfloat16 weight's (1 in 65,536 of its spacing) or a code's (about 1 in
10^5 of a level). So the kernel matches the ops when, on the same state and the same
random bits, every stored weight and code is equal or one step apart and at most one
in a thousand differ at all, and the block scales agree to 1e-6. (Where an update
cancels most of a weight, the float32 terms' last bit is many steps of the small
result: a weight may then differ by up to 2^-16 of the chunk's largest.) A device runs the
kernel only after it has matched the ops there on a sample chunk of its format
(ragged last block, an all-zero block, clipping and weight decay on half of it, and
for compact8 the gradient's coding too); otherwise it keeps the ops and says so once.
The host emulation (kernels/emulate.py) is held to the same comparison in the tests.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from dataclasses import dataclass

import torch

from streamer.errors import UserError
from streamer.optim import OptimConfig, adamw_update_

BLOCK = 256  # elements per moment scale: small enough to follow local magnitudes
OCTAVES = {"exp_avg": 16, "exp_avg_sq": 24, "grad": 16}  # each code's range below its block's largest value
LEVELS = {"exp_avg": 127, "exp_avg_sq": 255, "grad": 127}  # nonzero codes: sign + 7 bits, and 8 bits
SIGNED = ("exp_avg", "grad")


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
    # Host update time per parameter relative to float32 AdamW's, for planning with a
    # profile measured in another format (a run measures its own: see the engine's
    # calibration). Measured on a 2-core CPU: 1.8 G parameters/s for float32 AdamW (one
    # fused pass), 26 M/s for the compact format (decoding, rounding and coding 8-bit
    # moments, a dozen passes).
    update_cost: float = 1.0
    # Host bytes per chunk element that an update allocates besides the store's buffers:
    # float32 AdamW works in place; the compact update decodes to float32 and codes back,
    # with about ten float32-sized temporaries alive at its peak.
    workspace_bytes: int = 0
    # Device update time per parameter relative to float32 AdamW's as PyTorch ops, from
    # the bytes of device memory its kernels read and write (counted op by op over
    # `update_`, on 1 Mi elements: 32 per parameter for float32's one fused kernel, 464
    # for compact's 83 kernels, 479 for compact8's 78), for a profile's estimate on a
    # device without the fused kernel (`fused_update_cost`); a CUDA run measures its
    # own (`planner.measure_update_rate`).
    device_update_cost: float = 1.0

    @property
    def fused_update_cost(self) -> float:
        """`device_update_cost` for the fused kernel (kernels/compact.py): every buffer read
        once, all but the gradient written once, and 32 random bits per element written
        by the generator and read by the kernel (17 bytes per parameter for compact8)."""
        if self.name == "fp32":
            return 1.0
        whole = self.bytes_per_param()
        return (2 * whole - self.bytes_per_param(("grad",)) + 8) / 32

    def buffer(self, name: str) -> Buffer:
        return next(b for b in self.buffers if b.name == name)

    def part(self, name: str, tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """The part of buffer `name` (held in `tensor` from element 0) that elements
        [start, stop) occupy: the same range, or their blocks' scales."""
        buffer = self.buffer(name)
        first = buffer.offset(start)
        return tensor[first : first + buffer.numel(stop - start)]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.buffers)

    def expand(self, names: tuple[str, ...]) -> tuple[str, ...]:
        """The buffers that hold `names`: a coded moment brings its block scales."""
        return tuple(n for base in names for n in (base, f"{base}_scale") if n in self.names)

    def bytes_per_param(self, names: tuple[str, ...] | None = None) -> float:
        """Bytes per parameter of the named buffers and their scales (default: all)."""
        chosen = self.expand(names) if names is not None else self.names
        return sum(b.itemsize / (BLOCK if b.per_block else 1) for b in self.buffers if b.name in chosen)

    def store_grad(self, grad: torch.Tensor, out: dict[str, torch.Tensor], non_blocking: bool = False,
                   fused: bool | None = None) -> None:
        """Write a gradient (float, on any device) into the store's gradient buffers `out`
        (the "grad" buffer, and its scales for a coded one): cast, or coded a chunk at a
        time (the coding's temporaries stay small on the device), straight into `out`
        when it is on the gradient's device. On a CUDA device the coding is one kernel
        (kernels/compact.py) once it has matched the ops there; `fused` as `update_`'s."""
        target = out["grad"]
        if not self.codes_grad:  # cast on the gradient's device: fewer bytes cross
            target.copy_(grad.to(target.dtype) if grad.device != target.device else grad, non_blocking=non_blocking)
            return
        if fused is None:
            fused = use_fused(self, grad.device)
        direct = target.device == grad.device
        chunk = 32 * 1024 * BLOCK  # 8 Mi elements, as the store's chunks
        for start in range(0, grad.numel(), chunk):
            piece = grad[start : start + chunk].float()
            stop, blocks = start + piece.numel(), slice(start // BLOCK, start // BLOCK + -(-piece.numel() // BLOCK))
            codes = target[start:stop] if direct else torch.empty(piece.shape, dtype=torch.uint8, device=piece.device)
            scales = out["grad_scale"][blocks] if direct else torch.empty(blocks.stop - blocks.start,
                                                                          device=piece.device)
            if fused:
                from kernels.compact import code_gradient_

                code_gradient_(piece.contiguous(), codes, scales, _code("grad"), emulate=piece.device.type == "cpu")
            else:
                encode("grad", piece, codes, scales, None)
            if not direct:
                target[start:stop].copy_(codes, non_blocking=non_blocking)
                out["grad_scale"][blocks].copy_(scales, non_blocking=non_blocking)

    @property
    def codes_grad(self) -> bool:
        return "grad_scale" in self.names

    def grad_buffers_in(self, raw: torch.Tensor, numel: int) -> dict[str, torch.Tensor]:
        """The gradient's buffers for `numel` elements as views of the bytes `raw` (any
        dtype; each buffer starts 16-byte aligned): a staging buffer of float32
        gradients also holds them coded, in fewer bytes."""
        raw, views, offset = raw.view(torch.uint8), {}, 0
        for b in self.buffers:
            if b.name in self.expand(("grad",)):
                size = b.itemsize * b.numel(numel)
                views[b.name] = raw[offset : offset + size].view(b.dtype)
                offset = -(-(offset + size) // 16) * 16
        assert offset <= raw.numel() + 15, "the staging buffer is too small for the coded gradient"
        return views

    def gradient(self, buffers: dict[str, torch.Tensor]) -> torch.Tensor:
        """A chunk's gradient as float32."""
        if "grad_scale" in buffers:
            return decode("grad", buffers["grad"], buffers["grad_scale"])
        return buffers["grad"].float()

    def update_(self, buffers: dict[str, torch.Tensor], *, step: int, lr: float, cfg: OptimConfig,
                decay_numel: int, grad_scale: float, seed: int, fused: bool | None = None) -> None:
        """One AdamW step, in place, on one chunk of a unit's buffers (all of them).

        A compact format's step on a CUDA device is one kernel (kernels/compact.py) once it
        has matched the PyTorch ops there (see [Note: the fused update, checked before
        use]); `fused` forces one or the other (on CPU tensors, the fused kernel runs in
        the host emulation: a check, not a fast path)."""
        if self.name == "fp32":
            adamw_update_(buffers["param"], buffers["grad"], buffers["exp_avg"], buffers["exp_avg_sq"], step=step,
                          lr=lr, cfg=cfg, decay_numel=decay_numel, grad_scale=grad_scale)
            return
        device = buffers["param"].device
        generator = torch.Generator(device=device).manual_seed(seed)
        bits = random_bits(buffers["param"].shape, 32, generator)
        if fused is None:
            fused = use_fused(self, device)
        if fused:
            self.fused_update_(buffers, bits, step=step, lr=lr, cfg=cfg, decay_numel=decay_numel,
                               grad_scale=grad_scale)
            return
        param = buffers["param"].float()
        exp_avg = decode("exp_avg", buffers["exp_avg"], buffers["exp_avg_scale"])
        exp_avg_sq = decode("exp_avg_sq", buffers["exp_avg_sq"], buffers["exp_avg_sq_scale"]).square_()
        adamw_update_(param, self.gradient(buffers), exp_avg, exp_avg_sq, step=step, lr=lr, cfg=cfg,
                      decay_numel=decay_numel, grad_scale=grad_scale)
        buffers["param"].copy_(round_bf16_stochastic(param, bits.bitwise_right_shift(16)))
        encode("exp_avg", exp_avg, buffers["exp_avg"], buffers["exp_avg_scale"], bits.bitwise_and(255))
        encode("exp_avg_sq", exp_avg_sq.sqrt_(), buffers["exp_avg_sq"], buffers["exp_avg_sq_scale"],
               bits.bitwise_right_shift(8).bitwise_and_(255))

    def fused_update_(self, buffers: dict[str, torch.Tensor], bits: torch.Tensor, *, step: int, lr: float,
                      cfg: OptimConfig, decay_numel: int, grad_scale: float) -> None:
        """A compact format's step as one kernel (kernels/compact.py), rounding with `bits`
        (32 per element, as `update_` draws them); on CPU tensors in the host emulation."""
        from kernels.compact import compact_adamw_

        device = buffers["param"].device
        compact_adamw_(buffers, bits, fused_tables(device), emulate=device.type == "cpu", step=step, lr=lr,
                       beta1=cfg.beta1, beta2=cfg.beta2, weight_decay=cfg.weight_decay, eps=cfg.eps,
                       decay_numel=decay_numel, grad_scale=grad_scale,
                       codes={name: _code(name) for name in ("exp_avg", "exp_avg_sq")})


def _compact(name: str, grad: tuple[Buffer, ...], update_cost: float, workspace_bytes: int,
             device_update_cost: float) -> StateFormat:
    """bf16 weights and 8-bit moments with their block scales, around a gradient kept as
    `grad`."""
    return StateFormat(name, (
        Buffer("param", torch.bfloat16),
        *grad,
        Buffer("exp_avg", torch.uint8),
        Buffer("exp_avg_sq", torch.uint8),
        Buffer("exp_avg_scale", torch.float32, per_block=True),
        Buffer("exp_avg_sq_scale", torch.float32, per_block=True),
    ), update_cost=update_cost, workspace_bytes=workspace_bytes, device_update_cost=device_update_cost)


FORMATS = {
    "fp32": StateFormat("fp32", tuple(Buffer(n, torch.float32) for n in ("param", "grad", "exp_avg", "exp_avg_sq"))),
    "compact": _compact("compact", (Buffer("grad", torch.bfloat16),), update_cost=70.0, workspace_bytes=40,
                        device_update_cost=464 / 32),
    # The compact update plus the gradient's decoding.
    "compact8": _compact("compact8", (Buffer("grad", torch.uint8), Buffer("grad_scale", torch.float32, per_block=True)),
                         update_cost=75.0, workspace_bytes=44, device_update_cost=479 / 32),
}


def random_bits(shape: torch.Size | tuple[int, ...], count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` (at most 32) uniformly random low bits per element, as int32."""
    if count < 32:
        return torch.randint(0, 1 << count, shape, dtype=torch.int32, generator=generator, device=generator.device)
    numel = math.prod(shape)
    # Half as many 64-bit draws, each split in two: a third faster than 32-bit draws.
    wide = torch.randint(-(2**63), 2**63 - 1, ((numel + 1) // 2,), dtype=torch.int64, generator=generator,
                         device=generator.device)
    return wide.view(torch.int32)[:numel].view(shape)


def round_bf16_stochastic(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """float32 -> bfloat16, rounding away from zero with probability equal to the
    dropped low 16 bits' share: adding 16 random bits (`noise`, any int32 whose low 16
    bits are uniform) to the float32 pattern carries into the kept bits exactly that
    often (the pattern is sign-magnitude)."""
    bits = x.contiguous().view(torch.int32) + noise.bitwise_and(65535)
    return bits.bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)  # exact: low bits are zero


def _code(name: str) -> tuple[int, float, int]:
    """A code's scale as the fused kernels take it: (octaves, levels per octave, top code)."""
    return OCTAVES[name], _levels_per_octave(name), LEVELS[name]


def _levels_per_octave(name: str) -> float:
    """Code 1 is 2^-octaves of the block's largest magnitude, the top code is exactly it."""
    return (LEVELS[name] - 1) / OCTAVES[name]


def _blockwise_(op: str, x: torch.Tensor, per_block: torch.Tensor) -> torch.Tensor:
    """x.op_(each block's value of `per_block`), in place, the ragged last block included."""
    full = x.numel() - x.numel() % BLOCK
    getattr(x[:full].view(-1, BLOCK), op)(per_block[: full // BLOCK].unsqueeze(1))
    if full < x.numel():
        getattr(x[full:], op)(per_block[-1])
    return x


def decode(name: str, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values of a coded moment: code 0 is zero, code c >= 1 is
    scale x 2^((c - 1) / levels_per_octave - octaves), negative when signed and c > 128."""
    return _blockwise_("mul_", _table(name, codes.device).index_select(0, codes.int()), scales)


def decode_part(name: str, codes: torch.Tensor, scales: torch.Tensor, first: int) -> torch.Tensor:
    """float32 values of elements [first, first + len(codes)) of a coded moment whose
    blocks start at element 0: `scales` are those of blocks first // BLOCK onwards."""
    index = torch.arange(first, first + codes.numel(), device=codes.device) // BLOCK - first // BLOCK
    return _table(name, codes.device).index_select(0, codes.int()) * scales.index_select(0, index)


_TABLES: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    """The 256 values a code of `name` stands for, made once per device: made per
    chunk, its copy from the host would wait for the stream each time."""
    if (name, device) not in _TABLES:
        k, octaves, top = _levels_per_octave(name), OCTAVES[name], LEVELS[name]
        table = torch.zeros(256)
        table[1 : top + 1] = torch.exp2((torch.arange(top, dtype=torch.float64)) / k - octaves).float()
        if name in SIGNED:
            table[129:] = -table[1:128]
        _TABLES[name, device] = table.to(device)
    return _TABLES[name, device]


def encode(name: str, x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
           noise: torch.Tensor | None) -> None:
    """Code `x` into `codes` (uint8) and `scales` (one per block): each value's position
    on the block's log scale, rounded up with probability equal to its fraction (8
    random bits of `noise` per element; see the note at the top), or to the nearest
    code when `noise` is None."""
    k, octaves, top = _levels_per_octave(name), OCTAVES[name], LEVELS[name]
    magnitude = x.abs()
    full = x.numel() - x.numel() % BLOCK
    block_max = magnitude[:full].view(-1, BLOCK).amax(1)
    if full < x.numel():
        block_max = torch.cat([block_max, magnitude[full:].amax().reshape(1)])
    scales.copy_(block_max)
    # Position on the level scale: 0 at the smallest level, top - 1 at the block's largest.
    position = magnitude.log2_()
    _blockwise_("sub_", position, block_max.log2()).add_(octaves).mul_(k)
    position.add_(0.5 if noise is None else noise.float().add_(0.5).div_(256)).floor_().add_(1).clamp_(min=0, max=top)
    zero = x == 0  # log2(0) is -inf: the clamp made it code 0; a zero block's max gives NaN
    if name == "exp_avg_sq":
        position.clamp_(min=1)  # a nonzero root never codes as zero
    else:  # signed
        position.add_(torch.where(torch.signbit(x) & (position > 0), 128.0, 0.0))
    codes.copy_(position.masked_fill_(zero, 0))


# --- the fused kernels, checked before use (see the note at the top) ----------------

_FUSED_TABLES: dict[torch.device, torch.Tensor] = {}
_FUSED_AGREES: dict[tuple[str, torch.device], bool] = {}
_FUSED_LOCK = threading.Lock()
FUSED_ENV = "STREAMER_FUSED_UPDATE"


def fused_tables(device: torch.device) -> torch.Tensor:
    """The values of the gradient's, the first moment's and the root's codes, 3 x 256."""
    if device not in _FUSED_TABLES:
        _FUSED_TABLES[device] = torch.cat([_table(name, device) for name in ("grad", "exp_avg", "exp_avg_sq")])
    return _FUSED_TABLES[device]


def sample_values(numel: int, scale: float, generator: torch.Generator) -> torch.Tensor:
    """float32 values as a run's gradients and moments are: magnitudes that vary by orders
    from block to block, exact zeros, and one block that is all zero."""
    blocks = -(-numel // BLOCK)
    spread = torch.exp2(torch.randint(-12, 4, (blocks,), generator=generator).float()).repeat_interleave(BLOCK)
    x = torch.randn(numel, generator=generator) * spread[:numel] * scale
    x[torch.rand(numel, generator=generator) < 0.02] = 0.0
    x[BLOCK : 2 * BLOCK] = 0.0
    return x


def sample_state(fmt: StateFormat, numel: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A chunk of training state as a run has it (`sample_values`), on `device`."""
    generator = torch.Generator().manual_seed(seed)
    buffers = {b.name: torch.zeros(b.numel(numel), dtype=b.dtype) for b in fmt.buffers}
    buffers["param"].copy_(torch.randn(numel, generator=generator) * 0.02)
    fmt.store_grad(sample_values(numel, 1e-2, generator), buffers)
    encode("exp_avg", sample_values(numel, 1e-3, generator), buffers["exp_avg"], buffers["exp_avg_scale"], None)
    encode("exp_avg_sq", sample_values(numel, 1e-3, generator).abs(), buffers["exp_avg_sq"],
           buffers["exp_avg_sq_scale"], None)
    return {name: buffer.to(device) for name, buffer in buffers.items()}


def fused_gaps(fmt: StateFormat, expected: dict[str, torch.Tensor],
               got: dict[str, torch.Tensor]) -> dict[str, tuple[int, float, int]]:
    """How far `got` (the fused kernels' state, or the part of it in `expected`) is from
    `expected` (the ops'), per buffer: (values that differ, the largest difference, values):
    in codes for codes, relative for block scales, and for weights in bfloat16 steps
    (2^-7 of the value) or, where larger, 2^-16 of the chunk's largest weight: where an
    update cancels most of a weight, a last-bit difference in the float32 terms is many
    steps of the small result, and no more than that floor."""
    gaps: dict[str, tuple[int, float, int]] = {}
    for name in (n for n in ("param", "grad", "exp_avg", "exp_avg_sq") if n in expected):
        if name == "grad" and not fmt.codes_grad:  # an input, cast: nothing fused wrote it
            continue
        a, b = expected[name].cpu(), got[name].cpu()
        if name == "param":
            a, b = a.float(), b.float()
            floor = 2**-16 * float(a.abs().max()) if a.numel() else 0.0
            step = (a - b).abs() / torch.maximum(a.abs(), b.abs()).mul(2**-7).clamp(min=max(floor, 1e-38))
        else:
            a, b = a.int(), b.int()
            if name in SIGNED:  # a signed code's level: positive, or negative past 128
                a, b = torch.where(a > 128, 128 - a, a), torch.where(b > 128, 128 - b, b)
            step = (a - b).abs().float()
        gaps[name] = (int((a != b).sum()), float(step.max()) if step.numel() else 0.0, a.numel())
    for name in (n for n in ("grad_scale", "exp_avg_scale", "exp_avg_sq_scale") if n in expected):
        a, b = expected[name].cpu(), got[name].cpu()
        relative = (a - b).abs() / a.abs().clamp(min=1e-30)
        gaps[name] = (int((a != b).sum()), float(relative.max()) if a.numel() else 0.0, a.numel())
    return gaps


def fused_differences(fmt: StateFormat, expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> list[str]:
    """Where `got` is further from `expected` (see `fused_gaps`) than the note above
    allows; empty when it matches."""
    problems = []
    for name, (differ, largest, numel) in fused_gaps(fmt, expected, got).items():
        if name.endswith("_scale"):
            if largest > 1e-6:
                problems.append(f"{name}: up to {largest:.2g} apart")
        elif largest > 1 or differ > max(2, numel // 1000):
            problems.append(f"{name}: {differ} of {numel} differ, by up to {largest:.3g} steps")
    return problems


def check_fused_update(fmt: StateFormat, device: torch.device, numel: int = 48 * BLOCK + 77) -> list[str]:
    """Both updates on the same sample chunk on `device`, and both codings of a gradient
    where the format codes it: what differs (empty: none)."""
    state = sample_state(fmt, numel, device)
    expected = {name: buffer.clone() for name, buffer in state.items()}
    settings = dict(step=3, lr=1e-3, cfg=OptimConfig(), decay_numel=numel // 2, grad_scale=0.5, seed=7)
    fmt.update_(expected, fused=False, **settings)
    fmt.update_(state, fused=True, **settings)
    problems = fused_differences(fmt, expected, state)
    if fmt.codes_grad:
        grad = sample_values(numel, 1e-2, torch.Generator().manual_seed(1)).to(device)
        coded = [{n: torch.empty_like(state[n]) for n in ("grad", "grad_scale")} for _ in range(2)]
        fmt.store_grad(grad, coded[0], fused=False)
        fmt.store_grad(grad, coded[1], fused=True)
        problems += fused_differences(fmt, coded[0], coded[1])
    return problems


def fused_mode() -> str:
    """STREAMER_FUSED_UPDATE, checked: 1 (the default) fuses on a CUDA device once the
    kernels have matched the ops there; 0 keeps the ops everywhere; `host` also runs the
    kernels on a CPU device, in the host emulation (slow: to check a whole run)."""
    mode = os.environ.get(FUSED_ENV, "1")
    if mode not in ("0", "1", "host"):
        raise UserError(f"{FUSED_ENV} must be 0 (the PyTorch ops), 1 (the fused kernels where they match the ops) "
                        f"or host (their host emulation on a CPU device), got '{mode}'")
    return mode


def use_fused(fmt: StateFormat, device: torch.device) -> bool:
    """Whether `fmt`'s update and gradient coding on `device` run as the fused kernels
    (see `fused_mode`)."""
    mode = fused_mode()
    if mode == "0" or fmt.name == "fp32":
        return False
    if device.type == "cuda":
        return fused_update_agrees(fmt, device)
    return mode == "host" and device.type == "cpu"


def fused_update_agrees(fmt: StateFormat, device: torch.device) -> bool:
    """Whether `fmt`'s fused kernels matched the ops on `device` (checked once per device)."""
    if device.index is None:  # "cuda" is the current device; tensors name it by its index
        device = torch.device(device.type, torch.cuda.current_device())
    key = (fmt.name, device)
    if key in _FUSED_AGREES:  # every chunk asks: no lock once the answer is known
        return _FUSED_AGREES[key]
    with _FUSED_LOCK:  # the worker and the held stream's thread may both update first
        if key in _FUSED_AGREES:
            return _FUSED_AGREES[key]
        try:
            problems = check_fused_update(fmt, device)
        except Exception as error:  # no CuPy, a compile or launch error: the ops still work
            problems = [f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"]
        _FUSED_AGREES[key] = not problems
        if problems:
            print(f"warning: the fused {fmt.name} update does not match the PyTorch ops on {device} "
                  f"({'; '.join(problems)}); updating with the ops (about 25x the device memory traffic)",
                  file=sys.stderr)
        return _FUSED_AGREES[key]
