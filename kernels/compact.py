"""The compact state formats' kernels: the AdamW step, and the coding of a gradient.

streamer.state keeps a bfloat16 master weight and 8-bit moments on a log scale per
block of 256 elements (and, for compact8, an 8-bit gradient). Its PyTorch update is
about eighty elementwise kernels over a chunk: it decodes each buffer to float32, runs
AdamW, rounds and codes back, and moves some 480 bytes of device memory per parameter
(against 32 for float32 AdamW). `compact_adamw_` reads each buffer once and writes the
updated ones once: 9 bytes per parameter in, 4 out, beside the 8 of the random bits
that the reference's own generator writes and the kernel reads, so that both round
with the same bits (see [Note: the fused update, checked before use] in
streamer/state.py). `code_gradient_` codes a float32 gradient as compact8 keeps it,
in 5 bytes per element where the ops move about 110.

Both run on CUDA tensors (CuPy, on PyTorch's current stream) or, with `emulate=True`,
on CPU tensors through kernels/emulate.py: the same source, compiled for the host, so
that CI checks them against the reference without a GPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kernels.cuda_sources import CODE_GRADIENT_PARAMS, COMPACT_ADAMW_PARAMS, SOURCES

BLOCK = 256  # elements per scale, as streamer.state.BLOCK
WARP = 32
NUMPY = {"int64": np.int64, "int": np.int32, "double": np.float64, "float": np.float32}


def arguments(buffers: dict[str, torch.Tensor], bits: torch.Tensor, tables: torch.Tensor, *, step: int, lr: float,
              beta1: float, beta2: float, weight_decay: float, eps: float, decay_numel: int, grad_scale: float,
              codes: dict[str, tuple[float, float, int]]) -> dict[str, object]:
    """The kernel's arguments by name, for one chunk's `buffers` (streamer.state's names),
    its 32 `bits` per element (int32), the 3 x 256 code `tables` (gradient, first moment,
    second moment's root), and each moment's (octaves, levels per octave, top code)."""
    param = buffers["param"]
    coded = "grad_scale" in buffers
    grad = buffers["grad"]
    (m_octaves, m_levels, m_top), (r_octaves, r_levels, r_top) = codes["exp_avg"], codes["exp_avg_sq"]
    return {
        "param": param, "grad16": param if coded else grad, "grad8": grad if coded else buffers["exp_avg"],
        "grad_scale": buffers["grad_scale"] if coded else buffers["exp_avg_scale"],
        "exp_avg": buffers["exp_avg"], "exp_avg_scale": buffers["exp_avg_scale"],
        "exp_avg_sq": buffers["exp_avg_sq"], "exp_avg_sq_scale": buffers["exp_avg_sq_scale"],
        "bits": bits, "tables": tables, "n": param.numel(),
        "decay_numel": min(decay_numel, param.numel()) if weight_decay else 0, "grad_coded": int(coded),
        # Scalars as torch's fused AdamW forms them (in double), then rounded to float32.
        "decay_factor": lr * weight_decay, "beta1": beta1, "one_minus_beta1": 1 - beta1, "beta2": beta2,
        "one_minus_beta2": 1 - beta2, "eps": eps,
        # torch divides the gradient by its float32 `grad_scale` tensor.
        "grad_divisor": 1.0 / grad_scale,
        "step_size": lr / (1 - beta1**step), "bias_correction2_sqrt": math.sqrt(1 - beta2**step),
        "m_octaves": m_octaves, "m_levels_per_octave": m_levels, "m_top": m_top,
        "r_octaves": r_octaves, "r_levels_per_octave": r_levels, "r_top": r_top,
    }


def _address(tensor: object, device: torch.device) -> np.uint64:
    """A pointer argument as the tensor's address, not a DLPack view: a view's handshake
    records and waits for an event on the stream per tensor (a dozen a chunk), and the
    kernel runs on the stream the tensors are used on anyway."""
    assert isinstance(tensor, torch.Tensor) and tensor.device == device and tensor.is_contiguous()
    return np.uint64(tensor.data_ptr())


def _run(kernel: str, params: tuple[tuple[str, str], ...], args: dict[str, object], device: torch.device,
         emulate: bool, threads: int = 256) -> None:
    """Launch `kernel` with one warp per block of `BLOCK` elements (`args["n"]` of them)."""
    blocks = -(-int(args["n"]) // BLOCK)  # type: ignore[call-overload]
    if blocks == 0:
        return
    if emulate:
        from kernels import emulate as host

        # Two warps per block is enough to check that warps do not mix.
        grid = min(-(-blocks * WARP // 64), 4)
        host.launch(SOURCES["compact"], kernel, params, grid, 64, args)
        return
    from kernels import cuda

    values = tuple(_address(args[name], device) if kind.endswith("*") else NUMPY[kind](args[name])
                   for kind, name in params)
    with cuda._on_torch_stream(device):
        grid = min(cuda.MAX_BLOCKS, -(-blocks * WARP // threads))
        cuda._kernel("compact", kernel, device.index)((grid,), (threads,), values)


def compact_adamw_(buffers: dict[str, torch.Tensor], bits: torch.Tensor, tables: torch.Tensor, *,
                   emulate: bool = False, **settings: object) -> None:
    """One AdamW step in place on a chunk's buffers (see `arguments` for `settings`).
    The chunk starts on a block boundary; its last block may be ragged."""
    args = arguments(buffers, bits, tables, **settings)  # type: ignore[arg-type]
    _run("compact_adamw", COMPACT_ADAMW_PARAMS, args, buffers["param"].device, emulate)


def code_gradient_(grad: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                   code: tuple[float, float, int], emulate: bool = False) -> None:
    """Code a float32 `grad` into `codes` (uint8) and `scales` (one per block), on the
    signed log scale `code` = (octaves, levels per octave, top code), to the nearest."""
    octaves, levels, top = code
    args = {"grad": grad, "codes": codes, "scales": scales, "n": grad.numel(), "octaves": octaves,
            "levels_per_octave": levels, "top": top}
    _run("code_gradient", CODE_GRADIENT_PARAMS, args, grad.device, emulate)
