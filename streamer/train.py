"""The training loop: one loop for every mode; the engine decides where weights live.

    for step in steps:
        micro_batches = sampler.global_batch(step)   # a pure function of (seed, step)
        stats = engine.step(micro_batches, lr_at(step))
        if evaluation is due:
            held_out_loss = engine.evaluate(eval_batches)   # the same windows every time
        log(step, stats, held_out_loss)
        if a signal asked to stop:                           # every rank agrees
            checkpoint(step); stop                           # [Note: stopping on a signal]
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from models import GPT, REGISTRY, ModelConfig, UnknownModelError
from models.safety import UnsafeFileError, check_safetensors
from streamer.checkpoint import (
    PATH_SETTINGS,
    check_compatible,
    choose_checkpoint,
    discard_after,
    newest_manifest,
    restore,
    save_checkpoint,
    truncate_metrics,
)
from streamer.data import (
    BatchSampler,
    Mixture,
    Tokens,
    check_one_tokenizer,
    default_corpus,
    document_separator,
    eval_window_total,
    eval_windows_by_file,
    holdout_split,
    load_data,
    times_read,
)
from streamer.errors import OUT_OF_TIME, Stopped, UserError
from streamer.io import absolute, atomic_write_json, existing_parent, utc_stamp, write_safetensors
from streamer.optim import SCHEDULES, OptimConfig, lr_at, wsd_decay_start
from streamer.parallel import DataParallel
from streamer.state import fused_mode
from streamer.stats import StepStats
from streamer.status import process_record
from streamer.store import allocated_bytes, stale_store, store_free_bytes, store_root


@dataclass
class TrainConfig:
    # A registry name, or a folder of weights whose architecture to train (a Hugging Face
    # checkpoint, a run's final/ or one of its checkpoints); None: --init-from's, else tiny.
    model: str | None = "tiny"
    # The model's vocabulary in place of its own (data of a tokenizer the registry entry
    # was not made for); None: as the model has it.
    vocab_size: int | None = None
    mode: str = "resident"  # resident | stream
    steps: int = 300
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    seq_len: int = 256
    lr: float = 3e-3  # tiny models tolerate a high peak rate; scale down for large ones
    min_lr: float | None = None  # default: lr / 10
    warmup: int = 20
    schedule: str = "cosine"  # after warmup: cosine | wsd | constant (streamer.optim.lr_at)
    decay_fraction: float = 0.2  # wsd: the last share of the steps, which decays to min_lr
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    # Token files from 'streamer prepare': one (a str), or several (a list) drawn from in
    # the shares `data_weights` (default: their sizes; streamer.data's [Note: data
    # mixtures]); None: the stdlib corpus.
    data: str | list[str] | None = None
    data_weights: list[float] | None = None
    out: str | None = None
    device: str = "auto"  # auto: cuda when present, else cpu
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on CPU
    offload: str = "auto"  # stream mode: ram | disk | split | auto (the planner decides)
    prefetch_depth: int | None = None  # stream mode: units fetched ahead; None: the planner decides
    # Stream mode, AdamW on the GPU: leading units whose state comes to the device during
    # the backward (streamer.scheduler's [Note: updates held on the device]); None: the
    # planner decides.
    held_units: int | None = None
    recompute: str = "auto"  # stream mode: yes | no | auto (recompute only when graphs do not fit)
    max_memory_gib: float | None = None  # stream mode: peak device memory (a CPU's: the process) to plan for
    host_memory_gib: float | None = None  # stream mode: host RAM to plan with; None: what the OS reports available
    state: str = "fp32"  # stream mode: host state format, fp32 | compact (streamer.state)
    # Stream mode: where AdamW runs, host | device (the compute device) | auto (the one the
    # planner predicts the faster: streamer.planner's [Note: where AdamW runs]).
    update_on: str = "auto"
    grad_sync: str = "sparse"  # data parallel: the embedding's gradient by sparse or dense all-reduce
    progress: bool = True
    save_final: bool = True  # export DIR/final/ at the end (a benchmark may not need 40 GB of weights)
    checkpoint_every: int = 0  # steps between checkpoints in DIR/checkpoints; 0: none
    keep: int = 2  # complete checkpoints kept; older ones go only once a newer one is complete
    keep_every: int = 0  # and, past those, the checkpoints of every N-th step for good; 0: none
    resume: bool = False  # continue from the newest valid checkpoint in --out
    # The wall time the run has, in seconds (a cluster job's); it stops in time with a
    # checkpoint ([Note: stopping in time]); 0: no limit.
    time_limit_s: float = 0.0
    max_skipped_steps: int = 0  # stop after this many non-finite steps in a row; 0: never stop
    # Attention within each document of a window, not across them ([Note: documents in a
    # window] in models/gpt.py): the data must end its documents with a separator.
    document_mask: bool = False
    # Where a stream run's disk tier lives: None, under --out; else a folder of its own
    # in this one (streamer.store.store_root), such as a local NVMe.
    store_dir: str | None = None
    # Pretrained weights to start from instead of a random initialisation: a Hugging Face
    # checkpoint (GPT-2, GPT-J, GPT-NeoX) or a run's final/ export, of --model's architecture.
    init_from: str | None = None
    # Held-out evaluation: every N steps and after the last, the loss on the data's tail
    # (the last `holdout` of its tokens, which training then never reads); 0: none, and
    # training reads all of the data.
    eval_every: int = 0
    eval_tokens: int | None = None  # tokens per evaluation; None: one step's
    holdout: float = 0.01
    # Held-out text of its own (token files, one or several in their sizes' shares):
    # evaluations read windows over all of it, and training reads all of `data`.
    eval_data: str | list[str] | None = None
    extra: dict = field(default_factory=dict)

    def validate(self) -> ModelConfig:
        """Refuses bad settings, each with what to do (a UserError), and returns the
        model's architecture."""
        self._check_counts()
        self._check_optimizer()
        self._check_checkpoints()
        self._check_engine()
        model_cfg = model_config(self.model, self.init_from)
        if self.vocab_size is not None:
            model_cfg = replace(model_cfg, vocab_size=self.vocab_size)
        if self.seq_len > model_cfg.block_size:
            raise UserError(f"--seq-len {self.seq_len} exceeds {model_cfg.name}'s context of "
                            f"{model_cfg.block_size}: use --seq-len {model_cfg.block_size} or less")
        from streamer.planner import check_held_units

        check_held_units(model_cfg, self.held_units, self.update_on if self.mode == "stream" else "host")
        return model_cfg

    def _check_counts(self) -> None:
        """The batch's sizes, the steps, the evaluation's."""
        for name in ("steps", "batch_size", "grad_accum", "seq_len", "vocab_size"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} must be a positive integer, got {getattr(self, name)}")
        for name in ("checkpoint_every", "max_skipped_steps", "eval_every", "seed"):
            if getattr(self, name) < 0:
                flag = "--" + name.replace("_", "-")
                raise UserError(f"{flag} must be 0{'' if name == 'seed' else ' (off)'} or a positive integer, "
                                f"got {getattr(self, name)}")
        if self.eval_tokens is not None and self.eval_tokens <= 0:
            raise UserError(f"--eval-tokens must be a positive integer, got {self.eval_tokens}")
        files = [path.resolve() for path in self.data_files()]
        twice = next((path for path in files if files.count(path) > 1), None)
        if twice is not None:
            raise UserError(f"--data names '{twice}' more than once: name each file once (--data-weights draws "
                            "more from one)")
        if self.eval_data and not self.eval_every:
            raise UserError("--eval-data is what the evaluations of --eval-every N read: add --eval-every N")
        if not 0 < self.holdout < 1:
            raise UserError(f"--holdout must be a fraction between 0 and 1, got {self.holdout}")

    def _check_optimizer(self) -> None:
        """AdamW's settings and the schedule's: finite, and in their ranges (a NaN passes
        every comparison but ends the run in NaN weights)."""
        if not 0 < self.lr < math.inf:
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise UserError(f"--min-lr must be between 0 and --lr ({self.lr:g}), the floor the schedule decays to, "
                            f"got {self.min_lr}")
        if self.warmup < 0:
            raise UserError(f"--warmup must be 0 or a positive number of steps, got {self.warmup}")
        for name, value in (("weight-decay", self.weight_decay), ("grad-clip", self.grad_clip)):
            if not 0 <= value < math.inf:
                raise UserError(f"--{name} must be 0 (off) or a positive number, got {value}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule must be {', '.join(SCHEDULES[:-1])} or {SCHEDULES[-1]}, got '{self.schedule}'")
        if not 0 < self.decay_fraction <= 1:
            raise UserError(f"--decay-fraction must be above 0 and at most 1 (the share of the steps that decays), "
                            f"got {self.decay_fraction}")

    def _check_checkpoints(self) -> None:
        """Checkpoints, what is kept of them, the time limit and resuming."""
        if self.keep <= 0:
            raise UserError(f"--keep must be a positive integer, got {self.keep}")
        if self.keep_every < 0:
            raise UserError(f"--keep-every must be 0 (none) or a positive number of steps, got {self.keep_every}")
        if self.keep_every and not self.checkpoint_every:
            raise UserError(f"--keep-every {self.keep_every} keeps checkpoints that --checkpoint-every writes: add "
                            f"--checkpoint-every N (N dividing {self.keep_every})")
        if self.keep_every and self.keep_every % self.checkpoint_every:
            raise UserError(f"--keep-every {self.keep_every} names steps that --checkpoint-every "
                            f"{self.checkpoint_every} never checkpoints: make it a multiple of "
                            f"{self.checkpoint_every}")
        if not 0 <= self.time_limit_s < float("inf"):
            raise UserError(f"--time-limit must be a positive duration, got {self.time_limit_s} s")
        if self.time_limit_s and not self.checkpoint_every:
            raise UserError("--time-limit stops the run with a checkpoint to go on from: add --checkpoint-every N")
        if self.resume and not self.out:
            raise UserError("--resume needs the run's directory: add --out DIR")

    def _check_engine(self) -> None:
        """The mode, and the stream engine's settings: a resident run refuses them rather
        than run without what they ask for."""
        if self.mode not in ("resident", "stream"):
            raise UserError(f"--mode must be 'resident' or 'stream', got '{self.mode}'")
        if self.recompute not in ("auto", "yes", "no"):
            raise UserError(f"--recompute must be auto, yes or no, got '{self.recompute}'")
        if self.max_memory_gib is not None and not 0 < self.max_memory_gib < math.inf:
            raise UserError(f"--max-memory must be a positive number of GiB, got {self.max_memory_gib}")
        if self.host_memory_gib is not None and not 0 < self.host_memory_gib < math.inf:
            raise UserError(f"--host-memory must be a positive number of GiB, got {self.host_memory_gib}")
        if self.prefetch_depth is not None and self.prefetch_depth <= 0:
            raise UserError(f"--prefetch-depth must be a positive integer, got {self.prefetch_depth}")
        if self.state not in ("fp32", "compact", "compact8"):
            raise UserError(f"--state must be fp32, compact or compact8, got '{self.state}'")
        if self.update_on not in ("auto", "host", "device"):
            raise UserError(f"--update-on must be auto, host or device, got '{self.update_on}'")
        if self.grad_sync not in ("sparse", "dense"):
            raise UserError(f"--grad-sync must be sparse or dense, got '{self.grad_sync}'")
        if self.mode == "stream":
            return
        if self.state != "fp32":
            raise UserError(f"--state {self.state} is a host-store format: use it with --mode stream")
        streamed = {"--offload": self.offload != "auto", "--prefetch-depth": self.prefetch_depth is not None,
                    "--recompute": self.recompute != "auto", "--max-memory": self.max_memory_gib is not None,
                    "--store-dir": self.store_dir is not None, "--update-on host": self.update_on == "host"}
        given = [flag for flag, set_ in streamed.items() if set_]
        if given:
            raise UserError(f"{', '.join(given)} {'is a setting' if len(given) == 1 else 'are settings'} of the "
                            "stream engine, which a resident run does not use: add --mode stream, or drop "
                            f"{'it' if len(given) == 1 else 'them'}")

    def record(self) -> dict:
        """The settings as run.json and each checkpoint record them: file and folder paths
        made absolute, so that the record means the same files from any directory."""
        model = self.model if self.model is None or self.model in REGISTRY else absolute(self.model)
        return {**asdict(self), **{name: absolute(getattr(self, name)) for name in PATH_SETTINGS}, "model": model}

    def data_files(self) -> list[Path]:
        """The token files, none for the default corpus."""
        return [] if not self.data else [Path(self.data)] if isinstance(self.data, str) else list(map(Path, self.data))

    def optim_config(self) -> OptimConfig:
        return OptimConfig(lr=self.lr, min_lr=self.lr / 10 if self.min_lr is None else self.min_lr,
                           warmup_steps=min(self.warmup, self.steps), total_steps=self.steps,
                           weight_decay=self.weight_decay, grad_clip=self.grad_clip, schedule=self.schedule,
                           decay_fraction=self.decay_fraction)

    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    def eval_data_files(self) -> list[Path]:
        """The held-out files of their own (`--eval-data`), none for the data's tail."""
        return ([] if not self.eval_data else [Path(self.eval_data)] if isinstance(self.eval_data, str)
                else list(map(Path, self.eval_data)))

    def training_tokens(self, tokens: Tokens) -> Tokens:
        """What training samples from: all of the data, or all but the held-out tail."""
        tail_held_out = self.eval_every and not self.eval_data
        return holdout_split(tokens, self.holdout, self.seq_len)[0] if tail_held_out else tokens

    def eval_sequences(self, world: int = 1) -> int:
        """The held-out windows an evaluation reads: --eval-tokens (default: one step's, of
        every rank) in whole sequences, rounded up to a multiple of the ranks."""
        wanted = -(-(self.eval_tokens or self.tokens_per_step() * world) // self.seq_len)
        return -(-wanted // world) * world

    def eval_passes(self, tokens: Tokens, rank: int = 0, world: int = 1, held_out: Tokens | None = None
                    ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """This rank's share of the held-out windows, in micro-batches of --batch-size,
        grouped into passes of at most --grad-accum micro-batches, so that a pass holds no
        more activations than a step's forward. Sequences go to ranks in turn (their
        count rounded up to a multiple of the ranks), and every rank makes as many passes,
        some perhaps empty: a streamed pass gathers weights, a collective all must join."""
        return [batches for _, passes in self.eval_groups(tokens, rank, world, held_out) for batches in passes]

    def eval_groups(self, tokens: Tokens, rank: int = 0, world: int = 1, held_out: Tokens | None = None
                    ) -> list[tuple[str | None, list[list[tuple[torch.Tensor, torch.Tensor]]]]]:
        """`eval_passes`, a group of passes per file: one, unnamed, for one file; for a
        mixture, each file's windows (as many as its share) in passes of their own, so
        that each file's held-out loss is known as well as the mixture's. The windows
        lie in `held_out` (the --eval-data files), else in the tail of `tokens`."""
        held = held_out if held_out is not None else holdout_split(tokens, self.holdout, self.seq_len)[1]
        x, y, files = eval_windows_by_file(held, self.seq_len, self.eval_sequences(world))
        groups, first = [], 0
        for name, count in files:
            groups.append((name, self._passes(x[first : first + count], y[first : first + count], rank, world)))
            first += count
        return groups

    def _passes(self, x: np.ndarray, y: np.ndarray, rank: int, world: int
                ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        per_pass, most = self.batch_size * self.grad_accum, -(-len(x) // world)  # the most windows a rank has
        passes = -(-most // per_pass)
        x, y = torch.from_numpy(x[rank::world]), torch.from_numpy(y[rank::world])
        return [[(x[i : i + self.batch_size], y[i : i + self.batch_size])
                 for i in range(p * per_pass, min(len(x), (p + 1) * per_pass), self.batch_size)]
                for p in range(passes)]


def resolve_device(name: str) -> torch.device:
    """`--device`: auto (CUDA when present, else the CPU), cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got '{name}'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but this machine has no CUDA device: use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # bf16 halves the bytes streamed and doubles matmul rate on GPUs; CPUs gain
        # little from it and float32 keeps CPU runs exactly comparable.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in table:
        raise UserError(f"--dtype must be one of {', '.join(table)} or auto, got '{name}'")
    return table[name]


def model_config(model: str | None, init_from: str | None = None) -> ModelConfig:
    """The architecture to train: `model`'s, a registry name or a folder of weights (its
    config.json, or a run checkpoint's manifest), or with no `model` that of the weights
    in `init_from`, or tiny's. Weights that name their own architecture train as they
    are, with no registry entry for them (GPT-2 medium, Pythia 2.8B, a model of one's own)."""
    if model is None and init_from is None or model in REGISTRY:
        return ModelConfig.from_name(model or "tiny")
    folder, flag = (Path(model), "--model") if model is not None else (Path(init_from), "--init-from")
    if model is not None and not folder.exists() and os.sep not in model:  # a name, mistyped
        raise UserError(f"{UnknownModelError(model)} (or name a folder of weights: a Hugging Face checkpoint, "
                        "a run's final/ or one of its checkpoints)")
    weights = "a Hugging Face checkpoint with its config.json, a run's final/ or one of its checkpoints"
    from streamer.inference import read_model_config, weights_folder

    try:
        return read_model_config(weights_folder(folder))  # a run's folder: its final/
    except (OSError, ValueError) as exc:
        raise UserError(f"{flag} '{folder}': {exc}: " + (f"pass pretrained weights ({weights})" if model is None else
                        f"name a folder of weights ({weights}) or a registry name (streamer models)")) from None


def default_out(model: str) -> Path:
    return Path("runs") / f"{model}-{time.strftime('%Y%m%d-%H%M%S')}"


def check_out_dir(path: Path, resume: bool) -> None:
    """Refuse, before anything is written, an output directory that cannot be one or that
    holds another run (unless resuming it)."""
    existing = existing_parent(path)
    if not existing.is_dir():
        raise UserError(f"output directory '{path}' cannot be created: '{existing}' is a file: choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"output directory '{path}' is not writable (permission denied): choose another --out")
    if not resume and ((path / "metrics.jsonl").exists() or (path / "checkpoints").exists()):
        raise UserError(f"output directory '{path}' holds another run: choose a new --out, "
                        "or add --resume to continue it")


def prepare_out_dir(path: Path) -> Path | None:
    """Create the output directory (rank 0) and prove it writable; returns the top-most
    folder this created, which is removed again if the run fails to start, or None."""
    created = next((p for p in reversed([path, *path.parents]) if not p.exists()), None)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise UserError(f"output directory '{path}' is not writable ({exc.strerror}): choose another --out") from None
    return created


def check_grad_sync(cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device, world: int) -> None:
    """Refuse device and gradient-sync choices that would fail at the first step."""
    if device.type == "cuda" and world > torch.cuda.device_count():
        raise UserError(f"{world} processes need {world} CUDA devices (NCCL runs one per device) but this "
                        f"machine has {torch.cuda.device_count()}: use --nproc {torch.cuda.device_count()}")
    # The sparse all-reduce moves an untied embedding's rows with CuPy kernels when the
    # gradient lives on a CUDA device; a tied table's gradient is dense and never does.
    if cfg.grad_sync != "sparse" or world <= 1 or device.type != "cuda" or model_cfg.tie_embeddings:
        return
    try:
        import cupy  # noqa: F401
    except Exception:  # ImportError, or a CuPy build that cannot load on this machine
        raise UserError("--grad-sync sparse on CUDA needs CuPy (the 'cuda' extra): "
                        "pip install 'streamer[cuda]', or use --grad-sync dense") from None


def check_store_dir(store_dir: str | Path | None) -> None:
    """--store-dir must be a folder this process can write in, or one it can create in
    a folder that exists: a path mistyped further up is refused rather than made, on
    whichever disk holds the first folder that does exist."""
    if store_dir is None:
        return
    path = Path(store_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--store-dir '{path}' is a file, not a folder: name a folder on the disk for the store")
    if not path.exists() and not path.absolute().parent.is_dir():
        raise UserError(f"--store-dir '{path}': no folder '{path.absolute().parent}' to make it in: check the path, "
                        "or create the folder first")
    parent = existing_parent(path)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"--store-dir '{path}' cannot be written here ('{parent}' is not a writable folder): "
                        "name a folder this user may write in")


def same_disk(a: Path, b: Path) -> bool:
    """Whether two paths (or the folders they would be created in) share a filesystem."""
    return os.stat(existing_parent(a)).st_dev == os.stat(existing_parent(b)).st_dev


# Held whole, a model keeps float32 weights, their gradients and AdamW's two moments on
# the device: 16 bytes a parameter before any activation. A model past that would fail
# in its first allocations: a CUDA out-of-memory error, or on a CPU device the kernel's
# OOM killer, which takes the process (and may take others) without a word.
RESIDENT_BYTES_PER_PARAMETER = 16


def check_resident_fits(cfg: TrainConfig, model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse a resident run whose weights and optimizer state, or those with a
    micro-batch's activations (`planner.predict_resident_peak_bytes`, within 11% of the
    peaks measured), exceed the device's memory (a CPU device's: the host memory
    available, or --host-memory): it would fail in its first steps, on a CPU at the hands
    of the OOM killer."""
    from streamer.planner import host_available, predict_resident_peak_bytes

    state = RESIDENT_BYTES_PER_PARAMETER * model_cfg.n_params()
    if device.type == "cuda":
        have, where = torch.cuda.get_device_properties(device).total_memory, "the GPU's"
    else:
        have, where = host_available(cfg.host_memory_gib), "the host memory available"
    if state > 0.9 * have:
        raise UserError(f"{model_cfg.name} held whole needs {state / 2**30:.1f} GiB for its float32 weights, "
                        f"gradients and AdamW state, and {where} is {have / 2**30:.1f} GiB: train it with --mode "
                        f"stream (streamer plan --model {model_cfg.name} shows where its state would live)")
    step = predict_resident_peak_bytes(model_cfg, cfg.batch_size * cfg.seq_len, dtype.itemsize, cfg.grad_accum)
    if step > 0.9 * have:
        raise UserError(f"a step of {model_cfg.name} held whole, with micro-batches of {cfg.batch_size} x "
                        f"{cfg.seq_len} tokens, needs about {step / 2**30:.1f} GiB, and {where} is "
                        f"{have / 2**30:.1f} GiB: lower --batch-size (and raise --grad-accum to keep the tokens "
                        "per step), or train with --mode stream")


def check_plan_fits(cfg: TrainConfig, model_cfg: ModelConfig, root: Path, device: torch.device,
                    dtype: torch.dtype) -> float:
    """A streamed model's state must fit host RAM or the disk that holds the store's
    folder `root` (`store_free_bytes`), and its step the --max-memory limit when one is
    given. Returns the bytes the store will write there (its disk part)."""
    from streamer import planner

    available = planner.host_available(cfg.host_memory_gib)
    free = store_free_bytes(root)
    offload = planner.choose_offload(model_cfg, available, free, cfg.offload, cfg.state)
    ram_units = planner.split_ram_units(model_cfg, available, cfg.state) if offload == "split" else None
    counts = planner.unit_param_counts(model_cfg)
    on_disk = planner.state_bytes(cfg.state)[0] * sum(counts[planner.units_in_ram(len(counts), offload, ram_units):])
    if cfg.max_memory_gib:
        # Memory does not depend on the compute rate, so the device's stock profile
        # answers "does it fit" before anything is measured or written.
        profile = planner.PROFILES["cpu" if device.type == "cpu" else "h100"]
        profile = planner.replace(profile, compute_bytes=torch.tensor([], dtype=dtype).element_size())
        planner.fit_memory(model_cfg, profile, cfg.tokens_per_step(), cfg.seq_len, offload,
                           cfg.batch_size * cfg.seq_len, cfg.max_memory_gib * 2**30, cfg.prefetch_depth,
                           cfg.recompute, cfg.state, ram_units)
    return on_disk


def final_bytes(cfg: TrainConfig, model_cfg: ModelConfig) -> int:
    """The final weights' size: in the master weights' own precision, float32, or
    bfloat16 in the compact formats (a float32 copy would double the bytes and add no
    information)."""
    from streamer.planner import unit_param_counts
    from streamer.state import FORMATS

    itemsize = FORMATS[cfg.state].buffer("param").itemsize if cfg.mode == "stream" else 4
    return itemsize * sum(unit_param_counts(model_cfg))


def check_final_fits(cfg: TrainConfig, model_cfg: ModelConfig, out: Path, store_bytes: float) -> None:
    """The final weights, and the disk part of a fresh store beside them, must fit the
    free space under --out: a 20B model's are 41 GB, and a disk that fills only after
    the last step loses the run's result."""
    def size(n: float) -> str:
        return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    need, free = final_bytes(cfg, model_cfg), shutil.disk_usage(existing_parent(out)).free
    beside = f" beside its store's {size(store_bytes)}" if store_bytes else ""
    if need + store_bytes > free:
        raise UserError(f"{cfg.model}'s final weights need {size(need)} under '{out}'{beside}, but {size(free)} "
                        "is free: free space, choose another --out, or add --no-save-final")


def open_pretrained(path: str, model_cfg: ModelConfig):  # -> models.hf.Pretrained or CheckpointWeights
    """The weights of --init-from, checked against the model: its architecture, and for
    exported weights every tensor's presence and shape and the files' headers (nothing
    is read yet); a run's checkpoint (DIR/checkpoints/step-N) has its files checked as
    they are read."""
    from models.hf import Pretrained, check_architecture
    from streamer.checkpoint import MANIFEST, CheckpointWeights
    from streamer.inference import weights_folder

    path = weights_folder(Path(path))  # a run's folder: its final/
    try:
        if (Path(path) / MANIFEST).is_file():
            weights = CheckpointWeights(Path(path))
            check_architecture(weights.cfg, model_cfg)
            return weights
        return Pretrained(path, model_cfg)
    except (OSError, ValueError) as exc:  # a bad or crafted file's UnsafeFileError too
        raise UserError(f"--init-from '{path}': {exc}: pass pretrained weights of {model_cfg.name}'s architecture "
                        "(a Hugging Face checkpoint, a run's final/ or one of its checkpoints), or the --model it "
                        "was made for") from None


def check_resumable(cfg: TrainConfig, model_cfg: ModelConfig, out: Path, world: int) -> list[str]:
    """Refuse to resume a checkpoint of another model, mode or world size (from its
    manifest only: files are verified once the processes start); returns warnings."""
    found = newest_manifest(out)
    if found is None:
        return []
    folder, manifest = found
    if cfg.steps < manifest["step"]:
        raise UserError(f"--steps {cfg.steps} is fewer than the {manifest['step']} steps checkpoint {folder.name} "
                        f"has done: a resumed run goes on from there; give --steps {manifest['step']} or more")
    changed = check_compatible(manifest, folder, model_cfg.to_dict(), cfg.mode, world, cfg.record())
    # Not named after a checkpoint: the manifest read here is the newest that reads, and
    # the run may go on from an older one, should this one's files prove corrupt.
    warnings = [f"settings differ from those the run recorded ({', '.join(changed)}): the resumed run uses "
                "the new ones, so it is not the run its checkpoints came from"] if changed else []
    saved = manifest.get("train") or {}
    if cfg.schedule == saved.get("schedule") == "wsd" and cfg.steps > saved.get("steps", cfg.steps):
        # A wsd run is its longer self only up to where its decay began: steps past it
        # took lower rates than the longer run's (see streamer.optim.lr_at).
        decay_from = wsd_decay_start(saved["steps"], saved.get("decay_fraction", cfg.decay_fraction),
                                     min(saved.get("warmup", cfg.warmup), saved["steps"]))
        if manifest["step"] > decay_from + 1:
            warnings.append(f"checkpoint {folder.name} is past the start of the run's decay (step {decay_from} of "
                            f"{saved['steps']}): the longer run goes on from decayed weights, not as a run of "
                            f"{cfg.steps} steps would; a checkpoint of step {decay_from + 1} or earlier (a "
                            "--keep-every milestone) would go on as one")
    return warnings


@dataclass(frozen=True)
class Preflight:
    """What `preflight` resolved: the run needs no other checks before it starts."""

    model_cfg: ModelConfig
    device: torch.device
    dtype: torch.dtype
    tokens: Tokens  # one token file, or a mixture of several
    out: Path
    warnings: list[str]
    separator: int | None = None  # with --document-mask: the token that ends each document
    held_out: Tokens | None = None  # the --eval-data files' tokens, when given


def preflight(cfg: TrainConfig, world: int) -> Preflight:
    """Every check that writes nothing and needs no process group, so that a bad input
    fails before anything exists on disk (the launcher runs it before it starts any
    process): flags, model, device, data, output directory, plan, checkpoint."""
    model_cfg = cfg.validate()
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if world > 1 and cfg.mode != "stream":
        raise UserError("several processes train with --mode stream only: add --mode stream")
    if world > 1 and cfg.held_units:
        raise UserError(f"--held-units {cfg.held_units} needs one process (a held unit keeps its whole gradient): "
                        "drop it, or train with --nproc 1")
    check_grad_sync(cfg, model_cfg, device, world)
    if cfg.mode == "resident":
        check_resident_fits(cfg, model_cfg, device, dtype)
    fused_mode()  # the environment's choice of update kernels, read again by every update
    data_files = cfg.data_files() or [default_corpus()]
    tokens = load_data(data_files, cfg.data_weights, model_cfg.vocab_size)
    held_out = check_eval_data(cfg, data_files, model_cfg.vocab_size) if cfg.eval_data else None
    separator = document_separator(data_files + cfg.eval_data_files()) if cfg.document_mask else None
    BatchSampler(cfg.training_tokens(tokens), cfg.seq_len, cfg.seed)  # refuses data shorter than one sequence
    out = Path(cfg.out) if cfg.out else default_out(model_cfg.name)
    check_out_dir(out, cfg.resume)
    root = store_root(out, cfg.store_dir)
    check_store_dir(cfg.store_dir)
    # A killed run leaves its store (streamer.store's [Note: the disk tier is scratch]):
    # the new one is written over it, so its bytes count as free. A resume by another
    # number of processes rebuilds the store in another layout: the old one's files are
    # dead (see streamer.store.stale_store), and go once the run is known to start.
    found = newest_manifest(out) if cfg.resume and cfg.mode == "stream" else None
    stale = stale_store(root, int(found[1].get("world", 1)), world) if found else []
    reclaimed = allocated_bytes([root])
    store_bytes = check_plan_fits(cfg, model_cfg, root, device, dtype) if cfg.mode == "stream" else 0
    if cfg.save_final:  # the store's new bytes, if it shares the disk of --out
        beside = max(0, store_bytes - reclaimed) if same_disk(out, root) else 0
        check_final_fits(cfg, model_cfg, out, beside)
    warnings = check_resumable(cfg, model_cfg, out, world) if cfg.resume else []
    for path in stale:  # every rank may try: the first to reach a path removes it
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if cfg.init_from and not (cfg.resume and newest_manifest(out)):  # a checkpoint's weights win
        open_pretrained(cfg.init_from, model_cfg).close()
    warnings += repetition_warnings(cfg, tokens, world) + evaluation_warnings(cfg, tokens, held_out, world)
    return Preflight(model_cfg, device, dtype, tokens, out, warnings, separator, held_out)


def evaluation_warnings(cfg: TrainConfig, tokens: Tokens, held_out: Tokens | None, world: int) -> list[str]:
    """--eval-tokens beyond what the held-out text holds (each evaluation reads the
    windows there are, a fraction of what was asked): said before the run, not found in
    its metrics' eval_tokens."""
    if not (cfg.eval_every and cfg.eval_tokens):
        return []
    held = held_out if held_out is not None else holdout_split(tokens, cfg.holdout, cfg.seq_len)[1]
    asked = cfg.eval_sequences(world)
    windows = eval_window_total(held, cfg.seq_len, asked)
    if windows >= asked:
        return []
    where = "--eval-data" if held_out is not None else f"the data's held-out tail (--holdout {cfg.holdout:g})"
    return [f"--eval-tokens {cfg.eval_tokens:,}: {where} holds {windows:,} window{'s' * (windows != 1)} of "
            f"{cfg.seq_len}, so each "
            f"evaluation reads {windows * cfg.seq_len:,} tokens"]


def check_eval_data(cfg: TrainConfig, data_files: list[Path], vocab_size: int) -> Tokens:
    """The --eval-data files' tokens: text of their own, none of it a training file,
    tokenized as the training data is, and a sequence long at least."""
    training = {path.resolve() for path in data_files}
    for path in cfg.eval_data_files():
        if path.resolve() in training:
            raise UserError(f"--eval-data file '{path}' is also a --data file: the run would train on what it "
                            "evaluates; hold out a file of its own, or drop --eval-data to hold out the data's tail")
    held_out = load_data(cfg.eval_data_files(), None, vocab_size)
    check_one_tokenizer(data_files + cfg.eval_data_files())
    parts = held_out.parts if isinstance(held_out, Mixture) else (held_out,)
    for path, part in zip(cfg.eval_data_files(), parts):
        if part.size < cfg.seq_len + 1:
            raise UserError(f"--eval-data file '{path}' holds {part.size} tokens, fewer than one sequence of "
                            f"{cfg.seq_len + 1}: hold out more text, or a shorter --seq-len")
    return held_out


def repetition_warnings(cfg: TrainConfig, tokens: Tokens, world: int) -> list[str]:
    """A file the run reads twice over or more (a small file, or one given a large
    share): said before the run starts, since training on repeated text overfits it."""
    read = cfg.steps * cfg.tokens_per_step() * world
    return [f"{f'data file {name!r}' if name else 'the data'} ({size:,} training tokens"
            f"{f', {share:.0%} of the windows' if name else ''}) is read {times:.1f} times over by {cfg.steps:,} steps "
            f"of {cfg.tokens_per_step() * world:,} tokens: more text{' or a smaller share' if name else ''}, "
            "if that is not meant"
            for name, size, share, times in times_read(cfg.training_tokens(tokens), read) if times >= 2]


def warn(message: str) -> None:
    """A warning line on stderr that does not tear the progress bar."""
    tqdm.write(f"streamer: warning: {message}", file=sys.stderr)


class StopSignals:
    """Stop a run at a step's end when asked by a signal.

    [Note: stopping on a signal]
    SIGINT (Ctrl-C), SIGTERM (what a cluster's scheduler or a cloud sends before it
    pre-empts a job) and SIGUSR1 (the warning a batch scheduler sends ahead of a job's
    wall time when asked to, as Slurm's `--signal=USR1@300`; its default action is to
    terminate, too) do not kill a training run while it steps: the first one asks it to
    finish the step in progress, write a checkpoint there (when the run writes them,
    `--checkpoint-every`) and exit, so that `--resume` goes on from that step rather
    than from the last periodic checkpoint, hours earlier for a large model. A step is
    never left halfway: its gradients and its updates of the store are one transaction,
    which is what makes a checkpoint of it consistent. The ranks of a multi-process run
    agree on stopping after every step (an all-reduce of the signal's number), since
    each may see the signal in another step, or only one may get it at all: they stop
    together, after the same step, and write one checkpoint. A second signal stops at
    once (SIGINT as KeyboardInterrupt, the others by their default action), as before.
    (Python runs a handler between bytecodes of the main thread: a process hung inside
    native code, a collective whose peer died, answers none of them, only SIGKILL, which
    torchrun and cluster schedulers send after their grace period.)
    The handlers are in place only while steps run: during start-up and while the final
    weights are written, each of the three ends the command at once, as Ctrl-C does
    (`streamer train` has SIGTERM and SIGUSR1 raise errors.Interrupted; a launcher's
    ranks: streamer/cli.py's [Note: a signal before the steps]); nothing on disk is
    half-written either way (every file is written under a temporary name and renamed),
    and a run stopped in its start-up removes what it had made."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self, announce: bool) -> None:
        self.signum = 0  # the first signal received; 0: none
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # where Python runs handlers
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def _handle(self, signum: int, frame: object) -> None:
        if self.signum:  # the second: stop now
            self.__exit__()
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        if self.announce:  # a bare write: the main thread may be inside a buffered one
            os.write(2, f"\nstreamer: {signal.Signals(signum).name}: stopping after this step "
                        f"(signal again to stop at once)\n".encode())

    def agreed(self, dp: DataParallel, device: torch.device, out_of_time: bool = False) -> tuple[int, bool]:
        """Whether every rank stops after this step, and why: the signal (0: none), and
        whether time is up (a `TimeLimit` said so on some rank); all ranks call it after
        each step. A signal wins when both ask."""
        code = dp.max(self.signum << 1 | out_of_time, device if dp.world > 1 else torch.device("cpu"))
        return code >> 1, bool(code & 1)


class TimeLimit:
    """When a run with `--time-limit` must stop to end in time.

    [Note: stopping in time]
    A cluster job has a wall time, and the scheduler kills it there, often with no
    signal first, or with one too late for a 20B step and its checkpoint. With
    `--time-limit` the run keeps its own clock, from the command's start (the launcher's
    under `--nproc`), and after each step asks whether one more step and a checkpoint
    after it (and, when this step's periodic checkpoint is due, that one too) would
    still end before the limit. When they would not, it stops as a signal would stop it
    ([Note: stopping on a signal]): a checkpoint after this step, and exit status
    OUT_OF_TIME (75), on which a job script can requeue the same command with --resume.
    Ranks agree, since their clocks and steps differ a little.
    A step is the slowest so far (its evaluation included); a checkpoint, the longest
    this run wrote, or before it wrote one, its bytes at the rate a probe file writes
    (`probe_checkpoint_s`). A resumed run starts from the times its checkpoint recorded
    (the slowest step and the longest checkpoint before it), so that a job's first
    decision is measured too; a probe writes but does not read, as a checkpoint of a
    disk tier does. Both vary (the page cache, other jobs on the machine), so
    each counts a quarter more, and 5 s more on top. The final export is smaller than a
    checkpoint (weights only); the last step's check covers it.
    A fresh run's first step always runs: there is nothing to estimate it from.
    Start-up (reading a checkpoint back, filling a store) counts against the limit; a
    resumed job that it left no room for a step and its checkpoint is refused (a
    UserError, not OUT_OF_TIME: requeued, it would end the same way, for ever)."""

    MARGIN, SLACK_S = 1.25, 5.0

    def __init__(self, limit_s: float, started_at: float, checkpoint_s: float, measured: bool = False) -> None:
        self.limit_s = limit_s
        self.deadline = started_at + limit_s
        self.checkpoint_s = checkpoint_s  # estimated; once the run writes one, the longest it wrote
        self.measured = measured

    @staticmethod
    def clock() -> float:
        """Seconds since the epoch: a clock that several processes share."""
        return time.time()

    def wrote_checkpoint(self, seconds: float) -> None:
        self.checkpoint_s = max(self.checkpoint_s, seconds) if self.measured else seconds
        self.measured = True

    def needed_s(self, step_s: float, checkpoints: int) -> float:
        """The time to keep for a step and `checkpoints` checkpoints, with the margin."""
        return self.MARGIN * (step_s + checkpoints * self.checkpoint_s) + self.SLACK_S

    def out_of_time(self, slowest_s: float, checkpoint_due: bool) -> bool:
        """Whether the run must stop after the step just done."""
        return self.clock() + self.needed_s(slowest_s, 1 + checkpoint_due) > self.deadline

    def left_s(self) -> float:
        return self.deadline - self.clock()


def probe_checkpoint_s(engine: Any, out: Path, rank: int) -> float:
    """The seconds this rank's part of a checkpoint should take to write, before the run
    wrote one: its bytes at the rate a probe file of up to 64 MiB writes into `out`
    (hashed, written under a temporary name, fsynced and renamed, as checkpoint files are)."""
    from streamer.checkpoint import TensorSpec, write_tensor_file

    total = engine.checkpoint_bytes()
    size = max(1, min(total, 64 * 2**20))
    data = torch.randint(0, 256, (size,), dtype=torch.uint8)  # not zeros: a file system may compress those
    path = out / f".checkpoint-probe-{rank}.safetensors"
    started = time.perf_counter()
    try:
        write_tensor_file(path, [TensorSpec("probe", torch.uint8, (size,))], [data])
    except OSError as exc:  # a full disk, above all: no checkpoint would be written either
        raise UserError(f"--time-limit times a checkpoint's write into '{out}' first, and {size / 2**20:.0f} MiB "
                        f"could not be written there ({exc.strerror}): free space there, or choose another --out"
                        ) from None
    finally:
        path.unlink(missing_ok=True)
    return (time.perf_counter() - started) * total / size


def build_engine(cfg: TrainConfig, model_cfg: ModelConfig, out: Path, device: torch.device,
                 dtype: torch.dtype, initialise: bool = True,
                 separator: int | None = None):  # -> ResidentEngine | StreamEngine
    """The run's engine, its weights drawn at random or read from --init-from;
    `initialise=False` skips both when a checkpoint is about to overwrite them;
    `separator`: attention within the documents it ends (`--document-mask`)."""
    optim = cfg.optim_config()
    pretrained = open_pretrained(cfg.init_from, model_cfg) if cfg.init_from and initialise else None
    with pretrained or contextlib.nullcontext():
        if cfg.mode == "resident":
            from streamer.resident import ResidentEngine

            torch.manual_seed(cfg.seed)
            model = GPT(model_cfg)
            if pretrained is None:
                model.init_weights(cfg.seed)
            else:
                with torch.no_grad():
                    for name, param in model.named_parameters():
                        pretrained.into(name, param)
            return ResidentEngine(model, optim, device, dtype, separator)
        from streamer.scheduler import StreamEngine

        return StreamEngine.create(cfg, model_cfg, optim, out, device, dtype, initialise=initialise,
                                   pretrained=pretrained, separator=separator)


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
        check_safetensors(final / name)  # a bad header fails here, before any allocation
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
    """The process's peak resident set since the last `reset_peak_rss` (Linux's VmHWM;
    elsewhere ru_maxrss, a peak over the whole process life)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> None:
    """Start a new peak: a benchmark that runs several trainings in one process then
    reports each run's own peak, not the largest so far. Linux only; a no-op elsewhere."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


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
    if stats.peak_reserved_bytes:
        row["peak_reserved_bytes"] = stats.peak_reserved_bytes
    row.update(extra)
    return row


def _skip_streak(stats: StepStats, step: int, streak: int, cfg: TrainConfig, lead: bool) -> int:
    """Count non-finite steps in a row: warn for each, stop the run after too many."""
    if not stats.skipped:
        return 0
    streak += 1
    if lead:
        warn(f"step {step}: non-finite loss {stats.loss} or gradient norm {stats.grad_norm}: update skipped, "
             f"weights and optimizer state unchanged ({streak} in a row)")
    if cfg.max_skipped_steps and streak >= cfg.max_skipped_steps:
        raise UserError(f"stopped at step {step}: {streak} steps in a row had a non-finite loss or gradient norm "
                        f"(--max-skipped-steps {cfg.max_skipped_steps}): lower --lr or check the data, then "
                        "continue from the last checkpoint with --resume")
    return streak


def _start_engine(cfg: TrainConfig, checked: Preflight, dp: DataParallel) -> tuple[Any, int, dict]:
    """Build the engine, fresh or from the newest valid checkpoint; returns it, the first
    step to run and the saved run counters."""
    lead, out = dp.rank == 0, checked.out
    point = None
    if cfg.resume:
        point = choose_checkpoint(out, dp, checked.device,
                                  warn if lead else lambda message: warn(f"rank {dp.rank}: {message}"))
        if point is None and lead:
            warn(f"no checkpoint in '{out}': starting from step 0")
    started = time.perf_counter()
    engine = build_engine(cfg, checked.model_cfg, out, checked.device, checked.dtype, initialise=point is None,
                          separator=checked.separator)
    run_state = restore(point, engine, dp.rank) if point is not None else {}
    # The engine's start-up, in run.json: with its parts for a stream store.
    engine.startup = {**getattr(engine, "startup", {}), "total_s": time.perf_counter() - started}
    start = point.step if point is not None else 0
    if cfg.resume and lead:
        discard_after(out, start)
        truncate_metrics(out / "metrics.jsonl", start)
    dp.barrier()
    return engine, start, run_state


def evaluate(engine: Any, groups: list[tuple[str | None, list[list[tuple[torch.Tensor, torch.Tensor]]]]],
             dp: DataParallel) -> dict:
    """The held-out loss over every rank's share of the evaluation windows, as metrics;
    for a mixture, each file's too (`eval_loss_by_file`)."""
    started = time.perf_counter()
    local = []  # per group: the summed token loss and the token count
    for _, passes in groups:
        group_sum = group_count = 0
        for batches in passes:
            loss_sum, count = engine.evaluate(batches)
            group_sum, group_count = group_sum + loss_sum, group_count + count
        local += [group_sum, float(group_count)]
    summed = dp.sum(torch.tensor(local, dtype=torch.float64, device=engine.device if dp.world > 1 else "cpu"))
    sums, counts = summed[0::2].tolist(), summed[1::2].tolist()
    metrics = {"eval_loss": sum(sums) / sum(counts), "eval_tokens": int(sum(counts)),
               "eval_s": time.perf_counter() - started}
    if len(groups) > 1:
        metrics["eval_loss_by_file"] = {name: total / count for (name, _), total, count in zip(groups, sums, counts)}
    return metrics


def _run_record(cfg: TrainConfig, checked: Preflight, engine: Any, dp: DataParallel, started_at: float,
                flops_per_token: float, peak_flops: float) -> dict:
    """run.json: the settings, the machine, how the data is read, the start-up, the
    process (for `streamer status`), the time limit, and a streamed run's plan."""
    return {"train": cfg.record(), "model": checked.model_cfg.to_dict(), "world": dp.world,
            "device": str(checked.device), "dtype": str(checked.dtype).removeprefix("torch."),
            "flops_per_token": flops_per_token, "peak_flops": peak_flops,
            # Each data file as the run reads it: its training tokens, share of the
            # windows and times read over (on average).
            "data_reads": [{"file": name, "training_tokens": size, "share": share, "times_read": times}
                           for name, size, share, times in times_read(
                               cfg.training_tokens(checked.tokens), cfg.steps * cfg.tokens_per_step() * dp.world)],
            "startup": engine.startup,
            "process": process_record(),  # for `streamer status`: running, or killed?
            **({"time_limit": {"limit_s": cfg.time_limit_s, "ends": utc_stamp(started_at + cfg.time_limit_s)}}
               if cfg.time_limit_s else {}),
            **({"store": str(engine.store_root)} if getattr(engine, "store_root", None) else {}),
            # The streamer's plan as it started: tiers, state, recompute, prefetch,
            # predicted step and memory (before calibration).
            **({"plan": asdict(engine.plan), "page_locked": engine.page_locked, "update_on": engine.update_on}
               if hasattr(engine, "plan") else {})}


def _time_limit(cfg: TrainConfig, engine: Any, dp: DataParallel, out: Path, start: int, started_at: float,
                slowest_s: float, longest_s: float) -> TimeLimit:
    """--time-limit's clock, from the times earlier jobs measured (or a probe); a
    resumed job whose start-up left no room for a step and its checkpoint is refused."""
    limit = TimeLimit(cfg.time_limit_s, started_at, longest_s or probe_checkpoint_s(engine, out, dp.rank),
                      measured=bool(longest_s))
    # A resumed job knows its step: if start-up left no room for one and its
    # checkpoint, every job would end as this one, with nothing done; say so instead.
    if slowest_s and start < cfg.steps and dp.max(int(limit.out_of_time(slowest_s, False)), engine.device if
                                                   dp.world > 1 else torch.device("cpu")):
        raise UserError(f"--time-limit {cfg.time_limit_s:g} s leaves {max(0.0, limit.left_s()):.0f} s after "
                        f"start-up ({TimeLimit.clock() - started_at:.0f} s), and a step with its checkpoint needs "
                        f"about {limit.needed_s(slowest_s, 1):.0f} s (as this run measured them): give the "
                        f"job more time")
    return limit


def _show_progress(bar: tqdm, row: dict, held_out: float | None) -> float | None:
    """The progress bar's step, loss, speed, newest held-out loss and stall share;
    returns that held-out loss."""
    postfix = {"loss": f"{row['loss']:.3f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
    held_out = row.get("eval_loss", held_out)
    if held_out is not None:
        postfix["held-out"] = f"{held_out:.3f}"
    if "stall_s" in row:
        postfix["stall"] = f"{row['stall_s'] / row['step_s']:.0%}"
    bar.set_postfix(postfix)
    bar.update()
    return held_out


def _run_steps(cfg: TrainConfig, checked: Preflight, engine: Any, dp: DataParallel, start: int,
               run_state: dict, started_at: float) -> Stopped | None:
    """Steps `start`..steps-1: log each, count skipped ones, checkpoint when due; stop
    early when a signal asks ([Note: stopping on a signal]) or time runs short ([Note:
    stopping in time], counted from `started_at`), and say so."""
    from streamer import planner

    lead, out, optim = dp.rank == 0, checked.out, cfg.optim_config()
    sampler = BatchSampler(cfg.training_tokens(checked.tokens), cfg.seq_len, cfg.seed)
    evaluation = cfg.eval_groups(checked.tokens, dp.rank, dp.world, checked.held_out) if cfg.eval_every else []
    peak_flops = planner.peak_flops(checked.device, checked.dtype)
    flops_per_token = checked.model_cfg.flops_per_token(cfg.seq_len)
    run_info = _run_record(cfg, checked, engine, dp, started_at, flops_per_token, peak_flops)
    meta = {"mode": cfg.mode, "model": run_info["model"], "train": run_info["train"]}
    # The slowest step and the longest checkpoint so far, of the jobs before too: what a
    # stop needs ([Note: stopping in time]). A job refused for too little time leaves the
    # run's record as it was (a stop it recorded included).
    slowest_s, longest_s = run_state.get("slowest_step_s", 0.0), run_state.get("checkpoint_s", 0.0)
    limit = _time_limit(cfg, engine, dp, out, start, started_at, slowest_s, longest_s) if cfg.time_limit_s else None
    if lead:
        atomic_write_json(out / "run.json", run_info)
    streak, held_out = run_state.get("skipped_in_a_row", 0), None
    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and lead), unit="step",
               dynamic_ncols=True, mininterval=1.0)
    stop, checkpoint_s = StopSignals(announce=lead), 0.0
    with stop, bar, open(out / "metrics.jsonl", "a") if lead else contextlib.nullcontext() as metrics:
        for step in range(start, cfg.steps):
            lr = lr_at(step, optim)
            batches = micro_batches(sampler, step, cfg, dp.rank, dp.world)
            started = time.perf_counter()
            stats = engine.step(batches, lr)
            step_s = time.perf_counter() - started
            row = metrics_row(step, stats, lr, cfg.tokens_per_step() * dp.world, step_s, flops_per_token,
                              peak_flops * dp.world, getattr(engine, "step_extra", dict)())
            if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                row.update(evaluate(engine, evaluation, dp))
            if lead:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
            streak = _skip_streak(stats, step, streak, cfg, lead)
            held_out = _show_progress(bar, row, held_out)
            # What a stop waits for: the longest step (with its evaluation) so far, and a checkpoint.
            slowest_s = max(slowest_s, time.perf_counter() - started)
            due = bool(cfg.checkpoint_every) and (step + 1) % cfg.checkpoint_every == 0
            # A stop asked for in the last step is the run's end anyway.
            signum, out_of_time = (stop.agreed(dp, engine.device, limit is not None and limit.out_of_time(
                slowest_s, due)) if step + 1 < cfg.steps else (0, False))
            folder, left_s = None, limit.left_s() if limit is not None else 0.0
            if due or (cfg.checkpoint_every and (signum or out_of_time)):
                if lead:  # the rows a checkpoint vouches for are durable before it is
                    os.fsync(metrics.fileno())
                run = {"skipped_in_a_row": streak, "next_lr": lr_at(step + 1, optim), "slowest_step_s": slowest_s,
                       "checkpoint_s": longest_s}  # the longest before this one: its own is not known yet
                writing = time.perf_counter()
                folder = save_checkpoint(out, step + 1, engine, dp, {**meta, "run": run}, cfg.keep, cfg.keep_every)
                checkpoint_s = time.perf_counter() - writing
                longest_s = max(longest_s, checkpoint_s)
                if limit is not None:
                    limit.wrote_checkpoint(checkpoint_s)
            if signum or out_of_time:
                detail = "" if signum else (f", with {max(0.0, left_s):.0f} s of it left (the next step and a "
                                            f"checkpoint need about {limit.needed_s(slowest_s, 1):.0f} s)")
                return _stopped(cfg, out, run_info, signum, detail, step + 1, folder, lead, slowest_s, checkpoint_s)
    return None


def _stopped(cfg: TrainConfig, out: Path, run_info: dict, signum: int, detail: str, done: int,
             folder: Path | None, lead: bool, slowest_s: float, checkpoint_s: float) -> Stopped:
    """A run stopped by a signal (`signum`) or its time limit (`signum` 0; `detail` says
    what was left of it) after `done` steps: run.json records it (so a launcher, or a
    script, can tell it from a finished run), and the message says how to go on, and for
    a signal how much notice a stop needs (the slowest step and the checkpoint: a
    scheduler's notice shorter than that ends in a kill)."""
    name = signal.Signals(signum).name if signum else None
    reason = f"{name or '--time-limit'} after {done} of {cfg.steps} steps{detail}"
    if lead:
        atomic_write_json(out / "run.json", {**run_info, "stopped": {
            "signal": name, "time_limit": not signum, "steps_done": done,
            "checkpoint": folder.name if folder is not None else None,
            "slowest_step_s": slowest_s, "checkpoint_s": checkpoint_s if folder is not None else None}})
    status = 128 + signum if signum else OUT_OF_TIME
    if folder is not None:
        notice = (f" (a stop needs {slowest_s:.1f} s for the slowest step so far and {checkpoint_s:.1f} s for the "
                  f"checkpoint: send the signal that much ahead of a deadline at least)" if signum else "")
        return Stopped(f"stopped by {reason}; checkpoint in {folder}: "
                       f"`streamer train --out {out} --resume` goes on from there{notice}", status)
    return Stopped(f"stopped by {reason}, without a checkpoint (the run "
                   f"writes none: --checkpoint-every 0), so it cannot be resumed; metrics in "
                   f"{out / 'metrics.jsonl'}", status)


def dry_run(cfg: TrainConfig, world: int = 1) -> list[str]:
    """`train --dry-run`: every check a run makes before it starts (flags, model, data,
    output directory, disk space, a checkpoint to resume), and a streamed run's plan on
    this machine, its rates measured as the run would measure them; the lines to print.
    Nothing is written but the probe file the plan times the disk with, removed."""
    from streamer.planner import format_plan, peak_bytes, run_summary
    from streamer.scheduler import plan_run

    checked = preflight(cfg, world)
    model_cfg = checked.model_cfg
    tokens = cfg.tokens_per_step() * world
    found = newest_manifest(checked.out) if cfg.resume else None
    going = f"resumes from {found[0].name}" if found else "starts afresh"
    lines = [f"dry run: {model_cfg.name} ({model_cfg.n_params():,} parameters), {cfg.mode} on {checked.device} in "
             f"{str(checked.dtype).removeprefix('torch.')}{f' over {world} processes' if world > 1 else ''}, "
             f"{tokens:,} tokens a step for {cfg.steps:,} steps; {checked.out} {going}; nothing written"]
    if cfg.mode == "stream":
        run = plan_run(cfg, model_cfg, checked.out, checked.device, checked.dtype, world)
        lines += [run_summary(run.plan, run.update_on, cfg.batch_size * cfg.seq_len),
                  *format_plan(run.plan, run.profile).splitlines()[1:5],
                  f"  peak memory (what --max-memory limits) {peak_bytes(run.plan, run.profile) / 2**30:.2f} GiB"]
    if cfg.time_limit_s and found:
        lines.append(job_length(cfg, found[1].get("run", {}), checked.out, cfg.steps - found[1]["step"]))
    return lines + [f"warning: {warning}" for warning in checked.warnings]


def job_length(cfg: TrainConfig, run: dict, out: Path, steps_left: int) -> str:
    """How many steps a job of --time-limit does, resuming this run: its start-up as the
    last job's took (run.json), then steps and checkpoints at the times the checkpoint
    recorded, with a stop's reserve ([Note: stopping in time]), up to the `steps_left`."""
    if steps_left <= 0:
        return (f"--time-limit {cfg.time_limit_s:g} s: the checkpoint is the run's last step ({cfg.steps:,}): "
                "nothing is left to train (raise --steps to go on)")
    try:
        startup_s = float(json.loads((out / "run.json").read_text())["startup"]["total_s"])
    except (OSError, ValueError, KeyError, TypeError):
        startup_s = 0.0
    step_s, checkpoint_s = float(run.get("slowest_step_s", 0.0)), float(run.get("checkpoint_s", 0.0))
    if not step_s:
        return f"--time-limit {cfg.time_limit_s:g} s: the checkpoint recorded no step time to estimate the job by"
    limit = TimeLimit(cfg.time_limit_s, 0.0, checkpoint_s, measured=True)
    room = cfg.time_limit_s - startup_s - limit.needed_s(step_s, 1)  # the stop's step and checkpoint
    per_step = step_s + checkpoint_s / cfg.checkpoint_every
    steps = max(0, int(room / per_step) + 1) if room >= 0 else 0
    ends = (f"the {steps_left:,} steps left, then it finishes" if steps >= steps_left
            else f"about {steps:,} steps of the {steps_left:,} left")
    return (f"--time-limit {cfg.time_limit_s:g} s: start-up about {startup_s:.0f} s (the last job's), then {ends} "
            f"(the slowest step so far {step_s:.3g} s, a checkpoint {checkpoint_s:.3g} s every "
            f"{cfg.checkpoint_every}){'' if steps >= steps_left else ' before it stops in time'}")


def train(cfg: TrainConfig, started_at: float | None = None, announce: str | None = None) -> Path:
    """Run a whole training job; returns the output directory. `started_at`: when the
    command started (seconds since the epoch), which --time-limit counts from; None: now.
    `announce`: a line to print once the run is sure to start (not for a bad input).

    Under torchrun every rank runs this; rank 0 alone writes metrics, checkpoint
    manifests and final weights (each rank writes its own checkpoint shards)."""
    from streamer.parallel import init_from_env, leave

    started_at = TimeLimit.clock() if started_at is None else started_at

    checked = preflight(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    reset_peak_rss()
    joined = init_from_env(checked.device)
    dp = DataParallel(cfg.grad_sync)
    lead = dp.rank == 0
    created = prepare_out_dir(checked.out) if lead else None
    dp.barrier()
    try:
        engine, start, run_state = _start_engine(cfg, checked, dp)
    except (UserError, UnsafeFileError, KeyboardInterrupt):  # refused, or stopped in its start-up
        if created is not None:  # nothing of a run that never started stays on disk
            shutil.rmtree(created, ignore_errors=True)
        if lead:  # nor its store, wherever it is (streamer.store's [Note: the disk tier is scratch])
            shutil.rmtree(store_root(checked.out, cfg.store_dir), ignore_errors=True)
        raise
    if lead and announce:
        print(announce)
    if lead and hasattr(engine, "plan"):
        from streamer.planner import run_summary

        print(run_summary(engine.plan, engine.update_on, cfg.batch_size * cfg.seq_len))
    for warning in checked.warnings if lead else []:  # once the run is sure to start
        warn(warning)
    try:
        stopped = _run_steps(cfg, checked, engine, dp, start, run_state, started_at)
        if cfg.save_final and stopped is None:
            shards = engine.shards()
            if lead:
                save_final(shards, checked.model_cfg, checked.out)
            else:
                for shard in shards:  # every rank takes part in gathering each unit
                    shard()
        if lead and stopped is None:  # what `streamer status` tells a finished run by
            run_info = json.loads((checked.out / "run.json").read_text())
            atomic_write_json(checked.out / "run.json", {**run_info, "finished": utc_stamp()})
    finally:
        engine.close()
    if joined:
        leave()
    if stopped is not None:
        raise stopped
    return checked.out
