"""kernels/: the row-sparse primitives against naive dense computations, the owner hash,
NVRTC compilation of every CUDA kernel on a CPU machine, the compact AdamW kernel run
through the host emulation against the PyTorch ops, and the CuPy paths on a GPU.

Values are small integers so that every sum is exact in float32, bfloat16 and float16,
and results can be compared with torch.equal rather than a tolerance.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import kernels
from kernels import reference
from kernels.cuda_sources import KERNEL_NAMES, SOURCES
from kernels.hashing import mix64_python, owner_ranks
from kernels.sparse_sync import pack_rows, unpack_rows
from streamer.optim import OptimConfig

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DENSITIES = (0.0, 0.01, 0.5, 1.0)
SHAPES = ((1, 1), (64, 8), (300, 33))

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def sparse_grad(
    rows: int, hidden: int, density: float, dtype: torch.dtype, seed: int = 0, device: str = "cpu"
) -> torch.Tensor:
    """A [rows, hidden] tensor with round(density * rows) rows of small non-zero integers."""
    generator = torch.Generator().manual_seed(seed)
    grad = torch.zeros(rows, hidden, dtype=dtype)
    touched = torch.randperm(rows, generator=generator)[: round(density * rows)]
    values = torch.randint(1, 5, (touched.shape[0], hidden), generator=generator)
    signs = torch.randint(0, 2, values.shape, generator=generator) * 2 - 1
    grad[touched] = (values * signs).to(dtype)
    return grad.to(device)


def random_rows(
    count: int, num_rows: int, hidden: int, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` (index, value-row) pairs with duplicate indices, integer values."""
    generator = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, num_rows, (count,), generator=generator)
    values = torch.randint(-3, 4, (count, hidden), generator=generator).to(dtype)
    return indices, values


def naive_dense_sum(indices: torch.Tensor, values: torch.Tensor, num_rows: int) -> torch.Tensor:
    dense = torch.zeros(num_rows, values.shape[1], dtype=torch.float64)
    for index, row in zip(indices.tolist(), values.to(torch.float64), strict=True):
        dense[index] += row
    return dense


# --- nonzero_rows ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nonzero_rows_matches_naive(shape: tuple[int, int], density: float, dtype: torch.dtype) -> None:
    grad = sparse_grad(*shape, density, dtype)
    indices, values = kernels.nonzero_rows(grad)
    expected = [row for row in range(shape[0]) if bool((grad[row] != 0).any())]
    assert indices.dtype == torch.int64 and indices.tolist() == expected
    assert values.dtype == dtype and torch.equal(values, grad[expected])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", (1, 3, 4, 33))
def test_nonzero_rows_negative_zero_is_zero_and_nan_is_not(dtype: torch.dtype, hidden: int) -> None:
    grad = torch.zeros(6, hidden, dtype=dtype)
    grad[1] = -0.0
    grad[2, -1] = float("nan")
    grad[3, 0] = -1.0
    grad[4, hidden // 2] = float("inf")
    assert kernels.nonzero_rows(grad)[0].tolist() == [2, 3, 4]


def test_nonzero_rows_handles_views_and_empty_hidden() -> None:
    grad = sparse_grad(40, 10, 0.5, torch.float32)
    columns = grad[:, 2:7]  # not contiguous
    expected = [row for row in range(40) if bool((columns[row] != 0).any())]
    assert kernels.nonzero_rows(columns)[0].tolist() == expected
    assert kernels.nonzero_rows(torch.zeros(5, 0))[0].numel() == 0


# --- coalesce -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", (0, 1, 7, 500))
def test_coalesce_matches_naive(dtype: torch.dtype, count: int) -> None:
    indices, values = random_rows(count, num_rows=50, hidden=12, dtype=dtype)
    unique, sums = kernels.coalesce(indices, values)
    dense = naive_dense_sum(indices, values, 50)
    assert unique.tolist() == sorted(set(indices.tolist()))
    assert sums.dtype == dtype and torch.equal(sums.to(torch.float64), dense[unique])


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16))
def test_coalesce_accumulates_half_types_in_float32(dtype: torch.dtype) -> None:
    # 256 + 1 + 1 + ... is stuck at 256 when summed in bfloat16 (spacing 2 there) and at
    # 2048 in float16 (spacing 2 there); in float32 the 16 ones all count.
    big = 256.0 if dtype == torch.bfloat16 else 2048.0
    values = torch.tensor([[big]] + [[1.0]] * 16, dtype=dtype)
    _, sums = kernels.coalesce(torch.zeros(17, dtype=torch.int64), values)
    assert sums.item() == big + 16


# --- hash_partition and the owner hash --------------------------------------------------


@pytest.mark.parametrize("world_size", (1, 2, 3, 8))
@pytest.mark.parametrize("dtype", DTYPES)
def test_hash_partition_groups_rows_stably_by_owner(world_size: int, dtype: torch.dtype) -> None:
    indices, values = random_rows(200, num_rows=1000, hidden=5, dtype=dtype, seed=world_size)
    parted_indices, parted_values, counts = kernels.hash_partition(indices, values, world_size, seed=7)
    owners = [mix64_python(index, 7) % world_size for index in indices.tolist()]
    expected_order = sorted(range(200), key=lambda row: owners[row])  # sorted() is stable
    assert parted_indices.tolist() == indices[expected_order].tolist()
    assert torch.equal(parted_values, values[expected_order])
    assert counts.dtype == torch.int64
    assert counts.tolist() == [owners.count(rank) for rank in range(world_size)]


def test_owner_hash_is_the_splitmix64_specification() -> None:
    edge_indices = [0, 1, 2, 255, 256, 50431, 2**31 - 1, 2**31, 2**32 + 5, 2**62, 2**63 - 1]
    for seed in (0, 1, 12345, 2**64 - 1):
        owners = owner_ranks(torch.tensor(edge_indices), 1_000_003, seed)
        assert owners.tolist() == [mix64_python(index, seed) % 1_000_003 for index in edge_indices]
    # splitmix64's published first output for state 0 is its finaliser applied to 0 + gamma.
    assert mix64_python(0) == 0xE220A8397B1DCDAF


def zipf_touched_rows(ranks: int, rows_per_rank: int, vocab: int, seed: int) -> list[np.ndarray]:
    """Distinct Zipf(1.1) token ids per rank: a few hot ids shared by all, a long tail."""
    rng = np.random.default_rng(seed)
    probabilities = 1.0 / np.arange(1, vocab + 1) ** 1.1
    probabilities /= probabilities.sum()
    touched = []
    for _ in range(ranks):
        draws = rng.choice(vocab, size=rows_per_rank * 4, p=probabilities)
        touched.append(np.unique(draws))
    return touched


def owner_load_imbalance(touched: list[np.ndarray], world_size: int, seed: int) -> float:
    """max/mean of the rows each owner aggregates (every rank sends its distinct rows once)."""
    loads = torch.zeros(world_size, dtype=torch.int64)
    for rows in touched:
        loads += torch.bincount(owner_ranks(torch.from_numpy(rows), world_size, seed), minlength=world_size)
    return float(loads.max()) / float(loads.double().mean())


@pytest.mark.parametrize("world_size", (4, 8, 16))
def test_hash_balances_zipf_rows_across_owners(world_size: int) -> None:
    touched = zipf_touched_rows(ranks=world_size, rows_per_rank=20_000, vocab=50_432, seed=0)
    assert owner_load_imbalance(touched, world_size, seed=0) < 1.08
    # Contiguous index ranges, the obvious alternative, put the hot low ids on rank 0.
    loads = np.bincount(np.concatenate(touched) * world_size // 50_432, minlength=world_size)
    assert loads.max() / loads.mean() > 1.5


def test_hash_is_deterministic_given_seed() -> None:
    indices = torch.arange(10_000)
    assert torch.equal(owner_ranks(indices, 8, seed=3), owner_ranks(indices, 8, seed=3))
    changed = (owner_ranks(indices, 8, seed=3) != owner_ranks(indices, 8, seed=4)).double().mean()
    assert 0.8 < changed < 0.95  # a new seed reassigns about 7/8 of the rows


# --- scatter_add_rows -------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", (0, 1, 40, 400))
def test_scatter_add_rows_matches_naive(dtype: torch.dtype, count: int) -> None:
    indices, values = random_rows(count, num_rows=60, hidden=9, dtype=dtype, seed=count)
    start = sparse_grad(60, 9, 0.5, dtype, seed=1)
    dense = start.clone()
    assert kernels.scatter_add_rows(dense, indices, values) is dense
    expected = start.to(torch.float64) + naive_dense_sum(indices, values, 60)
    assert torch.equal(dense.to(torch.float64), expected)


def test_scatter_add_rows_into_a_view_updates_the_base() -> None:
    base = torch.zeros(10, 8)
    kernels.scatter_add_rows(base[:, 2:5], torch.tensor([3, 3]), torch.ones(2, 3))
    assert base[3].tolist() == [0, 0, 2, 2, 2, 0, 0, 0] and base.sum() == 6


# --- errors -------------------------------------------------------------------------------


def test_index_out_of_range_is_one_clear_line() -> None:
    dense = torch.zeros(64, 4)
    with pytest.raises(IndexError, match=r"^row index 70 out of range for 64 rows \(valid: 0..63\)$"):
        kernels.scatter_add_rows(dense, torch.tensor([1, 70]), torch.ones(2, 4))
    with pytest.raises(IndexError, match="^row index -1 is negative"):
        kernels.scatter_add_rows(dense, torch.tensor([-1]), torch.ones(1, 4))
    with pytest.raises(IndexError, match="negative"):
        kernels.coalesce(torch.tensor([2, -5]), torch.ones(2, 4))
    with pytest.raises(IndexError, match="negative"):
        kernels.hash_partition(torch.tensor([-5]), torch.ones(1, 4), 2)
    assert dense.count_nonzero() == 0  # nothing was written before the check


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(TypeError, match="unsupported"):
        kernels.nonzero_rows(torch.zeros(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="2-D"):
        kernels.nonzero_rows(torch.zeros(3))
    with pytest.raises(TypeError, match="int64"):
        kernels.coalesce(torch.tensor([1, 2], dtype=torch.int32), torch.ones(2, 4))
    with pytest.raises(ValueError, match="3 indices for 2 value rows"):
        kernels.coalesce(torch.tensor([1, 2, 3]), torch.ones(2, 4))
    with pytest.raises(ValueError, match="do not match"):
        kernels.scatter_add_rows(torch.zeros(5, 4), torch.tensor([1]), torch.ones(1, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="world_size"):
        kernels.hash_partition(torch.tensor([1]), torch.ones(1, 4), 0)
    with pytest.raises(ValueError, match="seed"):
        kernels.hash_partition(torch.tensor([1]), torch.ones(1, 4), 2, seed=-1)


# --- packing and the single-process all-reduce ---------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", (0, 1, 9))
@pytest.mark.parametrize("hidden", (1, 3, 4))
def test_pack_rows_round_trips(dtype: torch.dtype, count: int, hidden: int) -> None:
    indices, values = random_rows(count, num_rows=2**40, hidden=hidden, dtype=dtype)
    unpacked_indices, unpacked_values = unpack_rows(pack_rows(indices, values), dtype, hidden)
    assert torch.equal(unpacked_indices, indices) and torch.equal(unpacked_values, values)


def test_sparse_allreduce_without_process_group_is_a_copy() -> None:
    grad = sparse_grad(30, 4, 0.3, torch.bfloat16)
    stats: dict[str, int] = {}
    result = kernels.sparse_allreduce(grad, stats=stats)
    assert torch.equal(result, grad) and result.data_ptr() != grad.data_ptr()
    assert stats["bytes_sent"] == 0


def test_touched_rows_reads_only_candidates() -> None:
    grad = sparse_grad(50, 6, 0.2, torch.float32, seed=3)
    touched = kernels.nonzero_rows(grad)[0]
    candidates = torch.cat([touched, touched[:3], torch.tensor([0, 49])])  # repeats, extra zero rows
    indices, values = kernels.touched_rows(grad, candidates)
    assert torch.equal(indices, touched) and torch.equal(values, grad[touched])
    with pytest.raises(IndexError, match="out of range for 50 rows"):
        kernels.touched_rows(grad, torch.tensor([50]))


def test_import_does_not_need_cupy() -> None:
    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "import torch, kernels\n"
        "assert kernels.nonzero_rows(torch.eye(3))[0].tolist() == [0, 1, 2]\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --- CUDA sources through NVRTC, no GPU needed ---------------------------------------------


@pytest.fixture(scope="module")
def nvrtc_library() -> None:
    from kernels import nvrtc

    try:
        nvrtc.load_library()
    except nvrtc.NvrtcUnavailableError as error:
        pytest.skip(f"NVRTC cannot be loaded: {error}")


@pytest.mark.parametrize("arch", ("sm_80", "sm_90"))
def test_every_kernel_compiles_to_ptx(nvrtc_library: None, arch: str) -> None:
    from kernels.cuda import compile_all

    compiled = compile_all(arch)
    assert set(compiled) == set(SOURCES)
    for name, ptx in compiled.items():
        assert f".target {arch}".encode() in ptx, name
        for kernel in KERNEL_NAMES[name]:
            assert f".entry {kernel}(".encode() in ptx


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_kernel_assembles_to_cubin(nvrtc_library: None, name: str) -> None:
    # A CUBIN runs the PTX assembler too, which checks the inline PTX of the half conversions.
    from kernels import nvrtc
    from kernels.cuda_sources import OPTIONS

    assert nvrtc.compile_source(SOURCES[name], name, "sm_90", output="cubin", options=OPTIONS.get(name, ()))[:4] \
        == b"\x7fELF"


def test_compile_errors_carry_the_log(nvrtc_library: None) -> None:
    from kernels import nvrtc

    with pytest.raises(nvrtc.NvrtcCompileError, match="broken failed to compile for sm_90"):
        nvrtc.compile_source('extern "C" __global__ void f() { undeclared(); }', "broken")


# --- CuPy kernels on a GPU, against the reference ------------------------------------------


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", (*SHAPES, (5000, 1024)))
def test_gpu_nonzero_rows_matches_reference(shape: tuple[int, int], density: float, dtype: torch.dtype) -> None:
    grad = sparse_grad(*shape, density, dtype)
    grad[0] = -0.0  # a row of negative zeros stays a zero row on the GPU too
    indices, values = kernels.nonzero_rows(grad.cuda())
    expected_indices, expected_values = reference.nonzero_rows(grad)
    assert indices.is_cuda and torch.equal(indices.cpu(), expected_indices)
    assert torch.equal(values.cpu(), expected_values)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", (0, 1, 500, 20_000))
def test_gpu_coalesce_matches_reference(dtype: torch.dtype, count: int) -> None:
    indices, values = random_rows(count, num_rows=300, hidden=70, dtype=dtype)
    unique, sums = kernels.coalesce(indices.cuda(), values.cuda())
    expected_unique, expected_sums = reference.coalesce(indices, values)
    assert torch.equal(unique.cpu(), expected_unique) and torch.equal(sums.cpu(), expected_sums)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("world_size", (1, 3, 8))
@pytest.mark.parametrize("count", (0, 1, 5000))
def test_gpu_hash_partition_matches_reference_bit_for_bit(world_size: int, count: int) -> None:
    indices = torch.randint(0, 2**62, (count,), generator=torch.Generator().manual_seed(count))
    values = torch.arange(count * 3, dtype=torch.float32).view(count, 3)
    result = kernels.hash_partition(indices.cuda(), values.cuda(), world_size, seed=99)
    expected = reference.hash_partition(indices, values, world_size, seed=99)
    for got, want in zip(result, expected, strict=True):
        assert torch.equal(got.cpu(), want)


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("count", (0, 1, 400, 20_000))
def test_gpu_scatter_add_rows_matches_reference(dtype: torch.dtype, count: int) -> None:
    indices, values = random_rows(count, num_rows=600, hidden=33, dtype=dtype)
    start = sparse_grad(600, 33, 0.5, dtype, seed=2)
    dense = start.cuda()
    kernels.scatter_add_rows(dense, indices.cuda(), values.cuda())
    assert torch.equal(dense.cpu(), reference.scatter_add_rows(start.clone(), indices, values))


@pytest.mark.gpu
@requires_gpu
def test_gpu_out_of_range_index_raises() -> None:
    with pytest.raises(IndexError, match="out of range for 4 rows"):
        kernels.scatter_add_rows(
            torch.zeros(4, 2, device="cuda"), torch.tensor([4], device="cuda"), torch.ones(1, 2, device="cuda")
        )


# --- the row-sparse kernels' CUDA source, run on the host ----------------------------------
# kernels/emulate.py compiles each kernel's own text for the host; these check the raw
# kernels (their indexing, block votes, atomics and half conversions) against the
# reference, without the CuPy sorting and compaction around them (the GPU tests below
# check the whole primitives).

ROWS = ("const {bits}* rows", "int64 num_rows", "int64 hidden", "unsigned char* flags")
SEGMENTS = ("const {t}* values", "const int64* order", "const int64* segment_starts", "int64 num_segments",
            "int64 hidden", "const int64* out_rows", "int accumulate", "{t}* out")


def _params(spec: tuple[str, ...], **types: str) -> tuple[tuple[str, str], ...]:
    return tuple(tuple(part.format(**types).rsplit(" ", 1)) for part in spec)  # type: ignore[misc]


def _emulate(module: str, kernel: str, params: tuple[tuple[str, str], ...], args: dict, grid: int = 3,
             block: int = 64) -> None:
    from kernels import emulate

    emulate.launch(SOURCES[module], kernel, params, grid, block, args)


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int32 if tensor.dtype == torch.float32 else torch.int16)


@pytest.mark.parametrize("dtype", DTYPES)
def test_row_flags_kernel_votes_as_the_reference_in_host_emulation(host_compiler: None, dtype: torch.dtype) -> None:
    """One block per row, its threads voting with __syncthreads_or: -0.0 is zero, NaN is not."""
    grad = sparse_grad(300, 33, 0.2, dtype, seed=4)
    empty = (grad == 0).all(1).nonzero().flatten()  # rows no value touched
    signed_zero, nan = int(empty[0]), int(empty[1])
    grad[signed_zero, 5], grad[nan, 32] = -0.0, float("nan")
    flags = torch.zeros(300, dtype=torch.uint8)
    suffix, bits = ("b32", "unsigned int") if dtype == torch.float32 else ("b16", "unsigned short")
    _emulate("row_nonzero_flags", f"row_nonzero_flags_{suffix}", _params(ROWS, bits=bits),
             {"rows": _bits(grad), "num_rows": 300, "hidden": 33, "flags": flags})
    expected = torch.zeros(300, dtype=torch.uint8)
    expected[reference.nonzero_rows(grad)[0]] = 1
    assert torch.equal(flags, expected) and flags[nan] == 1 and flags[signed_zero] == 0
    assert 0.1 * 300 < int(flags.sum()) < 0.3 * 300


def test_hash_owner_kernel_matches_the_host_hash_in_host_emulation(host_compiler: None) -> None:
    from kernels.hashing import seed_offset

    indices = torch.randint(0, 2**62, (5000,), generator=torch.Generator().manual_seed(1))
    owners = torch.empty_like(indices)
    params = (("const int64*", "indices"), ("int64", "n"), ("uint64", "seed_offset"), ("uint64", "world_size"),
              ("int64*", "owners"))
    _emulate("hash_owner", "hash_owner", params,
             {"indices": indices, "n": 5000, "seed_offset": seed_offset(99), "world_size": 7, "owners": owners})
    assert torch.equal(owners, owner_ranks(indices, 7, seed=99))


def test_scatter_add_kernel_adds_duplicates_atomically_in_host_emulation(host_compiler: None) -> None:
    indices, values = random_rows(400, num_rows=50, hidden=33, dtype=torch.float32)
    dense = torch.zeros(50, 33)
    params = (("float*", "dense"), ("const int64*", "indices"), ("const float*", "values"), ("int64", "n"),
              ("int64", "hidden"))
    _emulate("scatter_add_rows", "scatter_add_rows_f32", params,
             {"dense": dense, "indices": indices, "values": values, "n": 400, "hidden": 33})
    assert torch.equal(dense.double(), naive_dense_sum(indices, values, 50))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("accumulate", (0, 1))
def test_segment_sum_kernel_matches_the_reference_in_host_emulation(host_compiler: None, dtype: torch.dtype,
                                                                    accumulate: int) -> None:
    """Stably sorted rows summed per index in float32, written or added into `out`."""
    indices, values = random_rows(500, num_rows=80, hidden=17, dtype=dtype)
    order = torch.argsort(indices, stable=True)
    unique, counts = torch.unique(indices, sorted=True, return_counts=True)
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    start = sparse_grad(80, 17, 0.5, dtype, seed=3)
    out = start.clone()
    t = {torch.float32: "float", torch.bfloat16: "unsigned short", torch.float16: "unsigned short"}[dtype]
    suffix = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}[dtype]
    _emulate("segment_sum_rows", f"segment_sum_rows_{suffix}", _params(SEGMENTS, t=t),
             {"values": values.view(torch.int16) if dtype != torch.float32 else values, "order": order,
              "segment_starts": starts, "num_segments": unique.numel(), "hidden": 17, "out_rows": unique,
              "accumulate": accumulate, "out": out.view(torch.int16) if dtype != torch.float32 else out})
    sums = reference.coalesce_float32(indices, values)[1]
    expected = start.clone()
    expected[unique] = ((start[unique].float() if accumulate else 0) + sums).to(dtype)
    assert torch.equal(out, expected)


# --- the compact AdamW kernel against the PyTorch ops ----------------------------------------


def _fused_against_ops(state: str, numel: int, device: str, **settings: object) -> list[str]:
    """One step of each update from the same state and random bits: what differs."""
    from streamer.state import FORMATS, fused_differences, sample_state

    fmt = FORMATS[state]
    fused = sample_state(fmt, numel, torch.device(device), seed=numel)
    ops = {name: buffer.clone() for name, buffer in fused.items()}
    settings = {"step": 3, "lr": 1e-3, "cfg": OptimConfig(), "decay_numel": numel // 2, "grad_scale": 0.5,
                "seed": 11, **settings}
    fmt.update_(ops, fused=False, **settings)
    fmt.update_(fused, fused=True, **settings)
    assert not torch.equal(ops["param"], sample_state(fmt, numel, torch.device(device), seed=numel)["param"])
    return fused_differences(fmt, ops, fused)


@pytest.mark.parametrize("state", ("compact", "compact8"))
@pytest.mark.parametrize("numel", (1, 255, 257, 40 * 256 + 77))
def test_compact_adamw_kernel_matches_the_ops_in_host_emulation(host_compiler: None, state: str,
                                                                 numel: int) -> None:
    """The CUDA source itself, run on the host (kernels/emulate.py): a ragged or lone
    block, a grid of several blocks of two warps striding over forty, against the
    PyTorch ops with the same random bits (streamer.state's [Note: the fused update,
    checked before use])."""
    assert _fused_against_ops(state, numel, "cpu") == []


@pytest.mark.parametrize("settings", (
    {"grad_scale": 1.0, "decay_numel": 0},
    {"step": 1, "cfg": OptimConfig(weight_decay=0.0)},
    {"step": 500, "lr": 3e-2, "decay_numel": 10**9},
))
def test_compact_adamw_kernel_matches_the_ops_with_every_setting(host_compiler: None, settings: dict) -> None:
    """No clipping, no or all decay, the first step's bias correction and a late one."""
    assert _fused_against_ops("compact8", 9 * 256 + 3, "cpu", **settings) == []


@pytest.mark.parametrize("state", ("compact", "compact8"))
def test_compact_adamw_kernel_decays_exactly_the_leading_elements(host_compiler: None, state: str) -> None:
    """Weight decay applies to the chunk's first `decay_numel` elements and no other, wherever
    the boundary falls in a block: with no gradient and no moments the step is the decay
    alone, a tenth of each decayed weight, and leaves the rest exactly as they were."""
    from streamer.state import FORMATS, sample_state

    fmt, numel, boundary = FORMATS[state], 5 * 256 + 9, 2 * 256 + 37
    buffers = sample_state(fmt, numel, torch.device("cpu"))
    for name in ("grad", "exp_avg", "exp_avg_sq"):
        buffers[name].zero_()
    before = buffers["param"].float()
    fmt.update_(buffers, step=3, lr=0.1, cfg=OptimConfig(weight_decay=1.0), decay_numel=boundary, grad_scale=1.0,
                seed=5, fused=True)
    after = buffers["param"].float()
    assert torch.equal(after[boundary:], before[boundary:])
    torch.testing.assert_close(after[:boundary], 0.9 * before[:boundary], rtol=2**-7, atol=0)


def test_a_broken_kernel_is_told_apart(host_compiler: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison is not blind: a kernel that rounds the first moment to the nearest
    code instead of stochastically, or reduces the block's largest value over half a
    warp, fails it."""
    import kernels.cuda_sources as sources

    original = sources.SOURCES["compact"]
    for wrong, broken in (("stochastic_offset(noise & 255u), 1)", "0.5f, 1)"), ("offset > 0", "offset > 1")):
        assert wrong in original
        monkeypatch.setitem(sources.SOURCES, "compact", original.replace(wrong, broken))
        assert any("exp_avg:" in problem for problem in _fused_against_ops("compact8", 40 * 256, "cpu"))
    # A gradient coded with the first moment's rounding instead of the nearest code.
    monkeypatch.setitem(sources.SOURCES, "compact", original.replace("top, 0.5f, 1)", "top, 0.25f, 1)"))
    assert any("grad:" in problem for problem in _coded_against_ops(40 * 256, "cpu"))


def _coded_against_ops(numel: int, device: str) -> list[str]:
    """A float32 gradient coded as compact8 keeps it, by the kernel and by the ops."""
    from streamer.state import FORMATS, fused_differences, sample_values

    fmt = FORMATS["compact8"]
    grad = sample_values(numel, 1e-2, torch.Generator().manual_seed(numel)).to(device)
    coded = [{"grad": torch.empty(numel, dtype=torch.uint8, device=device),
              "grad_scale": torch.empty(-(-numel // 256), device=device)} for _ in range(2)]
    fmt.store_grad(grad, coded[0], fused=False)
    fmt.store_grad(grad, coded[1], fused=True)
    assert int(coded[0]["grad"].count_nonzero()) > numel // 2  # something was coded
    return fused_differences(fmt, coded[0], coded[1])


@pytest.mark.parametrize("numel", (1, 255, 257, 40 * 256 + 77))
def test_gradient_coding_kernel_matches_the_ops_in_host_emulation(host_compiler: None, numel: int) -> None:
    """compact8's gradient coded by the kernel, run on the host: the ops' codes and scales."""
    assert _coded_against_ops(numel, "cpu") == []


def test_the_emulation_runs_whole_warps() -> None:
    from kernels import emulate

    with pytest.raises(ValueError, match="whole warps"):
        emulate.launch("", "k", (), grid=1, block=48, args={})


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("state", ("compact", "compact8"))
@pytest.mark.parametrize("numel", (1, 257, 8 * 2**20 + 77))
def test_gpu_compact_adamw_kernel_matches_the_ops(state: str, numel: int) -> None:
    """On the GPU, at a store chunk's size and ragged: the check a run makes before it
    uses the kernel, here as a test so that a mismatch fails loudly."""
    assert _fused_against_ops(state, numel, "cuda") == []


@pytest.mark.gpu
@requires_gpu
@pytest.mark.parametrize("numel", (257, 3 * 8 * 2**20 + 77))
def test_gpu_gradient_coding_kernel_matches_the_ops(numel: int) -> None:
    """Across the store's chunks of 8 Mi elements and ragged, on the GPU."""
    assert _coded_against_ops(numel, "cuda") == []
