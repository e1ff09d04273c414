"""Sparse all-reduce of row-sparse gradients over a torch.distributed group.

[Note: two-phase sparse all-reduce]
A dense all-reduce moves every row of an embedding gradient although a step touches
about 1% of them. ``sparse_allreduce`` moves only non-zero rows, in two phases:

1. reduce-scatter by owner: each rank sends each non-zero row to the rank that owns
   its index (hash_partition; counts, then rows, through all_to_all_single), and each
   owner sums what it received (coalesce).
2. all-gather of the owners' sums: sizes first, then every pair of ranks swaps rows
   directly (no padding); the result is scattered into a dense zero tensor.

Owners come from a well-mixed hash, so hot (frequent-token) rows spread evenly and no
owner aggregates much more than the mean: ZEN's balancing argument.

Cost model, with n non-zero rows per rank, U distinct rows over all N ranks: a rank
sends (N - 1) / N * (n + U) rows here, and (N - 1) * n rows in the one-phase
``allgather_rows`` baseline, so the ratio is N * n / (n + U). Two phases win when
ranks share rows (U well below N * n, as with Zipf-distributed tokens and large N)
and lose slightly when they share none (U = N * n).

Rows travel as one byte buffer per exchange, [n, 8 + hidden * element_size]: the
int64 index then the values, so indices and values need one message, not two.

Gloo in torch 2.13 implements all_to_all_single for CPU tensors, uneven and empty
splits included (tests/test_kernels_dist.py checks it), so no fallback is needed for
phase 1. For CUDA tensors use NCCL.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kernels.checks import check_index_range, check_rows, check_sparse_rows
from kernels.rows import coalesce, hash_partition, nonzero_rows, scatter_add_rows

INDEX_BYTES = 8  # one int64 row index at the front of every packed row
COUNT_BYTES = 8  # one int64 count per peer in size exchanges

STAT_KEYS = ("bytes_sent", "rows_sent", "rows_received", "rows_owned")


def pack_rows(indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """uint8 [n, 8 + hidden * element_size]: each row's int64 index followed by its values."""
    count, row_bytes = indices.shape[0], values.shape[1] * values.element_size()
    if count == 0:  # dtype views of empty tensors can fail on their (arbitrary) strides
        return torch.empty(0, INDEX_BYTES + row_bytes, dtype=torch.uint8, device=values.device)
    index_bytes = indices.contiguous().view(torch.uint8).view(count, INDEX_BYTES)
    value_bytes = values.contiguous().view(torch.uint8).view(count, row_bytes)
    return torch.cat([index_bytes, value_bytes], dim=1)


def unpack_rows(packed: torch.Tensor, dtype: torch.dtype, hidden: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of pack_rows."""
    count = packed.shape[0]
    if count == 0:
        return packed.new_empty(0, dtype=torch.int64), packed.new_empty(0, hidden, dtype=dtype)
    # Flatten before the dtype view: a column slice's row stride (8 + row bytes) need not
    # be a multiple of 8, which a dtype view of a 2-D slice would require.
    indices = packed[:, :INDEX_BYTES].reshape(-1).view(torch.int64)
    values = packed[:, INDEX_BYTES:].reshape(-1).view(dtype).view(count, hidden)
    return indices, values


def _world_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def _new_stats(stats: dict[str, int] | None) -> dict[str, int]:
    """The caller's stats dict (reset) or a private one; keys are STAT_KEYS."""
    stats = {} if stats is None else stats
    stats.update(dict.fromkeys(STAT_KEYS, 0))
    return stats


def _send_to_owners(
    indices: torch.Tensor, values: torch.Tensor, group: dist.ProcessGroup | None, seed: int, stats: dict
) -> torch.Tensor:
    """Phase 1 exchange: every row goes to its owner; returns the packed rows this rank owns."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    indices, values, send_counts = hash_partition(indices, values, world, seed)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send_splits, recv_splits = send_counts.tolist(), recv_counts.tolist()
    packed = pack_rows(indices, values)
    received = packed.new_empty(sum(recv_splits), packed.shape[1])
    dist.all_to_all_single(received, packed, recv_splits, send_splits, group=group)
    rows_to_peers = sum(send_splits) - send_splits[rank]
    stats["bytes_sent"] += COUNT_BYTES * (world - 1) + rows_to_peers * packed.shape[1]
    stats["rows_sent"] += rows_to_peers
    stats["rows_received"] += received.shape[0]
    return received


def _all_gather_rows(packed: torch.Tensor, group: dist.ProcessGroup | None, stats: dict) -> torch.Tensor:
    """All ranks' packed rows, concatenated in rank order.

    Sizes go first; then every pair of ranks swaps its rows directly (batch_isend_irecv),
    which needs no padding. gloo's all_gather is a ring, N - 1 store-and-forward hops
    one after the other: 17 ms for 2 MB per rank among 4 ranks on 2 cores, against 9 ms
    for the concurrent pairwise sends. The sizes travel by all_to_all_single for the
    same reason (gloo's all_to_all is direct pairwise exchange).
    """
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    sizes = torch.empty(world, dtype=torch.int64, device=packed.device)
    dist.all_to_all_single(sizes, torch.full_like(sizes, packed.shape[0]), group=group)
    counts = sizes.tolist()
    gathered = [packed if peer == rank else packed.new_empty(counts[peer], packed.shape[1]) for peer in range(world)]
    operations = []
    for peer in range(world):
        peer_global = peer if group is None else dist.get_global_rank(group, peer)
        if peer != rank and counts[rank] > 0:  # both sides know the sizes: skip empty messages
            operations.append(dist.P2POp(dist.isend, packed, peer_global, group))
        if peer != rank and counts[peer] > 0:
            operations.append(dist.P2POp(dist.irecv, gathered[peer], peer_global, group))
    for request in dist.batch_isend_irecv(operations) if operations else ():
        request.wait()
    stats["bytes_sent"] += (COUNT_BYTES + packed.numel()) * (world - 1)
    return torch.cat(gathered)


def sparse_allreduce_rows(
    indices: torch.Tensor,
    values: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    seed: int = 0,
    stats: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of row-sparse tensors (indices [n], values [n, hidden]) over ``group``.

    Indices may repeat within and across ranks. Returns every rank the same (indices,
    values) with each index once, grouped by owner rank and ascending within an owner.
    This is the two-phase exchange of the module note; ``stats`` as in sparse_allreduce.
    """
    check_sparse_rows(indices, values)
    check_index_range(indices)
    stats = _new_stats(stats)
    if _world_size(group) == 1:
        indices, values = coalesce(indices, values)
        stats["rows_received"] = stats["rows_owned"] = indices.shape[0]
        return indices, values
    received = _send_to_owners(indices, values, group, seed, stats)
    owned_indices, owned_values = coalesce(*unpack_rows(received, values.dtype, values.shape[1]))
    stats["rows_owned"] = owned_indices.shape[0]
    gathered = _all_gather_rows(pack_rows(owned_indices, owned_values), group, stats)
    return unpack_rows(gathered, values.dtype, values.shape[1])


def allgather_rows(
    indices: torch.Tensor,
    values: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    stats: dict[str, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Baseline exchange: every rank's rows, concatenated in rank order (duplicates kept).

    One phase instead of two, but each rank receives every other rank's rows, so a row
    touched by all N ranks arrives N - 1 times. Scatter-add the result to sum it.
    ``stats``: ``rows_received`` counts every gathered row, ``rows_owned`` the distinct ones.
    """
    check_sparse_rows(indices, values)
    check_index_range(indices)
    stats = _new_stats(stats)
    world = _world_size(group)
    packed = pack_rows(indices, values)
    gathered = _all_gather_rows(packed, group, stats) if world > 1 else packed
    stats["rows_sent"] = indices.shape[0] * (world - 1)
    stats["rows_received"] = gathered.shape[0]
    gathered_indices, gathered_values = unpack_rows(gathered, values.dtype, values.shape[1])
    stats["rows_owned"] = int(torch.unique(gathered_indices).shape[0])
    return gathered_indices, gathered_values


def touched_rows(grad: torch.Tensor, candidate_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """nonzero_rows(grad), reading only ``candidate_rows`` when they are given.

    Finding the non-zero rows of a dense gradient reads all of it (206 MB for a
    50432 x 1024 float32 embedding), which can cost more than the sparse exchange. A
    caller that knows a superset of the touched rows (an embedding's gradient is zero
    outside the batch's token ids) passes it as ``candidate_rows`` (int64, repeats
    allowed) and only those rows are read; rows outside it must be zero.
    """
    if candidate_rows is None:
        return nonzero_rows(grad)
    candidates = torch.unique(candidate_rows)
    check_index_range(candidates, grad.shape[0])
    local_indices, values = nonzero_rows(grad.index_select(0, candidates))
    return candidates.index_select(0, local_indices), values


def sparse_allreduce(
    grad: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    seed: int = 0,
    stats: dict[str, int] | None = None,
    candidate_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense sum of ``grad`` [rows, hidden] over ``group``, moving only non-zero rows.

    Equals ``dist.all_reduce`` of the dense tensors (exactly when the sums are exact,
    e.g. integer-valued floats; otherwise up to summation order, and half types are
    summed in float32 and rounded once). ``grad`` is left unchanged; the result is a
    fresh tensor. With one rank (or no initialised process group) it is ``grad.clone()``.
    Every rank must pass the same shape and dtype, as for ``dist.all_reduce``.

    If ``stats`` is a dict it is filled with this rank's ``bytes_sent`` (payload bytes
    to other ranks, counts and padding included), ``rows_sent``, ``rows_received``
    (rows this rank aggregated as owner) and ``rows_owned`` (distinct rows it owns).
    ``candidate_rows``: see touched_rows.
    """
    check_rows(grad, "grad")
    if _world_size(group) == 1:
        _new_stats(stats)
        return grad.clone()
    indices, values = touched_rows(grad, candidate_rows)
    indices, values = sparse_allreduce_rows(indices, values, group, seed=seed, stats=stats)
    out = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
    return scatter_add_rows(out, indices, values)


def allgather_allreduce(
    grad: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    *,
    stats: dict[str, int] | None = None,
    candidate_rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Baseline for sparse_allreduce: all-gather every rank's non-zero rows, add them locally."""
    check_rows(grad, "grad")
    if _world_size(group) == 1:
        _new_stats(stats)
        return grad.clone()
    indices, values = allgather_rows(*touched_rows(grad, candidate_rows), group, stats=stats)
    out = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
    return scatter_add_rows(out, indices, values)


class ReusedOutputAllReduce:
    """A sparse all-reduce that writes every step into one output buffer.

    A fresh dense zero tensor per step costs more than the sparse exchange itself on a
    CPU: zeroing a new 50432 x 1024 float32 tensor page-faults 206 MB (about 130 ms on
    one core, against about 20 ms for the exchange). So the buffer is allocated once
    and, before each step, only the rows the previous step wrote are zeroed again.

    The returned tensor is the buffer: the next call overwrites it. ``method`` is
    "hash_partition" (sparse_allreduce_rows) or "allgather" (allgather_rows).
    """

    def __init__(
        self, group: dist.ProcessGroup | None = None, *, method: str = "hash_partition", seed: int = 0
    ) -> None:
        if method not in ("hash_partition", "allgather"):
            raise ValueError(f"method must be 'hash_partition' or 'allgather', got {method!r}")
        self.group, self.method, self.seed = group, method, seed
        self._out: torch.Tensor | None = None
        self._written_rows: torch.Tensor | None = None  # rows of _out that may be non-zero

    def _zeroed_output(self, grad: torch.Tensor) -> torch.Tensor:
        reusable = self._out is not None and (self._out.shape, self._out.dtype, self._out.device) == (
            grad.shape,
            grad.dtype,
            grad.device,
        )
        if not reusable:
            self._out = torch.zeros(grad.shape, dtype=grad.dtype, device=grad.device)
        elif self._written_rows is not None:
            self._out.index_fill_(0, self._written_rows, 0)
        self._written_rows = None
        return self._out

    def __call__(
        self,
        grad: torch.Tensor,
        stats: dict[str, int] | None = None,
        candidate_rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The dense sum of ``grad`` over the group, in the reused buffer (see touched_rows)."""
        check_rows(grad, "grad")
        out = self._zeroed_output(grad)
        indices, values = touched_rows(grad, candidate_rows)
        if self.method == "hash_partition":
            indices, values = sparse_allreduce_rows(indices, values, self.group, seed=self.seed, stats=stats)
        else:
            indices, values = allgather_rows(indices, values, self.group, stats=stats)
        self._written_rows = indices
        return scatter_add_rows(out, indices, values)
