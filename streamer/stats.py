"""What one training step reports, whatever engine ran it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepStats:
    loss: float
    grad_norm: float
    skipped: bool = False  # a non-finite loss or gradient norm: no update was applied
    bytes_in: int = 0  # weights streamed host -> device
    bytes_out: int = 0  # gradients streamed device -> host
    stall_s: float = 0.0  # time compute waited for weights to arrive
    transfer_s: float = 0.0  # time the transfer worker spent moving bytes
    peak_device_bytes: int = 0
    # On CUDA, what the caching allocator held at its peak: allocated plus freed blocks it
    # kept (memory freed on one stream is reused by allocations on that stream only).
    peak_reserved_bytes: int = 0
