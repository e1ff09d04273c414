"""The training loop: one loop for every mode; the engine decides where weights live.

    for step in steps:
        micro_batches = sampler.global_batch(step)   # a pure function of (seed, step)
        stats = engine.step(micro_batches, lr_at(step))
        log(step, stats)
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm import tqdm

from models import GPT, ModelConfig, UnknownModelError
from streamer.data import BatchSampler, default_corpus, load_tokens
from streamer.errors import UserError
from streamer.io import atomic_write_json, write_safetensors
from streamer.optim import OptimConfig, lr_at
from streamer.stats import StepStats


@dataclass
class TrainConfig:
    model: str = "tiny"
    mode: str = "resident"  # resident | stream
    steps: int = 300
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    lr: float = 3e-3  # tiny models tolerate a high peak rate; scale down for large ones
    min_lr: float | None = None  # default: lr / 10
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    data: str | None = None  # a token file from 'streamer prepare'; default: the stdlib corpus
    out: str | None = None
    device: str = "auto"  # auto: cuda when present, else cpu
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    offload: str = "auto"  # stream mode: ram | disk | auto (the planner decides)
    prefetch_depth: int | None = None  # stream mode: units fetched ahead; None: the planner decides
    recompute: str = "auto"  # stream mode: yes | no | auto (recompute only when graphs do not fit)
    grad_sync: str = "sparse"  # data parallel: the embedding's gradient by sparse or dense all-reduce
    progress: bool = True
    extra: dict = field(default_factory=dict)

    def validate(self) -> ModelConfig:
        for name in ("steps", "batch_size", "grad_accum", "seq_len"):
            if getattr(self, name) <= 0:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} must be a positive integer, got {getattr(self, name)}")
        if self.lr <= 0:
            raise UserError(f"--lr must be positive, got {self.lr}")
        if self.recompute not in ("auto", "yes", "no"):
            raise UserError(f"--recompute must be auto, yes or no, got '{self.recompute}'")
        if self.prefetch_depth is not None and self.prefetch_depth <= 0:
            raise UserError(f"--prefetch-depth must be a positive integer, got {self.prefetch_depth}")
        if self.grad_sync not in ("sparse", "dense"):
            raise UserError(f"--grad-sync must be sparse or dense, got '{self.grad_sync}'")
        if self.mode not in ("resident", "stream"):
            raise UserError(f"--mode must be 'resident' or 'stream', got '{self.mode}'")
        try:
            model_cfg = ModelConfig.from_name(self.model)
        except UnknownModelError as exc:
            raise UserError(str(exc)) from exc
        if self.seq_len > model_cfg.block_size:
            raise UserError(f"--seq-len {self.seq_len} exceeds {self.model}'s context of "
                            f"{model_cfg.block_size}: use --seq-len {model_cfg.block_size} or less")
        return model_cfg

    def optim_config(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, min_lr=self.lr / 10 if self.min_lr is None else self.min_lr,
                           warmup_steps=min(self.warmup, self.steps), total_steps=self.steps,
                           weight_decay=self.weight_decay, grad_clip=self.grad_clip)

    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but this machine has no CUDA device: use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 halves the bytes streamed and doubles matmul rate on GPUs; CPUs gain
        # little from it and float32 keeps CPU runs exactly comparable.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in table:
        raise UserError(f"--dtype must be one of {', '.join(table)} or auto, got '{name}'")
    return table[name]


def prepare_out_dir(out: str | None, model: str, create: bool = True) -> Path:
    """Check (every rank) and create (rank 0) the output directory."""
    path = Path(out) if out else Path("runs") / f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"
    if (path / "metrics.jsonl").exists():
        raise UserError(f"output directory '{path}' holds another run: choose a new --out")
    if not create:
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"output directory '{path}' is not writable ({exc.strerror}): choose another --out") from None
    return path


def build_engine(cfg: TrainConfig, model_cfg: ModelConfig, out: Path, device: torch.device,
                 dtype: torch.dtype):  # -> ResidentEngine | StreamEngine
    optim = cfg.optim_config()
    if cfg.mode == "resident":
        from streamer.resident import ResidentEngine

        torch.manual_seed(cfg.seed)
        model = GPT(model_cfg)
        model.init_weights(cfg.seed)
        return ResidentEngine(model, optim, device, dtype)
    from streamer.scheduler import StreamEngine

    return StreamEngine.create(cfg, model_cfg, optim, out, device, dtype)


def save_final(shards: list, model_cfg: ModelConfig, out: Path) -> Path:
    """Write `DIR/final/`: safetensors keyed by `state_dict()` names, plus `config.json`.

    `shards` are zero-argument callables, each returning part of the state dict, so a
    streamed model is exported one unit at a time and never held whole in memory. More
    than one shard gets a Hugging Face style `model.safetensors.index.json`.
    """
    final = out / "final"
    final.mkdir(exist_ok=True)
    weight_map = {}
    for k, shard in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = shard()
        write_safetensors(final / name, tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    if len(shards) > 1:
        atomic_write_json(final / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    atomic_write_json(final / "config.json", model_cfg.to_dict())
    return final


def load_final(final: Path) -> dict[str, torch.Tensor]:
    """Read back what `save_final` wrote (one file or shards with an index)."""
    index = final / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]
    state = {}
    for name in files:
        state.update(load_file(final / name))
    return state


def micro_batches(sampler: BatchSampler, step: int, cfg: TrainConfig, rank: int = 0,
                  world: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's micro-batches. The step's global batch is world x batch x accum
    sequences; micro-batch i of rank r is rows [(i·world + r)·batch, +batch), so N ranks
    with batch B see exactly the micro-batches one process with batch N·B would."""
    x, y = sampler.global_batch(step, cfg.batch_size * cfg.grad_accum * world)
    x, y = torch.from_numpy(x), torch.from_numpy(y)
    rows = [slice((i * world + rank) * cfg.batch_size, (i * world + rank + 1) * cfg.batch_size)
            for i in range(cfg.grad_accum)]
    return [(x[r], y[r]) for r in rows]


def peak_rss_bytes() -> int:
    """The process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def metrics_row(step: int, stats: StepStats, lr: float, tokens: int, step_s: float, flops_per_token: float,
                peak_flops: float, extra: dict) -> dict:
    tokens_per_s = tokens / step_s if step_s > 0 else 0.0
    row = {"step": step, "loss": stats.loss, "lr": lr, "tokens": tokens, "tokens_per_s": tokens_per_s,
           # MFU counts 6 FLOPs per weight per token plus attention (ModelConfig.flops_per_token)
           # against the device's measured or profiled peak matmul rate.
           "mfu": tokens_per_s * flops_per_token / peak_flops if peak_flops else 0.0,
           "grad_norm": stats.grad_norm, "skipped": stats.skipped, "step_s": step_s,
           "peak_rss_bytes": peak_rss_bytes()}
    if stats.bytes_in or stats.bytes_out:
        row.update(bytes_in=stats.bytes_in, bytes_out=stats.bytes_out,
                   link_gbps=(stats.bytes_in + stats.bytes_out) / step_s / 1e9,
                   stall_s=stats.stall_s)
    row["peak_device_bytes"] = stats.peak_device_bytes
    row.update(extra)
    return row


def train(cfg: TrainConfig) -> Path:
    """Run a whole training job; returns the output directory.

    Under torchrun every rank runs this; rank 0 alone writes metrics and final weights."""
    from streamer import planner
    from streamer.parallel import DataParallel, init_from_env

    model_cfg = cfg.validate()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    init_from_env(device)
    dp = DataParallel(cfg.grad_sync)
    if dp.world > 1 and cfg.mode != "stream":
        raise UserError("several processes train with --mode stream only: add --mode stream")
    tokens = load_tokens(Path(cfg.data) if cfg.data else default_corpus(), model_cfg.vocab_size)
    sampler = BatchSampler(tokens, cfg.seq_len, cfg.seed)
    out = prepare_out_dir(cfg.out, cfg.model, create=dp.rank == 0)
    dp.barrier()
    engine = build_engine(cfg, model_cfg, out, device, dtype)
    peak_flops = planner.peak_flops(device, dtype)
    flops_per_token = model_cfg.flops_per_token(cfg.seq_len)
    lead = dp.rank == 0
    if lead:
        atomic_write_json(out / "run.json", {"train": asdict(cfg), "model": model_cfg.to_dict(), "world": dp.world,
                                             "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                                             "flops_per_token": flops_per_token, "peak_flops": peak_flops})
    bar = tqdm(total=cfg.steps, disable=not (cfg.progress and lead), unit="step", dynamic_ncols=True,
               mininterval=1.0)
    optim = cfg.optim_config()
    try:
        with open(out / "metrics.jsonl", "a") if lead else contextlib.nullcontext() as metrics:
            for step in range(cfg.steps):
                lr = lr_at(step, optim)
                batches = micro_batches(sampler, step, cfg, dp.rank, dp.world)
                started = time.perf_counter()
                stats = engine.step(batches, lr)
                step_s = time.perf_counter() - started
                row = metrics_row(step, stats, lr, cfg.tokens_per_step() * dp.world, step_s, flops_per_token,
                                  peak_flops * dp.world, getattr(engine, "step_extra", dict)())
                if lead:
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                postfix = {"loss": f"{stats.loss:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
                if "stall_s" in row:
                    postfix["stall"] = f"{row['stall_s'] / step_s:.0%}"
                bar.set_postfix(postfix)
                bar.update()
        shards = engine.shards()
        if lead:
            save_final(shards, model_cfg, out)
        else:
            for shard in shards:  # every rank takes part in gathering each unit
                shard()
    finally:
        bar.close()
        engine.close()
    return out
