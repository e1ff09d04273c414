"""`streamer sample`: text from a trained model, to see what training made of it.

Continues a prompt token by token, every sample of a call in one batch, with the model
held on the device or streamed to it (`streamer.inference`). Each block keeps a
key-value cache (`models.gpt.KVCache`), so a new token costs one position's compute,
not the whole context's again.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models import GPT, ModelConfig
from models.gpt import KVCache
from streamer.data import BYTE_VOCAB, ByteTokenizer, HFTokenizer
from streamer.errors import UserError
from streamer.inference import (
    ResidentWeights,
    Weights,
    activation_bytes,
    data_tokenizer,
    end_of_text,
    model_config,
    place,
    weights_folder,
)
from streamer.train import resolve_device, resolve_dtype


@dataclass(frozen=True)
class SampleConfig:
    """How to continue a prompt."""

    new_tokens: int = 200
    temperature: float = 0.8  # 0: always the likeliest token (greedy, deterministic)
    top_k: int | None = 200  # sample among the k likeliest tokens only; None: all of them
    top_p: float = 1.0  # and among the fewest likeliest whose probability reaches p (1: all)
    stop: int | None = None  # a token that ends a continuation (end of text); None: none does

    def __post_init__(self) -> None:
        if self.new_tokens < 1:
            raise UserError(f"--tokens must be at least 1, got {self.new_tokens}")
        if not 0 <= self.temperature < math.inf:
            raise UserError(f"--temperature must be 0 (greedy) or a positive number, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise UserError(f"--top-k must be at least 1 (or 0: every token), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be above 0 and at most 1 (every token), got {self.top_p}")


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
    if cfg.top_p < 1:  # nucleus sampling: a token stays if the likelier ones hold less than p
        ordered, order = logits.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        ordered = ordered.masked_fill(probs.cumsum(-1) - probs >= cfg.top_p, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, ordered)
    # Drawn on the CPU from a seeded generator: the same seed gives the same text on any
    # device.
    return torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator).view(-1).to(logits.device)


def cache_bytes(cfg: ModelConfig, dtype: torch.dtype, samples: int, positions: int) -> int:
    """Every block's keys and values for `samples` continuations of `positions`."""
    return 2 * cfg.n_layer * samples * positions * cfg.d_model * (torch.finfo(dtype).bits // 8)


@torch.no_grad()
def generate(weights: Weights | GPT, prompt: list[int], cfg: SampleConfig, generator: torch.Generator | None = None,
             samples: int = 1) -> list[list[int]]:
    """`samples` continuations of `prompt`, each `cfg.new_tokens` long, drawn together;
    one that draws `cfg.stop` ends before it (and all of them end once each has).

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
    stopped = torch.zeros(samples, 1, dtype=torch.bool, device=device)
    for _ in range(cfg.new_tokens):
        if caches[0].length + fresh.shape[1] > capacity:
            for cache in caches:
                cache.length = 0
            fresh = tokens[:, -context:]
        following = _choose(_next_logits(weights, fresh, caches), cfg, generator).view(samples, 1)
        tokens = torch.cat([tokens, following], dim=1)
        fresh = following
        if cfg.stop is not None:
            stopped |= following == cfg.stop
            if bool(stopped.all()):
                break
    rows = tokens[:, len(prompt):].tolist()
    return [row[: row.index(cfg.stop)] if cfg.stop in row else row for row in rows]


def tokenizer_for(cfg: ModelConfig, folder: Path, path: Path | None, given: Path | None = None,
                  ) -> ByteTokenizer | HFTokenizer:
    """--tokenizer (`path`); else the checkpoint's own tokenizer.json; else the one the
    run's data was prepared with, when `given` (the folder named) is a run's or one of
    its checkpoints; else bytes, for a model of the byte vocabulary (what `streamer
    train` trains on by default)."""
    if path is None and (folder / "tokenizer.json").is_file():
        path = folder / "tokenizer.json"
    if path is None and given is not None:
        path = data_tokenizer(given)
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
    if args.samples < 1:
        raise UserError(f"--samples must be at least 1, got {args.samples}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    folder = weights_folder(Path(args.weights))
    model_cfg = model_config(folder)
    stop = end_of_text(folder, Path(args.weights)) if args.stop_token is None else args.stop_token
    if stop is not None and not -1 <= stop < model_cfg.vocab_size:
        raise UserError(f"--stop-token must be a token id below {model_cfg.vocab_size} (or -1: none), got {stop}")
    cfg = SampleConfig(new_tokens=args.tokens, temperature=args.temperature, top_k=args.top_k or None,
                       top_p=args.top_p, stop=None if stop == -1 else stop)
    tokenizer = tokenizer_for(model_cfg, folder, args.tokenizer, Path(args.weights))
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise UserError("--prompt encodes to no token: give some text to continue")
    positions = min(model_cfg.block_size, len(prompt) + cfg.new_tokens)
    working = cache_bytes(model_cfg, dtype, args.samples, positions) + activation_bytes(
        model_cfg, dtype, args.samples, positions)
    weights = place(args.mode, folder, model_cfg, device, dtype, working, lower="fewer --samples or --tokens")
    started = time.perf_counter()
    try:
        continuations = generate(weights, prompt, cfg, torch.Generator().manual_seed(args.seed), args.samples)
    finally:
        weights.close()
    seconds = time.perf_counter() - started
    for i, continuation in enumerate(continuations):
        if i:
            print("\n" + "-" * 40)
        print(args.prompt + tokenizer.decode(continuation), flush=True)
    drawn = sum(len(c) for c in continuations)
    print(f"{model_cfg.name} {weights.mode} on {device.type}: {drawn} tokens in {len(continuations)} sample(s) in "
          f"{seconds:.1f} s ({drawn / seconds:.1f} tokens/s)", file=sys.stderr)
