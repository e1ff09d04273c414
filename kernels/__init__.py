"""Row-sparse gradient primitives and a load-balanced sparse all-reduce.

Embedding gradients are row-sparse, and the rows they touch follow the Zipf-like
frequencies of tokens. Following ZEN (OSDI 2023), rows are partitioned
over ranks by a well-mixed hash of the row index so every rank aggregates a similar
share, then each owner's summed rows are shared with everyone.

Each primitive dispatches on the tensor's device: CuPy raw kernels for CUDA tensors
(kernels/cuda.py, CuPy imported lazily) and the PyTorch reference otherwise
(kernels/reference.py). Both give the same results; float32, bfloat16 and float16
values are supported and half-precision sums are accumulated in float32.

Beside them, kernels/compact.py holds the compact state formats' AdamW step and
gradient coding as one CUDA kernel each (streamer.state calls them), and
kernels/emulate.py runs a kernel's CUDA source on the host, so that a machine without a
GPU checks it against the PyTorch reference.
"""

from __future__ import annotations

from kernels.rows import coalesce, hash_partition, nonzero_rows, scatter_add_rows
from kernels.sparse_sync import (
    ReusedOutputAllReduce,
    allgather_allreduce,
    allgather_rows,
    sparse_allreduce,
    sparse_allreduce_rows,
    touched_rows,
)

__all__ = [
    "ReusedOutputAllReduce",
    "allgather_allreduce",
    "allgather_rows",
    "coalesce",
    "hash_partition",
    "nonzero_rows",
    "scatter_add_rows",
    "sparse_allreduce",
    "sparse_allreduce_rows",
    "touched_rows",
]
