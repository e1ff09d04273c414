"""Input checks shared by the CPU reference and the CUDA path, so both fail the same way."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HALF_DTYPES = (torch.bfloat16, torch.float16)


def check_rows(values: torch.Tensor, name: str) -> None:
    """``values`` must be a 2-D [rows, hidden] tensor of a supported float dtype."""
    if values.dim() != 2:
        raise ValueError(f"{name} must be 2-D [rows, hidden], got shape {tuple(values.shape)}")
    if values.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} dtype {values.dtype} unsupported; use float32, bfloat16 or float16")


def check_sparse_rows(indices: torch.Tensor, values: torch.Tensor) -> None:
    """``indices`` int64 [n] on the same device as ``values`` [n, hidden]."""
    check_rows(values, "values")
    if indices.dim() != 1 or indices.dtype != torch.int64:
        raise TypeError(f"indices must be 1-D int64, got {indices.dtype} of shape {tuple(indices.shape)}")
    if indices.shape[0] != values.shape[0]:
        raise ValueError(f"{indices.shape[0]} indices for {values.shape[0]} value rows")
    if indices.device != values.device:
        raise ValueError(f"indices on {indices.device} but values on {values.device}")


def check_index_range(indices: torch.Tensor, num_rows: int | None = None) -> None:
    """Raise IndexError if an index is negative or, when ``num_rows`` is given, >= num_rows.

    On CUDA this costs one device-to-host sync; a silent out-of-bounds write in a
    kernel would corrupt memory instead.
    """
    if indices.numel() == 0:
        return
    low, high = int(indices.min()), int(indices.max())
    if low < 0:
        raise IndexError(f"row index {low} is negative; indices must be >= 0")
    if num_rows is not None and high >= num_rows:
        raise IndexError(f"row index {high} out of range for {num_rows} rows (valid: 0..{num_rows - 1})")
