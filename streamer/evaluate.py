"""`streamer eval`: a trained model's loss on text, held whole on the device or streamed.

The windows are those a run's held-out evaluation reads (`streamer.data.holdout_split`
and `eval_windows`): evenly spaced over the last `--holdout` of a token file, or over
all of it with `--holdout 1`. Given a run folder (or its `final/`), every default is
the run's own (its data, sequence length, held-out fraction, evaluation tokens and
batch size), so the loss is the held-out loss its last evaluation printed, now from
the exported weights; given a Hugging Face checkpoint, it measures that model on your
text (`--data`, prepared with the model's tokenizer).

A streamed model's every weight crosses the link once per pass, so a pass takes as
many windows through each unit, while it is on the device, as the device's memory
holds: all of them when it can ([Note: streamed inference]).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models import Documents, ModelConfig, loss_fn
from streamer.data import (
    BatchSampler,
    Tokens,
    default_corpus,
    document_separator,
    eval_windows_by_file,
    holdout_split,
    load_data,
)
from streamer.errors import UserError
from streamer.inference import (
    Weights,
    activation_bytes,
    check_weights,
    free_memory,
    model_config,
    place,
    run_record,
    weights_folder,
)
from streamer.train import TrainConfig, resolve_device, resolve_dtype


@dataclass(frozen=True)
class EvalConfig:
    """Which windows of which text: `tokens` of it, in sequences of `seq_len`, from the
    last `holdout` of the file (1: all of it), in micro-batches of `batch_size`."""

    data: tuple[Path, ...]  # none: the default corpus (the standard library as bytes)
    weights: tuple[float, ...] | None  # several files: their shares (None: their sizes)
    seq_len: int
    holdout: float
    tokens: int
    batch_size: int

    def __post_init__(self) -> None:
        if not 0 < self.holdout <= 1:
            raise UserError(f"--holdout must be a fraction above 0 and at most 1 (all of the data), got "
                            f"{self.holdout}")
        for flag, value in (("--seq-len", self.seq_len), ("--tokens", self.tokens),
                            ("--batch-size", self.batch_size)):
            if value < 1:
                raise UserError(f"{flag} must be a positive integer, got {value}")

    def windows(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str | None, int]]]:
        """(inputs, targets, files): the same windows a run's evaluation with these
        settings reads, and the files they come from (`eval_windows_by_file`)."""
        if self.holdout < 1:
            tokens = holdout_split(tokens, self.holdout, self.seq_len)[1]
        else:
            BatchSampler(tokens, self.seq_len, seed=0)  # refuses a file shorter than one sequence
        x, y, files = eval_windows_by_file(tokens, self.seq_len, -(-self.tokens // self.seq_len))
        return torch.from_numpy(x), torch.from_numpy(y), files


def run_settings(path: Path) -> tuple[TrainConfig, int] | None:
    """The training settings and number of processes of the run `path` is, whose
    `final/` it is, or whose checkpoint it is; None for weights that are no run's."""
    record = run_record(path)
    if record is None:
        return None
    try:
        return TrainConfig(**record["train"]), int(record.get("world", 1))
    except (TypeError, ValueError) as exc:
        raise UserError(f"'{path}' records settings this version does not know ({exc}): pass --data, --seq-len "
                        "and --tokens") from None


def eval_config(args: argparse.Namespace, cfg: ModelConfig, settings: tuple[TrainConfig, int] | None) -> EvalConfig:
    """The flags given, and for the rest the run's settings, else the defaults."""
    run, world = settings or (None, 1)

    def given(flag: str, otherwise: int) -> int:  # a flag given, even a wrong one, wins
        value = getattr(args, flag)
        return otherwise if value is None else value

    seq_len = given("seq_len", run.seq_len if run else cfg.block_size)
    if seq_len < 1:
        raise UserError(f"--seq-len must be a positive integer, got {seq_len}")
    if seq_len > cfg.block_size:
        raise UserError(f"--seq-len {seq_len} exceeds {cfg.name}'s context of {cfg.block_size}: use "
                        f"--seq-len {cfg.block_size} or less")
    if run is not None:  # the run's own evaluation: its windows, however many ranks read them
        run = dataclasses.replace(run, seq_len=seq_len)
    own = bool(run and run.eval_data) and not args.data  # the run's held-out files of their own: all of them
    if args.data:
        data, weights = tuple(args.data), args.data_weights
    elif own:
        data, weights = tuple(run.eval_data_files()), args.data_weights
    else:
        data, weights = tuple(run.data_files()) if run else (), args.data_weights or (run.data_weights if run else None)
    return EvalConfig(
        data=data, weights=tuple(weights) if weights else None, seq_len=seq_len,
        holdout=args.holdout if args.holdout is not None else 1.0 if own else (run.holdout if run else 0.01),
        tokens=given("tokens", run.eval_sequences(world) * seq_len if run else 16 * seq_len),
        batch_size=given("batch_size", run.batch_size if run else 4))


@torch.no_grad()
def evaluate(weights: Weights, x: torch.Tensor, y: torch.Tensor, batch_size: int,
             per_pass: int | None = None, separator: int | None = None) -> tuple[float, int]:
    """The summed token loss over the windows (x, y) and their token count, in passes
    over the model of `per_pass` windows (default: all), each micro-batch of a pass
    through each unit in turn. A streamed model's weights cross the link once a pass;
    a pass keeps its windows' activations between units. With a `separator`, attention
    stays within the documents it ends, as in a run trained with --document-mask (each
    unit makes the mask again, so a pass holds none)."""
    device, head = weights.device, weights.cfg.n_layer + 1
    per_pass = per_pass or len(x)
    sums = []
    for first in range(0, len(x), per_pass):
        batches = range(first, min(len(x), first + per_pass), batch_size)
        hs = [x[i : min(i + batch_size, first + per_pass)].to(device) for i in batches]
        ys = [y[i : min(i + batch_size, first + per_pass)].to(device) for i in batches]
        ids = hs
        for index, unit in weights.units():
            if index < head and separator is None:
                hs = [unit(h) for h in hs]
            elif index < head:
                hs = [unit(h, documents=Documents.of(i, separator)) for h, i in zip(hs, ids)]
            else:
                sums += [loss_fn(unit(h), t).double() * t.numel() for h, t in zip(hs, ys)]
    return float(torch.stack(sums).sum()), int(y.numel())


def boundary_bytes(cfg: ModelConfig, dtype: torch.dtype, seq_len: int) -> int:
    """What a pass holds per window: its activations between two units, in and out, and
    its input and target token ids (int64)."""
    return 2 * seq_len * cfg.d_model * (torch.finfo(dtype).bits // 8) + 2 * seq_len * 8


def working_bytes(cfg: ModelConfig, dtype: torch.dtype, ecfg: EvalConfig) -> int:
    """Device memory besides the weights for a pass of one micro-batch: its activations
    between units and inside one, and its logits: in the compute dtype, in float32 for
    the loss (the same tensor when that is float32) and the loss's log-softmax."""
    batch = ecfg.batch_size
    per_logit = 8 if dtype == torch.float32 else 8 + torch.finfo(dtype).bits // 8
    logits = batch * ecfg.seq_len * cfg.padded_vocab_size * per_logit
    return batch * boundary_bytes(cfg, dtype, ecfg.seq_len) + activation_bytes(cfg, dtype, batch, ecfg.seq_len) + logits


def windows_per_pass(weights: Weights, ecfg: EvalConfig, windows: int, free: int) -> int:
    """Held whole, a pass is one micro-batch: nothing is gained by more. Streamed, a pass
    takes as many windows as the device's `free` memory (with the weights placed) holds
    beside one micro-batch's work (all of them, when it can), since each pass moves
    every weight."""
    if weights.mode == "resident":
        return ecfg.batch_size
    cfg, dtype = weights.cfg, weights.dtype
    spare = 0.9 * free - working_bytes(cfg, dtype, ecfg)
    fits = int(spare // boundary_bytes(cfg, dtype, ecfg.seq_len)) // ecfg.batch_size * ecfg.batch_size
    return max(ecfg.batch_size, min(windows, fits))


def cmd_eval(args: argparse.Namespace) -> None:
    """Each folder's loss, on the same windows when they are one run's (its checkpoints
    along the way: a learning curve on new text, say); every folder is checked before
    any is read. --json: an object, or a list of them for several folders."""
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    paths = [Path(given) for given in args.weights]
    for path in paths:  # a folder that cannot be read is found before the others' minutes of reading
        folder = weights_folder(path)
        cfg = model_config(folder)
        if len(paths) > 1:
            check_weights(folder, cfg)
    results = []
    for path in paths:
        result, line = _evaluated(args, path, device, dtype)
        results.append({"weights": str(path), **result})
        if not args.json:
            print(f"{path}: {line}" if len(paths) > 1 else line, flush=True)
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else results))


def _evaluated(args: argparse.Namespace, path: Path, device: torch.device, dtype: torch.dtype) -> tuple[dict, str]:
    """One folder's loss: the JSON result and the line for a person."""
    folder = weights_folder(path)
    model_cfg = model_config(folder)
    settings = run_settings(path)
    ecfg = eval_config(args, model_cfg, settings)
    for file in ecfg.data if args.data is None else ():
        if not file.is_file():
            raise UserError(f"the run's data '{file}' is not there (a path relative to where it was trained?): "
                            "pass --data")
    tokens = (load_data(list(ecfg.data), list(ecfg.weights) if ecfg.weights else None, model_cfg.vocab_size)
              if ecfg.data else _default_tokens(model_cfg))
    x, y, files = ecfg.windows(tokens)
    # A run trained with attention within documents is measured so (on its data, or on
    # --data whose documents end in the same way), unless told otherwise.
    masked = (args.document_mask == "yes" if args.document_mask is not None
              else settings is not None and settings[0].document_mask)
    separator = document_separator(list(ecfg.data) or [default_corpus()]) if masked else None
    weights = place(args.mode, folder, model_cfg, device, dtype, working_bytes(model_cfg, dtype, ecfg),
                    lower="a smaller --batch-size or --seq-len")
    per_pass = windows_per_pass(weights, ecfg, len(x), free_memory(device))
    started = time.perf_counter()
    spans, first = [], 0  # a mixture's files each in passes of their own, so that each one's loss is known
    try:
        for name, n_windows in files:
            spans.append((name, *evaluate(weights, x[first : first + n_windows], y[first : first + n_windows],
                                          ecfg.batch_size, per_pass, separator)))
            first += n_windows
    finally:
        weights.close()
    seconds = time.perf_counter() - started
    total, count = sum(span[1] for span in spans), sum(span[2] for span in spans)
    loss = total / count
    where = "all of" if ecfg.holdout == 1 else f"the last {ecfg.holdout * 100:g}% of"
    result = {"loss": loss, "perplexity": math.exp(min(loss, 700)), "tokens": count, "sequences": len(x),
              "seq_len": ecfg.seq_len, "holdout": ecfg.holdout,
              "data": " + ".join(map(str, ecfg.data)) or "the standard library",
              "model": model_cfg.name, "mode": weights.mode, "device": device.type,
              "dtype": str(dtype).removeprefix("torch."), "seconds": seconds,
              "passes": sum(-(-n // per_pass) for _, n in files), "document_mask": masked,
              "held_out": held_out(settings[0] if settings else None, ecfg)}
    mixture = len(ecfg.data) > 1
    if mixture:
        result["by_file"] = {name: span_total / span_count for name, span_total, span_count in spans}
    windows = f"{len(x)} window{'s' if len(x) > 1 else ''} of {ecfg.seq_len}"
    run = settings[0] if settings else None
    caveat = "" if result["held_out"] is not False else "; the run trained on these tokens (it held out " + (
        f"files of its own: {' + '.join(map(str, run.eval_data_files()))})" if run.eval_data else
        f"only the last {run.holdout * 100:g}%)" if run.eval_every else "none: see --eval-every)")
    by_file = "; by file: " + ", ".join(f"{name} {value:.4f}" for name, value in result["by_file"].items()
                                        ) if mixture else ""
    return result, (f"{model_cfg.name} ({weights.mode} on {device.type}): loss {loss:.4f}, perplexity "
                    f"{result['perplexity']:.2f}, over {count:,} tokens ({windows} from {where} {result['data']}) in "
                    f"{seconds:.1f} s{', attention within documents' if masked else ''}{by_file}{caveat}")


def held_out(run: TrainConfig | None, ecfg: EvalConfig) -> bool | None:
    """Whether the windows lie in text the run never trained on: its --eval-data files,
    or its own data's tail no longer than the part it held out (None: not a run's
    weights, or other data)."""
    if run is not None and run.eval_data and ecfg.data == tuple(run.eval_data_files()):
        return True
    if run is None or ecfg.data != tuple(run.data_files()) or (len(ecfg.data) > 1 and ecfg.weights != (
            tuple(run.data_weights) if run.data_weights else None)):
        return None
    return bool(run.eval_every) and not run.eval_data and ecfg.holdout <= run.holdout


def _default_tokens(cfg: ModelConfig) -> Tokens:
    from streamer.data import BYTE_VOCAB

    if cfg.vocab_size != BYTE_VOCAB:
        raise UserError(f"{cfg.name} has a vocabulary of {cfg.vocab_size} tokens and the default text is bytes: "
                        "pass --data, a token file prepared with the model's tokenizer ('streamer prepare')")
    return load_data([default_corpus()], None, cfg.vocab_size)
