"""The CuPy kernels against the PyTorch reference and against memory bandwidth.

For each primitive of `kernels` (nonzero_rows, coalesce, hash_partition,
scatter_add_rows) at an embedding's realistic size (vocab 50,432 x hidden 6,144 by
default) and 1-5% of rows touched: the result is checked against `kernels.reference`
(indices equal, values equal to float32 rounding), then timed; its effective bandwidth
(the bytes it must read and write at least, per second) is compared with the device's
memory copy bandwidth measured in the same run. The target on a GPU is >= 50% of it.

Then the compact formats' kernels (kernels/compact.py) on one store chunk (8 Mi
elements), each checked against the PyTorch ops (streamer.state's fused_differences).
The AdamW step, from the same state with the same random bits, is timed three ways:
the kernel alone (its bytes: every buffer read once, the updated ones written once, the
random bits read), the whole fused update (with drawing the bits), and the PyTorch ops
it replaces; compact8's gradient coding (float32 in, codes and scales out) as the
kernel and as the ops.

On a machine without CUDA the same sizes run through the reference on the CPU (nothing
to check against), so the script is exercised everywhere; the JSON says which (the
update's kernels need CUDA: only the ops are timed there, and `--emulate` checks the
kernels through their host emulation, kernels/emulate.py).

    python benchmarks/bench_kernels.py --json benchmarks/results/kernels_cuda.json
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, machine_line, write_json  # noqa: E402

from kernels import reference  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeat: int) -> float:  # noqa: ANN001
    """Median seconds per call after a warm-up call (kernel compilation, allocation)."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, nbytes: int = 2**30) -> float:
    """Device memory copy: bytes read plus written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, 5)


def cases(vocab: int, hidden: int, density: float, world: int, dtype: torch.dtype, device: torch.device,
          seed: int) -> dict:
    """Inputs shaped as one step's embedding gradient: `density` of the rows touched per
    rank; the ranks' rows gathered (with the duplicates several ranks share) for the
    sum; and a dense table to add them into."""
    generator = torch.Generator().manual_seed(seed)
    touched = max(1, int(density * vocab))
    rows = [torch.randperm(vocab, generator=generator)[:touched] for _ in range(world)]
    gathered = torch.cat(rows)
    # The values are drawn where they are used: on one CPU thread the dense table alone
    # (310 M values) takes seconds, which the GPU machine's budget has no room for.
    draw = torch.Generator(device).manual_seed(seed)
    grad = torch.zeros(vocab, hidden, dtype=dtype, device=device)
    grad[rows[0].to(device)] = torch.randn(touched, hidden, generator=draw, device=device).to(dtype)
    values = torch.randn(gathered.numel(), hidden, generator=draw, device=device).to(dtype)
    dense = torch.randn(vocab, hidden, generator=draw, device=device).to(dtype)
    on = {"grad": grad, "indices": gathered.to(device), "values": values, "dense": dense}
    return {"device": on, "cpu": {k: v.cpu() for k, v in on.items()}}


def check(name: str, got: tuple, want: tuple) -> float:
    """Largest absolute difference of the value tensors; indices must be equal."""
    worst = 0.0
    for a, b in zip(got, want):
        a = a.cpu()
        if a.dtype in (torch.int64, torch.int32):
            if not torch.equal(a, b):
                raise AssertionError(f"{name}: indices differ from the reference")
        else:
            worst = max(worst, float((a.float() - b.float()).abs().max()) if a.numel() else 0.0)
    return worst


def operations(impl, d: dict, c: dict, world: int, scan_bytes: int, n: int, unique: int,  # noqa: ANN001
               row_bytes: int) -> dict:
    """Per primitive: the run under test, the reference on the CPU copies, and the
    bytes it must move at least."""
    return {
        # Reads the whole table, writes the touched rows out.
        "nonzero_rows": (lambda: impl.nonzero_rows(d["grad"]), lambda: reference.nonzero_rows(c["grad"]),
                         scan_bytes),
        # Reads every gathered row, writes one per distinct index.
        "coalesce": (lambda: impl.coalesce(d["indices"], d["values"]),
                     lambda: reference.coalesce(c["indices"], c["values"]), (n + unique) * row_bytes),
        # Reads and writes every row once, reordered by owner.
        "hash_partition": (lambda: impl.hash_partition(d["indices"], d["values"], world),
                           lambda: reference.hash_partition(c["indices"], c["values"], world), 2 * n * row_bytes),
        # Reads every row to add, and reads and writes each touched table row.
        "scatter_add_rows": (lambda: impl.scatter_add_rows(d["dense"].clone(), d["indices"], d["values"]),
                             lambda: (reference.scatter_add_rows(c["dense"].clone(), c["indices"], c["values"]),),
                             (n + 2 * unique) * row_bytes),
    }


def update_rows(device: torch.device, memory: float, repeat: int, numel: int, emulate: bool = False) -> list[dict]:
    """The compact formats' update on one chunk: the fused kernel checked against the ops
    (on a CPU, with `emulate`, its host emulation), then the kernel alone, the fused
    update and the ops, timed (on a CPU the ops only)."""
    from streamer.optim import OptimConfig
    from streamer.state import FORMATS, fused_differences, fused_gaps, random_bits, sample_state, sample_values

    cuda, rows = device.type == "cuda", []
    checked = cuda or emulate
    for state in ("compact", "compact8"):
        fmt = FORMATS[state]
        buffers = sample_state(fmt, numel, device)
        settings = {"step": 3, "lr": 1e-3, "cfg": OptimConfig(), "decay_numel": numel // 2, "grad_scale": 0.5}
        problems, gaps = [], {}
        if checked:
            ops = {name: buffer.clone() for name, buffer in buffers.items()}
            fused = {name: buffer.clone() for name, buffer in buffers.items()}
            fmt.update_(ops, seed=1, fused=False, **settings)
            fmt.update_(fused, seed=1, fused=True, **settings)
            problems, gaps = fused_differences(fmt, ops, fused), fused_gaps(fmt, ops, fused)
        bits = random_bits((numel,), 32, torch.Generator(device=device).manual_seed(0))
        whole, grad_bytes = fmt.bytes_per_param(), fmt.bytes_per_param(("grad",))
        kernel_bytes = (2 * whole - grad_bytes + 4) * numel  # state in, updated state out, bits in
        update = functools.partial(fmt.update_, buffers, seed=1, **settings)
        runs = {"ops": (functools.partial(update, fused=False), kernel_bytes)}
        if cuda:
            runs = {"kernel": (functools.partial(fmt.fused_update_, buffers, bits, **settings), kernel_bytes),
                    "fused update": (functools.partial(update, fused=True), kernel_bytes + 4 * numel), **runs}
        if state == "compact8":  # the gradient's coding, as the backward runs it: float32 in, codes out
            grad = sample_values(numel, 1e-2, torch.Generator().manual_seed(1)).to(device)
            coded = {name: torch.empty_like(buffers[name]) for name in ("grad", "grad_scale")}
            code = functools.partial(fmt.store_grad, grad, coded)
            code_bytes = (4 + grad_bytes) * numel
            if checked:
                expected = {name: torch.empty_like(buffers[name]) for name in ("grad", "grad_scale")}
                fmt.store_grad(grad, expected, fused=False)
                code(fused=True)
                problems = problems + fused_differences(fmt, expected, coded)
                gaps = {**gaps, **{f"coded {name}": gap for name, gap in fused_gaps(fmt, expected, coded).items()}}
            if cuda:
                runs["code_gradient kernel"] = (functools.partial(code, fused=True), code_bytes)
            runs["code_gradient ops"] = (functools.partial(code, fused=False), code_bytes)
        for how, (run, nbytes) in runs.items():
            seconds = timed(run, device, repeat)
            kernel = how if how.startswith("code_gradient") else f"compact_adamw {how}"
            rows.append({"kernel": kernel, "state": state, "numel": numel, "seconds": seconds,
                         "bytes": nbytes, "bytes_per_s": nbytes / seconds, "share_of_copy": nbytes / seconds / memory,
                         "params_per_s": numel / seconds, "differences": problems, "gaps": gaps,
                         "checked": "cuda" if cuda else ("host emulation" if emulate else None)})
            r = rows[-1]
            print(f"{r['kernel']:<28}{state:<10}{numel:>10}{seconds * 1e3:>9.2f}{r['bytes_per_s'] / 1e9:>8.0f}"
                  f"{r['share_of_copy']:>9.0%}{numel / seconds / 1e9:>10.2f}  "
                  f"{'; '.join(problems) or ('matches the ops' if checked else 'not checked (no CUDA)')}")
        if gaps:  # how close, not only whether within the allowance
            print("    " + ", ".join(f"{name} {differ}/{n} differ (largest {largest:.2g})"
                                     for name, (differ, largest, n) in gaps.items()))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=50_432)
    parser.add_argument("--hidden", type=int, default=6_144)
    parser.add_argument("--densities", default="0.01,0.02,0.05", help="share of rows each rank touches")
    parser.add_argument("--world", type=int, default=4, help="ranks whose rows are summed")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--update-numel", type=int, default=8 * 2**20, help="elements of the update's chunk")
    parser.add_argument("--emulate", action="store_true",
                        help="without CUDA, check the compact kernels through their host emulation (slow)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        from kernels import cuda as impl
    else:
        impl = reference
    info = machine()
    memory = copy_bandwidth(device)
    print(f"sparse kernels on {'the GPU' if cuda else 'the CPU (reference; no CUDA device)'}: {machine_line(info)}")
    print(f"memory copy bandwidth {memory / 1e9:.0f} GB/s (read + write)")
    print(f"{'kernel':<18}{'dtype':<10}{'density':>8}{'rows in':>9}{'ms':>9}{'GB/s':>8}{'of copy':>9}"
          f"{'max |diff|':>12}")
    rows = []
    for dtype in [getattr(torch, name) for name in args.dtypes.split(",")]:
        size = torch.tensor([], dtype=dtype).element_size()
        for density in [float(d) for d in args.densities.split(",")]:
            data = cases(args.vocab, args.hidden, density, args.world, dtype, device, seed=0)
            d, c = data["device"], data["cpu"]
            n, h = d["values"].shape
            unique = int(torch.unique(c["indices"]).numel())
            touched = int((c["grad"].abs().sum(1) > 0).sum())
            ops = operations(impl, d, c, args.world, (args.vocab + touched) * h * size, n, unique, h * size)
            table = d["dense"].clone()  # scatter_add_rows adds in place: timed into one copy, over and over
            for name, (run, ref, nbytes) in ops.items():
                got = run()
                diff = check(name, got if isinstance(got, tuple) else (got,), ref()) if cuda else 0.0
                if name == "scatter_add_rows":  # the check's fresh clone of the table is not the kernel's work
                    run = functools.partial(impl.scatter_add_rows, table, d["indices"], d["values"])
                seconds = timed(run, device, args.repeat)
                rate = nbytes / seconds
                rows.append({"kernel": name, "dtype": str(dtype).removeprefix("torch."), "density": density,
                             "rows_in": n if name != "nonzero_rows" else args.vocab, "seconds": seconds,
                             "bytes": nbytes, "bytes_per_s": rate, "share_of_copy": rate / memory,
                             "max_abs_diff": diff})
                r = rows[-1]
                print(f"{name:<18}{r['dtype']:<10}{density:>8.2f}{r['rows_in']:>9}{seconds * 1e3:>9.2f}"
                      f"{rate / 1e9:>8.0f}{rate / memory:>9.0%}{diff:>12.2e}")
    worst = min(rows, key=lambda r: r["share_of_copy"])
    print(f"lowest share of copy bandwidth: {worst['kernel']} {worst['dtype']} at {worst['density']:.0%}: "
          f"{worst['share_of_copy']:.0%}")
    path = args.json or RESULTS / ("kernels_cuda.json" if cuda else "kernels_cpu.json")
    result = {"machine": info, "device": device.type, "checked_against_reference": cuda, "vocab": args.vocab,
              "hidden": args.hidden, "world": args.world, "copy_bytes_per_s": memory, "rows": rows,
              "min_share_of_copy": worst["share_of_copy"]}
    write_json(path, result)  # the sparse kernels' results stand whatever the update's kernel does
    print(f"\n{'update':<28}{'state':<10}{'elements':>10}{'ms':>9}{'GB/s':>8}{'of copy':>9}{'G param/s':>10}  check")
    try:
        updates = update_rows(device, memory, args.repeat, args.update_numel, args.emulate and not cuda)
    except Exception as error:  # a launch or compile failure: said, and kept in the JSON
        print(f"the update's kernel failed: {type(error).__name__}: {error}")
        write_json(path, {**result, "update_error": f"{type(error).__name__}: {error}", "update_matches_ops": False})
        raise
    by = {(r["kernel"], r["state"]): r for r in updates}
    for state in ("compact", "compact8"):
        if ("compact_adamw kernel", state) in by:
            speedup = by["compact_adamw ops", state]["seconds"] / by["compact_adamw fused update", state]["seconds"]
            print(f"{state}: the fused update is {speedup:.1f}x as fast as the ops")
    if ("code_gradient kernel", "compact8") in by:
        speedup = by["code_gradient ops", "compact8"]["seconds"] / by["code_gradient kernel", "compact8"]["seconds"]
        print(f"compact8: the gradient's coding kernel is {speedup:.1f}x as fast as the ops")
    kernels_only = [r for r in updates if r["kernel"].endswith("kernel")]
    write_json(path, {**result, "min_share_of_copy": min(r["share_of_copy"] for r in [*rows, *kernels_only]),
                      "updates": updates,
                      "update_matches_ops": all(not r["differences"] for r in updates)
                      if cuda or args.emulate else None})


if __name__ == "__main__":
    main()
