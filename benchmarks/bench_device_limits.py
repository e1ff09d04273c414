"""The accelerator's limits, measured: every GPU target is a share of these.

bf16 (and fp32) matmul rate, pinned host-to-device and device-to-host copy bandwidth,
alone and both directions at once (separate streams), and device memory (HBM) copy
bandwidth. On a machine without CUDA it measures the CPU equivalents and says so.

    python benchmarks/bench_device_limits.py --json benchmarks/results/device_limits.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, machine_line, write_json  # noqa: E402

from streamer.planner import measure_matmul_flops  # noqa: E402


def timed(fn, repeat: int, cuda: bool) -> float:  # noqa: ANN001
    """Seconds per call, after one warm-up call."""
    fn()
    if cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - started) / repeat


def copy_bandwidths(nbytes: int, cuda: bool) -> dict:
    device = torch.device("cuda" if cuda else "cpu")
    host_a = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    host_b = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda)
    dev_a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dev_b = torch.empty(nbytes, dtype=torch.uint8, device=device)
    h2d = nbytes / timed(lambda: dev_a.copy_(host_a, non_blocking=cuda), 8, cuda)
    d2h = nbytes / timed(lambda: host_b.copy_(dev_b, non_blocking=cuda), 8, cuda)
    result = {"h2d_bytes_per_s": h2d, "d2h_bytes_per_s": d2h}
    if cuda:
        up, down = torch.cuda.Stream(), torch.cuda.Stream()

        def both() -> None:
            with torch.cuda.stream(up):
                dev_a.copy_(host_a, non_blocking=True)
            with torch.cuda.stream(down):
                host_b.copy_(dev_b, non_blocking=True)

        # Both directions at once: the sum each direction keeps on a full-duplex link.
        result["bidirectional_bytes_per_s"] = 2 * nbytes / timed(both, 8, cuda)
    # Device memory: a copy reads and writes each byte once.
    result["device_copy_bytes_per_s"] = 2 * nbytes / timed(lambda: dev_b.copy_(dev_a), 16, cuda)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=1024, help="transfer size per copy")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    info = machine()
    size = 8192 if cuda else 2048
    limits = {
        "bf16_matmul_flops": measure_matmul_flops(device, torch.bfloat16, size=size, seconds=2.0),
        "fp32_matmul_flops": measure_matmul_flops(device, torch.float32, size=size, seconds=2.0),
        **copy_bandwidths(args.mib * 2**20, cuda),
    }
    print(f"limits of {'the GPU' if cuda else 'this CPU (no CUDA device)'}: {machine_line(info)}")
    for key, value in limits.items():
        unit = "TFLOP/s" if "flops" in key else "GB/s"
        print(f"  {key:<28}{value / (1e12 if 'flops' in key else 1e9):>10.1f} {unit}")
    path = args.json or RESULTS / ("device_limits_cuda.json" if cuda else "device_limits_cpu.json")
    write_json(path, {"machine": info, "device": "cuda" if cuda else "cpu", "limits": limits})


if __name__ == "__main__":
    main()
