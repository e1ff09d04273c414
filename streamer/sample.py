"""`streamer sample`: text from a trained model, to see what training made of it.

Reads a run's `final/` (or the run folder holding it) or a Hugging Face GPT-2, GPT-J or
GPT-NeoX checkpoint, holds the model whole on one device (sampling streams nothing: it
is for models that fit), and continues a prompt token by token. Without a key-value
cache each new token runs the model over the whole context again: quadratic in the
output's length, and ample for reading a few hundred tokens of a model this engine
trained; the model file stays the one the training runs.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from models import GPT, ModelConfig
from streamer.data import BYTE_VOCAB, ByteTokenizer, HFTokenizer
from streamer.errors import UserError
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


@torch.no_grad()
def generate(model: GPT, prompt: list[int], cfg: SampleConfig,
             generator: torch.Generator | None = None) -> list[int]:
    """The `cfg.new_tokens` tokens that follow `prompt`, each drawn from the model's
    prediction given at most its context's worth of the tokens before it."""
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    for _ in range(cfg.new_tokens):
        logits = model(tokens[:, -model.cfg.block_size:])[0, -1].float()
        if cfg.temperature == 0:
            following = logits.argmax().view(1)
        else:
            logits = logits / cfg.temperature
            if cfg.top_k is not None and cfg.top_k < logits.numel():
                kth = torch.topk(logits, cfg.top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            # Drawn on the CPU from a seeded generator: the same seed gives the same
            # text on any device.
            following = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator).to(device)
        tokens = torch.cat([tokens, following.view(1, 1)], dim=1)
    return tokens[0, len(prompt):].tolist()


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
    """The model `cfg` with the folder's weights, whole on `device` in `dtype`, after
    checking it fits there."""
    from models.hf import load_hf

    check_fits(cfg, device, dtype)
    try:
        return load_hf(folder, dtype).to(device).eval()
    except (OSError, ValueError) as exc:  # a bad or crafted file's UnsafeFileError too
        raise UserError(f"cannot sample from '{folder}': {exc}") from None


def check_fits(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
    need = cfg.n_params() * torch.finfo(dtype).bits // 8
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        where = "the GPU has"
    else:
        free, where = psutil.virtual_memory().available, "this machine has"
    if need > 0.9 * free:  # the activations of one forward pass need the rest
        raise UserError(f"{cfg.name}'s {cfg.n_params() / 1e9:.1f}B parameters need {need / 2**30:.1f} GiB in "
                        f"{str(dtype).removeprefix('torch.')} and {where} {free / 2**30:.1f} GiB free: sample "
                        f"on a larger device{', or with --dtype bfloat16' if dtype == torch.float32 else ''}")


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
    folder = weights_folder(Path(args.weights))
    model_cfg = model_config(folder)
    tokenizer = tokenizer_for(model_cfg, folder, args.tokenizer)
    prompt = tokenizer.encode(args.prompt)
    if not prompt:
        raise UserError("--prompt encodes to no token: give some text to continue")
    model = load_model(folder, model_cfg, device, resolve_dtype(args.dtype, device))
    generator = torch.Generator().manual_seed(args.seed)
    for i in range(args.samples):
        if i:
            print("\n" + "-" * 40)
        print(args.prompt + tokenizer.decode(generate(model, prompt, cfg, generator)), flush=True)

