"""`streamer sample`: text from a trained model, to see what training made of it.

Reads a run's `final/` (or the run folder holding it) or a Hugging Face GPT-2, GPT-J or
GPT-NeoX checkpoint and continues a prompt token by token, every sample of a call in one
batch. Each block keeps a key-value cache (`models.gpt.KVCache`), so a new token costs
one position's compute, not the whole context's again.

A model that fits the device is held there whole (`ResidentWeights`). One that does not
is streamed as training streams it (`StreamedWeights`, [Note: streamed sampling]): its
weights wait in host memory and each unit comes to the device just before it runs.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch.func import functional_call

from models import GPT, ModelConfig
from models.gpt import KVCache, build_unit
from streamer.data import BYTE_VOCAB, ByteTokenizer, HFTokenizer
from streamer.errors import UserError
from streamer.store import UnitLayout, page_aligned_zeros, page_lock, page_unlock
from streamer.train import resolve_device, resolve_dtype


@dataclass(frozen=True)
class SampleConfig:
    """How to continue a prompt."""

    new_tokens: int = 200
    temperature: float = 0.8  # 0: always the likeliest token (greedy, deterministic)
    top_k: int | None = 200  # sample among the k likeliest tokens only; None: all of them

    def __post_init__(self) -> None:
        if self.new_tokens < 1:
            raise UserError(f"--tokens must be at least 1, got {self.new_tokens}")
        if self.temperature < 0:
            raise UserError(f"--temperature must be 0 (greedy) or more, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k must be at least 1 (or 0: every token), got {self.top_k}")


Unit = Callable[..., torch.Tensor]  # a unit with its weights bound: embedding(idx, start), block(x, cache), head(x)


class ResidentWeights:
    """A model held whole on its device."""

    def __init__(self, model: GPT) -> None:
        self.model, self.cfg = model, model.cfg
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype

    def units(self) -> Iterator[tuple[int, Unit]]:
        """One pass over the model: each unit's index and the unit, in forward order."""
        *body, head = self.model.units
        yield from enumerate(body)
        yield len(body), functools.partial(head, tied_weight=self.model.tied_weight())


class StreamedWeights:
    """A model's weights in host memory, each unit brought to the device for its turn.

    [Note: streamed sampling]
    Sampling from a model larger than the device works as training does: the weights,
    read from the checkpoint a tensor at a time, wait in host RAM in the sampling dtype
    (page-locked on CUDA, so copies run by DMA at the link's rate), and during a pass
    unit i + 1 is copied on a stream of its own while unit i computes, into the other
    of two device buffers; a tied embedding table stays on the device for the head. The
    device holds two units, the caches and one pass's activations, whatever the
    model's size. Every new token is one pass, so every weight crosses the link once a
    token for all samples together: the link sets the rate (a 20B model's 41 GB at
    50 GB/s is ~0.8 s a token), and until the compute catches up with it more samples
    cost almost nothing more.
    """

    def __init__(self, weights, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,  # noqa: ANN001
                 depth: int = 2) -> None:
        """`weights`: a `models.hf.Pretrained` (or anything with its `into(name, target)`)."""
        self.cfg, self.device, self.dtype, self.depth = cfg, device, dtype, depth
        with torch.device("meta"):  # shapes only: the weights live in the flat buffers
            self.modules = [build_unit(cfg, i) for i in range(cfg.n_layer + 2)]
        self.layouts = [UnitLayout.of(i, unit) for i, unit in enumerate(self.modules)]
        self.host = []
        for layout in self.layouts:
            flat = page_aligned_zeros(layout.numel, dtype)
            for name, view in layout.views(flat).items():
                weights.into(f"units.{layout.index}.{name}", view)
            self.host.append(flat)
        cuda = device.type == "cuda"
        self.locked = page_lock(self.host) if cuda else []
        self.tied = self.host[0].to(device) if cfg.tie_embeddings else None
        self.order = list(range(1 if self.tied is not None else 0, len(self.layouts)))
        largest = max(self.layouts[u].numel for u in self.order)
        self.slots = [torch.empty(largest, dtype=dtype, device=device) for _ in range(depth)]
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.copied = [torch.cuda.Event() for _ in self.slots] if cuda else None
        self.freed = [torch.cuda.Event() for _ in self.slots] if cuda else None

    def device_bytes(self) -> int:
        """What the weights take on the device: the buffers, and a tied table."""
        numel = sum(s.numel() for s in self.slots) + (self.tied.numel() if self.tied is not None else 0)
        return numel * self.slots[0].element_size()

    def _copy_in(self, unit: int, slot: int) -> None:
        into = self.slots[slot][: self.layouts[unit].numel]
        if self.copy_stream is None:
            into.copy_(self.host[unit])
            return
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(self.freed[slot])  # the kernels reading the slot's last unit
            into.copy_(self.host[unit], non_blocking=True)
            self.copied[slot].record(self.copy_stream)

    def _bind(self, unit: int, flat: torch.Tensor) -> Unit:
        params, module = self.layouts[unit].views(flat), self.modules[unit]
        if unit == len(self.layouts) - 1 and self.tied is not None:
            table = self.layouts[0].views(self.tied)["wte.weight"]
            return lambda *args: functional_call(module, params, (*args, table))
        return lambda *args: functional_call(module, params, args)

    def units(self) -> Iterator[tuple[int, Unit]]:
        """One pass over the model, as `ResidentWeights.units`: each unit is on the device
        when it is handed out, and its buffer is refilled once the caller's kernels that
        read it are queued (when the caller asks for the next)."""
        for k, unit in enumerate(self.order[: self.depth]):
            self._copy_in(unit, k)
        if self.tied is not None:
            yield 0, self._bind(0, self.tied)
        for k, unit in enumerate(self.order):
            slot = k % self.depth
            if self.copied is not None:
                torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
            yield unit, self._bind(unit, self.slots[slot])
            if self.freed is not None:
                self.freed[slot].record(torch.cuda.current_stream(self.device))
            if k + self.depth < len(self.order):
                self._copy_in(self.order[k + self.depth], slot)

    def close(self) -> None:
        page_unlock(self.locked)
        self.locked = []


Weights = ResidentWeights | StreamedWeights


def _next_logits(weights: Weights, idx: torch.Tensor, caches: list[KVCache]) -> torch.Tensor:
    """The float32 logits [batch, vocab] that follow idx, whose tokens come after the
    positions the caches hold (and are added to them)."""
    start, head = caches[0].length, weights.cfg.n_layer + 1
    for index, unit in weights.units():
        if index == 0:
            x = unit(idx, start)
        elif index < head:
            x = unit(x, caches[index - 1])
        else:
            x = unit(x[:, -1:])  # only the last position's prediction is wanted
    return x[:, -1].float()


def _choose(logits: torch.Tensor, cfg: SampleConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of logits [batch, vocab]."""
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = logits / cfg.temperature
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    # Drawn on the CPU from a seeded generator: the same seed gives the same text on any
    # device.
    return torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator).view(-1).to(logits.device)


@torch.no_grad()
def generate(weights: Weights | GPT, prompt: list[int], cfg: SampleConfig, generator: torch.Generator | None = None,
             samples: int = 1) -> list[list[int]]:
    """`samples` continuations of `prompt`, each `cfg.new_tokens` long, drawn together.

    Every token is drawn from the model's prediction given at most its context's worth
    of the tokens before it. Within the context the caches grow a position a token;
    past it every position would move, so each further token runs the model over the
    last context's worth again (as without a cache).
    """
    if isinstance(weights, GPT):
        weights = ResidentWeights(weights)
    model_cfg, device = weights.cfg, weights.device
    context = model_cfg.block_size
    capacity = min(context, len(prompt) + cfg.new_tokens)
    caches = [KVCache(model_cfg, samples, capacity, device, weights.dtype) for _ in range(model_cfg.n_layer)]
    tokens = torch.tensor([prompt] * samples, dtype=torch.long, device=device)
    fresh = tokens[:, -context:]  # what the next pass reads: the prompt, then each new token
    for _ in range(cfg.new_tokens):
        if caches[0].length + fresh.shape[1] > capacity:
            for cache in caches:
                cache.length = 0
            fresh = tokens[:, -context:]
        following = _choose(_next_logits(weights, fresh, caches), cfg, generator).view(samples, 1)
        tokens = torch.cat([tokens, following], dim=1)
        fresh = following
    return tokens[:, len(prompt):].tolist()


def weights_folder(path: Path) -> Path:
    """The checkpoint folder: `path` itself, or a run folder's `final/`."""
    if not (path / "config.json").is_file() and (path / "final" / "config.json").is_file():
        return path / "final"
    return path


def model_config(folder: Path) -> ModelConfig:
    """The model a checkpoint folder holds, from its config.json."""
    from models.hf import checkpoint_config

    try:
        return checkpoint_config(folder)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot sample from '{folder}': {exc}: pass a run's final/ or a Hugging Face "
                        "checkpoint folder (config.json plus safetensors)") from None


def load_model(folder: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> GPT:
    """The model `cfg` with the folder's weights, whole on `device` in `dtype`."""
    from models.hf import load_hf

    try:
        return load_hf(folder, dtype).to(device).eval()
    except (OSError, ValueError) as exc:  # a bad or crafted file's UnsafeFileError too
        raise UserError(f"cannot sample from '{folder}': {exc}") from None


def stream_model(folder: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> StreamedWeights:
    """The folder's weights in host memory, to be streamed to `device` in `dtype`."""
    from models.hf import Pretrained

    try:
        with Pretrained(folder, cfg) as pretrained:
            return StreamedWeights(pretrained, cfg, device, dtype)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot sample from '{folder}': {exc}") from None


@dataclass(frozen=True)
class Footprint:
    """Bytes a sampling run needs, in its dtype, for `samples` continuations reaching
    `positions` positions."""

    weights: int  # the whole model
    streamed: int  # the device's share of a streamed model: two units and a tied table
    caches: int  # every block's keys and values
    activations: int  # one pass's largest working set (a long prompt's)

    @classmethod
    def of(cls, cfg: ModelConfig, dtype: torch.dtype, samples: int, positions: int) -> Footprint:
        size = torch.finfo(dtype).bits // 8
        with torch.device("meta"):
            numels = [sum(p.numel() for p in build_unit(cfg, i).parameters()) for i in range(cfg.n_layer + 2)]
        ring = numels[1:] if cfg.tie_embeddings else numels
        streamed = 2 * max(ring) + (numels[0] if cfg.tie_embeddings else 0)
        caches = 2 * cfg.n_layer * samples * positions * cfg.d_model * size
        tokens = samples * positions
        # The MLP's inner activations and a few of the residual stream's; the attention
        # scores in float32, should the attention run unfused.
        activations = tokens * (cfg.d_ff + 6 * cfg.d_model) * size + samples * cfg.n_head * positions**2 * 4
        return cls(sum(numels) * size, streamed * size, caches, activations)

    def resident(self) -> int:
        return self.weights + self.caches + self.activations

    def streaming(self) -> int:
        return self.streamed + self.caches + self.activations


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def choose_mode(mode: str, cfg: ModelConfig, device: str, dtype: torch.dtype, samples: int, positions: int,
                free: int, host: int) -> str:
    """--mode auto: the model whole on the device when it fits there, else streamed from
    host memory (a GPU's: on a CPU both are the same memory). Refuses, saying what to
    change, what fits neither. `device`: its type; `free`, `host`: the bytes free on it
    and available in host RAM."""
    need = Footprint.of(cfg, dtype, samples, positions)
    gib, kind = 2**30, str(dtype).removeprefix("torch.")
    where = "the GPU has" if device == "cuda" else "this machine has"
    smaller = " or with --dtype bfloat16" if dtype == torch.float32 else ""
    # 0.9: the allocator's rounding and what the estimate leaves out need the rest.
    if mode in ("auto", "resident") and need.resident() <= 0.9 * free:
        return "resident"
    if mode == "resident" or (mode == "auto" and device != "cuda"):
        raise UserError(f"{cfg.name}'s {cfg.n_params() / 1e9:.1f}B parameters need {need.resident() / gib:.1f} GiB "
                        f"in {kind} with the caches, and {where} {free / gib:.1f} GiB free: sample on a larger "
                        f"device{smaller}{', or stream it with --mode stream' if mode == 'resident' else ''}")
    if need.streaming() > 0.9 * free:
        raise UserError(f"streaming {cfg.name} needs {need.streaming() / gib:.1f} GiB on the device for two units, "
                        f"the caches of {samples} sample(s) and a pass, and {where} {free / gib:.1f} GiB free: "
                        f"ask for fewer --samples or --tokens{smaller}")
    if device == "cuda" and need.weights > 0.9 * host:
        raise UserError(f"streaming {cfg.name} holds its weights in host memory, {need.weights / gib:.1f} GiB in "
                        f"{kind}, and this machine has {host / gib:.1f} GiB available: sample on a machine with "
                        f"more memory{smaller}")
    return "stream"


def tokenizer_for(cfg: ModelConfig, folder: Path, path: Path | None) -> ByteTokenizer | HFTokenizer:
    """--tokenizer; else the checkpoint's own tokenizer.json; else bytes, for a model of
    the byte vocabulary (what `streamer train` trains on by default)."""
    if path is None and (folder / "tokenizer.json").is_file():
        path = folder / "tokenizer.json"
    if path is not None:
        tokenizer = HFTokenizer(path)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise UserError(f"tokenizer '{path}' has {tokenizer.vocab_size} tokens but {cfg.name} predicts "
                            f"{cfg.vocab_size}: pass the tokenizer the model's data was prepared with")
        return tokenizer
    if cfg.vocab_size != BYTE_VOCAB:
        raise UserError(f"{cfg.name} has a vocabulary of {cfg.vocab_size} tokens and '{folder}' holds no "
                        "tokenizer.json: pass --tokenizer, the tokenizer.json its data was prepared with")
    return ByteTokenizer()


def cmd_sample(args: argparse.Namespace) -> None:
    cfg = SampleConfig(new_tokens=args.tokens, temperature=args.temperature, top_k=args.top_k or None)
    if args.samples < 1:
        raise UserError(f"--samples must be at least 1, got {args.samples}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    folder = weights_folder(Path(args.weights))
    model_cfg = model_config(folder)
    tokenizer = tokenizer_for(model_cfg, folder, args.tokenizer)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise UserError("--prompt encodes to no token: give some text to continue")
    positions = min(model_cfg.block_size, len(prompt) + cfg.new_tokens)
    mode = choose_mode(args.mode, model_cfg, device.type, dtype, args.samples, positions, free_memory(device),
                       psutil.virtual_memory().available)
    if mode == "resident":
        weights: Weights = ResidentWeights(load_model(folder, model_cfg, device, dtype))
    else:
        weights = stream_model(folder, model_cfg, device, dtype)
    started = time.perf_counter()
    continuations = generate(weights, prompt, cfg, torch.Generator().manual_seed(args.seed), args.samples)
    seconds = time.perf_counter() - started
    if isinstance(weights, StreamedWeights):
        weights.close()
    for i, continuation in enumerate(continuations):
        if i:
            print("\n" + "-" * 40)
        print(args.prompt + tokenizer.decode(continuation), flush=True)
    print(f"{model_cfg.name} {mode} on {device.type}: {args.samples} x {cfg.new_tokens} tokens in {seconds:.1f} s "
          f"({args.samples * cfg.new_tokens / seconds:.1f} tokens/s)", file=sys.stderr)
