"""`streamer export`: a run's final weights (or a checkpoint's) as a Hugging Face checkpoint.

A run's `final/` holds this project's own names, which `streamer sample`, `eval` and
`--init-from` read; `transformers` reads its own. The export renames (and for GPT-NeoX
interleaves) every tensor into the family's layout (`models.hf.write_hf`), a tensor at
a time into shards of `--shard-size`, so a 20B model is written without being held,
and copies the run's tokenizer.json beside it when the run's data names one: the
folder then loads with `AutoModelForCausalLM.from_pretrained` and decodes with its own
tokenizer. The token the run's data put after each document (`prepare --separator`)
becomes the config's `eos_token_id`, where generation stops.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from models import GPT
from streamer.errors import UserError
from streamer.inference import data_tokenizer, end_of_text, model_config, open_weights, weights_folder
from streamer.io import atomic_write_bytes
from streamer.train import resolve_dtype


def cmd_export(args: argparse.Namespace) -> None:
    from models.hf import write_hf

    path, out = Path(args.weights), Path(args.out)
    existed = out.exists()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"--out '{out}' exists and is not an empty folder: choose a new folder (nothing there is "
                        "replaced)")
    if args.shard_size <= 0:
        raise UserError(f"--shard-size must be a positive number of GB, got {args.shard_size}")
    dtype = resolve_dtype(args.dtype, torch.device("cpu")) if args.dtype != "auto" else None
    folder = weights_folder(path)
    cfg = model_config(folder)
    tokenizer = args.tokenizer or (folder / "tokenizer.json" if (folder / "tokenizer.json").is_file()
                                   else data_tokenizer(path))
    if tokenizer is not None:
        _check_tokenizer(Path(tokenizer), cfg.vocab_size)
    with torch.device("meta"):
        names = list(GPT(cfg).state_dict())
    try:
        # The tokenizer first: config.json, written last, makes the folder a checkpoint.
        if tokenizer is not None:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(out / "tokenizer.json", Path(tokenizer).read_bytes())
        with open_weights(folder, cfg) as weights:
            stored = dtype or weights.tensor(names[0]).dtype  # auto: as the run stored them
            files = write_hf(cfg, ((name, weights.tensor(name)) for name in names), out, stored,
                             shard_bytes=args.shard_size * 1e9, eos_token_id=end_of_text(folder, path))
    except BaseException as exc:
        # Nothing half-written is left: --out was new or empty, and is so again.
        if out.is_dir() and not existed:
            shutil.rmtree(out)
        elif out.is_dir():
            for entry in out.iterdir():
                _remove(entry)
        if isinstance(exc, (OSError, ValueError)):  # an architecture no family expresses; a bad or crafted file
            raise UserError(f"cannot export '{folder}': {exc}") from None
        raise
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {cfg.name} as a Hugging Face {json.loads((out / 'config.json').read_text())['model_type']} "
          f"checkpoint in {out}: {len(files)} file(s), {size / 1e9:.2f} GB in {str(stored).removeprefix('torch.')}"
          f"{', with its tokenizer.json' if tokenizer is not None else ''}")


def _check_tokenizer(path: Path, vocab_size: int) -> None:
    """The tokenizer to copy beside the weights must be one, and of at most the model's
    vocabulary (a larger one was made for another model)."""
    from streamer.data import HFTokenizer

    if not path.is_file():
        raise UserError(f"--tokenizer '{path}' not found: pass the tokenizer.json the data was prepared with")
    tokens = HFTokenizer(path).vocab_size
    if tokens > vocab_size:
        raise UserError(f"tokenizer '{path}' has {tokens:,} tokens, more than the model's vocabulary of "
                        f"{vocab_size:,}: pass the tokenizer.json the run's data was prepared with")


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink()
