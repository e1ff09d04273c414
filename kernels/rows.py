"""The row-sparse primitives, validated and dispatched on the tensor's device.

CUDA tensors go to the CuPy kernels (kernels/cuda.py, imported on first use so CPU
machines need no CuPy); everything else to the PyTorch reference (kernels/reference.py).
"""

from __future__ import annotations

from types import ModuleType

import torch

from kernels import reference
from kernels.checks import check_index_range, check_rows, check_sparse_rows


def _backend(tensor: torch.Tensor) -> ModuleType:
    if tensor.is_cuda:
        from kernels import cuda

        return cuda
    return reference


def nonzero_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact the rows of ``grad`` [rows, hidden] that are not all zero.

    Returns (indices int64 [n] ascending, values [n, hidden] copies). -0.0 counts as
    zero, NaN as non-zero.
    """
    check_rows(grad, "grad")
    return _backend(grad).nonzero_rows(grad)


def coalesce(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum the rows sharing an index; returns (unique indices ascending, summed values).

    Sums are accumulated in float32 and returned in the values' dtype.
    """
    check_sparse_rows(indices, values)
    check_index_range(indices)
    return _backend(values).coalesce(indices, values)


def hash_partition(
    indices: torch.Tensor, values: torch.Tensor, world_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group rows by owner rank: owner = splitmix64(index, seed) mod world_size.

    Returns (indices, values, counts int64 [world_size]); rows of rank r come before
    those of rank r + 1 and keep their input order. Owners are bit-identical on CPU and
    GPU (kernels/hashing.py).
    """
    check_sparse_rows(indices, values)
    check_index_range(indices)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    return _backend(values).hash_partition(indices, values, world_size, seed)


def scatter_add_rows(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``dense[indices] += values`` in place, duplicate indices summed; returns ``dense``.

    float32 adds directly (atomicAdd on GPU); half types sum duplicates in float32 and
    round each touched row once.
    """
    check_rows(dense, "dense")
    check_sparse_rows(indices, values)
    if values.dtype != dense.dtype or values.shape[1] != dense.shape[1] or values.device != dense.device:
        raise ValueError(
            f"values {values.dtype} [*, {values.shape[1]}] on {values.device} do not match "
            f"dense {dense.dtype} [*, {dense.shape[1]}] on {dense.device}"
        )
    check_index_range(indices, dense.shape[0])
    return _backend(dense).scatter_add_rows(dense, indices, values)
