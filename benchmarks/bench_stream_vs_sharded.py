"""Streaming on one process against PyTorch FSDP2 over N processes, on the same work.

The same model, initial weights, global batch, data, learning-rate schedule, clipping
and steps are trained (a) by the streamer in one process and (b) by FSDP2
(`torch.distributed.fsdp.fully_shard` on every block and the root) over N processes:
gloo on CPU, NCCL on GPUs, or on a single GPU FSDP2 with `CPUOffloadPolicy`. Reports
tokens/s, peak memory per process, bytes moved per step, and whether the loss curves
agree.

Each side runs twice: under glibc's default allocator, which is what users get and the
faster (the throughput comparison), and with its mmap threshold fixed
(`MALLOC_MMAP_THRESHOLD_`, 1 MiB), which returns freed tensors to the system at once.
The default's dynamic threshold keeps freed tensors on the heaps of a process with many
threads, so there a process holds more than its tensors need; the fixed threshold
shows what the tensors need, which is what the planner's memory model predicts, and
costs both sides speed in page faults (1.08-1.28x the step time in two runs on the
project's CPU machine). Every run makes its own step-time and memory predictions.

    python benchmarks/bench_stream_vs_sharded.py --model gpt3-125m --world 2 \\
        --json benchmarks/results/stream_vs_sharded_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, machine_line, pyplot, read_metrics, run_child, streamer_train_cmd, write_json  # noqa: E402

from models import GPT, ModelConfig, loss_fn  # noqa: E402
from streamer import planner  # noqa: E402
from streamer.optim import decays, lr_at  # noqa: E402
from streamer.parallel import end_process, leave  # noqa: E402
from streamer.train import TrainConfig, micro_batches, peak_rss_bytes, reset_peak_rss  # noqa: E402


def shared_settings(args: argparse.Namespace, world: int) -> TrainConfig:
    """One process's share of the global batch; both runs derive everything from this."""
    return TrainConfig(
        model=args.model,
        steps=args.steps,
        batch_size=args.global_batch // world,
        grad_accum=1,
        seq_len=args.seq_len,
        warmup=1,
        lr=args.lr,
        device=args.device,
        progress=False,
    )


# Allocations of 1 MiB and more are mmapped and returned to the system when freed.
FIXED_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def run_streaming(args: argparse.Namespace, scratch: Path, env: dict | None = None, update_on: str = "host") -> dict:
    out = scratch / f"stream-{update_on}{'-fixed' if env else ''}"
    cfg = shared_settings(args, 1)
    cmd = streamer_train_cmd(
        model=args.model,
        mode="stream",
        steps=args.steps,
        batch_size=cfg.batch_size,
        seq_len=args.seq_len,
        warmup=1,
        lr=args.lr,
        device=args.device,
        offload="ram",
        update_on=update_on,
        out=out,
    )
    run_child(cmd, env={**os.environ, **(env or {})})
    rows = read_metrics(out)
    timed = rows[1:]
    step_s = min(r["step_s"] for r in timed)  # both runs: the fastest timed step (contention only adds)
    peak = max(r["peak_rss_bytes"] for r in rows)
    return {
        "losses": [r["loss"] for r in rows],
        "step_s": step_s,
        # The engine's own prediction, calibrated in its first step with updates.
        "predicted_step_s": rows[-1]["predicted_step_s"],
        "prediction": rows[-1]["prediction"],
        "predicted_peak_host_bytes": rows[-1]["predicted_peak_bytes"],
        "tokens_per_step": rows[0]["tokens"],
        "peak_host_bytes_per_process": [peak],
        "peak_host_bytes_by_step": [r["peak_rss_bytes"] for r in rows],
        "peak_device_bytes_per_process": [max(r["peak_device_bytes"] for r in rows)],
        "bytes_moved_per_step": statistics.median(r["bytes_in"] + r["bytes_out"] for r in timed),
        "processes": 1,
        "update_on": update_on,
    }


def run_sharded(args: argparse.Namespace, scratch: Path, env: dict | None = None) -> dict:
    result = scratch / ("fsdp-fixed.json" if env else "fsdp.json")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.world}",
        __file__,
        "--worker",
        "--model",
        args.model,
        "--steps",
        str(args.steps),
        "--global-batch",
        str(args.global_batch),
        "--seq-len",
        str(args.seq_len),
        "--lr",
        str(args.lr),
        "--device",
        args.device,
        "--world",
        str(args.world),
        "--json",
        str(result),
    ]
    run_child(cmd, env={**os.environ, **(env or {})})
    return json.loads(result.read_text())


def fsdp_worker(args: argparse.Namespace) -> None:
    """One FSDP2 rank: the same model, data, optimizer and schedule as the streamer."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from streamer.data import BatchSampler, default_corpus, load_tokens

    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    cfg = shared_settings(args, world)
    model_cfg = ModelConfig.from_name(args.model)
    with torch.device("meta"):  # one draw of the weights, not the layers' defaults and then ours
        model = GPT(model_cfg)
    model.to_empty(device="cpu")
    model.init_weights(cfg.seed)
    mesh = init_device_mesh(device.type, (world,))
    # One GPU cannot shard anything away: offloading to the host is FSDP's way to fit.
    offload = {"offload_policy": CPUOffloadPolicy()} if cuda and world == 1 else {}
    if cuda and not offload:
        model.to(device)
    for block in model.units[1:-1]:
        fully_shard(block, mesh=mesh, **offload)
    fully_shard(model, mesh=mesh, **offload)
    optim = cfg.optim_config()
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if decays(n, p)], "weight_decay": optim.weight_decay},
            {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0},
        ],
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        fused=True,  # the fastest AdamW torch has, as the streamer and resident training use
    )
    sampler = BatchSampler(load_tokens(default_corpus(), model_cfg.vocab_size), cfg.seq_len, cfg.seed)
    rates = measure_rank_rates(model_cfg, cfg, device, world)
    reset_peak_rss()  # the peak of training, not of the profiling above
    losses, times, peaks = [], [], []
    for step in range(cfg.steps):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, optim)
        ((x, y),) = micro_batches(sampler, step, cfg, rank, world)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(model(x.to(device)), y.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        peaks.append(peak_rss_bytes())
    everyone = [None] * world
    dist.all_gather_object(everyone, peaks)
    # As objects: NCCL gathers only into CUDA tensors, and these are two numbers.
    finals = [None] * world
    dist.all_gather_object(finals, (peak_rss_bytes(), torch.cuda.max_memory_allocated() if cuda else 0))
    hosts, devs = [h for h, _ in finals], [d for _, d in finals]
    if rank == 0:
        params = model_cfg.n_params()
        # Per rank and step: all-gather of parameters for forward and again for backward
        # (FSDP2 reshards after forward), reduce-scatter of gradients: 3 x P x 4 bytes x
        # (N - 1) / N over the interconnect; with CPU offload, P x 4 in and out per pass.
        moved = 3 * params * 4 * (world - 1) / world if world > 1 else 3 * params * 4
        tokens_per_rank = cfg.batch_size * cfg.seq_len
        if cuda:  # one GPU, CPU offload: the link and the host's AdamW instead of collectives
            predicted = planner.predict_fsdp_offload_step_s(model_cfg, tokens_per_rank, cfg.seq_len, rates["flops"],
                                                            rates["h2d"], rates["d2h"], rates["update"])
        else:
            predicted = planner.predict_fsdp_step_s(model_cfg, tokens_per_rank, cfg.seq_len, world, rates["flops"],
                                                    rates["gather"], rates["scatter"], rates["update"])
        write_json(
            Path(args.json),
            {
                "losses": losses,
                "step_s": min(times[1:]),
                "tokens_per_step": cfg.batch_size * world * cfg.seq_len,
                "peak_host_bytes_per_process": [int(h) for h in hosts],
                "peak_host_bytes_by_step": [max(p[i] for p in everyone) for i in range(len(peaks))],
                "peak_device_bytes_per_process": [int(d) for d in devs],
                "bytes_moved_per_step": moved,
                "processes": world,
                "rank_rates": rates,
                "predicted_step_s": predicted,
                "predicted_peak_host_bytes": planner.predict_fsdp_peak_bytes(model_cfg, tokens_per_rank, world, 4)
                if not cuda else None,
            },
        )
    leave()  # all ranks together: see streamer.parallel.leave
    end_process()


def measure_rank_rates(model_cfg: ModelConfig, cfg: TrainConfig, device: torch.device, world: int) -> dict:
    """What the FSDP2 cost model needs, measured by every rank at once (so they contend
    for the cores as they will in training): the compute rate of one block at the
    rank's micro-batch (as the streamer profiles its own), all-gather bandwidth (bytes
    received per second), reduce-scatter bandwidth, host AdamW rate. Rank 0's figures are kept."""
    import torch.distributed as dist

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # A barrier before each timed pass: the ranks time the same part at the same moment.
    flops = planner.measure_model_flops(model_cfg, device, dtype, cfg.batch_size, cfg.seq_len,
                                        before_pass=dist.barrier)
    piece = torch.ones(16 * 2**20 // world, device=device)
    whole = torch.empty(piece.numel() * world, device=device)
    rates = {"flops": flops}
    for name, collective in (("gather", lambda: dist.all_gather_into_tensor(whole, piece)),
                             ("scatter", lambda: dist.reduce_scatter_tensor(piece, whole))):
        collective()  # warm-up: connections, buffers
        started = time.perf_counter()
        for _ in range(4):
            collective()
        rates[name] = 4 * 4 * piece.numel() * (world - 1) / (time.perf_counter() - started)
        dist.barrier()
    if device.type == "cuda":  # CPU offload moves the parameters over the host link
        rates["h2d"], rates["d2h"] = planner.measure_copy_bandwidth(device)
    return {**rates, "update": planner.measure_update_rate()}


def plot(stream: dict, sharded: dict, path: Path, title: str) -> None:
    plt = pyplot()

    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8))
    left.plot(stream["losses"], "o-", label="stream (1 process)")
    left.plot(sharded["losses"], "s--", label=f"FSDP2 ({sharded['processes']} processes)")
    left.set_xlabel("step")
    left.set_ylabel("loss")
    left.legend(fontsize=8)
    names = ["stream", "FSDP2"]
    right.bar(names, [stream["tokens_per_s"], sharded["tokens_per_s"]], color=["C0", "C1"])
    right.set_ylabel("tokens / s")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt3-125m")
    parser.add_argument("--world", type=int, default=2, help="FSDP2 processes")
    parser.add_argument("--global-batch", type=int, default=4, help="sequences per step, over all processes")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--fixed-threshold", action=argparse.BooleanOptionalAction, default=True,
                        help="also run each side with the mmap threshold fixed (host memory as the tensors "
                             "need it); --no-fixed-threshold halves the runs where host memory is not the "
                             "question, as on a GPU")
    parser.add_argument("--stream-updates", default="host",
                        help="where the streamer runs AdamW, host and/or device, comma-separated: each is a run of "
                             "its own, and the faster is compared (on a GPU the device's update wins where the "
                             "host's would cost as much as FSDP2's own host AdamW)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        fsdp_worker(args)
        return
    if args.global_batch % args.world:
        parser.error("--global-batch must be a multiple of --world")
    if args.device == "cpu" and args.world < 2:  # on a GPU, one process offloads to the host instead
        parser.error("on CPU, FSDP2 in one process shards nothing: use --world 2 or more")
    updates = args.stream_updates.split(",")
    if not updates or not set(updates) <= {"host", "device"} or len(set(updates)) < len(updates):
        parser.error(f"--stream-updates takes host and/or device, comma-separated, got '{args.stream_updates}'")
    scratch = Path(tempfile.mkdtemp(prefix="bench-sharded-"))
    info = machine()
    print(f"{args.model}, global batch {args.global_batch} x {args.seq_len}, {args.steps} steps: {machine_line(info)}")
    streams = {u: run_streaming(args, scratch, update_on=u) for u in updates}
    sharded = run_sharded(args, scratch)
    stream = min(streams.values(), key=lambda r: r["step_s"])  # the streamer's faster configuration is compared
    fixed = ({"stream": run_streaming(args, scratch, FIXED_THRESHOLD, stream["update_on"]),
              "sharded": run_sharded(args, scratch, FIXED_THRESHOLD)} if args.fixed_threshold else {})
    # Every run trains the same steps on the same data: all curves must agree. On CPU
    # both sides compute in float32 (to rounding); on a GPU the streamer computes with
    # bf16 weights and FSDP2 with float32 weights under bf16 autocast, which round in
    # other places (a few hundredths of a nat).
    curves = [stream["losses"], *(r["losses"] for r in streams.values() if r is not stream), sharded["losses"],
              *(run["losses"] for run in fixed.values())]
    max_gap = max(abs(a - b) for curve in curves[1:] for a, b in zip(curves[0], curve))
    tolerance = 1e-3 if args.device == "cpu" else 5e-2
    print(
        f"{'run':<26}{'allocator':<11}{'tok/s':>7}{'step s':>8}{'pred s':>8}{'err':>6}"
        f"{'peak host GiB/proc':>20}{'pred':>7}{'err':>6}{'GB moved/step':>15}"
    )
    runs = [(f"stream, AdamW on {u}", "stream" if r is stream else None, r) for u, r in streams.items()]
    for name, key, r in (*runs, (f"FSDP2, {sharded['processes']} processes", "sharded", sharded)):
        for allocator, run in (("default", r), *((("fixed", fixed[key]),) if fixed and key else ())):
            run["tokens_per_s"] = run["tokens_per_step"] / run["step_s"]
            peak = max(run["peak_host_bytes_per_process"])
            predicted_s, predicted_peak = run.get("predicted_step_s"), run.get("predicted_peak_host_bytes")
            run["prediction_error"] = predicted_s / run["step_s"] - 1 if predicted_s else None
            run["peak_prediction_error"] = predicted_peak / peak - 1 if predicted_peak else None
            print(
                f"{name if allocator == 'default' else '':<26}{allocator:<11}{run['tokens_per_s']:>7.0f}"
                f"{run['step_s']:>8.2f}{predicted_s or 0:>8.2f}{run['prediction_error'] or 0:>+6.0%}"
                f"{peak / 2**30:>20.2f}{(predicted_peak or 0) / 2**30:>7.2f}{run['peak_prediction_error'] or 0:>+6.0%}"
                f"{run['bytes_moved_per_step'] / 1e9:>15.2f}"
            )
        by_step = " ".join(f"{p / 2**30:.2f}" for p in r["peak_host_bytes_by_step"])
        if fixed and key:
            r["fixed_threshold"] = fixed[key]
            # What the default allocator holds beyond the tensors, as a multiple.
            r["default_over_fixed_peak"] = max(r["peak_host_bytes_per_process"]) / max(
                fixed[key]["peak_host_bytes_per_process"])
            peaks = fixed[key]["peak_host_bytes_by_step"]
            by_step += "; fixed threshold " + " ".join(f"{p / 2**30:.2f}" for p in peaks)
        print(f"{'':<26}peak GiB by step: default {by_step}")
    print(
        f"loss curves (all {len(curves)} runs): max |difference| {max_gap:.2e} over {args.steps} steps "
        f"({'agree' if max_gap < tolerance else 'DIFFER'}, tolerance {tolerance:g})"
    )
    stem = args.json.with_suffix("") if args.json else RESULTS / f"stream_vs_sharded_{args.device}"
    write_json(
        stem.with_suffix(".json"),
        {
            "model": args.model,
            "device": args.device,
            "world": args.world,
            "global_batch": args.global_batch,
            "seq_len": args.seq_len,
            "steps": args.steps,
            "machine": info,
            "stream": stream,  # the faster of `streams`
            "streams": streams,
            "sharded": sharded,
            "loss_max_abs_difference": max_gap,
            "losses_agree": max_gap < tolerance,
            "loss_tolerance": tolerance,
            "stream_over_sharded_tokens_per_s": stream["tokens_per_s"] / sharded["tokens_per_s"],
            "stream_over_sharded_by_update": {u: r["tokens_per_s"] / sharded["tokens_per_s"]
                                              for u, r in streams.items()},
        },
    )
    # After the JSON: a plotting failure must not lose the measurements.
    plot(stream, sharded, stem.with_suffix(".png"), f"{args.model}; {machine_line(info)}")


if __name__ == "__main__":
    main()
