"""The flagship: train a model whose weights, gradients and AdamW state exceed this
machine's RAM, from the disk tier, on real text.

Measures, in the same run: disk read and write bandwidth (fsync'd, page cache dropped),
the matmul rate, then `streamer train --mode stream --offload disk` for a few steps:
loss per step, peak resident memory, bytes the process read from and wrote to storage
per step (/proc/PID/io, so page-cache hits do not count), how busy the disk itself was
during each step (its block device's counters), and step time against the I/O floor
(storage bytes / measured bandwidth) and the compute floor (model FLOPs / measured
matmul rate). Both rates are probed before the steps and again after them, and the
step is compared with the floor from each.

    python benchmarks/bench_oversized.py --model gpt3-2.7b --json benchmarks/results/oversized_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, machine_line, pyplot, streamer_train_cmd, write_json  # noqa: E402

from models import ModelConfig  # noqa: E402
from streamer import planner  # noqa: E402


def proc_io(pid: int) -> tuple[int, int]:
    """Bytes the process made storage read and write (not page-cache hits)."""
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["read_bytes"]), int(fields["write_bytes"])


def block_device_stat(folder: Path) -> Path | None:
    """The kernel's counters of the block device that holds `folder`, if it has them."""
    dev = os.stat(folder).st_dev
    stat = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}/stat")
    return stat if stat.exists() else None


def disk_counters(stat: Path | None) -> tuple[int, int, float] | None:
    """Bytes the device read and wrote, and seconds it had requests in flight
    (Documentation/block/stat.rst: sectors are 512 bytes, io_ticks in ms)."""
    if stat is None:
        return None
    fields = [int(f) for f in stat.read_text().split()]
    return fields[2] * 512, fields[6] * 512, fields[9] / 1000


def sustained_matmul_flops(seconds: float) -> float:
    return planner.measure_matmul_flops(torch.device("cpu"), torch.float32, size=2048, seconds=seconds)


def train_and_watch(cmd: list[str], metrics: Path, stat: Path | None) -> tuple[list[dict], list[tuple], int]:
    """Run training, sampling the child's storage I/O and the disk's own counters
    whenever a step is logged."""
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    io_at_step, seen, peak_rss = [], 0, 0
    while child.poll() is None:
        time.sleep(0.5)
        try:
            peak_rss = max(peak_rss, psutil.Process(child.pid).memory_info().rss)
            io = (*proc_io(child.pid), disk_counters(stat))
        except (psutil.NoSuchProcess, FileNotFoundError, ProcessLookupError):
            break
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if len(lines) > seen:
            seen = len(lines)
            io_at_step.append(io)
    output = child.communicate()[0]
    if child.returncode:
        raise SystemExit(f"training failed:\n{output[-3000:]}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return rows, io_at_step, peak_rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt3-2.7b")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--warmup", type=int, default=None, help="warmup steps (default: all of them)")
    parser.add_argument("--max-memory", type=float, default=7.5, metavar="GIB",
                        help="peak resident memory the run plans for (the target is 8 GiB; the margin "
                        "covers the memory model's error, a few percent)")
    parser.add_argument("--matmul-seconds", type=float, default=10.0, help="length of each matmul-rate probe")
    parser.add_argument("--probe-gib", type=int, default=4, help="bytes each disk probe writes and reads")
    parser.add_argument("--dir", type=Path, default=None, help="where the disk tier lives (default: a temp dir here)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--replot", type=Path, default=None, metavar="JSON",
                        help="only redraw the plot of an earlier run's JSON")
    args = parser.parse_args()
    if args.probe_gib <= 0 or args.matmul_seconds <= 0:
        parser.error("--probe-gib and --matmul-seconds must be positive")
    if args.replot:
        if not args.replot.is_file():
            parser.error(f"--replot: no such file '{args.replot}'; give the JSON an earlier run wrote")
        done = json.loads(args.replot.read_text())
        title = f"{done['model']} from disk; {machine_line(done['machine'])}"
        plot(done["steps"], args.replot.with_suffix(".png"), title)
        return
    cfg = ModelConfig.from_name(args.model)
    state_bytes = planner.state_bytes("fp32")[0] * cfg.n_params()
    ram = psutil.virtual_memory().total
    work = Path(tempfile.mkdtemp(prefix="oversized-", dir=args.dir or RESULTS.parent))
    info = machine()
    print(
        f"{args.model}: state {state_bytes / 2**30:.1f} GiB = {state_bytes / ram:.2f}x this machine's "
        f"{ram / 2**30:.1f} GiB RAM; {machine_line(info)}"
    )
    # 4 GiB: a virtual disk absorbs a 1 GiB burst at up to 4x its sustained rate, and a
    # step writes tens of GB (1 GiB probes read 0.29-1.64 GB/s within minutes).
    probe = {"nbytes": args.probe_gib * 2**30}
    read_bw, write_bw = planner.measure_disk_bandwidth(work / "probe", **probe)
    # The matmul rate sustained over 10 s: this machine's rate swings 130-190 GFLOP/s from
    # one second to the next, and a step of minutes runs at the average, not the peak.
    flops = sustained_matmul_flops(args.matmul_seconds)
    print(f"measured: disk read {read_bw / 1e9:.2f} GB/s, write {write_bw / 1e9:.2f} GB/s, {flops / 1e9:.0f} GFLOP/s")
    out = work / "run"
    stat = block_device_stat(work)
    cmd = streamer_train_cmd(
        model=args.model,
        mode="stream",
        offload="disk",
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        warmup=args.warmup or args.steps,
        lr=args.lr,
        max_memory=args.max_memory,
        out=out,
    )
    try:
        rows, io_at_step, peak_rss = train_and_watch(cmd, out / "metrics.jsonl", stat)
        shutil.rmtree(out, ignore_errors=True)
        # The same probes once the steps are done: a shared machine's speed drifts over a
        # run of several minutes, and a floor taken at one end can miss the steps' machine.
        read_bw_end, write_bw_end = planner.measure_disk_bandwidth(work / "probe", **probe)
        flops_end = sustained_matmul_flops(args.matmul_seconds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"after the steps: disk read {read_bw_end / 1e9:.2f} GB/s, write {write_bw_end / 1e9:.2f} GB/s, "
          f"{flops_end / 1e9:.0f} GFLOP/s")
    tokens = args.batch_size * args.seq_len
    compute_floor = cfg.flops_per_token(args.seq_len) * tokens / flops
    compute_floor_end = cfg.flops_per_token(args.seq_len) * tokens / flops_end
    # What the plan itself must compute at that rate: model FLOPs plus the recompute in
    # backward that the memory budget forces (the engine reports its choice per step).
    profile = planner.replace(planner.PROFILES["cpu"], matmul_flops=flops, compute_bytes=4)
    plan_compute = planner.make_plan(cfg, profile, tokens, args.seq_len, "disk",
                                     kept_graphs=rows[0]["kept_graphs"]).compute_s
    steps = []
    if len(io_at_step) < len(rows):
        # Steps shorter than the 0.5 s sampling interval: per-step I/O cannot be told apart.
        raise SystemExit(
            f"steps finished faster than I/O could be sampled ({len(io_at_step)} samples for "
            f"{len(rows)} steps): use a larger --model, --batch-size or --seq-len"
        )
    previous = io_at_step[0]
    for i, row in enumerate(rows):
        read, written = (io_at_step[i][0] - previous[0], io_at_step[i][1] - previous[1]) if i else (0, 0)
        disk = None
        if i and io_at_step[i][2] is not None:
            (r0, w0, t0), (r1, w1, t1) = previous[2], io_at_step[i][2]
            # The whole device, other tenants' traffic included; the sample lags the
            # step's end by up to the 0.5 s sampling interval.
            disk = {"disk_read_bytes": r1 - r0, "disk_written_bytes": w1 - w0, "disk_busy_s": t1 - t0,
                    "disk_busy_share": min(1.0, (t1 - t0) / row["step_s"])}
        previous = io_at_step[i]
        io_floor = read / read_bw + written / write_bw
        io_floor_end = read / read_bw_end + written / write_bw_end
        # The strict floor: each rate at the faster of its two probes, and the disk at
        # no more than the time its own counters say it was busy with the step's bytes.
        # A single fsync'd stream can read well under the disk's rate: 0.35 GB/s on this
        # project's CPU machine where two streams wrote 2.3 GB/s the same minute.
        strict_io = read / max(read_bw, read_bw_end) + written / max(write_bw, write_bw_end)
        if disk is not None:
            strict_io = min(strict_io, disk["disk_busy_s"])
        strict = max(strict_io, min(compute_floor, compute_floor_end))
        steps.append(
            {
                "step": row["step"],
                "loss": row["loss"],
                "step_s": row["step_s"],
                "read_bytes": read,
                "written_bytes": written,
                "io_floor_s": io_floor,
                "compute_floor_s": compute_floor,
                "over_floor": row["step_s"] / max(io_floor, compute_floor) if i else None,
                "io_floor_end_s": io_floor_end,
                "compute_floor_end_s": compute_floor_end,
                "over_floor_end": row["step_s"] / max(io_floor_end, compute_floor_end) if i else None,
                "strict_floor_s": strict,
                "over_strict_floor": row["step_s"] / strict if i else None,
                **(disk or {}),
                "plan_compute_s": plan_compute,
                "over_plan_floor": row["step_s"] / max(io_floor, plan_compute) if i else None,
                "prediction": row.get("prediction"),
                "predicted_step_s": row.get("predicted_step_s"),
                # Where the step went: the forward phase carries the previous step's
                # updates (read, AdamW, write); the store's seconds are busy time of
                # its I/O threads, which overlap compute and each other.
                **{k: row.get(k) for k in ("forward_s", "backward_s", "update_s", "stall_s", "store_read_s",
                                           "store_write_s", "store_read_bytes", "store_write_bytes")},
            }
        )
    print(
        f"{'step':>4}{'loss':>9}{'step s':>9}{'read GB':>9}{'write GB':>10}{'I/O floor s':>13}"
        f"{'compute s':>11}{'x floor':>9}{'x end':>7}{'disk busy':>11}{'plan s':>8}{'x plan':>8}{'pred s':>9}"
        f"{'err':>7}  prediction"
    )
    for s in steps:
        ratio = f"{s['over_floor']:.2f}" if s["over_floor"] else "-"
        ratio_end = f"{s['over_floor_end']:.2f}" if s["over_floor_end"] else "-"
        busy = f"{s['disk_busy_share']:.0%}" if "disk_busy_share" in s else "-"
        plan_ratio = f"{s['over_plan_floor']:.2f}" if s["over_plan_floor"] else "-"
        predicted = s["predicted_step_s"] or 0.0
        s["prediction_error"] = predicted / s["step_s"] - 1 if predicted else None
        print(
            f"{s['step']:>4}{s['loss']:>9.3f}{s['step_s']:>9.1f}{s['read_bytes'] / 1e9:>9.1f}"
            f"{s['written_bytes'] / 1e9:>10.1f}{s['io_floor_s']:>13.1f}{s['compute_floor_s']:>11.1f}{ratio:>9}"
            f"{ratio_end:>7}{busy:>11}"
            f"{s['plan_compute_s']:>8.1f}{plan_ratio:>8}{predicted:>9.1f}{s['prediction_error'] or 0:>+7.0%}"
            f"  {s['prediction']}"
        )
    timed = [s for s in steps if s["over_floor"]]
    print(f"x the larger floor: {min(s['over_floor'] for s in timed):.2f}-{max(s['over_floor'] for s in timed):.2f} "
          f"with the rates probed before the steps, "
          f"{min(s['over_floor_end'] for s in timed):.2f}-{max(s['over_floor_end'] for s in timed):.2f} "
          f"with those probed after them, "
          f"{min(s['over_strict_floor'] for s in timed):.2f}-{max(s['over_strict_floor'] for s in timed):.2f} "
          f"with each rate at its faster probe (the strict floor)")
    busy = [s["disk_busy_share"] for s in timed if "disk_busy_share" in s]
    if busy:
        print(f"the disk had requests in flight {min(busy):.0%}-{max(busy):.0%} of each timed step")
    peak = max(peak_rss, max(r["peak_rss_bytes"] for r in rows))
    predicted_peak = rows[0]["predicted_peak_bytes"]
    print(f"peak resident memory {peak / 2**30:.2f} GiB (predicted {predicted_peak / 2**30:.2f} GiB, "
          f"{predicted_peak / peak - 1:+.0%}); loss {rows[0]['loss']:.3f} -> {rows[-1]['loss']:.3f}")
    stem = args.json.with_suffix("") if args.json else RESULTS / "oversized_cpu"
    write_json(
        stem.with_suffix(".json"),
        {
            "model": args.model,
            "n_params": cfg.n_params(),
            "state_bytes": state_bytes,
            "ram_bytes": ram,
            "state_over_ram": state_bytes / ram,
            "tokens_per_step": tokens,
            "machine": info,
            "disk_read_bytes_per_s": read_bw,
            "disk_write_bytes_per_s": write_bw,
            "disk_read_bytes_per_s_end": read_bw_end,
            "disk_write_bytes_per_s_end": write_bw_end,
            "probe_bytes": probe["nbytes"],
            "matmul_flops": flops,
            "matmul_flops_end": flops_end,
            "matmul_probe_s": args.matmul_seconds,
            "peak_rss_bytes": peak,
            "predicted_peak_bytes": predicted_peak,
            "peak_prediction_error": predicted_peak / peak - 1,
            "recompute": rows[0]["recompute"],
            "kept_graphs": rows[0]["kept_graphs"],
            "max_memory_gib": args.max_memory,
            "loss_falling": rows[-1]["loss"] < rows[0]["loss"],
            "steps": steps,
        },
    )
    plot(steps, stem.with_suffix(".png"), f"{args.model} from disk; {machine_line(info)}")


def plot(steps: list[dict], path: Path, title: str) -> None:
    """Per timed step: the measured step beside each floor and the prediction."""
    plt = pyplot()

    timed = [s for s in steps if s["over_floor"]]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    bars = (
        ("step_s", "measured step"),
        ("io_floor_s", "I/O floor, disk probed before the steps"),
        ("io_floor_end_s", "I/O floor, disk probed after them"),
        ("disk_busy_s", "disk busy (its own counters)"),
        ("compute_floor_s", "compute floor, matmul probed before"),
        ("compute_floor_end_s", "compute floor, matmul probed after"),
        ("plan_compute_s", "compute with the plan's recompute (before)"),
        ("predicted_step_s", "engine's prediction"),
    )
    width = 0.85 / len(bars)
    for k, (key, label) in enumerate(bars):
        xs = [s["step"] + (k - (len(bars) - 1) / 2) * width for s in timed]
        ax.bar(xs, [s.get(key) or 0 for s in timed], width=width, label=label)
    ax.set_xticks([s["step"] for s in timed])
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
