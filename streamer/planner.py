"""The planner: pure functions from (model, device profile, run shape) to a plan.

Nothing here touches hardware except `measure_profile`, which calibrates a profile on
this machine; everything else is arithmetic that tests check without a GPU.

[Note: when streaming hides]
A unit of P parameters costs 2·P·T FLOPs forward and, with recompute, 2·P·T + 4·P·T
backward for T tokens per step (all micro-batches pass while the unit is resident).
Moving its weights costs P·b bytes (b bytes per parameter in compute dtype). Compute
covers the transfer when 2·P·T / F >= P·b / W, i.e. T >= F·b / (2·W) for the forward
and T >= F·max(b/W_in, g/W_out) / 6 for the backward (weights in and gradients of g
bytes out overlap on a full-duplex link). Below that the link, not the device, sets
the step time; above it streaming costs only the recompute and the optimizer.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import psutil
import torch

from models import ModelConfig, UnknownModelError
from streamer.errors import UserError

STATE_BYTES_PER_PARAM = 16  # float32 master weight, gradient, Adam first and second moments


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    matmul_flops: float  # sustained dense matmul rate in the compute dtype (FLOP/s)
    h2d_bytes_per_s: float  # pinned host -> device copy
    d2h_bytes_per_s: float  # device -> pinned host copy
    device_memory_bytes: float
    disk_read_bytes_per_s: float
    disk_write_bytes_per_s: float
    host_update_bytes_per_s: float  # AdamW over flat fp32 buffers on the host, bytes touched/s
    compute_bytes: int = 2  # bytes per parameter on the device (bf16)
    host_memory_bytes: float = 128 * 2**30  # the host the device sits in
    disk_free_bytes: float = 64 * 2**30
    device_update_bytes_per_s: float = 2e12  # resident AdamW on the device (HBM-bound)
    # A CPU "device" runs compute and the host worker on the same cores, so host work
    # adds to the step instead of hiding behind compute.
    shares_host_cores: bool = False
    # Free memory the kernel can use as page cache: a disk-tier store that fits is
    # served at memory speed after its first pass.
    page_cache_bytes: float = 64 * 2**30


# Sustained (not datasheet) figures; `--measure` replaces them with this machine's.
PROFILES: dict[str, DeviceProfile] = {
    "h100": DeviceProfile("h100", 6.5e14, 5.0e10, 5.0e10, 80e9, 3.0e9, 2.0e9, 2.0e10),
    "h200": DeviceProfile("h200", 6.5e14, 5.0e10, 5.0e10, 141e9, 3.0e9, 2.0e9, 2.0e10),
    "a100": DeviceProfile("a100", 2.5e14, 2.4e10, 2.4e10, 80e9, 3.0e9, 2.0e9, 2.0e10),
    # A 2-core CPU "device": the link is a host memory copy, the update shares the cores.
    "cpu": DeviceProfile("cpu", 8e10, 5e9, 5e9, 0.0, 1.0e9, 0.8e9, 4e9, compute_bytes=4,
                         host_memory_bytes=24 * 2**30, device_update_bytes_per_s=4e9, shares_host_cores=True,
                         page_cache_bytes=12 * 2**30),
}


@dataclass(frozen=True)
class Plan:
    """Where every byte lives and what a step costs; the streamer runs what this says."""

    model: str
    device: str
    offload: str
    prefetch_depth: int
    tokens_per_step: int
    seq_len: int
    n_params: int
    n_units: int
    max_unit_params: int
    device_bytes: int
    host_bytes: int
    disk_bytes: int
    h2d_bytes_per_step: int
    d2h_bytes_per_step: int
    disk_read_bytes_per_step: int
    disk_write_bytes_per_step: int
    min_tokens_forward: int
    min_tokens_backward: int
    min_tokens_disk: int
    min_tokens_per_step: int
    recommended_tokens_per_step: int
    recompute: bool
    fits_device: bool  # device_bytes within the device's memory (always true for a CPU device)
    compute_s: float
    predicted_step_s: float


def unit_param_counts(cfg: ModelConfig) -> list[int]:
    """Parameters per unit (embedding, blocks, head), from the analytic count."""
    d, v = cfg.d_model, cfg.padded_vocab_size
    embed = v * d + (cfg.block_size * d if cfg.positional == "learned" else 0)
    head = 2 * d + (0 if cfg.tie_embeddings else v * d + (v if cfg.head_bias else 0))
    block = (cfg.n_params() - embed - head) // cfg.n_layer
    return [embed, *([block] * cfg.n_layer), head]


def _unit_flops_per_token(cfg: ModelConfig, seq_len: int) -> list[float]:
    """Forward FLOPs per token for each unit (the embedding lookup is free; a tied head
    is a matmul over the embedding table)."""
    counts = unit_param_counts(cfg)
    head_matmul = cfg.padded_vocab_size * cfg.d_model
    block = 2 * counts[1] + 4 * seq_len * cfg.d_model  # weights + attention scores and sum
    return [0.0, *([float(block)] * cfg.n_layer), 2.0 * head_matmul]


def activation_bytes(cfg: ModelConfig, tokens_per_step: int, micro_tokens: int, act_bytes: int) -> int:
    """Unit-boundary activations for the whole step plus one unit's working set.

    The working set (attention and MLP intermediates of one micro-batch while a unit
    recomputes and backpropagates) is about 34 x d_model values per token for a block,
    the count from the Megatron activation-recompute paper, and the logits for the head.
    """
    boundary = (cfg.n_layer + 2) * tokens_per_step * cfg.d_model * act_bytes
    working = micro_tokens * max(34 * cfg.d_model * act_bytes, 3 * cfg.vocab_size * 4)
    return boundary + working


def graph_activation_bytes(cfg: ModelConfig, tokens_per_step: int, act_bytes: int) -> int:
    """What autograd keeps for the whole step when no unit is recomputed: about 34 x
    d_model values per token per block (flash attention keeps no T x T scores)."""
    return cfg.n_layer * tokens_per_step * 34 * cfg.d_model * act_bytes


def choose_recompute(cfg: ModelConfig, tokens_per_step: int, act_bytes: int, budget_bytes: float,
                     asked: str = "auto") -> bool:
    """Recompute only when keeping every unit's graph would not fit the memory budget:
    recompute costs a third more compute in the blocks."""
    if asked in ("yes", "no"):
        return asked == "yes"
    return graph_activation_bytes(cfg, tokens_per_step, act_bytes) > budget_bytes


def choose_prefetch_depth(unit_compute_s: float, unit_transfer_s: float) -> int:
    """Enough units in flight that one unit's compute covers the next transfers, with one
    spare to absorb jitter; capped because each one costs a unit of device memory."""
    if unit_compute_s <= 0:
        return 2
    return max(1, min(4, math.ceil(unit_transfer_s / unit_compute_s) + 1))


@dataclass(frozen=True)
class Visit:
    """One unit visit of a step, in seconds: device compute, host-worker work to bring
    the unit in (update, read, copy), the device link in, and gradient work out."""

    compute_s: float
    host_in_s: float
    link_in_s: float
    out_s: float


def step_visits(cfg: ModelConfig, profile: DeviceProfile, tokens_per_step: int, seq_len: int, offload: str,
                depth: int, recompute: bool) -> list[Visit]:
    """The visits of one step (forward 0..U-2, head, backward U-2..0) with their costs,
    mirroring `StreamEngine.visits`; units still pinned in the window move nothing."""
    counts = unit_param_counts(cfg)
    flops = _unit_flops_per_token(cfg, seq_len)
    head = len(counts) - 1
    b, mem, F = profile.compute_bytes, profile.host_update_bytes_per_s, profile.matmul_flops
    disk_r, disk_w = profile.disk_read_bytes_per_s, profile.disk_write_bytes_per_s
    if STATE_BYTES_PER_PARAM * sum(counts) <= 0.5 * profile.page_cache_bytes:
        disk_r = disk_w = mem  # the store stays in the page cache: files move at memory speed
    order = [("forward", u) for u in range(head)] + [("head", head)]
    order += [("backward", u) for u in range(head - 1, -1, -1)]
    last_seen: dict[int, int] = {}
    visits = []
    for v, (phase, unit) in enumerate(order):
        p, f = counts[unit], flops[unit] * tokens_per_step / F
        pinned = unit in last_seen and v - last_seen[unit] <= depth or (cfg.tie_embeddings and unit == 0 and v > 0)
        last_seen[unit] = v
        compute = {"forward": f, "head": 3 * f, "backward": (3 if recompute else 2) * f}[phase]
        host_in = link_in = 0.0
        if not pinned:
            # A CPU device computes straight from the slot the host worker filled.
            link_in = 0.0 if profile.shares_host_cores else p * b / profile.h2d_bytes_per_s
            host_in = p * (4 + b) / mem  # read the float32 master, write the compute copy
            if phase == "forward":
                host_in += 28 * p / mem  # the AdamW update due from the previous step
            if offload == "disk":
                host_in += (16 * p / disk_r + 12 * p / disk_w) if phase == "forward" else 4 * p / disk_r
        out = 0.0
        if phase != "forward":
            out = p * 4 / profile.d2h_bytes_per_s + (4 * p / disk_w if offload == "disk" else 8 * p / mem)
        visits.append(Visit(compute, host_in, link_in, out))
    return visits


def simulate_step(visits: list[Visit], depth: int) -> tuple[float, float]:
    """Step time and stall time of the engine's pipeline: a single host worker serves
    staging jobs (issued `depth` visits ahead) and gradient jobs in FIFO order; the link
    copy follows the host job; compute starts when its weights have arrived."""
    n = len(visits)
    arrive = [0.0] * n
    worker = link = compute_end = stall = 0.0

    def issue(w: int, at: float) -> None:
        nonlocal worker, link
        worker = max(worker, at) + visits[w].host_in_s
        link = max(link, worker) + visits[w].link_in_s
        arrive[w] = link

    for w in range(min(depth, n)):
        issue(w, 0.0)
    for v, visit in enumerate(visits):
        start = max(compute_end, arrive[v])
        stall += start - compute_end
        if v + depth < n:
            issue(v + depth, start)
        compute_end = start + visit.compute_s
        if visit.out_s:
            worker = max(worker, compute_end) + visit.out_s
    return max(compute_end, worker), stall


def predicted_stream_s(visits: list[Visit], depth: int, profile: DeviceProfile) -> float:
    """Step time of the streamer: the pipeline simulation, or, when compute and host
    work share the CPU cores, their sum."""
    if profile.shares_host_cores:
        return sum(v.compute_s + v.host_in_s + v.link_in_s + v.out_s for v in visits)
    return simulate_step(visits, depth)[0]


def recommended_tokens(cfg: ModelConfig, profile: DeviceProfile, seq_len: int, offload: str, depth: int,
                       recompute: bool, overhead: float = 0.05) -> int:
    """The fewest tokens per step (whole sequences) at which moving data costs at most
    `overhead` of the step: the predicted step is within that share of its compute plus
    the optimizer time resident training also pays. Doublings, then a binary search."""
    update_s = 28 * cfg.n_params() / profile.device_update_bytes_per_s

    def too_slow(tokens: int) -> bool:
        visits = step_visits(cfg, profile, tokens, seq_len, offload, depth, recompute)
        ideal = sum(v.compute_s for v in visits) + update_s
        return predicted_stream_s(visits, depth, profile) > (1 + overhead) * ideal

    sequences = 1
    while too_slow(sequences * seq_len) and sequences < 2**20:
        sequences *= 2
    low = sequences // 2 + 1 if sequences > 1 else 1
    while low < sequences:
        mid = (low + sequences) // 2
        if too_slow(mid * seq_len):
            low = mid + 1
        else:
            sequences = mid
    return sequences * seq_len


def make_plan(cfg: ModelConfig, profile: DeviceProfile, tokens_per_step: int, seq_len: int,
              offload: str, micro_tokens: int | None = None, prefetch_depth: int | None = None,
              memory_budget: float | None = None, recompute: str = "auto") -> Plan:
    """Bytes per tier, bytes per link, the hiding threshold and the predicted step time.

    `memory_budget` is what activations may use (default: 80% of the device's memory;
    a CPU device passes its host's)."""
    if memory_budget is None:
        if profile.device_memory_bytes:
            memory_budget = 0.8 * profile.device_memory_bytes
        else:  # a CPU device: activations share host memory with a RAM-tier store
            state = STATE_BYTES_PER_PARAM * cfg.n_params() if offload == "ram" else 0
            memory_budget = 0.5 * profile.host_memory_bytes - state
    budget = memory_budget
    do_recompute = choose_recompute(cfg, tokens_per_step, profile.compute_bytes, budget, recompute)
    counts = unit_param_counts(cfg)
    n_params, biggest = sum(counts), max(counts)
    b, g = profile.compute_bytes, 4  # weights in compute dtype in, float32 gradients out
    F = profile.matmul_flops
    flops = _unit_flops_per_token(cfg, seq_len)
    unit_compute = flops[1] * tokens_per_step / F if cfg.n_layer else 0.0
    depth = prefetch_depth or choose_prefetch_depth(unit_compute, counts[1] * b / profile.h2d_bytes_per_s)
    visits = step_visits(cfg, profile, tokens_per_step, seq_len, offload, depth, do_recompute)
    predicted = predicted_stream_s(visits, depth, profile)

    backward_ratio = 6 if do_recompute else 4  # backward FLOPs per parameter per token
    min_fwd = F * b / (2 * profile.h2d_bytes_per_s)
    min_bwd = F * max(b / profile.h2d_bytes_per_s, g / profile.d2h_bytes_per_s) / backward_ratio
    disk_read = disk_write = 0
    min_disk = 0.0
    if offload == "disk":
        # The update reads p, g, m, v and writes p, m, v, and hands p straight to the
        # forward; backward re-reads p; gradients are written once.
        disk_read, disk_write = 20 * n_params, 16 * n_params
        per_token = 2 + backward_ratio
        min_disk = F * (20 / profile.disk_read_bytes_per_s + 16 / profile.disk_write_bytes_per_s) / per_token

    recommended = recommended_tokens(cfg, profile, seq_len, offload, depth, do_recompute)
    micro = micro_tokens or tokens_per_step
    resident_units = depth + 1 + (1 if cfg.tie_embeddings else 0)  # a tied table stays for the head
    activations = (activation_bytes(cfg, tokens_per_step, micro, b) if do_recompute
                   else graph_activation_bytes(cfg, tokens_per_step, b))
    device_bytes = resident_units * biggest * b + 2 * biggest * g + activations
    staging = (depth + 1) * biggest * (b + g)
    host_bytes = staging + (STATE_BYTES_PER_PARAM * n_params if offload == "ram" else 4 * biggest * 4)
    return Plan(
        model=cfg.name, device=profile.name, offload=offload, prefetch_depth=depth,
        tokens_per_step=tokens_per_step, seq_len=seq_len, n_params=n_params, n_units=len(counts),
        max_unit_params=biggest, device_bytes=int(device_bytes), host_bytes=int(host_bytes),
        disk_bytes=STATE_BYTES_PER_PARAM * n_params if offload == "disk" else 0,
        h2d_bytes_per_step=2 * n_params * b, d2h_bytes_per_step=n_params * g,
        disk_read_bytes_per_step=disk_read, disk_write_bytes_per_step=disk_write,
        min_tokens_forward=math.ceil(min_fwd), min_tokens_backward=math.ceil(min_bwd),
        min_tokens_disk=math.ceil(min_disk),
        min_tokens_per_step=math.ceil(max(min_fwd, min_bwd, min_disk)),
        recommended_tokens_per_step=recommended, recompute=do_recompute,
        fits_device=not profile.device_memory_bytes or device_bytes <= profile.device_memory_bytes,
        compute_s=sum(v.compute_s for v in visits), predicted_step_s=predicted,
    )


def predict_resident_step_s(cfg: ModelConfig, profile: DeviceProfile, tokens_per_step: int, seq_len: int) -> float:
    """Resident training: forward + backward on the device, then the AdamW update there."""
    flops = sum(_unit_flops_per_token(cfg, seq_len)) * tokens_per_step
    return 3 * flops / profile.matmul_flops + 28 * cfg.n_params() / profile.device_update_bytes_per_s


def offload_for_plan(cfg: ModelConfig, host_available: float, disk_free: float, asked: str) -> tuple[str, str]:
    """The tier `streamer train` would pick, and what does not fit (empty when all fits);
    the plan command reports a shortfall instead of refusing."""
    try:
        return choose_offload(cfg, host_available, disk_free, asked), ""
    except UserError as exc:
        return ("disk" if asked == "auto" else asked), str(exc)


def choose_offload(cfg: ModelConfig, host_available: float, disk_free: float, asked: str = "auto") -> str:
    """RAM when the whole state fits in 80% of available memory, else disk; refuse when
    neither fits, saying what is short and by how much."""
    need = STATE_BYTES_PER_PARAM * cfg.n_params()
    fits_ram = need <= 0.8 * host_available
    if asked == "ram" and not fits_ram:
        raise UserError(f"{cfg.name} needs {need / 2**30:.1f} GiB of host RAM for its state but "
                        f"{0.8 * host_available / 2**30:.1f} GiB is usable "
                        f"({(need - 0.8 * host_available) / 2**30:.1f} GiB short): use --offload disk")
    if asked == "ram" or (asked == "auto" and fits_ram):
        return "ram"
    if need > disk_free:
        raise UserError(f"{cfg.name} needs {need / 2**30:.1f} GiB of disk for its state but "
                        f"{disk_free / 2**30:.1f} GiB is free ({(need - disk_free) / 2**30:.1f} GiB short): "
                        "free disk space or choose a smaller --model")
    return "disk"


# --- measurement -------------------------------------------------------------------

_PEAK_CACHE: dict[tuple[str, str], float] = {}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.3) -> float:
    """Sustained square-matmul rate on `device`, FLOP/s."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    c = a @ b  # warm-up: first call pays for library set-up
    _sync(device)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        torch.matmul(a, b, out=c)
        count += 1
    _sync(device)
    return 2 * size**3 * count / (time.perf_counter() - started)


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The matmul rate MFU is measured against: measured once per process."""
    key = (str(device), str(dtype))
    if key not in _PEAK_CACHE:
        _PEAK_CACHE[key] = measure_matmul_flops(device, dtype, size=4096 if device.type == "cuda" else 2048)
    return _PEAK_CACHE[key]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: torch.device, nbytes: int = 256 * 2**20) -> tuple[float, float]:
    """Host -> device and device -> host bytes/s (pinned on CUDA; a memcpy on CPU)."""
    pin = device.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rates = []
    for dst, src in ((dev, host), (host, dev)):
        dst.copy_(src, non_blocking=pin)
        _sync(device)
        started = time.perf_counter()
        for _ in range(4):
            dst.copy_(src, non_blocking=pin)
        _sync(device)
        rates.append(4 * nbytes / (time.perf_counter() - started))
    return rates[0], rates[1]


def measure_disk_bandwidth(folder: Path, nbytes: int = 256 * 2**20) -> tuple[float, float]:
    """Sequential read and write bytes/s with fsync, page cache dropped before reading."""
    folder.mkdir(parents=True, exist_ok=True)
    data = os.urandom(2**20) * (nbytes // 2**20)
    fd, name = tempfile.mkstemp(dir=folder, prefix=".bw-probe-")
    try:
        started = time.perf_counter()
        os.write(fd, data)
        os.fsync(fd)
        write_rate = nbytes / (time.perf_counter() - started)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        started = time.perf_counter()
        total = 0
        while chunk := os.pread(fd, 16 * 2**20, total):
            total += len(chunk)
        read_rate = total / (time.perf_counter() - started)
    finally:
        os.close(fd)
        os.unlink(name)
    return read_rate, write_rate


def measure_update_rate(numel: int = 8 * 2**20) -> float:
    """Bytes/s the host AdamW update touches (28 bytes per parameter)."""
    from streamer.optim import OptimConfig, adamw_update_

    p, g, m, v = (torch.randn(numel) for _ in range(4))
    cfg = OptimConfig()
    adamw_update_(p, g, m, v, step=1, lr=1e-3, cfg=cfg, decay_numel=numel)
    started = time.perf_counter()
    for step in range(2, 5):
        adamw_update_(p, g, m, v, step=step, lr=1e-3, cfg=cfg, decay_numel=numel)
    return 3 * 28 * numel / (time.perf_counter() - started)


def measure_model_flops(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, batch: int, seq_len: int,
                        repeat: int = 3) -> float:
    """The FLOP rate one transformer block of `cfg` sustains, forward and backward, at a
    micro-batch of `batch` x `seq_len`: a short profiling run that sees what a square
    matmul does not (attention, norms, activations, memory-bound kernels)."""
    from models.gpt import build_unit, init_unit

    block = build_unit(cfg, 1).to(device=device, dtype=dtype)
    init_unit(block, cfg, seed=0, index=1)
    x = torch.randn(batch, seq_len, cfg.d_model, device=device, dtype=dtype, requires_grad=True)

    def once() -> None:
        block(x).float().square().mean().backward()

    once()  # warm-up: allocations, kernel selection
    _sync(device)
    started = time.perf_counter()
    for _ in range(repeat):
        once()
    _sync(device)
    flops = 3 * _unit_flops_per_token(cfg, seq_len)[1] * batch * seq_len  # forward + 2x backward
    return repeat * flops / (time.perf_counter() - started)


def measure_profile(device: torch.device, dtype: torch.dtype, disk_folder: Path,
                    model: tuple[ModelConfig, int, int] | None = None) -> DeviceProfile:
    """Calibrate every rate on this machine. With `model=(cfg, batch, seq_len)` the
    compute rate comes from profiling one block of that model (`measure_model_flops`)
    instead of a square matmul."""
    base = PROFILES["cpu" if device.type == "cpu" else "h100"]
    h2d, d2h = measure_copy_bandwidth(device)
    read, write = measure_disk_bandwidth(disk_folder)
    update = measure_update_rate()
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    if model is not None:
        flops = measure_model_flops(model[0], device, dtype, model[1], model[2])
    else:
        flops = measure_matmul_flops(device, dtype, size=4096 if device.type == "cuda" else 1024, seconds=0.5)
    return replace(base, name=f"measured-{device.type}", matmul_flops=flops,
                   h2d_bytes_per_s=h2d, d2h_bytes_per_s=d2h, device_memory_bytes=memory,
                   disk_read_bytes_per_s=read, disk_write_bytes_per_s=write,
                   host_update_bytes_per_s=update, page_cache_bytes=psutil.virtual_memory().available,
                   device_update_bytes_per_s=update if device.type == "cpu" else base.device_update_bytes_per_s,
                   compute_bytes=torch.tensor([], dtype=dtype).element_size())


# --- command line ------------------------------------------------------------------


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="bytes per tier, bytes per link, hiding threshold, predicted step time")
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="cpu", help=f"a profile ({', '.join(PROFILES)}) or measure with --measure")
    p.add_argument("--tokens-per-step", type=int, default=None, help="default: the hiding threshold")
    p.add_argument("--seq-len", type=int, default=None, help="default: the model's context")
    p.add_argument("--offload", default="auto", choices=["auto", "ram", "disk"])
    p.add_argument("--measure", action="store_true", help="calibrate on this machine instead of a profile")
    p.add_argument("--disk", type=Path, default=Path("."), help="folder the disk tier would use")
    p.add_argument("--json", action="store_true")


def cmd_plan(args: argparse.Namespace) -> None:
    try:
        cfg = ModelConfig.from_name(args.model)
    except UnknownModelError as exc:
        raise UserError(str(exc)) from exc
    if args.measure:
        device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        profile = measure_profile(device, dtype, args.disk)
    elif args.device in PROFILES:
        profile = PROFILES[args.device]
    else:
        raise UserError(f"unknown device profile '{args.device}': use one of {', '.join(PROFILES)} or --measure")
    seq_len = args.seq_len or cfg.block_size
    if seq_len <= 0 or seq_len > cfg.block_size:
        raise UserError(f"--seq-len must be in 1..{cfg.block_size} for {cfg.name}")
    if args.measure or args.device == "cpu":  # this machine's memory and disk
        host = psutil.virtual_memory().available
        disk = shutil.disk_usage(args.disk if args.disk.exists() else Path(".")).free
    else:  # the profiled machine's
        host, disk = profile.host_memory_bytes, profile.disk_free_bytes
    offload, shortfall = offload_for_plan(cfg, host, disk, args.offload)
    tokens = args.tokens_per_step
    if tokens is None:
        tokens = make_plan(cfg, profile, seq_len, seq_len, offload).recommended_tokens_per_step
    if tokens <= 0:
        raise UserError(f"--tokens-per-step must be positive, got {tokens}")
    plan = make_plan(cfg, profile, tokens, seq_len, offload)
    if args.json:
        print(json.dumps({**asdict(plan), "fits": not shortfall, "shortfall": shortfall,
                          "profile": asdict(profile)}, indent=2))
        return
    print(format_plan(plan, profile))
    if shortfall:
        print(f"  does not fit: {shortfall.split(': ')[0]}")


def format_plan(plan: Plan, profile: DeviceProfile) -> str:
    gib = 2**30
    lines = [
        f"plan for {plan.model} on {profile.name} ({profile.matmul_flops / 1e12:.1f} TFLOP/s, "
        f"h2d {profile.h2d_bytes_per_s / 1e9:.1f} GB/s), offload {plan.offload}, prefetch {plan.prefetch_depth}",
        f"  parameters        {plan.n_params:>16,} in {plan.n_units} units (largest {plan.max_unit_params:,})",
        f"  device memory     {plan.device_bytes / gib:>12.2f} GiB",
        f"  host memory       {plan.host_bytes / gib:>12.2f} GiB",
        f"  disk              {plan.disk_bytes / gib:>12.2f} GiB",
        f"  per step: h2d {plan.h2d_bytes_per_step / 1e9:.2f} GB, d2h {plan.d2h_bytes_per_step / 1e9:.2f} GB, "
        f"disk read {plan.disk_read_bytes_per_step / 1e9:.2f} GB, write {plan.disk_write_bytes_per_step / 1e9:.2f} GB",
        f"  tokens per step to hide transfers: forward {plan.min_tokens_forward:,}, backward "
        f"{plan.min_tokens_backward:,}, disk {plan.min_tokens_disk:,} -> {plan.min_tokens_per_step:,}",
        f"  recommended tokens per step (data movement <= 5% of the step): {plan.recommended_tokens_per_step:,}"
        f"; recompute in backward: {'yes' if plan.recompute else 'no'}",
        *([] if plan.fits_device else [f"  device memory short: {plan.device_bytes / gib:.1f} GiB needed, "
                                       f"{profile.device_memory_bytes / gib:.1f} GiB on {profile.name}: "
                                       "use fewer tokens per step (unit-boundary activations grow with it)"]),
        f"  at {plan.tokens_per_step:,} tokens/step: compute {plan.compute_s:.3f} s, "
        f"predicted step {plan.predicted_step_s:.3f} s",
    ]
    return "\n".join(lines)
