"""Host stores: where master weights, gradients and AdamW state live between uses.

Each unit's parameters are packed into one flat buffer (decayed tensors first, so
weight decay is a prefix) and the unit's state buffers (param, grad, exp_avg,
exp_avg_sq, and the moments' block scales in the compact format: see
`streamer.state`) are kept together:

- `RamStore`: plain host tensors.
- `DiskStore`: one safetensors file per unit in the run's store folder (`store_root`:
  `DIR/store/`, or in `--store-dir`), read and written with
  `pread`/`pwrite` into buffers allocated once. Reading through file descriptors (not
  mmap) keeps file pages out of the process's resident set: the page cache may hold
  them, but the kernel can drop those at will, and they never count as our memory.

Only the engine's host worker thread reads and updates a store; gradient writes may
come from a second thread but touch only the gradient buffer, which no update-time job
writes.

[Note: the disk tier's read-update-write pipeline]
An update reads four buffers and writes three, about 28 bytes per parameter, and the
whole model's worth must move between one backward and the next forward (the clip
coefficient is known only when the backward ends). Done in sequence per chunk, the
read, the update and the write add up. `DiskStore.stream` instead keeps a ring of
`RING` chunk-buffer sets: a reader thread fills chunk i + 2 while the worker updates
chunk i and a writer thread writes chunk i - 1 back, so the step pays about the largest
of the three, not their sum. A later read of a unit first waits for that unit's
pending writes (`settle`), so no read ever sees a half-written chunk.

Two passes may run at once on different units, each in a lane of its own (its ring,
reader and writer): the host worker's staging in lane 0, and the engine's early updates
of the disk units in lane 1 (see streamer.scheduler's [Note: early updates of the disk
part]). The per-unit pending writes are shared, so a pass over a unit in either lane
first waits for the other lane's writes of that unit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import struct
import sys
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from streamer.io import existing_parent
from streamer.optim import decays
from streamer.state import FORMATS, StateFormat

BUFFERS = ("param", "grad", "exp_avg", "exp_avg_sq")  # what an update reads; a format adds scales
# What a checkpoint keeps of each unit: the update consumes the gradient before a
# checkpoint is taken, so the gradient is not state.
CHECKPOINT_BUFFERS = ("param", "exp_avg", "exp_avg_sq")
_IO_BYTES = 256 * 2**20  # pread/pwrite move at most 2 GiB per call; stay well under it
CHUNK_NUMEL = 8 * 2**20  # 32 MiB per float32 buffer: large I/Os, small resident set; whole blocks
RING = 3  # chunk-buffer sets in the disk pipeline: one being read, one updated, one written


@dataclass(frozen=True)
class TensorSlot:
    name: str
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass(frozen=True)
class UnitLayout:
    """How one unit's named parameters sit in its flat buffer."""

    index: int
    tensors: tuple[TensorSlot, ...]
    numel: int
    decay_numel: int  # the first decay_numel elements are weight-decayed

    @classmethod
    def of(cls, index: int, unit: nn.Module) -> UnitLayout:
        named = list(unit.named_parameters())
        ordered = [np for np in named if decays(*np)] + [np for np in named if not decays(*np)]
        slots, offset = [], 0
        for name, p in ordered:
            slots.append(TensorSlot(name, tuple(p.shape), offset, p.numel()))
            offset += p.numel()
        decay_numel = sum(p.numel() for n, p in named if decays(n, p))
        return cls(index, tuple(slots), offset, decay_numel)

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into `flat` (which may be longer than this unit)."""
        return {s.name: flat[s.offset : s.offset + s.numel].view(s.shape) for s in self.tensors}

    def pack(self, unit: nn.Module, flat: torch.Tensor) -> None:
        params = dict(unit.named_parameters())
        for s in self.tensors:
            flat[s.offset : s.offset + s.numel].copy_(params[s.name].detach().reshape(-1))

    def flatten(self, unit: nn.Module) -> torch.Tensor:
        """The unit's weights as one new float32 buffer, in this layout."""
        flat = torch.empty(self.numel)
        self.pack(unit, flat)
        return flat

    def bind(self, unit: nn.Module, flat: torch.Tensor) -> nn.Module:
        """`unit` with its parameters replaced by views of `flat`, in place.

        Built on the meta device and bound to a reused buffer, a unit is initialised
        straight into the weights the store takes: no default initialisation to throw
        away, no copy, and no fresh allocation whose pages fault in for every unit (for a
        20B model that was half of the store's start-up).
        """
        for s, view in zip(self.tensors, self.views(flat).values()):
            owner, _, name = s.name.rpartition(".")
            module = unit.get_submodule(owner) if owner else unit
            setattr(module, name, nn.Parameter(view, requires_grad=False))
        return unit


class HostStore(ABC):
    """Common interface: `open` returns the unit's buffers (reading them if needed),
    `commit` makes changes to the named buffers durable in the tier."""

    def __init__(self, layouts: list[UnitLayout], owned: list[tuple[int, int]] | None = None,
                 state: StateFormat = FORMATS["fp32"]) -> None:
        self.layouts = layouts
        # The element range [start, stop) of each unit that this process keeps: the
        # whole unit, or this rank's shard under data parallelism (streamer.parallel).
        self.owned = owned or [(0, lay.numel) for lay in layouts]
        self.format = state

    def _slice(self, name: str, tensor: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return self.format.part(name, tensor, start, stop)

    def owned_numel(self, index: int) -> int:
        start, stop = self.owned[index]
        return stop - start

    def _owned_part(self, index: int, weights: torch.Tensor) -> torch.Tensor:
        assert weights.numel() == self.layouts[index].numel, f"unit {index}: weights of the wrong size"
        start, stop = self.owned[index]
        return weights[start:stop]

    @abstractmethod
    def init_params(self, index: int, weights: torch.Tensor) -> None:
        """Take unit `index`'s initial weights (all of them, float32, in its layout: the
        store keeps its owned part); moments start at zero."""

    def allocate(self, index: int) -> None:  # noqa: B027 - the RAM tier allocates up front
        """Make room for unit `index` with every buffer zero (before a checkpoint fills it)."""

    @abstractmethod
    def open(self, index: int, names: tuple[str, ...], start: int, stop: int) -> dict[str, torch.Tensor]:
        """Elements [start, stop) of the unit's owned part of the named buffers (offsets
        relative to the owned range; a scale buffer gives those elements' blocks), read
        from the tier if needed. `start` is a block boundary."""

    @abstractmethod
    def commit(self, index: int, names: tuple[str, ...], start: int, stop: int) -> None:
        """Make changes to the chunk returned by the last `open` durable in the tier."""

    def chunks(self, index: int) -> list[tuple[int, int]]:
        """The unit split into pieces of at most CHUNK_NUMEL elements: a disk-tier unit is
        read, updated and written a piece at a time, so host memory holds one piece of
        each buffer, not the unit."""
        numel = self.owned_numel(index)
        return [(start, min(numel, start + CHUNK_NUMEL)) for start in range(0, numel, CHUNK_NUMEL)]

    def stream(self, index: int, read: tuple[str, ...], write: tuple[str, ...] = (),
               lane: int = 0) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        """Every chunk of the unit as (start, stop, {name: buffer}) for the `read` names
        and their scales, in order; once the consumer asks for the next chunk, the
        `write` names of the previous one are committed. Here: `open` and `commit` in
        sequence. `lane` matters to the disk tier only: passes in different lanes may
        run at once."""
        read, write = self.format.expand(read), self.format.expand(write)
        for start, stop in self.chunks(index):
            yield start, stop, self.open(index, read, start, stop)
            if write:
                self.commit(index, write, start, stop)

    def settle(self) -> None:  # noqa: B027 - only the disk tier writes in the background
        """Wait for background writes and raise the first error any of them hit."""

    def on_disk(self, index: int) -> bool:
        """Whether the unit's state lives on disk (its passes are storage I/O)."""
        return False

    def io_seconds(self) -> dict[str, float]:
        """Cumulative seconds spent in storage reads and writes, and their bytes."""
        return {}

    def advise(self, index: int, names: tuple[str, ...]) -> None:  # noqa: B027 - a hint; RAM needs none
        """Hint that the unit's named buffers will be read soon."""

    def pinned(self, index: int) -> bool:
        """Whether the buffers `stream` yields for the unit are page-locked and stay put
        (the device may then copy from them directly and asynchronously)."""
        return False

    def grad_target(self, index: int) -> dict[str, torch.Tensor] | None:
        """The unit's page-locked gradient buffers (the gradient, and its scales when the
        format codes it), which the device may fill directly through the format's
        `store_grad` instead of calling `write_grad`; None if there are none."""
        return None

    @abstractmethod
    def write_grad(self, index: int, grad: torch.Tensor | dict[str, torch.Tensor]) -> None:
        """Store the owned part of a unit's step gradient: float32 (the store casts or
        codes it, as its format keeps it), or already in the format's gradient buffers
        (coded on the device, where coding is cheap)."""

    def bytes_on_disk(self) -> int:
        return 0

    def close(self) -> None:  # noqa: B027 - a tier without resources has nothing to do
        """Release files, page locks and buffers."""


def page_lock(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Register host tensors with CUDA as page-locked, in place; returns those that are
    (all, or none if the driver refuses: copies then go through staging buffers).

    [Note: page-locking the RAM tier]
    The device copies from page-locked memory by DMA, asynchronously and at the link's
    full rate; from pageable memory the driver first copies through a bounce buffer of
    its own, on the calling thread. The RAM tier is therefore locked where it lies
    (cudaHostRegister) rather than allocated by the pinned allocator, which rounds each
    allocation up to a power of two: a 20B model's compact state fills most of a
    128 GiB host, and up to 2x of it would not fit.
    """
    cudart = torch.cuda.cudart()
    locked = []
    for tensor in tensors:
        if not tensor.numel():
            continue
        code = int(cudart.cudaHostRegister(tensor.data_ptr(), tensor.numel() * tensor.element_size(), 0))
        if code != 0:
            _clear_cuda_error()
            print(f"warning: host state not page-locked (CUDA error {code}); its copies go through staging "
                  "buffers at a lower rate", file=sys.stderr)
            page_unlock(locked)
            return []
        locked.append(tensor)
    return locked


def _clear_cuda_error() -> None:
    """Reset the CUDA runtime's last error after a refused cudaHostRegister: torch reads
    it after every kernel launch, so the refusal would surface later as the failure of
    some unrelated kernel. torch binds no cudaGetLastError; the runtime library it
    loaded is found again by its name (best effort: without it the error stays)."""
    import ctypes

    major = (torch.version.cuda or "0").split(".")[0]
    try:
        ctypes.CDLL(f"libcudart.so.{major}").cudaGetLastError()
    except (OSError, AttributeError):
        pass


PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def page_aligned_zeros(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A zeroed 1-D tensor that starts on a page boundary, in an allocation of its own
    whole pages: no other tensor shares a page with it, so page-locking it never
    overlaps a range already locked (cudaHostRegister refuses overlaps, and small
    buffers from the allocator share pages)."""
    nbytes = numel * torch.tensor([], dtype=dtype).element_size()
    span = -(-nbytes // PAGE) * PAGE
    raw = torch.zeros(span + PAGE, dtype=torch.uint8)
    offset = -raw.data_ptr() % PAGE
    return raw[offset : offset + nbytes].view(dtype)


def page_unlock(tensors: list[torch.Tensor]) -> None:
    for tensor in tensors:
        torch.cuda.cudart().cudaHostUnregister(tensor.data_ptr())


class RamStore(HostStore):
    def __init__(self, layouts: list[UnitLayout], owned: list[tuple[int, int]] | None = None,
                 state: StateFormat = FORMATS["fp32"], pin: bool = False) -> None:
        super().__init__(layouts, owned, state)
        self.buffers = [{b.name: page_aligned_zeros(b.numel(self.owned_numel(i)), b.dtype) for b in state.buffers}
                        for i in range(len(layouts))]
        # With a CUDA device: see [Note: page-locking the RAM tier].
        started = time.perf_counter()
        self.locked = page_lock([t for unit in self.buffers for t in unit.values()]) if pin else []
        self.page_lock_s = time.perf_counter() - started  # reported: it grows with the RAM tier

    def pinned(self, index: int) -> bool:
        return bool(self.locked)

    def grad_target(self, index: int) -> dict[str, torch.Tensor] | None:
        return {n: self.buffers[index][n] for n in self.format.expand(("grad",))} if self.locked else None

    def close(self) -> None:
        page_unlock(self.locked)
        self.locked = []

    def init_params(self, index: int, weights: torch.Tensor) -> None:
        self.buffers[index]["param"].copy_(self._owned_part(index, weights))

    def open(self, index: int, names: tuple[str, ...], start: int, stop: int) -> dict[str, torch.Tensor]:
        return {n: self._slice(n, self.buffers[index][n], start, stop) for n in names}

    def commit(self, index: int, names: tuple[str, ...], start: int, stop: int) -> None:
        pass  # the buffers are the store

    def write_grad(self, index: int, grad: torch.Tensor | dict[str, torch.Tensor]) -> None:
        out = {n: self.buffers[index][n] for n in self.format.expand(("grad",))}
        if isinstance(grad, dict):
            for name, tensor in grad.items():
                out[name].copy_(tensor)
            return
        self.format.store_grad(grad[: self.owned_numel(index)], out)


@dataclass
class _Lane:
    """One pipeline of the disk tier: its ring of chunk sets, the pending write out of
    each set, and its reader and writer threads."""

    ring: list[dict[str, torch.Tensor]]
    busy: list[Future | None]
    reader: ThreadPoolExecutor
    writer: ThreadPoolExecutor


def store_root(out: Path, store_dir: str | Path | None = None) -> Path:
    """Where a run's disk tier lives: `--out`/store, or a folder of its own in
    `--store-dir` (a local NVMe beside an --out on a network or persistent disk), named
    after --out's absolute path so that runs sharing one scratch disk never meet, and a
    resumed run finds its own.

    [Note: the disk tier is scratch]
    The store holds the live training state, rewritten every step; it is never read on
    resume (a run is rebuilt from its checkpoint) nor by `sample`, `eval` or `export`
    (they read `final/` or a checkpoint). So a run removes it when it ends, finished,
    stopped by a signal or failed: a 20B model's is 115-330 GB. Only a killed run
    leaves it, and its resume takes the space back (`reusable_bytes`)."""
    if store_dir is None:
        return out / "store"
    key = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:12]
    return Path(store_dir) / f"streamer-{out.name}-{key}"


def store_folder(root: Path, rank: int, world: int) -> Path:
    """Where rank `rank` of `world` keeps its disk tier in the run's store `root`."""
    return root / (f"rank{rank}" if world > 1 else "")


def stale_store(root: Path, saved_world: int, world: int) -> list[Path]:
    """What a run of `saved_world` processes left in its store `root` that a resume by
    `world` processes will not reuse: the top level's unit files (one process) or the
    rank folders (several) no rank of the new world has. A store is never read on
    resume (it is rebuilt from the checkpoint), so these are dead bytes."""
    if saved_world == world or not root.is_dir():
        return []
    if saved_world == 1:
        return sorted(root.glob("unit_*.safetensors"))
    kept = {store_folder(root, rank, world) for rank in range(world)} if world > 1 else set()
    return sorted(p for p in root.glob("rank*") if p.is_dir() and p not in kept)


def remove_store(root: Path, rank: int, world: int) -> None:
    """Remove this rank's part of a store that has closed ([Note: the disk tier is
    scratch]), and the store's folder once no rank's part is left in it."""
    folder = store_folder(root, rank, world)
    for file in sorted(folder.glob("unit_*.safetensors")):
        file.unlink(missing_ok=True)
    for empty in dict.fromkeys((folder, root)):  # ranks finish in any order: the last one takes the folder
        with contextlib.suppress(OSError):
            empty.rmdir()


def store_free_bytes(root: Path) -> int:
    """The room for a run's store in `root`: its disk's free bytes, and what the run's
    own leftover store takes there (a killed run's: the new one is written over it)."""
    return shutil.disk_usage(existing_parent(root)).free + allocated_bytes([root])


def allocated_bytes(paths: list[Path]) -> int:
    """Disk blocks the files (or folders of files) take: a store's files are sparse."""
    files = [f for p in paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return sum(f.stat().st_blocks * 512 for f in files)


class DiskStore(HostStore):
    """One safetensors file per unit holding the format's flat buffers."""

    def __init__(self, layouts: list[UnitLayout], folder: Path, owned: list[tuple[int, int]] | None = None,
                 state: StateFormat = FORMATS["fp32"], first_unit: int = 0) -> None:
        super().__init__(layouts, owned, state)
        self.first_unit = first_unit  # the model's index of this store's unit 0 (a split store's disk part)
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        # Scratch for one chunk of each buffer, allocated once for the run; each lane's
        # ring of chunk sets and I/O threads come with its first pass (see the note at
        # the top): a run without early updates never allocates lane 1.
        self.scratch = self._chunk_set()
        self.lanes: dict[int, _Lane] = {}
        self.pending: dict[int, list[Future]] = {}  # unit -> its writes not yet waited on
        self.fds: list[int] = []
        self.offsets: list[dict[str, int]] = []
        self._lock = threading.Lock()  # the counters below are updated from several threads
        self.bytes_read = self.bytes_written = 0
        self.read_s = self.write_s = 0.0

    def _chunk_set(self) -> dict[str, torch.Tensor]:
        return {b.name: torch.empty(b.numel(CHUNK_NUMEL), dtype=b.dtype) for b in self.format.buffers}

    def _lane(self, lane: int) -> _Lane:
        if lane not in self.lanes:
            self.lanes[lane] = _Lane(ring=[self._chunk_set() for _ in range(RING)], busy=[None] * RING,
                                     reader=ThreadPoolExecutor(1, thread_name_prefix=f"streamer-read{lane}"),
                                     writer=ThreadPoolExecutor(1, thread_name_prefix=f"streamer-write{lane}"))
        return self.lanes[lane]

    def on_disk(self, index: int) -> bool:
        return True

    def path(self, index: int) -> Path:
        return self.folder / f"unit_{self.first_unit + index:05d}.safetensors"

    def init_params(self, index: int, weights: torch.Tensor) -> None:
        """Create unit `index`'s file: packed initial weights, zero grad and moments."""
        self.allocate(index)
        self._pwrite(index, "param", self._owned_part(index, weights).to(self.format.buffer("param").dtype), 0)
        os.fsync(self.fds[index])

    def allocate(self, index: int) -> None:
        """Create unit `index`'s file with every buffer zero (units are created in order)."""
        assert index == len(self.fds), f"unit {index} allocated out of order"
        from streamer.checkpoint import DTYPE_NAMES

        numel = self.owned_numel(index)
        header, offsets, end = {}, {}, 0
        for b in self.format.buffers:
            size = b.itemsize * b.numel(numel)
            header[b.name] = {"dtype": DTYPE_NAMES[b.dtype], "shape": [b.numel(numel)],
                              "data_offsets": [end, end + size]}
            offsets[b.name], end = end, end + size
        header["__metadata__"] = {"unit": str(self.first_unit + index), "format": "streamer-unit-v1",
                                  "state": self.format.name}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # safetensors pads the header to 8 bytes
        data_start = 8 + len(blob)
        path = self.path(index)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, struct.pack("<Q", len(blob)) + blob)
        os.ftruncate(fd, data_start + end)  # a sparse file: zero moments cost no writes
        self.fds.append(fd)
        self.offsets.append({name: data_start + offset for name, offset in offsets.items()})

    def _byte_offset(self, index: int, name: str, first: int) -> int:
        buffer = self.format.buffer(name)
        return self.offsets[index][name] + buffer.itemsize * buffer.offset(first)

    def _pwrite(self, index: int, name: str, tensor: torch.Tensor, first: int) -> None:
        """Write `tensor` over elements [first, first + len) of the named buffer."""
        started = time.perf_counter()
        view = memoryview(tensor.view(torch.uint8).numpy()).cast("B")
        fd, base = self.fds[index], self._byte_offset(index, name, first)
        for start in range(0, len(view), _IO_BYTES):
            chunk = view[start : start + _IO_BYTES]
            written = 0
            while written < len(chunk):
                written += os.pwrite(fd, chunk[written:], base + start + written)
        with self._lock:
            self.bytes_written += len(view)
            self.write_s += time.perf_counter() - started

    def _pread(self, index: int, name: str, tensor: torch.Tensor, first: int) -> None:
        started = time.perf_counter()
        view = memoryview(tensor.view(torch.uint8).numpy()).cast("B")
        fd, base = self.fds[index], self._byte_offset(index, name, first)
        for start in range(0, len(view), _IO_BYTES):
            chunk = view[start : start + _IO_BYTES]
            got = 0
            while got < len(chunk):
                n = os.preadv(fd, [chunk[got:]], base + start + got)
                if n == 0:
                    raise OSError(f"store file {self.path(index)} is truncated")
                got += n
        with self._lock:
            self.bytes_read += len(view)
            self.read_s += time.perf_counter() - started

    def io_seconds(self) -> dict[str, float]:
        with self._lock:
            return {"read_s": self.read_s, "write_s": self.write_s,
                    "read_bytes": self.bytes_read, "write_bytes": self.bytes_written}

    def _settle_unit(self, index: int) -> None:
        futures = self.pending.pop(index, [])
        for future in futures:
            future.exception()  # wait for all of them before raising any error
        for future in futures:
            future.result()

    def settle(self) -> None:
        errors = []
        for index in list(self.pending):
            try:
                self._settle_unit(index)
            except OSError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def stream(self, index: int, read: tuple[str, ...], write: tuple[str, ...] = (),
               lane: int = 0) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        """The pipelined pass over a unit (see the note at the top of this module)."""
        self._settle_unit(index)  # an earlier pass's writes land before we read
        read, write = self.format.expand(read), self.format.expand(write)
        chunks = self.chunks(index)
        pipe = self._lane(lane)

        def fill(i: int) -> None:
            start, stop = chunks[i]
            k = i % RING
            if pipe.busy[k] is not None:
                # Wait until the set's previous chunk is written out; a failed write is
                # reported by `settle`, through `pending`, not here.
                pipe.busy[k].exception()
            for name in read:
                self._pread(index, name, self._slice(name, pipe.ring[k][name], 0, stop - start), start)

        def drain(i: int) -> None:
            start, stop = chunks[i]
            for name in write:
                self._pwrite(index, name, self._slice(name, pipe.ring[i % RING][name], 0, stop - start), start)

        reads = [pipe.reader.submit(fill, i) for i in range(min(RING - 1, len(chunks)))]
        finished = False
        try:
            for i, (start, stop) in enumerate(chunks):
                reads[i].result()
                yield start, stop, {name: self._slice(name, pipe.ring[i % RING][name], 0, stop - start)
                                    for name in read}
                if write:
                    future = pipe.writer.submit(drain, i)
                    pipe.busy[i % RING] = future
                    self.pending.setdefault(index, []).append(future)
                if i + RING - 1 < len(chunks):
                    reads.append(pipe.reader.submit(fill, i + RING - 1))
            finished = True
        finally:
            # A pass that stops early (an error) must not leave reads or writes using
            # sets that the next pass will fill; the error in flight is the one reported.
            for future in reads:
                future.exception()
            if not finished:
                for future in self.pending.pop(index, []):
                    future.exception()

    def advise(self, index: int, names: tuple[str, ...]) -> None:
        """POSIX_FADV_WILLNEED: the kernel reads the buffers ahead, asynchronously, while
        the worker is still busy with earlier units."""
        numel = self.owned_numel(index)
        for name in self.format.expand(names):
            buffer = self.format.buffer(name)
            os.posix_fadvise(self.fds[index], self.offsets[index][name], buffer.itemsize * buffer.numel(numel),
                             os.POSIX_FADV_WILLNEED)

    def open(self, index: int, names: tuple[str, ...], start: int, stop: int) -> dict[str, torch.Tensor]:
        assert stop - start <= CHUNK_NUMEL, "disk-tier reads go a chunk at a time"
        self._settle_unit(index)
        out = {}
        for name in names:
            buf = self._slice(name, self.scratch[name], 0, stop - start)
            self._pread(index, name, buf, start)
            out[name] = buf
        return out

    def commit(self, index: int, names: tuple[str, ...], start: int, stop: int) -> None:
        for name in names:
            self._pwrite(index, name, self._slice(name, self.scratch[name], 0, stop - start), start)

    def write_grad(self, index: int, grad: torch.Tensor | dict[str, torch.Tensor]) -> None:
        numel = self.owned_numel(index)
        out = grad
        if not isinstance(grad, dict):
            out = {b.name: torch.empty(b.numel(numel), dtype=b.dtype) for b in self.format.buffers
                   if b.name in self.format.expand(("grad",))}
            self.format.store_grad(grad[:numel], out)
        for name, tensor in out.items():
            self._pwrite(index, name, tensor, 0)

    def bytes_on_disk(self) -> int:
        return sum(b.itemsize * b.numel(self.owned_numel(i)) for i in range(len(self.layouts))
                   for b in self.format.buffers)

    def close(self) -> None:
        try:
            self.settle()
        finally:
            for pipe in self.lanes.values():
                pipe.reader.shutdown(wait=True)
                pipe.writer.shutdown(wait=True)
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()


class SplitStore(HostStore):
    """The first `ram_units` units in RAM, the rest on disk: for a state that fits
    neither alone (a 20B model's compact state is 115 GiB; a GPU host may have 128 GiB
    of RAM and 64 GiB of disk). Every call goes to the unit's own tier."""

    def __init__(self, layouts: list[UnitLayout], folder: Path, ram_units: int,
                 owned: list[tuple[int, int]] | None = None, state: StateFormat = FORMATS["fp32"],
                 pin: bool = False) -> None:
        super().__init__(layouts, owned, state)
        self.ram_units = ram_units
        self.ram = RamStore(layouts[:ram_units], self.owned[:ram_units], state, pin)
        self.disk = DiskStore(layouts[ram_units:], folder, self.owned[ram_units:], state, first_unit=ram_units)

    def _tier(self, index: int) -> tuple[HostStore, int]:
        return (self.ram, index) if index < self.ram_units else (self.disk, index - self.ram_units)

    def init_params(self, index: int, weights: torch.Tensor) -> None:
        store, local = self._tier(index)
        store.init_params(local, weights)

    def allocate(self, index: int) -> None:
        store, local = self._tier(index)
        store.allocate(local)

    def open(self, index: int, names: tuple[str, ...], start: int, stop: int) -> dict[str, torch.Tensor]:
        store, local = self._tier(index)
        return store.open(local, names, start, stop)

    def commit(self, index: int, names: tuple[str, ...], start: int, stop: int) -> None:
        store, local = self._tier(index)
        store.commit(local, names, start, stop)

    def stream(self, index: int, read: tuple[str, ...], write: tuple[str, ...] = (),
               lane: int = 0) -> Iterator[tuple[int, int, dict[str, torch.Tensor]]]:
        store, local = self._tier(index)
        return store.stream(local, read, write, lane)

    def on_disk(self, index: int) -> bool:
        return index >= self.ram_units

    def settle(self) -> None:
        self.disk.settle()

    def io_seconds(self) -> dict[str, float]:
        return self.disk.io_seconds()

    def advise(self, index: int, names: tuple[str, ...]) -> None:
        store, local = self._tier(index)
        store.advise(local, names)

    def write_grad(self, index: int, grad: torch.Tensor | dict[str, torch.Tensor]) -> None:
        store, local = self._tier(index)
        store.write_grad(local, grad)

    def pinned(self, index: int) -> bool:
        store, local = self._tier(index)
        return store.pinned(local)

    def grad_target(self, index: int) -> dict[str, torch.Tensor] | None:
        store, local = self._tier(index)
        return store.grad_target(local)

    def bytes_on_disk(self) -> int:
        return self.disk.bytes_on_disk()

    def close(self) -> None:
        try:
            self.disk.close()
        finally:
            self.ram.close()
