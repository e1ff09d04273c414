"""CuPy implementations of the row-sparse primitives for CUDA tensors.

Tensors cross into CuPy zero-copy through DLPack, and CuPy runs on PyTorch's current
stream, so kernels are ordered with the surrounding PyTorch work without extra syncs.
CuPy has no bfloat16, so value tensors are handed over as their raw bits (int32 or
int16 views) and the kernels convert (see kernels/cuda_sources.py).

CuPy is imported on first use: ``import kernels`` and ``compile_all`` (which only needs
NVRTC, through ctypes) work on machines without CuPy or a GPU.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import numpy as np
import torch

from kernels import nvrtc
from kernels.cuda_sources import KERNEL_NAMES, OPTIONS, SOURCES
from kernels.hashing import seed_offset

THREADS_PER_BLOCK = 256
# Kernels are grid-stride loops, so the grid only needs to fill the GPU, not cover the data.
MAX_BLOCKS = 1 << 16
VALUE_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
BITS_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def compile_all(arch: str = "sm_90") -> dict[str, bytes]:
    """PTX of every kernel module for ``arch``, compiled by NVRTC without a GPU.

    Raises NvrtcCompileError with the compiler log if a source does not compile, or if
    the PTX lacks one of the entry points the launchers below call.
    """
    compiled = {}
    for name, source in SOURCES.items():
        ptx = nvrtc.compile_source(source, name, arch, output="ptx", options=OPTIONS.get(name, ()))
        missing = [kernel for kernel in KERNEL_NAMES[name] if f".entry {kernel}(".encode() not in ptx]
        if missing:
            raise nvrtc.NvrtcCompileError(f"{name}: PTX lacks entry points {missing}")
        compiled[name] = ptx
    return compiled


@functools.cache
def _cupy() -> ModuleType:
    try:
        import cupy
    except ImportError as error:
        raise ImportError("CUDA tensors need CuPy: pip install cupy-cuda12x (CUDA 12) "
                          "or cupy-cuda13x (CUDA 13)") from error
    return cupy


@functools.cache
def _module(module_name: str, device_index: int) -> Any:
    """A kernel module, compiled once per device (CuPy compiles for the device's arch)."""
    cupy = _cupy()
    with cupy.cuda.Device(device_index):
        return cupy.RawModule(code=SOURCES[module_name], options=OPTIONS.get(module_name, ()))


@functools.cache
def _kernel(module_name: str, kernel_name: str, device_index: int) -> Any:
    cupy = _cupy()
    with cupy.cuda.Device(device_index):
        return _module(module_name, device_index).get_function(kernel_name)


@contextlib.contextmanager
def _on_torch_stream(device: torch.device) -> Iterator[ModuleType]:
    """CuPy with ``device`` current and PyTorch's current stream as its stream."""
    cupy = _cupy()
    torch_stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index):  # the stream's wrapper takes the current device's id
        if hasattr(cupy.cuda.Stream, "from_external"):  # CuPy >= 14
            stream = cupy.cuda.Stream.from_external(torch_stream)
        else:
            stream = cupy.cuda.ExternalStream(torch_stream.cuda_stream, device.index)
        with stream:
            yield cupy


def _launch(module_name: str, kernel_name: str, device: torch.device, work: int, args: tuple) -> None:
    """Launch a grid-stride kernel over ``work`` items; nothing to do for zero items."""
    if work == 0:
        return
    blocks = min(MAX_BLOCKS, -(-work // THREADS_PER_BLOCK))
    _kernel(module_name, kernel_name, device.index)((blocks,), (THREADS_PER_BLOCK,), args)


def _view(cupy: ModuleType, tensor: torch.Tensor) -> Any:
    """Zero-copy CuPy view of a tensor; value tensors are viewed as their raw bits."""
    tensor = tensor.detach()  # DLPack refuses tensors that require grad
    if tensor.dtype in BITS_VIEW:
        tensor = tensor.view(BITS_VIEW[tensor.dtype])
    return cupy.from_dlpack(tensor)


def nonzero_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA version of reference.nonzero_rows: flag kernel, then CuPy compaction."""
    grad = grad.contiguous()
    num_rows, hidden = grad.shape
    with _on_torch_stream(grad.device) as cupy:
        flags = cupy.zeros(num_rows, dtype=cupy.uint8)
        if hidden > 0:
            # One block per row (row_nonzero_flags votes within a block), not per element.
            kernel = "row_nonzero_flags_b32" if grad.dtype == torch.float32 else "row_nonzero_flags_b16"
            args = (_view(cupy, grad), np.int64(num_rows), np.int64(hidden), flags)
            _launch("row_nonzero_flags", kernel, grad.device, num_rows * THREADS_PER_BLOCK, args)
        indices = torch.from_dlpack(cupy.flatnonzero(flags).astype(cupy.int64))
    return indices, grad.index_select(0, indices)


def _segments(cupy: ModuleType, indices: torch.Tensor) -> tuple[Any, Any, Any]:
    """Stable sort order, sorted unique indices, and segment starts with the end appended."""
    indices = _view(cupy, indices)
    order = cupy.argsort(indices)  # CuPy's argsort is stable: equal indices keep input order
    sorted_indices = indices[order]
    is_start = cupy.ones(indices.shape[0], dtype=cupy.bool_)
    is_start[1:] = sorted_indices[1:] != sorted_indices[:-1]
    starts = cupy.flatnonzero(is_start).astype(cupy.int64)
    segment_starts = cupy.concatenate([starts, cupy.array([indices.shape[0]], dtype=cupy.int64)])
    return order.astype(cupy.int64), sorted_indices[starts], segment_starts


def _sum_segments(
    cupy: ModuleType,
    values: torch.Tensor,
    segments: tuple[Any, Any, Any],
    out_rows: Any,
    out: torch.Tensor,
    accumulate: bool,
) -> None:
    """Write (or, with accumulate, add) the float32 sum of segment s into out[out_rows[s]]."""
    order, unique, segment_starts = segments
    num_segments, hidden = int(unique.shape[0]), values.shape[1]
    args = (
        _view(cupy, values),
        order,
        segment_starts,
        np.int64(num_segments),
        np.int64(hidden),
        out_rows,
        np.int32(accumulate),
        _view(cupy, out),
    )
    kernel = f"segment_sum_rows_{VALUE_SUFFIX[values.dtype]}"
    _launch("segment_sum_rows", kernel, values.device, num_segments * hidden, args)


def coalesce(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA version of reference.coalesce: CuPy stable sort, then the segmented-sum kernel."""
    values = values.contiguous()
    with _on_torch_stream(values.device) as cupy:
        segments = _segments(cupy, indices.contiguous())
        unique = segments[1]
        out = values.new_empty(int(unique.shape[0]), values.shape[1])
        rows = cupy.arange(unique.shape[0], dtype=cupy.int64)
        _sum_segments(cupy, values, segments, rows, out, accumulate=False)
        return torch.from_dlpack(unique), out


def hash_partition(
    indices: torch.Tensor, values: torch.Tensor, world_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CUDA version of reference.hash_partition: hash kernel, then a stable CuPy argsort."""
    indices = indices.contiguous()
    owners = torch.empty_like(indices)
    with _on_torch_stream(indices.device) as cupy:
        args = (
            _view(cupy, indices),
            np.int64(indices.shape[0]),
            np.uint64(seed_offset(seed)),
            np.uint64(world_size),
            _view(cupy, owners),
        )
        _launch("hash_owner", "hash_owner", indices.device, indices.shape[0], args)
        order = torch.from_dlpack(cupy.argsort(_view(cupy, owners)).astype(cupy.int64))
    counts = torch.bincount(owners, minlength=world_size)
    return indices.index_select(0, order), values.index_select(0, order), counts


def scatter_add_rows(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """CUDA version of reference.scatter_add_rows (float32: atomics; half: float32 segment sums)."""
    target = dense if dense.is_contiguous() else dense.contiguous()
    values, indices = values.contiguous(), indices.contiguous()
    with _on_torch_stream(dense.device) as cupy:
        if dense.dtype == torch.float32:
            args = (
                _view(cupy, target),
                _view(cupy, indices),
                _view(cupy, values),
                np.int64(values.shape[0]),
                np.int64(values.shape[1]),
            )
            _launch("scatter_add_rows", "scatter_add_rows_f32", dense.device, values.numel(), args)
        else:
            segments = _segments(cupy, indices)
            _sum_segments(cupy, values, segments, segments[1], target, accumulate=True)
    if target is not dense:
        dense.copy_(target)
    return dense
