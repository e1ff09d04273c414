"""Data parallelism for the streamer on `torch.distributed` (gloo on CPU, NCCL on CUDA).

Every rank streams every unit and runs its share of the batch. Each unit's flat buffer
is cut into `world` equal shards (the last padded); rank r keeps master weights and
AdamW state for shard r only, so host memory per rank falls as 1/world:

- gradients: `reduce_scatter` leaves each rank the sum of its shard (in place, in the
  unit's gradient buffer), divided by world to average the ranks' mean losses; a
  row-sparse embedding gradient goes through `kernels.sparse_allreduce` instead;
- weights: each rank updates its shard, writes it at its place in the slot, and an
  in-place `all_gather` fills in the other ranks' shards.

With world 1 every call is a no-op and the shard is the whole unit.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

# Newer PyTorch renames the tensor collectives; older releases (the GPU machine's) lack
# the new names.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True)
class Shard:
    start: int  # first element of the unit this rank owns
    stop: int  # one past the last owned element (clipped to the unit)
    size: int  # padded shard length: world x size >= the unit's numel


def shard_of(numel: int, rank: int, world: int) -> Shard:
    """Rank `rank`'s part of a unit of `numel` elements shared by `world` processes:
    equal contiguous pieces in rank order, the last ones clipped (a pure function, so a
    checkpoint's shards of another world size can be found again)."""
    size = -(-numel // world)
    start = min(numel, rank * size)
    return Shard(start, min(numel, start + size), size)


class DataParallel:
    def __init__(self, grad_sync: str = "sparse") -> None:
        self.active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.active else 0
        self.world = dist.get_world_size() if self.active else 1
        self.grad_sync = grad_sync

    def shard(self, numel: int) -> Shard:
        return shard_of(numel, self.rank, self.world)

    def padded(self, numel: int) -> int:
        """Buffer length that holds a unit and its shard padding."""
        return self.world * self.shard(numel).size

    def gather_weights(self, flat: torch.Tensor, numel: int) -> None:
        """Fill `flat` with every rank's shard; this rank's is already in place."""
        if self.world == 1:
            return
        shard = self.shard(numel)
        offset = self.rank * shard.size
        _all_gather(flat[: self.world * shard.size], flat[offset : offset + shard.size])

    def reduce_grad(self, flat: torch.Tensor, numel: int, sparse_rows: tuple[int, int] | None = None,
                    candidate_rows: torch.Tensor | None = None) -> torch.Tensor:
        """Average this unit's gradient over ranks; returns this rank's shard of it.

        `sparse_rows=(rows, cols)` marks a row-sparse gradient (a token embedding): it is
        summed by the hash-partitioned sparse all-reduce, which moves only touched rows;
        `candidate_rows` (the batch's token ids) are the only rows that can be non-zero.
        """
        shard = self.shard(numel)
        if self.world == 1:
            return flat[:numel]
        if sparse_rows is not None and self.grad_sync == "sparse":
            from kernels import sparse_allreduce

            rows, cols = sparse_rows
            table = flat[: rows * cols].view(rows, cols)
            summed = sparse_allreduce(table, candidate_rows=candidate_rows).view(-1)
            return summed[shard.start : shard.stop].div_(self.world)
        offset = self.rank * shard.size
        padded = flat[: self.world * shard.size]
        _reduce_scatter(padded[offset : offset + shard.size], padded)
        return padded[offset : offset + shard.stop - shard.start].div_(self.world)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            dist.all_reduce(value)
        return value

    def max(self, value: int, device: torch.device) -> int:
        """The largest of every rank's `value` (an all-reduce, hence also a barrier)."""
        if self.world == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())


def init_from_env(device: torch.device) -> bool:
    """Join the process group torchrun describes in the environment, if any; whether
    this call joined it (a caller that did must `leave` it)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def leave() -> None:
    """Leave the process group once a run has finished well, all ranks together.

    A rank that finished its last collective and exited while the lead rank was still
    writing the final weights aborted in its interpreter's teardown (SIGABRT,
    "terminate called without an active exception", from a C++ thread destroyed while
    joinable): 1 run in 5 of a 4-process tiny run on 2 cores. Meeting at a barrier
    and destroying the group before exit: 0 in 34. Not after an error: another rank
    may still be inside a collective, and destroying the group then can hang."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def end_process() -> NoReturn:
    """A rank of a multi-process run ends here, after `leave` and with its files
    closed: it skips the interpreter's teardown, where a C++ thread still destroyed
    while joinable aborted the process now and then even after `leave` (1 run in 15
    of a 2-process FSDP2 worker on 2 cores). Exit status 0: the work is done."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
