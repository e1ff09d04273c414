"""Streaming against resident training on the same work, with the planner's prediction.

Sweeps tokens per step; at each point trains a few steps resident, streamed from the
RAM tier and streamed from the disk tier, and reports tokens/s, stall share and the
planner's predicted step time (from a profile calibrated on this machine in the same
run). Plots tokens/s against tokens per step with the predicted curve: the roofline
where the link (or disk) stops being the limit.

    python benchmarks/bench_stream_vs_resident.py --model gpt3-125m --device cpu \\
        --json benchmarks/results/stream_vs_resident_cpu.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, machine_line, pyplot, read_metrics, run_child, streamer_train_cmd, write_json  # noqa: E402

from models import ModelConfig  # noqa: E402
from streamer import planner  # noqa: E402

MODES = (("resident", "auto"), ("stream", "ram"), ("stream", "disk"))


def run_point(
    model: str,
    device: str,
    seq_len: int,
    batch: int,
    accum: int,
    mode: str,
    offload: str,
    steps: int,
    scratch: Path,
    recompute: str,
    update_on: str = "host",
    state: str = "fp32",
    held_units: int | None = None,
) -> dict:
    """Train `steps` steps in a process of its own (so its peak memory is its own); the
    first step is warm-up (allocation, first-touch), the rest are timed, and the fastest
    is reported (the median too)."""
    out = scratch / f"{mode}-{offload}-{batch}x{accum}"
    # Held units live in the RAM tier: a disk run plans without them.
    held = {} if held_units is None or offload != "ram" else {"held_units": held_units}
    flags = ({"offload": offload, "recompute": recompute, "update_on": update_on, "state": state, **held}
             if mode == "stream" else {})
    cmd = streamer_train_cmd(
        model=model,
        mode=mode,
        steps=steps,
        batch_size=batch,
        grad_accum=accum,
        seq_len=seq_len,
        device=device,
        out=out,
        warmup=1,
        **flags,
    )
    run_child(cmd)
    rows = read_metrics(out)[1:]
    shutil.rmtree(out, ignore_errors=True)
    # The fastest timed step: contention from other tenants of a shared machine only
    # ever adds time, and it hit the runs of one sweep unevenly (+-15% between runs).
    step_s = min(r["step_s"] for r in rows)
    result = {
        "mode": mode,
        "offload": offload if mode == "stream" else None,
        "step_s": step_s,
        "step_s_median": statistics.median(r["step_s"] for r in rows),
        "tokens_per_s": rows[0]["tokens"] / step_s,
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rows),
        "peak_device_bytes": max(r.get("peak_device_bytes", 0) for r in rows),
        "loss": [r["loss"] for r in rows],
    }
    if mode == "stream":
        result["stall_share"] = statistics.median(r["stall_s"] / r["step_s"] for r in rows)
        result["link_gbps"] = statistics.median(r["link_gbps"] for r in rows)
        if all("h2d_copy_gbps" in r for r in rows):  # CUDA: the link's rate while it copies
            result["h2d_copy_gbps"] = statistics.median(r["h2d_copy_gbps"] for r in rows)
        result["recompute"] = rows[0]["recompute"]
        result["kept_graphs"] = rows[0]["kept_graphs"]
        # What the run planned: its prediction below plans the same (the planner picks
        # held units and their prefetch depth from its own calibration).
        result["held_units"] = rows[0].get("held_units", 0)
        result["prefetch_depth"] = rows[0]["prefetch_depth"]
        result["state"] = state
    return result


def predict(
    cfg: ModelConfig, profile: planner.DeviceProfile, tokens: int, micro_tokens: int, seq_len: int, result: dict
) -> tuple[float, int]:
    """The planner's step time and peak memory (the device's; on CPU, the process's)
    for one run."""
    if result["mode"] == "resident":
        peak = planner.predict_resident_peak_bytes(cfg, micro_tokens, profile.compute_bytes, tokens // micro_tokens)
        if not profile.shares_host_cores:  # a GPU's memory holds no Python runtime
            peak -= planner.RUNTIME_BYTES
        return planner.predict_resident_step_s(cfg, profile, tokens, seq_len), peak
    plan = planner.make_plan(
        cfg,
        profile,
        tokens,
        seq_len,
        result["offload"],
        micro_tokens=micro_tokens,
        kept_graphs=result["kept_graphs"],
        state=result["state"],
        held_units=result["held_units"],
        prefetch_depth=result["prefetch_depth"],
    )
    return plan.predicted_step_s, planner.peak_bytes(plan, profile)


def plot(points: list[dict], recommended: int, path: Path, title: str) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for (mode, offload), style in zip(MODES, ("o-", "s-", "^-")):
        label = mode if mode == "resident" else f"stream ({offload})"
        rows = [
            (p["tokens_per_step"], r)
            for p in points
            for r in p["runs"]
            if r["mode"] == mode and (mode == "resident" or r["offload"] == offload)
        ]
        if not rows:  # a mode left out (--modes)
            continue
        xs = [t for t, _ in rows]
        ax.plot(xs, [r["tokens_per_s"] for _, r in rows], style, label=f"{label} measured")
        ax.plot(xs, [t / r["predicted_step_s"] for t, r in rows], style[0] + ":", alpha=0.6, label=f"{label} predicted")
    ax.axvline(recommended, color="grey", linestyle="--", label="planner's recommended tokens/step")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens per step")
    ax.set_ylabel("tokens / s")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt3-125m")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--sequences", default="1,4", help="sequences per step to sweep, besides the recommended")
    parser.add_argument("--steps", type=int, default=8, help="steps per point (the first is warm-up)")
    parser.add_argument("--recompute", default="auto", choices=["auto", "yes", "no"])
    parser.add_argument("--update-on", default="host", choices=["host", "device"],
                        help="where the streamer runs AdamW (train's --update-on); on a GPU the device's update "
                             "is the faster, so the recommended tokens per step are fewer and the step recomputes less")
    parser.add_argument("--state", default="fp32", choices=["fp32", "compact", "compact8"],
                        help="the streamer's state format (train's --state); resident training keeps float32 AdamW")
    parser.add_argument("--held-units", type=int, default=None,
                        help="the streamer's held units (train's --held-units; default: the planner decides)")
    parser.add_argument("--modes", default="resident,ram,disk",
                        help="what runs at each point: resident, and streaming from the ram and disk tiers "
                             "(resident and ram are needed; disk is the slowest to run)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    asked = args.modes.split(",")
    if not {"resident", "ram"} <= set(asked) <= {"resident", "ram", "disk"}:
        parser.error("--modes takes resident and ram, and optionally disk, comma-separated")
    if args.held_units and args.update_on != "device":
        parser.error("--held-units holds units for AdamW on the device: add --update-on device")
    modes = [(mode, offload) for mode, offload in MODES if (offload if mode == "stream" else mode) in asked]
    # The memory the planner predicts: a GPU's own; on a CPU device, the process's.
    peak_key = "peak_device_bytes" if args.device == "cuda" else "peak_rss_bytes"
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = ModelConfig.from_name(args.model)
    scratch = Path(tempfile.mkdtemp(prefix="bench-", dir=RESULTS.parent))
    # Compute is calibrated on one block of the model at the largest micro-batch swept.
    profile = planner.measure_profile(device, dtype, scratch, model=(cfg, 8, args.seq_len))
    if args.update_on == "device" and device.type == "cuda":  # the state's update on this GPU, measured
        rate = planner.measure_update_rate(state=args.state, device=device)
        stream_profile = planner.with_device_update(profile, args.state, rate, pipelined=True)
    else:
        stream_profile = profile
    # Planned at the sweep's micro-batch (8 sequences at most): it sizes the head's logits,
    # which the memory the recommendation keeps graphs in must leave room for.
    probe = planner.make_plan(cfg, stream_profile, 8 * args.seq_len, args.seq_len, "ram",
                              micro_tokens=8 * args.seq_len, state=args.state, held_units=args.held_units)
    recommended = probe.recommended_tokens_per_step
    # The recommended point first: it is the overlap target's, and a run cut short by a
    # time limit keeps the points already written (the JSON is rewritten after each).
    sweep = sorted({int(s) * args.seq_len for s in args.sequences.split(",")} | {recommended},
                   key=lambda t: (t != recommended, t))
    info = machine()
    print(f"{args.model} on {args.device}: {machine_line(info)}")
    print(
        f"calibrated: {profile.matmul_flops / 1e9:.0f} GFLOP/s (one block, fwd+bwd), "
        f"copy {profile.h2d_bytes_per_s / 1e9:.1f} GB/s, "
        f"disk read {profile.disk_read_bytes_per_s / 1e9:.2f} / write {profile.disk_write_bytes_per_s / 1e9:.2f} "
        f"GB/s, host update {profile.host_update_bytes_per_s / 1e9:.1f} GB/s; recommended {recommended} tokens/step"
    )
    points = []
    print(
        f"{'tokens':>7} {'mode':<14} {'step s':>8} {'pred s':>8} {'err':>6} {'tok/s':>8} {'stall':>6} {'ratio':>6}"
        f" {'peak GiB':>9} {'pred GiB':>9} {'err':>6}"
    )
    for tokens in sweep:
        sequences = tokens // args.seq_len
        # Micro-batches of at most 8 sequences, as few as that allows, as even as can be:
        # the step holds the fewest whole micro-batches that reach the asked tokens.
        accum = -(-sequences // 8)
        batch = -(-sequences // accum)
        tokens = batch * accum * args.seq_len
        # Each point's prediction uses the compute rate of its own micro-batch shape,
        # probed before and after the point's runs and taken at the faster of the two, as
        # each run's step time is its fastest step: on this shared machine the matmul
        # rate swings 130-190 GFLOP/s from one second to the next, and a probe taken
        # only before can land on a slow stretch that the runs missed, or the reverse.
        rates = [planner.measure_model_flops(cfg, device, dtype, batch, args.seq_len, repeat=6)]
        runs = [
            run_point(
                args.model, args.device, args.seq_len, batch, accum, mode, offload, args.steps, scratch, args.recompute,
                args.update_on, args.state, args.held_units,
            )
            for mode, offload in modes
        ]
        rates.append(planner.measure_model_flops(cfg, device, dtype, batch, args.seq_len, repeat=6))
        point_profile = planner.replace(profile, matmul_flops=max(rates))
        for result in runs:
            micro = batch * args.seq_len
            chosen = point_profile if result["mode"] == "resident" else planner.replace(
                stream_profile, matmul_flops=point_profile.matmul_flops)
            predicted_s, predicted_peak = predict(cfg, chosen, tokens, micro, args.seq_len, result)
            result["predicted_step_s"] = predicted_s
            result["prediction_error"] = predicted_s / result["step_s"] - 1
            result["predicted_peak_bytes"] = predicted_peak
            result["peak_prediction_error"] = predicted_peak / result[peak_key] - 1
        resident = runs[0]["tokens_per_s"]
        for r in runs:
            r["ratio_over_resident"] = r["tokens_per_s"] / resident
            label = r["mode"] if r["mode"] == "resident" else f"stream-{r['offload']}"
            stall = f"{r['stall_share']:.1%}" if "stall_share" in r else "-"
            print(
                f"{tokens:>7} {label:<14} {r['step_s']:>8.2f} {r['predicted_step_s']:>8.2f} "
                f"{r['prediction_error']:>+6.0%} {r['tokens_per_s']:>8.0f} {stall:>6} "
                f"{r['ratio_over_resident']:>6.3f} {r[peak_key] / 2**30:>9.2f} "
                f"{r['predicted_peak_bytes'] / 2**30:>9.2f} {r['peak_prediction_error']:>+6.0%}"
            )
        points.append(
            {
                "tokens_per_step": tokens,
                "model_flops": point_profile.matmul_flops,
                "model_flops_probes": rates,
                "runs": runs,
            }
        )
        write_results(args, points, recommended, stream_profile, info)
    shutil.rmtree(scratch, ignore_errors=True)


def write_results(args: argparse.Namespace, points: list[dict], recommended: int, profile: planner.DeviceProfile,
                  info: dict) -> None:
    """The summary, plot and JSON of the points measured so far."""
    points = sorted(points, key=lambda p: p["tokens_per_step"])
    at_rec = next(p for p in points if p["tokens_per_step"] >= recommended)
    ram_run = next(r for r in at_rec["runs"] if r.get("offload") == "ram")
    ratio = ram_run["ratio_over_resident"]
    max_err = max(abs(r["prediction_error"]) for p in points for r in p["runs"])
    max_peak_err = max(abs(r["peak_prediction_error"]) for p in points for r in p["runs"])
    print(
        f"stream (RAM) / resident at {at_rec['tokens_per_step']} tokens/step: {ratio:.3f}; "
        f"max |prediction error| step time {max_err:.1%}, peak memory {max_peak_err:.1%}"
        + (f"; link while copying {ram_run['h2d_copy_gbps']:.1f} GB/s" if "h2d_copy_gbps" in ram_run else "")
    )
    stem = args.json.with_suffix("") if args.json else RESULTS / f"stream_vs_resident_{args.device}"
    write_json(  # before the plot: a plotting failure must not lose the measurements
        stem.with_suffix(".json"),
        {
            "model": args.model,
            "device": args.device,
            "update_on": args.update_on,
            "state": args.state,
            "held_units": ram_run.get("held_units", 0),
            "seq_len": args.seq_len,
            "machine": info,
            "profile": planner.asdict(profile),
            "recommended_tokens_per_step": recommended,
            "ratio_stream_over_resident": ratio,
            "h2d_copy_gbps_at_recommended": ram_run.get("h2d_copy_gbps"),
            "max_prediction_error": max_err,
            "max_peak_prediction_error": max_peak_err,
            "points": points,
        },
    )
    plot(points, recommended, stem.with_suffix(".png"), f"{args.model}, {machine_line(info)}")


if __name__ == "__main__":
    main()
