"""PyTorch reference implementations of the row-sparse primitives.

These run on the CPU path of ``kernels`` and define the results the CUDA kernels
must reproduce. Callers go through ``kernels/__init__.py``, which validates inputs.

Half-precision values (bfloat16, float16) are summed in float32 and rounded once to
the input dtype: a hot embedding row can receive thousands of contributions, and
summing them in 8 mantissa bits (bf16) would lose most of them.
"""

from __future__ import annotations

import numpy as np
import torch

from kernels.checks import HALF_DTYPES
from kernels.hashing import owner_ranks

# Each element's bits with the sign cleared, repeated over an int64 word: a row is all
# zero (-0.0 included) exactly when the OR of its words, masked, is 0. NaN has bits set.
_WORD_MASKS = {4: np.int64(0x7FFFFFFF7FFFFFFF), 2: np.int64(0x7FFF7FFF7FFF7FFF)}
_ELEMENT_BITS = {4: (torch.int32, np.int32(0x7FFFFFFF)), 2: (torch.int16, np.int16(0x7FFF))}


def nonzero_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (ascending) and copies of the rows of ``grad`` that are not all zero.

    The scan reads every row of a mostly-zero tensor, so it is one bitwise-OR reduction
    over int64 words (NumPy; torch has no OR reduction) instead of a float comparison:
    11 ms instead of 96 ms for torch.any on a 50432 x 1024 float32 tensor on one core.
    -0.0 counts as zero and NaN as non-zero, like ``!= 0``.
    """
    element_size = grad.element_size()
    bits_dtype, element_mask = _ELEMENT_BITS[element_size]
    bits = grad.detach().contiguous().view(bits_dtype).numpy()
    if bits.shape[1] > 0 and bits.shape[1] * element_size % 8 == 0:
        words, mask = bits.view(np.int64), _WORD_MASKS[element_size]
    else:
        words, mask = bits, element_mask
    nonzero = (np.bitwise_or.reduce(words, axis=1) & mask) != 0
    indices = torch.from_numpy(np.flatnonzero(nonzero).astype(np.int64))
    return indices, grad.index_select(0, indices)


def coalesce_float32(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique indices and float32 sums of the rows sharing each index."""
    unique, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    sums = torch.zeros(unique.shape[0], values.shape[1], dtype=torch.float32, device=values.device)
    # index_add_ adds rows in input order, the order the CUDA segmented sum uses too.
    sums.index_add_(0, inverse, values.to(torch.float32))
    return unique, sums


def coalesce(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum rows sharing an index; output sorted by index, values in the input dtype."""
    unique, sums = coalesce_float32(indices, values)
    return unique, sums.to(values.dtype)


def hash_partition(
    indices: torch.Tensor, values: torch.Tensor, world_size: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows grouped by owner rank (stable within a group) and the row count per rank."""
    owners = owner_ranks(indices, world_size, seed).to(indices.device)
    order = torch.argsort(owners, stable=True)
    counts = torch.bincount(owners, minlength=world_size)
    return indices.index_select(0, order), values.index_select(0, order), counts


def scatter_add_rows(dense: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``dense[indices] += values`` in place with duplicate indices summed; returns ``dense``."""
    if dense.dtype not in HALF_DTYPES:
        return dense.index_add_(0, indices, values)
    # Sum duplicates in float32, then round each touched row once (see module docstring).
    unique, sums = coalesce_float32(indices, values)
    updated = dense.index_select(0, unique).to(torch.float32) + sums
    return dense.index_copy_(0, unique, updated.to(dense.dtype))
