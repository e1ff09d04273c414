"""sparse_allreduce over real gloo process groups (world 2 and 4) against dist.all_reduce.

Starting processes costs seconds, so each world size starts one group that runs every
case and writes one verdict per (case, rank); the tests below read those verdicts.
Values are small integers, so sums are exact and results must be equal, not close.
"""

from __future__ import annotations

import datetime
import json
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import kernels
from streamer.parallel import end_process, leave

ROWS, HIDDEN = 300, 16
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=20)


def integer_grad(rows: list[int], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    grad = torch.zeros(ROWS, HIDDEN, dtype=dtype)
    grad[rows] = torch.randint(-4, 5, (len(rows), HIDDEN), generator=generator).to(dtype)
    grad[rows, 0] = 1  # every listed row is non-zero
    return grad


def random_rows(rank: int, count: int) -> list[int]:
    return torch.randperm(ROWS, generator=torch.Generator().manual_seed(100 + rank))[:count].tolist()


def hot_rows(rank: int) -> list[int]:
    """A few rows every rank touches, plus a rank-specific tail: Zipf-like overlap."""
    return sorted({0, 1, 2, 3, 5, 8, 13, 21} | set(random_rows(rank, 20)))


# Each case builds one rank's gradient from (rank, world_size).
CASES: dict[str, Callable[[int, int], torch.Tensor]] = {
    "random_float32": lambda rank, world: integer_grad(random_rows(rank, 15), rank),
    "random_bfloat16": lambda rank, world: integer_grad(random_rows(rank, 15), rank, torch.bfloat16),
    "random_float16": lambda rank, world: integer_grad(random_rows(rank, 15), rank, torch.float16),
    "one_rank_without_rows": lambda rank, world: integer_grad([] if rank == 0 else random_rows(rank, 9), rank),
    "no_rank_has_rows": lambda rank, world: torch.zeros(ROWS, HIDDEN),
    "every_rank_same_rows": lambda rank, world: integer_grad([4, 77, 150, 299], rank),
    "all_rows_touched": lambda rank, world: integer_grad(list(range(ROWS)), rank),
    "hot_rows": lambda rank, world: integer_grad(hot_rows(rank), rank, torch.bfloat16),
}


def check_equal_to_all_reduce(case: str, rank: int, world: int) -> None:
    grad = CASES[case](rank, world)
    before = grad.clone()
    expected = grad.clone()
    dist.all_reduce(expected)
    stats: dict[str, int] = {}
    results = {
        "sparse_allreduce": kernels.sparse_allreduce(grad, stats=stats),
        "allgather_allreduce": kernels.allgather_allreduce(grad),
        "reused_output": kernels.ReusedOutputAllReduce()(grad),
    }
    assert torch.equal(grad, before), "the input was modified"
    for name, result in results.items():
        assert result.dtype == grad.dtype and torch.equal(result, expected), f"{name} differs from all_reduce"
    check_stats(grad, stats)


def check_stats(grad: torch.Tensor, stats: dict[str, int]) -> None:
    """Owners together aggregate every rank's rows, and own each distinct row once."""
    touched = torch.any(grad, dim=1).to(torch.int64)
    union = touched.clone()
    dist.all_reduce(union, op=dist.ReduceOp.MAX)
    totals = torch.tensor([stats["rows_received"], stats["rows_owned"], int(touched.sum())])
    dist.all_reduce(totals)
    assert totals[0] == totals[2], "owners did not receive every rank's rows"
    assert totals[1] == int(union.sum()), "distinct rows are not owned exactly once"


def check_candidate_rows(rank: int, world: int) -> None:
    """Given a superset of the touched rows (with repeats), only those rows are read."""
    rows = random_rows(rank, 12)
    grad = integer_grad(rows, rank)
    candidates = torch.tensor(rows + rows[:4] + random_rows(rank + world, 6))
    expected = grad.clone()
    dist.all_reduce(expected)
    assert torch.equal(kernels.sparse_allreduce(grad, candidate_rows=candidates), expected)
    assert torch.equal(kernels.allgather_allreduce(grad, candidate_rows=candidates), expected)
    assert torch.equal(kernels.ReusedOutputAllReduce()(grad, candidate_rows=candidates), expected)


def check_reused_output_across_steps(rank: int, world: int) -> None:
    """The reused buffer holds no rows of the previous step's sum."""
    reducer = kernels.ReusedOutputAllReduce()
    for step in range(3):
        grad = integer_grad(random_rows(rank + 10 * step, 10), rank + step)
        expected = grad.clone()
        dist.all_reduce(expected)
        assert torch.equal(reducer(grad), expected), f"step {step}"


def check_duplicate_rows(rank: int, world: int) -> None:
    """sparse_allreduce_rows sums repeated indices within and across ranks."""
    indices = torch.tensor([7, 7, rank, 7, 250])
    values = torch.arange(5 * 3, dtype=torch.float32).view(5, 3) + rank
    summed_indices, summed_values = kernels.sparse_allreduce_rows(indices, values)
    dense = torch.zeros(ROWS, 3).index_add_(0, indices, values)
    dist.all_reduce(dense)
    assert len(set(summed_indices.tolist())) == summed_indices.shape[0], "indices repeat in the result"
    assert torch.equal(torch.zeros(ROWS, 3).index_copy_(0, summed_indices, summed_values), dense)


def check_singleton_groups(rank: int, world: int) -> None:
    """A group of one rank needs no collective: the result is the input."""
    groups = [dist.new_group([member]) for member in range(world)]  # every rank creates every group
    grad = integer_grad(random_rows(rank, 5), rank)
    assert torch.equal(kernels.sparse_allreduce(grad, groups[rank]), grad)
    assert torch.equal(kernels.ReusedOutputAllReduce(groups[rank])(grad), grad)


def check_mismatched_rows_raise(rank: int, world: int) -> None:
    """A rank with more rows than its peers sends them indices they cannot hold."""
    rows = ROWS + 50 if rank == world - 1 else ROWS
    grad = torch.zeros(rows, HIDDEN)
    grad[-1] = 1.0
    try:
        kernels.sparse_allreduce(grad)
    except IndexError as error:
        assert (
            rank != world - 1
            and str(error) == f"row index {ROWS + 49} out of range for {ROWS} rows (valid: 0..{ROWS - 1})"
        )
    else:
        assert rank == world - 1, "an out-of-range index was accepted"


def check_gloo_all_to_all_single(rank: int, world: int) -> None:
    """gloo implements all_to_all_single for CPU tensors, uneven and empty splits included,
    so sparse_sync needs no fallback exchange (it would, were this to fail)."""
    send_splits = [(rank + peer) % 3 for peer in range(world)]  # some splits are 0
    recv_splits = [(peer + rank) % 3 for peer in range(world)]
    send = torch.tensor([rank * 100 + peer for peer in range(world) for _ in range(send_splits[peer])])
    received = torch.empty(sum(recv_splits), dtype=torch.int64)
    dist.all_to_all_single(received, send, recv_splits, send_splits)
    expected = [peer * 100 + rank for peer in range(world) for _ in range(recv_splits[peer])]
    assert received.tolist() == expected


CHECKS: dict[str, Callable[[int, int], None]] = {
    "gloo_all_to_all_single": check_gloo_all_to_all_single,
    **{case: lambda rank, world, case=case: check_equal_to_all_reduce(case, rank, world) for case in CASES},
    "duplicate_indices": check_duplicate_rows,
    "candidate_rows": check_candidate_rows,
    "reused_output_across_steps": check_reused_output_across_steps,
    "singleton_groups": check_singleton_groups,
    "index_out_of_range": check_mismatched_rows_raise,
}


def run_checks(rank: int, world: int, init_file: str, verdict_dir: str) -> None:
    torch.set_num_threads(1)
    # A rank whose check fails skips that check's remaining collectives; the timeout turns
    # the peers' wait into an error in that check instead of a hang.
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=COLLECTIVE_TIMEOUT
    )
    verdicts = {}
    for name, check in CHECKS.items():
        try:
            check(rank, world)
            verdicts[name] = "ok"
        except Exception:  # one failing case must not stop the others: report them all
            verdicts[name] = traceback.format_exc()
        dist.barrier()
    Path(verdict_dir, f"rank{rank}.json").write_text(json.dumps(verdicts))
    leave()  # all ranks together: see streamer.parallel.leave
    end_process()


@pytest.fixture(scope="module", params=(2, 4), ids=lambda world: f"world{world}")
def verdicts(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, str]]:
    world = request.param
    directory = tmp_path_factory.mktemp(f"world{world}")
    mp.spawn(run_checks, args=(world, str(directory / "init"), str(directory)), nprocs=world)
    return [json.loads((directory / f"rank{rank}.json").read_text()) for rank in range(world)]


@pytest.mark.parametrize("check", CHECKS)
def test_sparse_allreduce_across_processes(verdicts: list[dict[str, str]], check: str) -> None:
    failures = [f"rank {rank}:\n{result[check]}" for rank, result in enumerate(verdicts) if result[check] != "ok"]
    assert not failures, "\n".join(failures)
