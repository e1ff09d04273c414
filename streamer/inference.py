"""A trained model put to use, held whole on the device or streamed to it.

`streamer sample` and `streamer eval` read a run's `final/` (or the run folder holding
it) or a Hugging Face GPT-2, GPT-J or GPT-NeoX checkpoint. A model that fits the device
with the command's working memory is held there whole (`ResidentWeights`); one that
does not is streamed as training streams it (`StreamedWeights`, [Note: streamed
inference]): its weights wait in host memory and each unit comes to the device just
before it runs. Both hand out the model a unit at a time, in forward order, so the
commands' loops read the same either way.
"""

from __future__ import annotations

import functools
import json
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch
from torch.func import functional_call

from models import GPT, ModelConfig
from models.gpt import build_unit
from streamer.errors import UserError
from streamer.store import UnitLayout, page_aligned_zeros, page_lock, page_unlock

Unit = Callable[..., torch.Tensor]  # a unit with its weights bound: embedding(idx, start), block(x, cache), head(x)


class ResidentWeights:
    """A model held whole on its device."""

    mode = "resident"

    def __init__(self, model: GPT) -> None:
        self.model, self.cfg = model, model.cfg
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype

    def units(self) -> Iterator[tuple[int, Unit]]:
        """One pass over the model: each unit's index and the unit, in forward order."""
        *body, head = self.model.units
        yield from enumerate(body)
        yield len(body), functools.partial(head, tied_weight=self.model.tied_weight())

    def close(self) -> None:
        """Nothing to give back: the model goes with this object."""


class StreamedWeights:
    """A model's weights in host memory, each unit brought to the device for its turn.

    [Note: streamed inference]
    Sampling from or evaluating a model larger than the device works as training does:
    the weights, read from the checkpoint a tensor at a time, wait in host RAM in the
    compute dtype (page-locked on CUDA, so copies run by DMA at the link's rate), and
    during a pass unit i + 1 is copied on a stream of its own while unit i computes,
    into the other of two device buffers; a tied embedding table stays on the device
    for the head. The device holds two units and the pass's working memory (caches,
    activations), whatever the model's size. Each pass moves every weight over the link
    once, whatever it computes: a sampled token is one pass for all samples together
    (a 20B model's 41 GB at 50 GB/s is ~0.8 s a token, and until the compute catches up
    with the link more samples cost almost nothing more); an evaluation takes as many
    of its windows through each unit, while it is there, as the device holds.
    """

    def __init__(self, weights, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,  # noqa: ANN001
                 depth: int = 2, from_disk: bool = False) -> None:
        """`weights`: a `models.hf.Pretrained` (or anything with its `into(name, target)`
        and `close()`). `from_disk`: leave the weights in its files and read each unit
        from them for every pass ([Note: streamed from disk]); this object then owns
        `weights` and closes it."""
        self.cfg, self.device, self.dtype, self.depth = cfg, device, dtype, depth
        self.mode = "disk" if from_disk else "stream"
        with torch.device("meta"):  # shapes only: the weights live in the flat buffers
            self.modules = [build_unit(cfg, i) for i in range(cfg.n_layer + 2)]
        self.layouts = [UnitLayout.of(i, unit) for i, unit in enumerate(self.modules)]
        cuda = device.type == "cuda"
        first = 1 if cfg.tie_embeddings else 0  # a tied table stays on the device
        self.order = list(range(first, len(self.layouts)))
        self.host, self.disk = [], None
        if not from_disk:
            for layout in self.layouts:
                self.host.append(self._read(weights, layout.index))
        self.locked = page_lock(self.host) if cuda else []
        self.tied = None
        if cfg.tie_embeddings:
            self.tied = (self.host[0] if self.host else self._read(weights, 0)).to(device)
        if from_disk:  # after the table's read: from here on only the reader thread reads `weights`
            self.disk = UnitsFromDisk(weights, self.layouts, self.order, dtype, cuda, ahead=depth + 1)
        largest = max(self.layouts[u].numel for u in self.order)
        self.slots = [torch.empty(largest, dtype=dtype, device=device) for _ in range(depth)]
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        if cuda:  # the slots' memory may have been another tensor's, still read by queued kernels
            self.copy_stream.wait_stream(torch.cuda.current_stream(device))
        self.copied = [torch.cuda.Event() for _ in self.slots] if cuda else None
        self.freed = [torch.cuda.Event() for _ in self.slots] if cuda else None
        self.primed = False  # the next pass's first units are on their way (issued as a pass ends)

    def _read(self, weights, unit: int) -> torch.Tensor:  # noqa: ANN001
        return read_unit(weights, self.layouts[unit], page_aligned_zeros(self.layouts[unit].numel, self.dtype))

    def device_bytes(self) -> int:
        """What the weights take on the device: the buffers, and a tied table."""
        numel = sum(s.numel() for s in self.slots) + (self.tied.numel() if self.tied is not None else 0)
        return numel * self.slots[0].element_size()

    def _copy_in(self, unit: int, slot: int) -> None:
        into = self.slots[slot][: self.layouts[unit].numel]
        source, buffer = (self.host[unit], None) if self.disk is None else self.disk.take(unit)
        if self.copy_stream is None:
            into.copy_(source)
        else:
            with torch.cuda.stream(self.copy_stream):
                self.copy_stream.wait_event(self.freed[slot])  # the kernels reading the slot's last unit
                into.copy_(source, non_blocking=True)
                self.copied[slot].record(self.copy_stream)
        if buffer is not None:
            self.disk.emptying(buffer, self.copy_stream)

    def _bind(self, unit: int, flat: torch.Tensor) -> Unit:
        params, module = self.layouts[unit].views(flat), self.modules[unit]
        if unit == len(self.layouts) - 1 and self.tied is not None:
            table = self.layouts[0].views(self.tied)["wte.weight"]
            return lambda *args: functional_call(module, params, (*args, table))
        return lambda *args, **kwargs: functional_call(module, params, args, kwargs)

    def units(self) -> Iterator[tuple[int, Unit]]:
        """One pass over the model, as `ResidentWeights.units`: each unit is on the device
        when it is handed out, and its buffer is refilled once the caller's kernels that
        read it are queued (when the caller asks for the next, or leaves the pass). As a
        pass ends, the next pass's first units start on their way, so their copies run
        while the caller works on the pass's result (a token's choice)."""
        if not self.primed:
            self._prime()
        self.primed = False
        if self.tied is not None:
            yield 0, self._bind(0, self.tied)
        for k, unit in enumerate(self.order):
            slot = k % self.depth
            if self.copied is not None:
                torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
            try:
                yield unit, self._bind(unit, self.slots[slot])
            finally:  # also when the caller leaves mid-pass: no copy may overwrite what it queued
                if self.freed is not None:
                    self.freed[slot].record(torch.cuda.current_stream(self.device))
            if k + self.depth < len(self.order):
                self._copy_in(self.order[k + self.depth], slot)
        self._prime()
        self.primed = True

    def _prime(self) -> None:
        """Copies of a pass's first units into their slots (each waits for its slot)."""
        for k, unit in enumerate(self.order[: self.depth]):
            self._copy_in(unit, k)

    def close(self) -> None:
        """Give back the page-locked host memory, once no copy still reads it, and the
        files a model streamed from disk is read from."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()
        page_unlock(self.locked)
        self.locked = []
        if self.disk is not None:
            self.disk.close()


def read_unit(weights, layout: UnitLayout, flat: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """Unit `layout.index`'s weights read from `weights` into `flat`, a tensor at a time."""
    for name, view in layout.views(flat).items():
        weights.into(f"units.{layout.index}.{name}", view)
    return flat


class UnitsFromDisk:
    """A model's units read from its checkpoint's files for every pass, into a few
    host buffers, ahead of their copies to the device.

    [Note: streamed from disk]
    A model larger than host memory is sampled or evaluated as training streams one
    from its disk tier: its weights stay in the checkpoint's files (a run's `final/` or
    checkpoint, or a Hugging Face folder; the page cache keeps what fits), and a reader
    thread reads each unit, a tensor at a time, into one of `ahead` buffers (page-locked
    on CUDA) while earlier units are copied and computed. Units are read in forward
    order, pass after pass, `ahead` of their copies: a buffer is read into again only
    after the copy out of it was issued, and the reader first waits for that copy
    (`emptied`). A pass left midway leaves reads for units it will not take: they are
    waited for and dropped, and reading starts again from the unit asked for. Each
    pass reads every weight from the files once: a token costs at least the weights'
    bytes at the disk's rate, and all samples drawn together share it.
    """

    def __init__(self, weights, layouts: list, order: list[int], dtype: torch.dtype, cuda: bool,  # noqa: ANN001
                 ahead: int) -> None:
        self.weights, self.layouts, self.order = weights, layouts, order
        largest = max(layouts[u].numel for u in order)
        self.buffers = [page_aligned_zeros(largest, dtype) for _ in range(ahead)]
        self.locked = page_lock(self.buffers) if cuda else []
        # Recorded once the copy out of each buffer is issued; the reader waits on it.
        self.emptied = [torch.cuda.Event() for _ in self.buffers] if cuda else None
        self.reader = ThreadPoolExecutor(1, thread_name_prefix="units-from-disk")  # one: the files' reads in order
        self.pending: deque[tuple[int, int, Future]] = deque()  # (unit, buffer, read), in the order taken
        self.next_buffer = self.next_unit = 0  # round the buffers, and along `order`
        while len(self.pending) < len(self.buffers):
            self._issue()

    def _read(self, unit: int, buffer: int) -> None:
        if self.emptied is not None:
            self.emptied[buffer].synchronize()  # the copy that read the buffer's last unit
        read_unit(self.weights, self.layouts[unit], self.buffers[buffer][: self.layouts[unit].numel])

    def _issue(self) -> None:
        unit, buffer = self.order[self.next_unit], self.next_buffer
        self.next_unit, self.next_buffer = (self.next_unit + 1) % len(self.order), (buffer + 1) % len(self.buffers)
        self.pending.append((unit, buffer, self.reader.submit(self._read, unit, buffer)))

    def take(self, unit: int) -> tuple[torch.Tensor, int]:
        """`unit`'s weights, read (waited for), and their buffer's index for `emptying`."""
        if not self.pending or self.pending[0][0] != unit:  # a pass left midway: start again from `unit`
            self._drain()
            self.next_unit = self.order.index(unit)
            self._issue()  # only this one: the buffers' copies must be issued before more reads
        _, buffer, read = self.pending.popleft()
        try:
            read.result()  # a read's error is raised here, in the pass
        except (OSError, ValueError) as exc:  # a file damaged or gone since it was opened
            raise UserError(f"cannot read unit {unit}'s weights from disk: {exc}") from None
        return self.buffers[buffer][: self.layouts[unit].numel], buffer

    def emptying(self, buffer: int, stream: torch.cuda.Stream | None) -> None:
        """The copy out of `buffer` is issued (on `stream`; done, on a CPU): its next
        read may start, and the reads ahead are topped up."""
        if self.emptied is not None:
            self.emptied[buffer].record(stream)
        while len(self.pending) < len(self.buffers):
            self._issue()

    def _drain(self) -> None:
        for _, _, read in self.pending:
            read.exception()  # waited for; what a dropped read met does not matter
        self.pending.clear()

    def close(self) -> None:
        self._drain()
        self.reader.shutdown()
        page_unlock(self.locked)
        self.locked = []
        self.weights.close()


Weights = ResidentWeights | StreamedWeights


def weights_folder(path: Path) -> Path:
    """The weights' folder: `path` itself (an export, a Hugging Face checkpoint, or one
    of a run's checkpoints, DIR/checkpoints/step-N), or a run folder's `final/`."""
    if not (path / "config.json").is_file() and (path / "final" / "config.json").is_file():
        return path / "final"
    if (path / "run.json").is_file() and not (path / "config.json").is_file():
        from streamer.checkpoint import complete

        newest = complete(path)
        where = (f"pass one of its checkpoints, as {newest[-1][1]}" if newest
                 else "it has no checkpoint either: train it to its end, or with --checkpoint-every")
        raise UserError(f"the run in '{path}' has no final weights (it was stopped or killed before its end, or "
                        f"ran with --no-save-final): {where}")
    return path


def run_record(path: Path) -> dict | None:
    """What the run that `path` is (or whose `final/` or checkpoint it is) recorded of
    itself: its run.json, or the checkpoint's manifest, each with the run's settings
    under "train" and its number of processes under "world"; None for weights that are
    no run's."""
    from streamer.checkpoint import MANIFEST

    for candidate in (path / "run.json", path.parent / "run.json" if path.name == "final" else None, path / MANIFEST):
        if candidate is not None and candidate.is_file():
            try:
                record = json.loads(candidate.read_text())
                if isinstance(record.get("train"), dict):
                    return record
            except (OSError, ValueError, AttributeError):
                pass
            raise UserError(f"'{candidate}' does not hold a run's settings: pass the weights folder itself, "
                            "or the settings as flags")
    return None


def data_sidecar(path: Path) -> dict:
    """What the sidecar of the run's token file records (`streamer.data.prepare`), if
    `path` is a run's and the file is still there; else nothing."""
    record = run_record(path)
    data = record["train"].get("data") if record else None
    if isinstance(data, list):  # a mixture: its files share one tokenizer
        data = data[0] if data else None
    if not data:
        return {}
    try:
        meta = json.loads(Path(str(data) + ".json").read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def data_tokenizer(path: Path) -> Path | None:
    """The tokenizer.json the run's data was prepared with (its token file's sidecar
    names it), if `path` is a run's and the file is still there."""
    name = data_sidecar(path).get("tokenizer")
    return Path(name) if isinstance(name, str) and name != "bytes" and Path(name).is_file() else None


def data_separator(path: Path) -> int | None:
    """The token that ends each document of the run's data (`prepare --separator`), if any."""
    separator = data_sidecar(path).get("separator")
    return separator if isinstance(separator, int) and not isinstance(separator, bool) else None


def end_of_text(folder: Path, given: Path | None = None) -> int | None:
    """The checkpoint's end-of-text token: a Hugging Face config's `eos_token_id` (an
    export of a run names its data's separator so), else, when `given` (the folder
    named) is a run's or one of its checkpoints, the token its data put after each
    document (`prepare --separator`); None where there is none (text prepared without)."""
    try:
        eos = json.loads((folder / "config.json").read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        eos = None
    if isinstance(eos, int) and not isinstance(eos, bool):
        return eos
    return data_separator(given) if given is not None else None


def is_checkpoint(folder: Path) -> bool:
    """A run's checkpoint (its manifest), rather than exported weights."""
    from streamer.checkpoint import MANIFEST

    return (folder / MANIFEST).is_file()


def open_weights(folder: Path, cfg: ModelConfig):  # noqa: ANN201 - Pretrained or CheckpointWeights
    """A reader of the folder's weights by our parameter names, a tensor at a time."""
    from models.hf import Pretrained
    from streamer.checkpoint import CheckpointWeights

    return CheckpointWeights(folder) if is_checkpoint(folder) else Pretrained(folder, cfg)


def check_weights(folder: Path, cfg: ModelConfig) -> None:
    """That the folder holds every weight of `cfg` in sound files, without reading them:
    a checkpoint's files there at their recorded sizes, a Hugging Face checkpoint's
    tensors named, shaped and framed as they should be (their checksums, and the data,
    are read in their turn)."""
    from streamer.checkpoint import CheckpointWeights

    try:
        with open_weights(folder, cfg) as weights:
            if isinstance(weights, CheckpointWeights):
                weights.check_present()
    except (OSError, ValueError) as exc:  # a bad or crafted file's UnsafeFileError too
        raise UserError(f"cannot read '{folder}': {exc}") from None


def read_model_config(folder: Path) -> ModelConfig:
    """The model a weights folder holds, from a checkpoint's manifest or a config.json
    (OSError or ValueError saying what is wrong; a damaged manifest is a UserError)."""
    from models.hf import checkpoint_config
    from streamer.checkpoint import CheckpointWeights

    return CheckpointWeights(folder).cfg if is_checkpoint(folder) else checkpoint_config(folder)


def model_config(folder: Path) -> ModelConfig:
    """The model a weights folder holds: from a checkpoint's manifest or a config.json."""
    try:
        return read_model_config(folder)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read '{folder}': {exc}: pass a run's final/, one of its checkpoints or a "
                        "Hugging Face checkpoint folder (config.json plus safetensors)") from None


def load_model(folder: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> GPT:
    """The model `cfg` with the folder's weights, whole on `device` in `dtype`."""
    from models.hf import load_hf

    try:
        if not is_checkpoint(folder):
            return load_hf(folder, dtype).to(device).eval()
        with torch.device("meta"):  # no storage: the checkpoint's tensors become the parameters
            model = GPT(cfg)
        with open_weights(folder, cfg) as weights:
            model.load_state_dict({name: weights.tensor(name).to(dtype) for name in model.state_dict()},
                                  assign=True)
        return model.to(device).eval()
    except (OSError, ValueError) as exc:  # a bad or crafted file's UnsafeFileError too
        raise UserError(f"cannot read '{folder}': {exc}") from None


def stream_model(folder: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                 from_disk: bool = False) -> StreamedWeights:
    """The folder's weights in host memory (or, `from_disk`, left in its files), to be
    streamed to `device` in `dtype`."""
    try:
        if from_disk:
            weights = open_weights(folder, cfg)
            try:
                return StreamedWeights(weights, cfg, device, dtype, from_disk=True)
            except BaseException:
                weights.close()
                raise
        with open_weights(folder, cfg) as weights:
            return StreamedWeights(weights, cfg, device, dtype)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read '{folder}': {exc}") from None


@dataclass(frozen=True)
class Footprint:
    """Bytes a model needs on the device, in a dtype: held whole, or streamed."""

    weights: int  # the whole model
    streamed: int  # a streamed model's share: two units' buffers and a tied table

    @classmethod
    def of(cls, cfg: ModelConfig, dtype: torch.dtype) -> Footprint:
        from streamer.planner import streamed_inference_params, unit_param_counts

        size = torch.finfo(dtype).bits // 8
        return cls(sum(unit_param_counts(cfg)) * size, streamed_inference_params(cfg) * size)


def activation_bytes(cfg: ModelConfig, dtype: torch.dtype, sequences: int, positions: int) -> int:
    """One pass's largest working set for `sequences` of `positions`: the MLP's inner
    activations and a few of the residual stream's, and the attention scores in float32,
    should the attention run unfused."""
    size = torch.finfo(dtype).bits // 8
    return sequences * positions * (cfg.d_ff + 6 * cfg.d_model) * size + sequences * cfg.n_head * positions**2 * 4


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def choose_mode(mode: str, cfg: ModelConfig, device: str, dtype: torch.dtype, working: int, free: int, host: int,
                lower: str) -> str:
    """--mode auto: the model whole on the device when it fits there beside `working`
    bytes (caches, activations), else streamed from host memory when it fits there
    (a GPU's; on a CPU, host memory is the device's, so never), else streamed from its
    files on disk ([Note: streamed from disk]). Refuses what fits nowhere, saying what
    to change (`lower`: the flags that shrink `working`). `device`: its type; `free`,
    `host`: the bytes free on it and available in host RAM."""
    need = Footprint.of(cfg, dtype)
    gib, kind = 2**30, str(dtype).removeprefix("torch.")
    where = "the GPU has" if device == "cuda" else "this machine has"
    smaller = " or with --dtype bfloat16" if dtype == torch.float32 else ""
    # 0.9: the allocator's rounding and what the estimate leaves out need the rest.
    held, streamed = need.weights + working, need.streamed + working
    if mode in ("auto", "resident") and held <= 0.9 * free:
        return "resident"
    if mode == "resident":
        raise UserError(f"{cfg.name}'s {cfg.n_params() / 1e9:.1f}B parameters need {held / gib:.1f} GiB in {kind} "
                        f"with the working memory, and {where} {free / gib:.1f} GiB free: use a larger device"
                        f"{smaller}, or stream it with --mode stream (or --mode disk)")
    if streamed > 0.9 * free:
        raise UserError(f"streaming {cfg.name} needs {streamed / gib:.1f} GiB on the device for two units and the "
                        f"working memory, and {where} {free / gib:.1f} GiB free: ask for {lower}{smaller}")
    fits_host = need.weights <= 0.9 * host
    if mode == "stream" and not fits_host:
        raise UserError(f"streaming {cfg.name} from host memory holds its weights there, {need.weights / gib:.1f} "
                        f"GiB in {kind}, and this machine has {host / gib:.1f} GiB available: stream it from its "
                        "files with --mode disk")
    return "stream" if mode == "stream" or (mode == "auto" and device == "cuda" and fits_host) else "disk"


def place(requested: str, folder: Path, cfg: ModelConfig, device: torch.device, dtype: torch.dtype, working: int,
          lower: str) -> Weights:
    """The folder's model for a command that needs `working` bytes of the device beside
    it: held whole or streamed, as `choose_mode` decides for --mode `requested`."""
    mode = choose_mode(requested, cfg, device.type, dtype, working, free_memory(device),
                       psutil.virtual_memory().available, lower)
    if mode == "resident":
        return ResidentWeights(load_model(folder, cfg, device, dtype))
    return stream_model(folder, cfg, device, dtype, from_disk=mode == "disk")
