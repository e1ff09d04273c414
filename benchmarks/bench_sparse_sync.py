"""Sparse versus dense synchronisation of an embedding gradient across gloo processes.

    python benchmarks/bench_sparse_sync.py --world 4 --vocab 50432 --hidden 1024 \
        --density 0.01 --json benchmarks/results/sparse_sync_cpu.json

Starts ``--world`` gloo processes on this machine. Each step, every rank's gradient
[vocab, hidden] has non-zero rows at the distinct tokens of a contiguous window of real
text: the Python standard library's source tokenized by a 50k-token BPE (trained once
with the ``tokenizers`` library and cached), the window just long enough to hold
density * vocab distinct tokens. With ``--zipf`` the "text" is Zipf(1.1)-distributed
token ids instead. Methods compared, all producing the same dense sum on every rank:

  dense         dist.all_reduce of the dense gradient (in place, as DDP does)
  allgather     all-gather every rank's non-zero rows, scatter-add them locally
  hash          kernels' two-phase hash-partitioned sparse all-reduce (ZEN-style)

The sparse methods run three ways: reading only the rows the batch touched (its token
ids, passed as candidate_rows, as the engine does) into an output buffer reused across
steps (kernels.ReusedOutputAllReduce: the steady state of a training loop, and the
headline numbers); scanning the whole dense gradient for non-zero rows into the reused
buffer; and scanning into a fresh zero tensor per call (kernels.allgather_allreduce /
kernels.sparse_allreduce). A step's time is the slowest rank's, since a synchronous
training step waits for it; the median over steps is reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import kernels  # noqa: E402
from kernels.sparse_sync import STAT_KEYS  # noqa: E402
from streamer.parallel import end_process, leave  # noqa: E402

BPE_VOCAB = 50_000  # the tokenizer's vocabulary; --vocab pads the embedding above it (50432 = NeoX)
ZIPF_EXPONENT = 1.1  # typical of natural-language token frequencies
WARMUP_STEPS = 2
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # a few units in the last place
# Output buffers reused across steps, one per method that writes into one ("method:variant").
REUSED_BUFFERS = ("allgather", "hash_partition", "allgather:known", "hash_partition:known")
TARGETS = {"speedup_vs_dense": 10.0, "speedup_vs_allgather": 1.5, "load_imbalance": 1.10}


# --- rows touched per rank ------------------------------------------------------------------


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamer" / "bench_sparse_sync"


def stdlib_token_ids(cache_dir: Path) -> np.ndarray:
    """Token ids of the standard library's .py files under a BPE trained on them (cached)."""
    tag = f"stdlib-py{sysconfig.get_python_version()}-bpe{BPE_VOCAB}"
    ids_path, tokenizer_path = cache_dir / f"{tag}.npy", cache_dir / f"{tag}.json"
    if ids_path.exists():
        return np.load(ids_path)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(path for path in stdlib.rglob("*.py") if "site-packages" not in path.parts)
    # A few test files are deliberately not UTF-8; replacement characters are fine here.
    texts = [path.read_bytes().decode("utf-8", errors="replace") for path in files]
    print(f"training a {BPE_VOCAB}-token BPE on {len(files)} stdlib files (cached in {cache_dir})")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    ids = np.concatenate([np.asarray(encoding.ids, dtype=np.uint16) for encoding in tokenizer.encode_batch(texts)])
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(tokenizer_path))
    np.save(ids_path, ids)
    return ids


def zipf_token_ids(vocab: int, count: int, rng: np.random.Generator) -> np.ndarray:
    """A stream of Zipf-distributed token ids: id k has probability proportional to 1/(k+1)^s."""
    probabilities = 1.0 / np.arange(1, vocab + 1) ** ZIPF_EXPONENT
    return rng.choice(vocab, size=count, p=probabilities / probabilities.sum())


def window_rows(stream: np.ndarray, distinct: int, rng: np.random.Generator) -> np.ndarray:
    """Distinct ids of the shortest window, at a random start, that holds ``distinct`` of them."""
    for _ in range(100):
        start = int(rng.integers(0, max(1, len(stream) - 4 * distinct)))
        chunk = stream[start : start + 400 * distinct]
        unique, first_seen = np.unique(chunk, return_index=True)
        if unique.shape[0] >= distinct:
            return np.sort(unique[np.argsort(first_seen)[:distinct]]).astype(np.int64)
    raise ValueError(f"no window of the token stream holds {distinct} distinct tokens")


def touched_rows(args: argparse.Namespace) -> list[list[np.ndarray]]:
    """rows[step][rank]: the embedding rows each rank's gradient touches at each step."""
    rng = np.random.default_rng(args.seed)
    distinct = max(1, round(args.density * args.vocab))
    if args.zipf:
        stream = zipf_token_ids(args.vocab, 200 * distinct, rng)
    else:
        stream = stdlib_token_ids(args.cache_dir).astype(np.int64) % args.vocab
    steps = WARMUP_STEPS + args.steps
    return [[window_rows(stream, distinct, rng) for _ in range(args.world)] for _ in range(steps)]


# --- one rank --------------------------------------------------------------------------------


def fill_gradient(grad: torch.Tensor, previous: np.ndarray | None, rows: np.ndarray, seed: int) -> None:
    """Make ``grad`` zero except at ``rows`` (random values), touching only those rows."""
    if previous is not None:
        grad.index_fill_(0, torch.from_numpy(previous), 0)
    generator = torch.Generator().manual_seed(seed)
    values = torch.randn(rows.shape[0], grad.shape[1], generator=generator).to(grad.dtype)
    grad.index_copy_(0, torch.from_numpy(rows), values)


@dataclass
class Method:
    """One way to sum the gradient over ranks; ``prepare`` runs untimed before each step."""

    run: Callable[[torch.Tensor, dict[str, int], torch.Tensor], object]  # (grad, stats, token ids)
    prepare: Callable[[torch.Tensor], object] | None = None


def time_methods(methods: dict[str, Method], grad: torch.Tensor, rows: list[list[np.ndarray]], rank: int) -> dict:
    """Per method: seconds per step of the slowest rank and this rank's summed stats.

    Methods take turns within each step, so load from other processes on the machine
    falls on all of them alike. Warm-up steps are dropped.
    """
    results = {name: {"times_s": [], "totals": dict.fromkeys(STAT_KEYS, 0)} for name in methods}
    previous = None
    for step, step_rows in enumerate(rows):
        fill_gradient(grad, previous, step_rows[rank], seed=step * 1000 + rank)
        previous = step_rows[rank]
        known_rows = torch.from_numpy(step_rows[rank])
        for name, method in methods.items():
            if method.prepare is not None:
                method.prepare(grad)
            stats: dict[str, int] = {}
            dist.barrier()
            start = time.perf_counter()
            method.run(grad, stats, known_rows)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if step >= WARMUP_STEPS:
                results[name]["times_s"].append(elapsed.item())
                for key, value in stats.items():
                    results[name]["totals"][key] += value
    grad.index_fill_(0, torch.from_numpy(previous), 0)
    return results


def gather_totals(totals: dict[str, int]) -> dict[str, list[int]]:
    """Each stats key as a list over ranks."""
    local = torch.tensor([totals[key] for key in STAT_KEYS], dtype=torch.int64)
    everyone = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, local)
    return {key: [int(rank_totals[i]) for rank_totals in everyone] for i, key in enumerate(STAT_KEYS)}


def check_methods_agree(grad: torch.Tensor, rows: list[np.ndarray], rank: int) -> None:
    """All methods give the dense all-reduce's result, up to rounding: the sparse methods
    sum half types in float32 and round once, gloo rounds after every addition."""
    fill_gradient(grad, None, rows[rank], seed=rank)
    dense = grad.clone()
    dist.all_reduce(dense)
    for name, result in (
        ("hash", kernels.sparse_allreduce(grad)),
        ("allgather", kernels.allgather_allreduce(grad)),
        ("hash reused", kernels.ReusedOutputAllReduce()(grad)),
    ):
        tolerance = TOLERANCE[grad.dtype]
        if not torch.allclose(result.float(), dense.float(), rtol=tolerance, atol=tolerance):
            raise AssertionError(f"rank {rank}: {name} differs from dist.all_reduce")
    grad.index_fill_(0, torch.from_numpy(rows[rank]), 0)


def run_rank(rank: int, args: argparse.Namespace, rows: list[list[np.ndarray]], init_file: str) -> None:
    torch.set_num_threads(1)  # the ranks share this machine's cores; don't oversubscribe them
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=args.world)
    dtype = getattr(torch, args.dtype)
    grad = torch.zeros(args.vocab, args.hidden, dtype=dtype)
    check_methods_agree(grad, rows[0], rank)
    dense_copy = torch.zeros_like(grad)
    reused = {name: kernels.ReusedOutputAllReduce(method=name.split(":")[0]) for name in REUSED_BUFFERS}
    methods = {
        "dense": Method(run=lambda g, stats, rows: dist.all_reduce(dense_copy), prepare=dense_copy.copy_),
        "allgather": Method(run=lambda g, stats, rows: reused["allgather"](g, stats)),
        "hash": Method(run=lambda g, stats, rows: reused["hash_partition"](g, stats)),
        "allgather_fresh_output": Method(run=lambda g, stats, rows: kernels.allgather_allreduce(g, stats=stats)),
        "hash_fresh_output": Method(run=lambda g, stats, rows: kernels.sparse_allreduce(g, stats=stats)),
        # The same exchanges given each step's (distinct) token ids: the gradient is not scanned.
        "allgather_known_rows": Method(run=lambda g, stats, rows: reused["allgather:known"](g, stats, rows)),
        "hash_known_rows": Method(run=lambda g, stats, rows: reused["hash_partition:known"](g, stats, rows)),
        # Not a method: the non-zero-row scan that every sparse method above starts with.
        "scan_only": Method(run=lambda g, stats, rows: kernels.nonzero_rows(g)),
    }
    results = time_methods(methods, grad, rows, rank)
    for result in results.values():
        result["stats"] = gather_totals(result.pop("totals"))
    if rank == 0:
        report(args, rows, results)
    leave()  # all ranks together: see streamer.parallel.leave
    end_process()


# --- report ------------------------------------------------------------------------------------


def machine() -> dict[str, object]:
    model = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "logical_cores": psutil.cpu_count(logical=True),
        "physical_cores": psutil.cpu_count(logical=False),
        "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        # Other processes share this machine's cores; the timings are only as quiet as this.
        "load_average_1_5_15_min": [round(load, 2) for load in os.getloadavg()],
    }


def per_step_stats(args: argparse.Namespace, results: dict) -> None:
    """Medians in ms and, for the sparse methods, per-step bytes and rows from the totals."""
    dense_bytes = args.vocab * args.hidden * torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    # gloo's ring all-reduce sends 2 (N - 1) / N of the tensor from every rank.
    results["dense"]["bytes_sent_per_rank"] = 2 * (args.world - 1) * dense_bytes // args.world
    for name, result in results.items():
        result["median_ms"] = 1e3 * statistics.median(result["times_s"])
        stats = result.pop("stats")
        if name in ("dense", "scan_only"):
            continue
        result["bytes_sent_per_rank"] = statistics.mean(stats["bytes_sent"]) / args.steps
        result["rows_received_per_rank"] = [total / args.steps for total in stats["rows_received"]]
        result["rows_owned_per_rank"] = [total / args.steps for total in stats["rows_owned"]]


def summarise(args: argparse.Namespace, rows: list[list[np.ndarray]], results: dict) -> dict:
    per_step_stats(args, results)
    median = {name: result["median_ms"] for name, result in results.items()}
    received = results["hash"]["rows_received_per_rank"]
    owned = results["hash"]["rows_owned_per_rank"]
    per_rank = statistics.mean(len(rank_rows) for step in rows for rank_rows in step)
    union = statistics.mean(len(np.unique(np.concatenate(step))) for step in rows)
    return {
        "benchmark": "bench_sparse_sync",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("json", "cache_dir")},
            "rows": "zipf" if args.zipf else "stdlib BPE text windows",
        },
        # The headline is what training runs: the engine passes the batch's token ids as
        # the candidate rows (the embedding gradient is zero elsewhere), and the sparse
        # methods write into a reused output buffer.
        "headline": "hash and allgather read only the batch's rows (candidate_rows, as the engine passes "
        "them) and write into a reused output buffer (ReusedOutputAllReduce); see methods for the variants "
        "that scan the dense gradient or allocate a fresh output",
        "speedup_vs_dense": median["dense"] / median["hash_known_rows"],
        "speedup_vs_allgather": median["allgather_known_rows"] / median["hash_known_rows"],
        "load_imbalance": max(received) / statistics.mean(received),
        "owned_rows_imbalance": max(owned) / statistics.mean(owned),
        "rows_per_rank": per_rank,
        "distinct_rows_all_ranks": union,
        # Rows a rank sends: (N - 1) * n for allgather, (N - 1) / N * (n + U) for hash.
        "predicted_bytes_ratio_allgather_over_hash": args.world * per_rank / (per_rank + union),
        "scan_speedup_vs_dense": median["dense"] / median["hash"],
        "scan_speedup_vs_allgather": median["allgather"] / median["hash"],
        "fresh_output_speedup_vs_dense": median["dense"] / median["hash_fresh_output"],
        "fresh_output_speedup_vs_allgather": median["allgather_fresh_output"] / median["hash_fresh_output"],
        "targets": TARGETS,
        "methods": results,
    }


def report(args: argparse.Namespace, rows: list[list[np.ndarray]], results: dict) -> None:
    summary = summarise(args, rows, results)
    info = summary["machine"]
    print(f"\n{info['cpu']}, {info['logical_cores']} logical cores, {info['ram_gib']} GiB RAM, {summary['date']}")
    print(
        f"world {args.world}, [{args.vocab} x {args.hidden}] {args.dtype}, {summary['config']['rows']}: "
        f"{summary['rows_per_rank']:.0f} rows per rank, {summary['distinct_rows_all_ranks']:.0f} distinct overall"
    )
    print(f"load average (1, 5, 15 min): {info['load_average_1_5_15_min']}")
    dense_ms = summary["methods"]["dense"]["median_ms"]
    print(f"\n{'method':24} {'median ms':>10} {'x dense':>8} {'MB sent/rank':>13}")
    for name, result in summary["methods"].items():
        sent = result.get("bytes_sent_per_rank")
        sent_text = "" if sent is None else f"{sent / 1e6:13.2f}"
        print(f"{name:24} {result['median_ms']:10.2f} {dense_ms / result['median_ms']:8.2f} {sent_text}")
    print()
    for key, target in TARGETS.items():
        met = summary[key] <= target if key == "load_imbalance" else summary[key] >= target
        relation = "<=" if key == "load_imbalance" else ">="
        print(f"{key:34} {summary[key]:6.2f}  (target {relation} {target}: {'met' if met else 'MISSED'})")
    for key in (
        "predicted_bytes_ratio_allgather_over_hash",
        "scan_speedup_vs_dense",
        "scan_speedup_vs_allgather",
        "fresh_output_speedup_vs_dense",
    ):
        print(f"{key:34} {summary[key]:6.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {args.json}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=4, help="gloo processes to start")
    parser.add_argument("--vocab", type=int, default=50_432, help="embedding rows")
    parser.add_argument("--hidden", type=int, default=1024, help="embedding width")
    parser.add_argument("--density", type=float, default=0.01, help="share of rows each rank touches")
    parser.add_argument("--zipf", action="store_true", help="Zipf(1.1) token ids instead of stdlib text")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per method (after 2 warm-up)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--seed", type=int, default=0, help="window positions and gradient values")
    parser.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="tokenizer and token ids")
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    rows = touched_rows(args)
    with tempfile.TemporaryDirectory() as scratch:
        mp.spawn(run_rank, args=(args, rows, os.path.join(scratch, "init")), nprocs=args.world)


if __name__ == "__main__":
    main()
