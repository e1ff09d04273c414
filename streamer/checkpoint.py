"""Checkpoints: everything needed to continue a run, written so that no crash can break one.

    DIR/checkpoints/step-00000012/          the state after 12 completed steps
        unit-00003-rank0.safetensors        stream: rank 0's shard of unit 3 (param, exp_avg, exp_avg_sq)
        model.safetensors                   resident: the model's state dict
        optimizer.safetensors               resident: AdamW's state, per parameter
        rank-0.json                         per rank: RNG states and engine counters (adam step)
        manifest.json                       written last: step, configs, world size, and the
                                            size and sha256 of every other file

Nothing is pickled and nothing is read through `torch.load`: tensors are safetensors
whose headers pass `models.safety.check_safetensors` before any allocation, and the
rest is JSON. The data cursor is the step (sampling is a pure function of seed and
step) and the learning rate a pure function of the step, so neither needs its own state.

[Note: crash-consistent checkpoints]
A checkpoint exists once its `manifest.json` does, and the manifest is written last,
under a temporary name, fsynced and renamed into place (`streamer.io.atomic_write_json`).
Every other file is likewise written under a temporary name, fsynced and renamed, and
the folder is fsynced before the manifest is written, so a manifest never names a file
that a power cut could lose. A folder without a manifest is a partial checkpoint: it is
never read and is removed at the next start. Old checkpoints are deleted (`--keep`,
but for the milestones of `--keep-every`)
only after the new manifest is durable, manifest first, so a crash mid-deletion leaves
a partial folder, never a checkpoint with missing files. Hence at every instant the
newest complete checkpoint is loadable. Silent damage after the fact (a bad disk, a
truncating copy) is caught by the sizes and checksums the manifest records, and
`--resume` then falls back to the checkpoint before.

[Note: copy-on-checkpoint for the disk tier]
With `--offload disk` the store's files are updated in place during every step, so
they cannot double as a checkpoint. A checkpoint is instead a separate copy of the
state (param, exp_avg, exp_avg_sq, after `flush()` has applied every due update), read
from the store a chunk at a time and streamed into the checkpoint's own files: nothing
the store does afterwards can touch them. On resume the store is rebuilt from the
checkpoint, so a store torn by a crash mid-write is never read. The copy costs 12 bytes
per parameter of writing per checkpoint, the price of a design with no journal, no
generations to garbage-collect and one code path for both tiers; the gradient buffer
is not copied because `flush()` has consumed it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.safety import ITEMSIZE, UnsafeFileError, check_safetensors
from streamer.errors import UserError
from streamer.io import absolute, atomic_path, atomic_write_bytes, atomic_write_json, fsync_dir, utc_stamp

FORMAT = "streamer-checkpoint-v1"
MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"step-(\d{8})")
_HASH_BLOCK = 8 * 2**20  # bytes hashed or read per call: large I/Os, small buffers

DTYPE_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
               torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
               torch.uint8: "U8", torch.bool: "BOOL"}
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class CorruptCheckpointError(UserError):
    """A checkpoint file is missing, truncated or altered; the message names it."""


# --- tensor files --------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[DTYPE_NAMES[self.dtype]]


def _write_bytes(file: Any, data: memoryview) -> None:
    """Every byte of a checkpoint goes through here, so tests can inject a full disk."""
    file.write(data)


def _header_bytes(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": DTYPE_NAMES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
    return len(blob).to_bytes(8, "little") + blob


def _as_bytes(tensor: torch.Tensor) -> memoryview:
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def write_tensor_file(path: Path, specs: list[TensorSpec], chunks: Iterable[torch.Tensor],
                      metadata: dict[str, str] | None = None) -> dict[str, int | str]:
    """Stream `chunks` (the tensors' data in `specs` order, in any pieces) into a
    safetensors file at `path`: temporary name, fsync, rename. Returns its size and sha256.

    Streaming keeps host memory at one chunk, however large the unit."""
    path = Path(path)
    digest = hashlib.sha256()
    expected = sum(spec.nbytes for spec in specs)
    with atomic_path(path) as tmp, open(tmp, "wb") as file:
        header = _header_bytes(specs, metadata or {})
        digest.update(header)
        _write_bytes(file, memoryview(header))
        written = 0
        for chunk in chunks:
            data = _as_bytes(chunk)
            digest.update(data)
            _write_bytes(file, data)
            written += len(data)
        assert written == expected, f"{path.name}: wrote {written} data bytes, the header promises {expected}"
    return {"size": len(header) + expected, "sha256": digest.hexdigest()}


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> dict:
    """Write a dict of (small) tensors as one safetensors file; see `write_tensor_file`."""
    specs = [TensorSpec(name, t.dtype, tuple(t.shape)) for name, t in tensors.items()]
    return write_tensor_file(path, specs, tensors.values(), metadata)


class TensorFile:
    """A safetensors file read by byte range, its header validated first."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.header = check_safetensors(self.path)
        for name, entry in self.header.tensors.items():
            if entry.dtype not in TORCH_DTYPES:
                raise UnsafeFileError(f"'{self.path}': tensor '{name}' has dtype {entry.dtype}, "
                                      "which checkpoints never hold")

    def shape(self, name: str) -> tuple[int, ...]:
        return self.header.tensors[name].shape

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Flat elements [start, stop) of tensor `name`, read with pread into a new tensor."""
        entry = self.header.tensors[name]
        dtype = TORCH_DTYPES[entry.dtype]
        itemsize = ITEMSIZE[entry.dtype]
        numel = (entry.end - entry.begin) // itemsize
        stop = numel if stop is None else stop
        assert 0 <= start <= stop <= numel, f"{self.path.name}:{name}: range [{start}, {stop}) of {numel}"
        out = torch.empty(stop - start, dtype=dtype)
        view = memoryview(out.view(torch.uint8).numpy()).cast("B")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            got, base = 0, entry.begin + start * itemsize
            while got < len(view):
                n = os.preadv(fd, [view[got:]], base + got)
                if n == 0:
                    raise CorruptCheckpointError(f"checkpoint file '{self.path}' is truncated")
                got += n
        finally:
            os.close(fd)
        return out

    def read_all(self) -> dict[str, torch.Tensor]:
        return {name: self.read(name).view(entry.shape) for name, entry in self.header.tensors.items()}


# --- integrity -----------------------------------------------------------------------


def file_entry(path: Path) -> dict[str, int | str]:
    """Size and sha256 of a file, read in blocks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as file:
        while block := file.read(_HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return {"size": size, "sha256": digest.hexdigest()}


def inside(folder: Path, name: object) -> Path:
    """`folder / name` for a plain file name from a manifest; anything that could lead
    outside the folder (separators, '..', a symlink out) is refused."""
    if not isinstance(name, str) or not name or name != Path(name).name or name in (".", ".."):
        raise CorruptCheckpointError(f"checkpoint manifest in '{folder}' names {name!r}, not a file in its "
                                     "directory: refusing to read it")
    path = folder / name
    if path.exists() and path.resolve().parent != folder.resolve():
        raise CorruptCheckpointError(f"checkpoint file '{path}' leads outside '{folder}': refusing to read it")
    return path


def verify_file(folder: Path, name: str, expected: dict, checksum: bool = True) -> None:
    """Check one file's size and (unless not `checksum`: a read of the whole file) its
    checksum against the manifest; the error names the file."""
    path = inside(folder, name)
    if not path.is_file():
        raise CorruptCheckpointError(f"checkpoint file '{path}' is missing")
    size = path.stat().st_size
    if size != expected.get("size"):
        raise CorruptCheckpointError(f"checkpoint file '{path}' is truncated or altered: "
                                     f"{size} bytes, the manifest says {expected.get('size')}")
    if checksum and file_entry(path)["sha256"] != expected.get("sha256"):
        raise CorruptCheckpointError(f"checkpoint file '{path}' is corrupt: its sha256 differs from the manifest's")


def _manifest_digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def read_manifest(folder: Path) -> dict:
    """The manifest, checked for format and for its own checksum (bit rot in the JSON)."""
    path = folder / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptCheckpointError(f"checkpoint manifest '{path}' is unreadable ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptCheckpointError(f"checkpoint manifest '{path}' is not a {FORMAT} manifest")
    stored = manifest.pop("manifest_sha256", None)
    if stored != _manifest_digest(manifest):
        raise CorruptCheckpointError(f"checkpoint manifest '{path}' is corrupt: its checksum does not match")
    if not isinstance(manifest.get("files"), dict) or not isinstance(manifest.get("step"), int):
        raise CorruptCheckpointError(f"checkpoint manifest '{path}' lacks its file list or step")
    return manifest


def verify_rank(folder: Path, manifest: dict, rank: int, world: int | None = None) -> None:
    """Verify every file rank `rank` of `world` will read: sizes, checksums, headers,
    paths. Resuming on another world size, a rank reads the saved shards that overlap
    its own (`files_read`)."""
    saved = saved_rank(manifest, rank)
    resharded = world is not None and world != manifest.get("world")
    reads = files_read(manifest, rank, world) if resharded else set()
    for name, expected in manifest["files"].items():
        if not isinstance(expected, dict):
            raise CorruptCheckpointError(f"checkpoint manifest in '{folder}' has a bad entry for {name!r}")
        if (expected.get("rank", 0) == saved and not resharded) or name in reads or name == f"rank-{saved}.json":
            verify_file(folder, name, expected)
            if name.endswith(".safetensors"):
                check_safetensors(inside(folder, name))
    if f"rank-{saved}.json" not in manifest["files"]:
        raise CorruptCheckpointError(f"checkpoint in '{folder}' has no state for rank {saved}")


def files_read(manifest: dict, rank: int, world: int) -> set[str]:
    """The unit files rank `rank` of `world` reads from a checkpoint of another world
    size: for each unit, the saved ranks' shards that overlap its new one (shards as
    `DataParallel.shard` cuts them)."""
    from models import ModelConfig
    from models.gpt import build_unit

    try:
        cfg, saved_world = ModelConfig.from_dict(manifest["model"]), int(manifest["world"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"checkpoint manifest lacks its model or world size ({exc})") from None
    with torch.device("meta"):
        numels = [sum(p.numel() for p in build_unit(cfg, unit).parameters()) for unit in range(cfg.n_layer + 2)]
    return {f"unit-{unit:05d}-rank{r}.safetensors" for unit, numel in enumerate(numels)
            for r in overlapping_shards(numel, rank, world, saved_world)}


def overlapping_shards(numel: int, rank: int, world: int, saved_world: int) -> list[int]:
    """The ranks of `saved_world` whose shards of a unit of `numel` elements overlap
    rank `rank`'s of `world`."""
    from streamer.parallel import shard_of

    mine, theirs = shard_of(numel, rank, world), [shard_of(numel, r, saved_world) for r in range(saved_world)]
    return [r for r, shard in enumerate(theirs) if max(mine.start, shard.start) < min(mine.stop, shard.stop)]


def saved_rank(manifest: dict, rank: int) -> int:
    """The saved rank whose own state (RNG, engine counters) rank `rank` resumes with:
    itself, or on a larger world one of the saved ranks in turn."""
    return rank % max(1, int(manifest.get("world", 1)))


# --- listing and deleting --------------------------------------------------------------


def checkpoints_root(out: Path) -> Path:
    return Path(out) / "checkpoints"


def step_folders(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint folder, complete or not, oldest first."""
    root = checkpoints_root(out)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return sorted(found)


def complete(out: Path) -> list[tuple[int, Path]]:
    return [(step, p) for step, p in step_folders(out) if (p / MANIFEST).is_file()]


def remove_checkpoint(folder: Path) -> None:
    """Manifest first (the folder becomes partial at once), then the rest."""
    manifest = folder / MANIFEST
    if manifest.exists():
        manifest.unlink()
        fsync_dir(folder)
    shutil.rmtree(folder, ignore_errors=True)


def clean_partial(out: Path) -> None:
    """Remove checkpoint folders without a manifest (interrupted writes or deletions)."""
    for _, folder in step_folders(out):
        if not (folder / MANIFEST).is_file():
            shutil.rmtree(folder, ignore_errors=True)


def _prune(out: Path, keep: int, keep_every: int = 0) -> None:
    """Delete all but the newest `keep` complete checkpoints (after a new one is
    complete), and but those of the steps `keep_every` divides (milestones: 0, none)."""
    for step, folder in complete(out)[:-keep]:
        if not (keep_every and step % keep_every == 0):
            remove_checkpoint(folder)


# --- RNG -------------------------------------------------------------------------------


def rng_state(device: torch.device) -> dict[str, str]:
    state = {"torch_cpu": torch.get_rng_state().numpy().tobytes().hex()}
    if device.type == "cuda":
        state["torch_cuda"] = torch.cuda.get_rng_state(device).numpy().tobytes().hex()
    return state


def set_rng_state(state: dict[str, str], device: torch.device) -> None:
    def tensor(hex_bytes: str) -> torch.Tensor:
        return torch.from_numpy(np.frombuffer(bytes.fromhex(hex_bytes), dtype=np.uint8).copy())

    torch.set_rng_state(tensor(state["torch_cpu"]))
    if device.type == "cuda" and "torch_cuda" in state:
        torch.cuda.set_rng_state(tensor(state["torch_cuda"]), device)


# --- saving ----------------------------------------------------------------------------


def _all_ok(dp: Any, ok: bool, device: torch.device) -> bool:
    """True on every rank iff `ok` on every rank (an all-reduce, hence also a barrier)."""
    if dp.world == 1:
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    return int(dp.sum(flag).item()) == dp.world


def _failure(step: int, out: Path, error: BaseException | None) -> UserError:
    previous = complete(out)
    kept = f"{previous[-1][1].name} is intact" if previous else "no earlier checkpoint exists"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return UserError(f"checkpoint at step {step} failed: no space left on device under "
                         f"'{checkpoints_root(out)}'; its partial files were removed and {kept}: "
                         "free disk space or lower --keep, then rerun with --resume")
    reason = f"{error.strerror or error} ({error.filename})" if isinstance(error, OSError) else "another rank failed"
    return UserError(f"checkpoint at step {step} failed: {reason}; its partial files were removed and {kept}: "
                     "fix the cause, then rerun with --resume")


def _write_rank(folder: Path, engine: Any, rank: int) -> None:
    files, engine_state = engine.save_state(folder)
    atomic_write_json(folder / f"rank-{rank}.json",
                      {"rank": rank, "files": files, "engine": engine_state, "rng": rng_state(engine.device)})


def _commit(folder: Path, step: int, meta: dict, world: int) -> None:
    """Lead rank, after every rank's files are durable: write the manifest last."""
    files = {}
    for rank in range(world):
        name = f"rank-{rank}.json"
        rank_state = json.loads((folder / name).read_text())
        for file_name, entry in rank_state["files"].items():
            files[file_name] = {**entry, "rank": rank}
        files[name] = {**file_entry(folder / name), "rank": rank}
    fsync_dir(folder)
    body = {"format": FORMAT, "step": step, "world": world, "created": utc_stamp(),
            **meta, "files": files}
    atomic_write_json(folder / MANIFEST, {**body, "manifest_sha256": _manifest_digest(body)})


def save_checkpoint(out: Path, step: int, engine: Any, dp: Any, meta: dict, keep: int, keep_every: int = 0) -> Path:
    """Write the checkpoint after `step` completed steps; every rank calls it.

    `meta` (model and train configs, mode, run counters) goes into the manifest. Raises a
    UserError naming the cause (a full disk above all) after removing the partial files;
    older checkpoints are untouched unless this one completes."""
    folder = checkpoints_root(out) / f"step-{step:08d}"
    lead = dp.rank == 0
    error: BaseException | None = None
    try:
        if lead:
            if not folder.parent.exists():
                folder.parent.mkdir()
                fsync_dir(out)  # the checkpoints folder itself must survive a power cut
            if folder.exists():  # left from a future abandoned by resuming earlier
                remove_checkpoint(folder)
            folder.mkdir()
            fsync_dir(folder.parent)
    except OSError as exc:
        error = exc
    if _all_ok(dp, error is None, engine.device):
        try:
            _write_rank(folder, engine, dp.rank)
        except OSError as exc:
            error = exc
    if _all_ok(dp, error is None, engine.device) and lead:
        try:
            _commit(folder, step, meta, dp.world)
        except OSError as exc:
            error = exc
    if not _all_ok(dp, error is None, engine.device):
        if lead:
            shutil.rmtree(folder, ignore_errors=True)
        raise _failure(step, out, error) from None
    if lead:
        _prune(out, keep, keep_every)
    return folder


# --- resuming --------------------------------------------------------------------------


@dataclass(frozen=True)
class Resumable:
    folder: Path
    step: int
    manifest: dict


# Settings that change what the resumed steps compute: a difference is allowed (to
# extend a run, say) but is reported, since the result is then no longer the run that
# an uninterrupted job would have produced.
_REPORTED_SETTINGS = ("steps", "batch_size", "grad_accum", "seq_len", "lr", "min_lr", "warmup", "weight_decay",
                      "grad_clip", "seed", "data", "data_weights", "dtype", "document_mask",
                      "schedule", "decay_fraction", "eval_data")

# Settings that name files or folders: a record holds them absolute (TrainConfig.record);
# checkpoints from before that hold them as given, relative to where the run started.
PATH_SETTINGS = ("data", "eval_data", "init_from", "store_dir", "out")


def check_compatible(manifest: dict, folder: Path, model_cfg: dict, mode: str, world: int,
                     train: dict) -> list[str]:
    """Refuse a checkpoint of another model, mode, world size or state format; list other
    differences."""
    saved_train = manifest.get("train", {})
    saved_train = {**saved_train, **{key: absolute(saved_train[key]) for key in PATH_SETTINGS if key in saved_train}}
    saved_model = manifest.get("model") if isinstance(manifest.get("model"), dict) else {}
    if saved_model != model_cfg and {**saved_model, "vocab_size": model_cfg.get("vocab_size")} == model_cfg:
        raise UserError(f"checkpoint '{folder}' is of a vocabulary of {saved_model.get('vocab_size')}, not "
                        f"{model_cfg.get('vocab_size')}: resume with --vocab-size {saved_model.get('vocab_size')}, "
                        "or choose a new --out")
    if saved_model != model_cfg:
        theirs = saved_train.get("model") or saved_model.get("name", "?")
        # What named this architecture: --model, or without it --init-from's weights.
        flag, ours = (("--init-from", train["init_from"]) if not train.get("model") and train.get("init_from")
                      else ("--model", train.get("model") or model_cfg.get("name")))
        raise UserError(f"checkpoint '{folder}' is of model '{theirs}', not of {flag} {ours}"
                        f"{' (same name, other config)' if theirs == ours else ''}: "
                        f"resume with --model {theirs}{' and no --init-from' if flag == '--init-from' else ''}, "
                        "or choose a new --out")
    if manifest.get("mode") != mode:
        raise UserError(f"checkpoint '{folder}' was written by --mode {manifest.get('mode')}: "
                        f"resume with --mode {manifest.get('mode')}, or choose a new --out")
    saved_state = saved_train.get("state", "fp32")  # checkpoints from before --state hold fp32 state
    if mode == "stream" and saved_state != train.get("state", "fp32"):
        raise UserError(f"checkpoint '{folder}' holds --state {saved_state} optimizer state: resume with "
                        f"--state {saved_state}, or choose a new --out")
    saved_world = manifest.get("world")
    changed = [f"{key} {saved_train.get(key)!r} -> {train.get(key)!r}" for key in _REPORTED_SETTINGS
               if key in saved_train and saved_train.get(key) != train.get(key)]
    if saved_world != world:  # the state is resharded: see [Note: resuming on another world size]
        recoded = ", the 8-bit moments coded again" if mode == "stream" and saved_state != "fp32" else ""
        changed.append(f"processes {saved_world} -> {world} (global batch "
                       f"{saved_train.get('batch_size', 0) * saved_train.get('grad_accum', 0) * saved_world} -> "
                       f"{train['batch_size'] * train['grad_accum'] * world} sequences{recoded})")
    # Training reads all of the data but a held-out tail when it evaluates: turning
    # evaluation on or off, or moving the cut, changes what it samples from.
    before, after = (t.get("holdout") if t.get("eval_every") and not t.get("eval_data") else 0
                     for t in (saved_train, train))
    if before != after:
        changed.append(f"held-out fraction {before!r} -> {after!r}")
    return changed


def newest_manifest(out: Path) -> tuple[Path, dict] | None:
    """The newest complete checkpoint whose manifest reads, without verifying its files
    (cheap: for checks made before a run starts)."""
    for _, folder in reversed(complete(out)):
        try:
            return folder, read_manifest(folder)
        except CorruptCheckpointError:
            continue
    return None


def choose_checkpoint(out: Path, dp: Any, device: torch.device, warn: Callable[[str], None]) -> Resumable | None:
    """The newest checkpoint every rank verifies, falling back past corrupt ones with a
    warning; None if there is none. Raises if checkpoints exist but none is usable.

    Each rank verifies the files it will read and all ranks agree on the outcome, so they
    resume from the same step; a rank warns of the problems it found itself (the lead
    also of those found elsewhere)."""
    problems: list[str | None] = []
    for _, folder in reversed(complete(out)):
        problem = None
        try:
            manifest = read_manifest(folder)
            verify_rank(folder, manifest, dp.rank, dp.world)
        except (CorruptCheckpointError, UnsafeFileError) as exc:
            problem = str(exc)
        if _all_ok(dp, problem is None, device):
            for earlier in filter(None, problems):
                warn(f"{earlier}; falling back to the checkpoint before: resuming from {folder.name}")
            return Resumable(folder, manifest["step"], manifest)
        problems.append(problem or (f"checkpoint '{folder}' is unusable on another rank" if dp.rank == 0 else None))
    if problems:
        first = problems[0] or f"checkpoint '{checkpoints_root(out)}' is unusable on another rank"
        raise CorruptCheckpointError(f"{first}; no earlier checkpoint is usable either: "
                                     f"remove '{checkpoints_root(out)}' to start over")
    return None


def restore(point: Resumable, engine: Any, rank: int) -> dict:
    """Load a verified checkpoint into a freshly built engine and the RNGs; returns the
    manifest's run counters."""
    rank_state = json.loads((point.folder / f"rank-{saved_rank(point.manifest, rank)}.json").read_text())
    engine.load_state(point.folder, rank_state["engine"], saved_world=int(point.manifest.get("world", 1)))
    set_rng_state(rank_state["rng"], engine.device)
    return point.manifest.get("run", {})


def discard_after(out: Path, step: int) -> None:
    """Lead rank, on resume from `step`: remove partial folders and any checkpoint newer
    than `step` (unusable, or it would have been chosen), so none outlives its run."""
    for saved, folder in step_folders(out):
        if saved > step or not (folder / MANIFEST).is_file():
            remove_checkpoint(folder)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics rows of steps before `step` (the resumed run rewrites the rest);
    a row torn by the crash is dropped. Atomic: a crash here leaves the old file."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] < step:
            kept.append(line + "\n")
    atomic_write_bytes(path, "".join(kept).encode())


# --- reading a checkpoint's weights ----------------------------------------------------


class CheckpointWeights:
    """A complete checkpoint's weights under our parameter names, read a unit at a time:
    so that `streamer sample`, `eval` and `export` take a run's weights as they were
    after any checkpointed step, not only its last. A streamed run's units are
    gathered from every rank's shard of their `param` buffer (float32, or the compact
    formats' bfloat16) and cut by the unit's layout; a resident run's are its state
    dict. Each file's size and checksum are checked against the manifest before it is
    read, as `--resume` checks them (the optimizer's files, never read, are not). The
    same interface as `models.hf.Pretrained` (`tensor`, `into`, a context manager)."""

    def __init__(self, folder: Path) -> None:
        from models import ModelConfig
        from models.gpt import build_unit
        from streamer.store import UnitLayout

        self.folder = Path(folder)
        manifest = read_manifest(self.folder)
        self.files = manifest["files"]
        try:
            self.cfg = ModelConfig.from_dict(manifest["model"])
            self.mode, self.world = manifest["mode"], int(manifest["world"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptCheckpointError(f"checkpoint manifest '{self.folder / MANIFEST}' lacks the model, mode or "
                                         f"world size ({exc})") from None
        self.train = manifest.get("train")
        with torch.device("meta"):
            self.layouts = [UnitLayout.of(i, build_unit(self.cfg, i)) for i in range(self.cfg.n_layer + 2)]
        self._unit: tuple[int, torch.Tensor] | None = None  # the unit read last: names come a unit at a time
        self._verified: set[str] = set()  # a model streamed from disk reads each file once a pass: check it once

    def check_present(self) -> None:
        """Every file of the weights there, of the manifest's size (cheap: their checksums
        are checked as they are read)."""
        names = ["model.safetensors"] if self.mode == "resident" else [
            f"unit-{unit:05d}-rank{rank}.safetensors"
            for unit in range(len(self.layouts)) for rank in range(self.world)]
        for name in names:
            if name not in self.files:
                raise CorruptCheckpointError(f"checkpoint '{self.folder}' lists no file '{name}'")
            verify_file(self.folder, name, self.files[name], checksum=False)

    def _open(self, name: str) -> TensorFile:
        if name not in self.files:
            raise CorruptCheckpointError(f"checkpoint '{self.folder}' lists no file '{name}'")
        if name not in self._verified:
            verify_file(self.folder, name, self.files[name])
            self._verified.add(name)
        return TensorFile(self.folder / name)

    def _flat(self, unit: int) -> torch.Tensor:
        """Unit `unit`'s weights, its ranks' shards in order."""
        if self._unit is None or self._unit[0] != unit:
            parts = []
            for rank in range(self.world):
                source = self._open(f"unit-{unit:05d}-rank{rank}.safetensors")
                first, _, stop = source.header.metadata.get("owned", "").partition(":")
                if "param" not in source.header.tensors or not first.isdigit() or int(first) != sum(
                        p.numel() for p in parts):
                    raise CorruptCheckpointError(f"checkpoint file '{source.path}' does not hold rank {rank}'s "
                                                 f"shard of unit {unit}")
                parts.append(source.read("param", 0, int(stop) - int(first)))
            self._unit = unit, torch.cat(parts)[: self.layouts[unit].numel]
        return self._unit[1]

    def tensor(self, name: str) -> torch.Tensor:
        """Our parameter `name` (e.g. `units.3.attn.qkv.weight`), as the checkpoint holds it."""
        if self.mode == "resident":
            if self._unit is None:
                self._unit = -1, self._open("model.safetensors")
            source = self._unit[1]
            return source.read(name).view(source.shape(name))
        _, index, rest = name.split(".", 2)
        layout = self.layouts[int(index)]
        slot = next(s for s in layout.tensors if s.name == rest)
        return self._flat(int(index))[slot.offset : slot.offset + slot.numel].view(slot.shape)

    def into(self, name: str, target: torch.Tensor) -> None:
        """Copy parameter `name` into `target`, as `Pretrained.into` does: a vocabulary
        padded to another multiple gets its extra rows zeroed (never a token)."""
        tensor = self.tensor(name)
        rows = min(tensor.shape[0], target.shape[0])
        target[:rows].copy_(tensor[:rows])
        target[rows:].zero_()

    def close(self) -> None:
        self._unit = None

    def __enter__(self) -> CheckpointWeights:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
