"""The streaming engine: weights stream in, gradients stream out, the optimizer runs
on the host beside the next forward pass.

One step, as the loop in `StreamEngine.step` reads it:

    visits = forward units 0..U-1, then backward units U-2..0
    for each visit v:
        acquire(visits[v + 1 .. v + depth])   # issue transfers ahead (no-op if resident)
        wait(unit)                            # block only if its weights are not here yet
        forward all micro-batches | backward all micro-batches (recompute, then grad)
        emit_grad(unit)  (backward)           # gradient streams out, host stores it
        release(unit)                         # slot reusable once no visit in the window needs it
    global grad norm -> the AdamW update of every unit becomes due; each unit's update
    runs on the host worker just before that unit is staged for the next forward.

[Note: exact optimizer with off-device updates]
Global grad-norm clipping needs every gradient before any update, so updates cannot
run during the backward that produced them. Instead the clip coefficient, learning
rate and step count are recorded once the backward ends, and unit i's update is
applied by the host worker when unit i is next staged (the next forward), or by
`flush()`. Each update therefore sees exactly the gradient, clip factor, lr and step
that resident AdamW would, and the updates overlap the next forward pass.

[Note: early updates of the disk part]
A unit's update is due once the backward ends, and ran when the unit is next staged,
`depth` visits before its forward. For a unit on disk that update is I/O (its whole
state read, all but the gradient written back), which the prefetch window hides only
if the unit's compute is as long: a 20B model's six disk units each stalled the
forward ~0.9 s while the disk sat idle through the RAM units before them. When the
plan says so (`Plan.early_updates`: GPU runs whose store has a disk part, where the
planner predicts it faster), the disk units' updates start as soon as they are due, in
forward order, on a lane of their own (a thread, a CUDA stream, and the disk store's
lane 1), and write their weights back; the unit's staging then waits for its update
and reads the weights again, a pass that reads a third of the bytes. The updates see
the same gradient, clip factor, lr, step and rounding seed, so the run is the same.

[Note: updates held on the device]
With the update on a GPU every unit's state crosses the link twice a step, and all of
it in the forward: the backward's link carries only weights, the forward's carries
each unit's whole state while its compute is a third of the step's. The first
`held_units` units (`Plan.held_units`, forward order) therefore keep their gradient on
the device, coded as the store keeps it, and their weights and moments come to the
device during the backward, each unit's once its backward is done. When the backward
ends the clip coefficient is known and each held unit's update runs from that state
as the unit is staged, with nothing to bring in: it writes the slot, and its new state
goes back on the gradient stream (device to host, beside the other units' updated
states). The way in is then free for the next units' updates from the forward's first
visit, which is what deeper prefetch buys; what it cannot shorten is the update's
kernels, which still run in the forward (see the planner's [Note: the update's bytes on
the link]). The update sees the same gradient, clip factor, lr, step and
rounding seed as any other, so the run is the same. The planner weighs the state's
device memory against the activations that the backward frees as it goes.

[Note: why the head runs forward and backward in one visit]
The head is the last forward unit and the first backward unit; running its backward
right after its forward, while it is resident, saves a second fetch and the
recompute of the logits, the largest activation of the step.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import functools
import math
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.func import functional_call

from models import ModelConfig, loss_fn
from models.gpt import Documents, build_unit, init_unit
from models.hf import Pretrained
from streamer import planner
from streamer.errors import UserError
from streamer.io import existing_parent
from streamer.optim import OptimConfig, clip_coefficient
from streamer.parallel import DataParallel
from streamer.state import BLOCK, FORMATS, use_fused
from streamer.stats import StepStats
from streamer.store import (
    BUFFERS,
    CHECKPOINT_BUFFERS,
    DiskStore,
    HostStore,
    RamStore,
    SplitStore,
    UnitLayout,
    remove_store,
    store_folder,
    store_free_bytes,
    store_root,
)

if TYPE_CHECKING:  # annotations only: checkpoint reading is imported where a resume needs it
    from streamer.checkpoint import TensorFile

UPDATED = ("param", "exp_avg", "exp_avg_sq")  # what an update writes back (it consumes the gradient)


class UnitState(enum.Enum):
    HOME = "home"  # only in the host store; no slot
    IN_FLIGHT = "in flight"  # staging issued into a slot; not yet waited on
    RESIDENT = "resident"  # waited on: the slot holds the unit's current weights
    RELEASED = "released"  # no visit needs it; its slot went back to the pool


_TRANSITIONS = {
    UnitState.HOME: {UnitState.IN_FLIGHT},
    UnitState.IN_FLIGHT: {UnitState.RESIDENT},
    UnitState.RESIDENT: {UnitState.RELEASED},
    UnitState.RELEASED: {UnitState.IN_FLIGHT},
}


@dataclass
class PendingUpdate:
    """What the next update of every unit needs; recorded when a backward ends."""

    adam_step: int
    lr: float
    grad_scale: float  # the clip coefficient


def squared_norm(flat: torch.Tensor, width: int = 2**14) -> torch.Tensor:
    """Sum of squares, exact to float32 rounding per row and float64 across rows.

    A single float32 reduction over a 100M-element embedding gradient can be off by
    several percent, which would move the clip coefficient; converting the whole unit to
    float64 costs a pass that writes twice its bytes (0.34 s of a 6.5 s gpt3-125m step on
    2 cores). Rows of 16,384 elements reduce in float32 with no measurable error, and
    only their squares (one value per row) are summed in float64.
    """
    whole = flat.numel() // width * width
    rows = torch.linalg.vector_norm(flat[:whole].view(-1, width), dim=1).double()
    total = (rows * rows).sum()
    if whole < flat.numel():
        total = total + torch.linalg.vector_norm(flat[whole:], dtype=torch.float64) ** 2
    return total


class _Deferred(Future):
    def __init__(self, worker: InlineWorker) -> None:
        super().__init__()
        self.worker = worker

    def result(self, timeout: float | None = None):  # noqa: ANN201 - whatever the job returns
        self.worker.run_until(self)
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self.worker.run_until(self)
        return super().exception(timeout)


class InlineWorker:
    """The host worker when the device is the host's own cores and the store is in RAM.

    [Note: no worker thread on a CPU device]
    A worker thread overlaps host work with compute only if something else computes.
    On a CPU device both run on the same cores: the update and copies cost the same
    core time either way, and a third thread beside the two that each matmul splits
    into makes the matmul wait for whichever half was preempted (same matmuls 9%
    slower on 2 cores, measured with torch.profiler). So jobs are queued as the
    threaded worker would take them and run on the caller's thread, in submission
    order, when a result is first needed: the same work in the same order, at the
    moment the compute would otherwise block on it, with every core. Storage tiers keep
    their threads: there the worker spends its time waiting on the disk.
    """

    def __init__(self) -> None:
        self.queue: collections.deque = collections.deque()

    def submit(self, fn, *args) -> Future:  # noqa: ANN001
        future = _Deferred(self)
        self.queue.append((future, fn, args))
        return future

    def run_until(self, target: Future) -> None:
        while not target.done() and self.queue:
            future, fn, args = self.queue.popleft()
            future.set_running_or_notify_cancel()
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # noqa: BLE001 - delivered through the future, as a thread's would be
                future.set_exception(exc)

    def shutdown(self, wait: bool = True) -> None:
        if self.queue:
            self.run_until(self.queue[-1][0])


def initialise_store(store: HostStore, layouts: list[UnitLayout], cfg: ModelConfig, seed: int,
                     workers: int | None = None, pretrained: Pretrained | None = None) -> None:
    """Initialise every unit's weights into the store, a few units at a time: drawn at
    random, or read from `pretrained` (a checkpoint, one tensor at a time).

    torch draws normal numbers from a seeded CPU generator on one core (about 275 M/s
    here): a 20B model's 20.6 billion draws alone took over a minute. Each unit has a
    generator of its own (`init_unit`), so `workers` units are drawn at once, each into a
    buffer of its own that is reused (no fresh pages to fault in per unit), and handed to
    the store in unit order (the disk tier creates its files in order, and writes them
    while the next units are drawn). The bytes are those of one unit at a time. Host
    memory holds `workers` units' float32 weights beside the store until the run starts.
    """
    workers = workers or max(1, min(4, (os.cpu_count() or 1) // 2))
    largest = max(lay.numel for lay in layouts)
    buffers = [torch.empty(largest) for _ in range(min(workers, len(layouts)))]

    def draw(index: int) -> torch.Tensor:
        weights = buffers[index % len(buffers)][: layouts[index].numel]
        if pretrained is None:
            init_unit(layouts[index].bind(units[index], weights), cfg, seed, index)
        else:
            for name, view in layouts[index].views(weights).items():
                pretrained.into(f"units.{index}.{name}", view)
        return weights

    with torch.device("meta"):  # shapes only: the weights live in the buffers
        units = [build_unit(cfg, i) for i in range(len(layouts))]
    with ThreadPoolExecutor(len(buffers), thread_name_prefix="streamer-init") as pool:
        drawn = {i: pool.submit(draw, i) for i in range(len(buffers))}
        for i in range(len(layouts)):
            store.init_params(i, drawn.pop(i).result())
            if i + len(buffers) < len(layouts):  # into the buffer just handed over
                drawn[i + len(buffers)] = pool.submit(draw, i + len(buffers))


def _busy_ms(timings: list[tuple]) -> float:
    """Milliseconds in which at least one of the timed copies ran: copies on two streams
    may overlap, and a sum of their spans would count the overlap twice (and halve the
    link's apparent rate)."""
    if not timings:
        return 0.0
    ref = timings[0][0]
    spans = sorted((ref.elapsed_time(start), ref.elapsed_time(end)) for start, end, _ in timings)
    busy, (low, high) = 0.0, spans[0]
    for start, end in spans[1:]:
        if start > high:
            busy, low = busy + high - low, start
        high = max(high, end)
    return busy + high - low


class OnFirstUse:
    """A list of buffers, each made by its function when first indexed (from any
    thread)."""

    def __init__(self, makers: list) -> None:
        self._makers, self._made, self._lock = makers, [None] * len(makers), threading.Lock()

    def __getitem__(self, index: int) -> torch.Tensor:
        with self._lock:
            if self._made[index] is None:
                self._made[index] = self._makers[index]()
            return self._made[index]

    def __len__(self) -> int:
        return len(self._makers)


def measured_profiles(train_cfg, model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype,  # noqa: ANN001
                      offload: str, root: Path) -> tuple[planner.DeviceProfile, planner.DeviceProfile]:
    """The planner's profile with this machine's rates, measured in a few seconds:
    as the run sees it with AdamW on the host, and on the device (the same profile
    unless the update may run on a GPU)."""
    state = train_cfg.state
    profile = planner.PROFILES["cpu" if device.type == "cpu" else "h100"]
    # Whether this GPU runs the compact formats' fused kernels (their check runs here,
    # once, not in the first backward): their temporaries are a tenth of the ops'.
    profile = planner.replace(profile, fused_update=device.type == "cuda" and use_fused(FORMATS[state], device))
    # The compute rate comes from a short profiling run of one block at this run's
    # micro-batch: a square matmul misses attention, norms and memory-bound kernels
    # (10-20% on a 2-core CPU for gpt3-125m).
    flops = planner.measure_model_flops(model_cfg, device, dtype, train_cfg.batch_size, train_cfg.seq_len)
    # Host copies (staging, gradient writes) at this machine's memcpy rate: a copy of
    # n bytes reads n and writes n. On a CPU device it is also the "link".
    copy = planner.measure_copy_bandwidth(torch.device("cpu"), 64 * 2**20)[0]
    links = {"h2d_bytes_per_s": copy, "d2h_bytes_per_s": copy} if device.type == "cpu" else {}
    if offload != "ram":  # a store the page cache holds moves at the kernel's copy rate
        links["cached_io_bytes_per_s"] = planner.measure_page_cache_rate(existing_parent(root), 64 * 2**20)
    profile = planner.replace(profile, compute_bytes=torch.tensor([], dtype=dtype).element_size(),
                              matmul_flops=flops, host_copy_bytes_per_s=2 * copy, **links)
    on_device = profile
    if train_cfg.update_on != "host" and device.type == "cuda":
        # The update's kernels on this GPU, timed on one chunk (a second at most).
        rate = planner.measure_update_rate(state=state, device=device)
        on_device = planner.with_device_update(profile, state, rate, pipelined=offload == "ram")
    if device.type == "cuda":  # the run's peak memory is its steps', not the probes'
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return profile, on_device


@dataclass(frozen=True)
class RunPlan:
    """What `plan_run` decided for a streamed run, before any store exists."""

    plan: planner.Plan
    update_on: str  # where AdamW runs: host | device
    profile: planner.DeviceProfile  # the machine's measured profile, as the update's place sees it
    offload: str  # ram | disk | split
    ram_units: int | None  # split: the leading units in RAM
    budget: float  # the memory the planner may fill (the device's, or on a CPU the process's share)
    replan: Callable[[int | None], planner.Plan]  # the same run planned with this many held units


def plan_run(train_cfg, model_cfg: ModelConfig, out: Path, device: torch.device, dtype: torch.dtype,  # noqa: ANN001
             world: int = 1) -> RunPlan:
    """A streamed run's plan on this machine, its rates measured in a few seconds: the
    tiers, where AdamW runs (--update-on auto: streamer.planner's [Note: where AdamW
    runs]), prefetch, recompute and held units; refused (a UserError) if it does not fit.
    Writes nothing but a probe file, removed, into the store's disk."""
    state, available = train_cfg.state, planner.host_available(train_cfg.host_memory_gib)
    root = store_root(out, train_cfg.store_dir)
    offload = planner.choose_offload(model_cfg, available, store_free_bytes(root), train_cfg.offload, state)
    ram_units = planner.split_ram_units(model_cfg, available, state) if offload == "split" else None
    host_profile, on_device = measured_profiles(train_cfg, model_cfg, device, dtype, offload, root)
    if device.type == "cuda":
        budget = 0.8 * torch.cuda.get_device_properties(device).total_memory
    else:  # half of what the RAM tier leaves
        counts = planner.unit_param_counts(model_cfg)
        in_ram = sum(counts[: planner.units_in_ram(len(counts), offload, ram_units)])
        budget = 0.5 * available - planner.state_bytes(state)[0] * in_ram
    micro = train_cfg.batch_size * train_cfg.seq_len

    def plan_with(held: int | None, place: str) -> planner.Plan:
        profile = on_device if place == "device" else host_profile
        if train_cfg.max_memory_gib:
            return planner.fit_memory(model_cfg, profile, train_cfg.tokens_per_step(), train_cfg.seq_len,
                                      offload, micro, train_cfg.max_memory_gib * 2**30, train_cfg.prefetch_depth,
                                      train_cfg.recompute, state, ram_units, held)
        return planner.make_plan(model_cfg, profile, train_cfg.tokens_per_step(), train_cfg.seq_len, offload,
                                 micro_tokens=micro, prefetch_depth=train_cfg.prefetch_depth,
                                 memory_budget=budget, recompute=train_cfg.recompute, state=state,
                                 ram_units=ram_units, held_units=held)

    held, update_on = train_cfg.held_units, train_cfg.update_on
    plans: dict[str, planner.Plan] = {}  # auto's plans, one of which the run then runs
    if update_on == "auto":  # see streamer.planner's [Note: where AdamW runs]
        update_on = "device" if held else "host"
        if device.type == "cuda" and not held:
            for place in ("host", "device"):
                with contextlib.suppress(UserError):  # this place's plan does not fit --max-memory
                    plans[place] = plan_with(held if world == 1 else 0, place)
            update_on = planner.faster_update_place(plans)  # neither fits: the host's plan says why, below
    profile = on_device if update_on == "device" else host_profile
    planner.check_held_units(model_cfg, held, update_on,
                             planner.units_in_ram(model_cfg.n_layer + 2, offload, ram_units))
    # Held updates take the whole gradient: one process only (the launcher refuses
    # --held-units with several before any starts).
    plan = plans.get(update_on) or plan_with(held if world == 1 else 0, update_on)
    return RunPlan(plan, update_on, profile, offload, ram_units, budget, lambda held: plan_with(held, update_on))


class StreamEngine:
    def __init__(self, model_cfg: ModelConfig, optim: OptimConfig, store: HostStore, device: torch.device,
                 dtype: torch.dtype, prefetch_depth: int, predicted_step_s: float = 0.0,
                 recompute: bool = True, dp: DataParallel | None = None, kept_graphs: int | None = None,
                 update_on: str = "host", early_updates: bool = False, held_units: int = 0,
                 separator: int | None = None) -> None:
        self.cfg, self.optim, self.store = model_cfg, optim, store
        # Attention within documents, each ended by this token ([Note: documents in a
        # window] in models/gpt.py); None: across the whole window.
        self.separator = separator
        self.step_ids: list[torch.Tensor] = []  # the step's token ids, one tensor per micro-batch
        # Where AdamW runs: on the host beside the store, or on the compute device, which
        # decodes and re-codes a compact state far faster than host cores (the chunks
        # travel both ways over the link; the host then only copies).
        self.update_device = device if update_on == "device" else torch.device("cpu")
        self.dp = dp or DataParallel()
        if device.type == "cuda" and device.index is None:
            # An explicit index: tensors report "cuda:0", and the weight hooks compare devices.
            device = torch.device("cuda", torch.cuda.current_device())
        self.device, self.dtype, self.depth = device, dtype, prefetch_depth
        self.predicted_step_s = predicted_step_s
        # Re-plans with measured rates (set by `create`); see `_calibrate`.
        self.replan = None
        self.store_root: Path | None = None  # a disk tier's folder, removed on close (set by `create`)
        self.prediction = "profile"  # where predicted_step_s comes from: profile | calibrated
        self.fastest_update_s = math.inf  # the host update's best time so far (see `_calibrate`)
        self.store_cached = False  # whether the page cache holds the store's disk part (set by `create`)
        self._choose_graphs(model_cfg.n_layer, recompute, kept_graphs)
        with torch.device("meta"):
            self.modules = [build_unit(model_cfg, i) for i in range(model_cfg.n_layer + 2)]
        self.layouts = store.layouts
        self.n_units = len(self.layouts)
        self.tied = model_cfg.tie_embeddings
        sizes = self._allocate_buffers(prefetch_depth)
        self._make_streams(sizes, held_units)
        self.free_slots = list(range(prefetch_depth + 1))
        self.state = [UnitState.HOME] * self.n_units
        self.slot_of: list[int | None] = [None] * self.n_units
        self.pins = [0] * self.n_units
        self.staged: list[Future | None] = [None] * self.n_units
        self.grad_futures: list[Future | None] = [None, None]
        self._views: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._make_workers(store, early_updates)
        self._init_held(store, held_units)
        self.batch_rows: torch.Tensor | None = None  # token ids of this step, for the sparse path
        self.pending: PendingUpdate | None = None
        self.update_due = [False] * self.n_units
        self.adam_step = 0
        self._init_counters(store)

    def _choose_graphs(self, n_layer: int, recompute: bool, kept_graphs: int | None) -> None:
        """Which units keep their autograd graphs. Recompute keeps only unit-boundary
        activations and runs each unit's forward again in backward; without it each
        unit's graph is kept (weights excluded, see `_weight_hooks`): a third less
        compute, far more activation memory. `kept_graphs` blocks, the last ones, keep
        their graphs and the others recompute (the planner fits the count to memory);
        by default all or none, by `recompute`."""
        kept = (0 if recompute else n_layer) if kept_graphs is None else min(kept_graphs, n_layer)
        self.kept_graphs = kept
        self.keeps_graph = {u: (n_layer + 1 - kept <= u <= n_layer) or (kept == n_layer and u == 0)
                            for u in range(n_layer + 2)}
        self.recompute = kept < n_layer

    def _init_counters(self, store: HostStore) -> None:
        """The time and bytes a step reports (`StepStats`), zero."""
        self._counter_lock = threading.Lock()  # the lane, the worker and the step add time and bytes
        # Update seconds since the run began, and up to the last step's end: a step's own
        # share is the difference (the lane's updates for the next step start before the
        # last step's metrics are written, so a per-step counter would split them).
        self.update_s_total = self._update_s_seen = 0.0
        # Bytes an update on the device moves (state in, updated state out), likewise.
        self.update_bytes_total, self._update_bytes_seen = [0, 0], [0, 0]
        self.counters = {"bytes_in": 0, "bytes_out": 0, "stall_s": 0.0, "update_s": 0.0,
                         "forward_s": 0.0, "backward_s": 0.0, "h2d_busy_s": 0.0, "h2d_bytes": 0}
        # On CUDA, (start, end, bytes) of each host-to-device copy this step: the link's
        # rate while it copies, which the step's average (`link_gbps`) does not show.
        self.link_timings: list[tuple] = []
        self.io_before = store.io_seconds()
        self.io_step: dict[str, float] = {}

    def _allocate_buffers(self, prefetch_depth: int) -> list[int]:
        """The device's weight slots and gradient buffers (and on CUDA the page-locked
        host buffers behind them), allocated once; returns the slots' sizes."""
        device, dtype, cuda = self.device, self.dtype, self.device.type == "cuda"
        # A tied table stays resident all step in a slot of its own, sized for it; the
        # K + 1 ring slots that hold the prefetch window are sized for the other units.
        ring_units = range(1, self.n_units) if self.tied else range(self.n_units)
        # Buffers hold a unit plus the padding that makes it divide into equal shards.
        ring_numel = max(self.dp.padded(self.layouts[u].numel) for u in ring_units)
        tied_numel = self.dp.padded(self.layouts[0].numel)
        sizes = [ring_numel] * (prefetch_depth + 1) + ([tied_numel] if self.tied else [])
        self.tied_slot = len(sizes) - 1 if self.tied else None
        self.slots = [torch.empty(n, dtype=dtype, device=device) for n in sizes]
        # On CUDA the worker stages into pinned host buffers (one per slot, allocated
        # once) so the host-to-device copy can run asynchronously at full link speed.
        # A page-locked RAM tier copies straight from the store and never stages, so
        # they are allocated at first use: at 20B they would pin 7 GiB for nothing.
        pinned = functools.partial(torch.empty, pin_memory=True)
        self.staging = OnFirstUse([functools.partial(pinned, n, dtype=dtype) for n in sizes]) if cuda else None
        # Two gradient buffers: one fills while the other drains to the host. A tied
        # table accumulates in its own buffer (head and embedding both add to it).
        self.grad_buffers = [torch.zeros(ring_numel, device=device) for _ in range(2)]
        self.grad_host = OnFirstUse([functools.partial(pinned, ring_numel)] * 2) if cuda else None
        self.tied_grad = torch.zeros(tied_numel, device=device) if self.tied else None
        self.tied_grad_host = OnFirstUse([functools.partial(pinned, tied_numel)]) if (cuda and self.tied) else None
        # The squared norm of this rank's reduced gradient shards, summed by whichever
        # thread reduces them (the host worker on CPU, the grad stream on CUDA).
        self.shard_sq_norm = torch.zeros((), dtype=torch.float64, device=device)
        return sizes

    def _make_streams(self, sizes: list[int], held_units: int) -> None:
        """CUDA streams and events, allocated once (None on a CPU device)."""
        device, cuda = self.device, self.device.type == "cuda"
        # Copies run on their own streams so they overlap compute on the default stream.
        self.copy_stream = torch.cuda.Stream(device) if cuda else None  # host -> device weights
        # A page-locked unit's updates on the device alternate chunks between the copy
        # stream and this one: one chunk's kernels overlap the next one's copy in and the
        # last one's copy out (see `_stage`).
        self.update_stream = torch.cuda.Stream(device) if cuda else None
        self.grad_stream = torch.cuda.Stream(device) if cuda else None  # device -> host gradients
        # Held units' updates (see [Note: updates held on the device]) on a stream of their
        # own: the other units' updates, on the two above, do not queue behind them.
        self.held_stream = torch.cuda.Stream(device) if cuda and held_units else None
        self.slot_free_events = [torch.cuda.Event() for _ in sizes] if cuda else None
        self.copy_done_events = [torch.cuda.Event() for _ in sizes] if cuda else None
        # Timing events for device-side stalls, two per visit, allocated once.
        n_visits = 2 * self.n_units
        self.ready_events = [torch.cuda.Event(enable_timing=True) for _ in range(n_visits)] if cuda else None
        self.resumed_events = [torch.cuda.Event(enable_timing=True) for _ in range(n_visits)] if cuda else None
        self.waits: list[tuple] = []
        self.grad_events = [torch.cuda.Event() for _ in range(3)] if cuda else None
        # Per unit, the last direct copy out of a page-locked store: a host update of the
        # unit waits for it before it writes those buffers.
        self.store_read_events = [torch.cuda.Event() for _ in self.layouts] if cuda else None

    def _make_workers(self, store: HostStore, early_updates: bool) -> None:
        """The host threads that stage, update and write gradients (or, without threads,
        the caller's own), and the lane that updates the disk units early."""
        device, cuda = self.device, self.device.type == "cuda"
        # One host worker: staging, updates and gradient writes run in FIFO order, so
        # a unit is always updated before it is staged and never read mid-write.
        # Without threads (see [Note: no worker thread on a CPU device]) the same queue
        # runs on the caller's thread.
        host_threads = planner.host_threads(device.type == "cpu", isinstance(store, RamStore))
        self.worker = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamer-host") if host_threads
                       else InlineWorker())
        # Gradient writes may go to a second thread, so a disk tier writes gradients while
        # it reads the next units. Under data parallelism both kinds of job issue
        # collectives, which every rank must issue in the same order: one thread then.
        self.grad_worker = (self.worker if self.dp.world > 1 or not host_threads
                            else ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamer-grad"))
        # See [Note: early updates of the disk part].
        self.early_units = [u for u in range(self.n_units) if store.on_disk(u)] if early_updates else []
        self.lane = (ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamer-early")
                     if self.early_units else None)
        self.lane_stream = torch.cuda.Stream(device) if cuda and self.early_units else None
        self.early: dict[int, Future] = {}  # unit -> its update running on the lane

    def _init_held(self, store: HostStore, held_units: int) -> None:
        """The bookkeeping of units held for their update on the device."""
        cuda = self.device.type == "cuda"
        # See [Note: updates held on the device]. On a CPU device (tests) the same
        # bookkeeping runs with host copies and the host's update.
        self.held_units = held_units
        if held_units:
            assert self.dp.world == 1, "held updates take the whole gradient: one process only"
            assert held_units < self.n_units, "the head is never held"
            assert not any(store.on_disk(u) for u in range(held_units)), "held units live in RAM"
            on_gpu = self.update_device.type == "cuda" and all(store.pinned(u) for u in range(held_units))
            assert on_gpu or not cuda, "on a GPU, held units update there, from a page-locked RAM tier"
        self.held: dict[int, dict[str, torch.Tensor]] = {}  # unit -> its whole state, waiting for the update
        self.held_fetched: dict[int, torch.cuda.Event] = {}  # unit -> its state is on the device
        self.held_coded: dict[int, torch.cuda.Event] = {}  # unit -> its gradient is coded (before the fetch)
        self.fetching: list[Future] = []  # this step's fetch jobs, issued by the worker before the step ends
        # Per unit, the copy of its updated state back into the store: whatever reads
        # the store next (the backward's weights, the next fetch, a checkpoint) waits.
        self.held_written: list[torch.cuda.Event | None] = [None] * self.n_units

    # --- construction ------------------------------------------------------------

    @classmethod
    def create(cls, train_cfg, model_cfg: ModelConfig, optim: OptimConfig, out: Path,  # noqa: ANN001
               device: torch.device, dtype: torch.dtype, initialise: bool = True,
               pretrained: Pretrained | None = None, separator: int | None = None) -> StreamEngine:
        """Plan the run, refuse it if it does not fit, and initialise the host store, at
        random or from `pretrained` (or, with `initialise=False`, only allocate it: a
        checkpoint will fill it)."""

        planning = time.perf_counter()
        dp = DataParallel(train_cfg.grad_sync)
        run = plan_run(train_cfg, model_cfg, out, device, dtype, dp.world)
        plan, profile, offload, ram_units, update_on = run.plan, run.profile, run.offload, run.ram_units, run.update_on
        state, root = train_cfg.state, store_root(out, train_cfg.store_dir)
        with torch.device("meta"):
            layouts = [UnitLayout.of(i, build_unit(model_cfg, i)) for i in range(model_cfg.n_layer + 2)]
        owned = [(dp.shard(lay.numel).start, dp.shard(lay.numel).stop) for lay in layouts]
        folder = store_folder(root, dp.rank, dp.world)
        fmt = FORMATS[state]
        pin = device.type == "cuda"  # see streamer.store's [Note: page-locking the RAM tier]
        # Start-up is reported (run.json): for a 20B state it is minutes, not seconds.
        started = time.perf_counter()
        store = {"ram": lambda: RamStore(layouts, owned, fmt, pin),
                 "disk": lambda: DiskStore(layouts, folder, owned, fmt),
                 "split": lambda: SplitStore(layouts, folder, ram_units, owned, fmt, pin)}[offload]()
        startup = {"plan_s": started - planning, "store_s": time.perf_counter() - started}  # plan: its probes
        ram = store.ram if isinstance(store, SplitStore) else store
        if isinstance(ram, RamStore):
            startup["page_lock_s"] = ram.page_lock_s
        if plan.held_units and device.type == "cuda" and not all(store.pinned(u) for u in range(plan.held_units)):
            # A refused page-lock leaves nothing to copy from asynchronously: no held units.
            plan = run.replan(0)
        started = time.perf_counter()
        if initialise:
            initialise_store(store, layouts, model_cfg, train_cfg.seed, pretrained=pretrained)
        else:
            for i in range(len(layouts)):
                store.allocate(i)
        startup["initialise_s" if initialise else "allocate_s"] = time.perf_counter() - started
        engine = cls(model_cfg, optim, store, device, dtype, plan.prefetch_depth, plan.predicted_step_s,
                     dp=dp, kept_graphs=plan.kept_graphs, update_on=update_on,
                     early_updates=plan.early_updates, held_units=plan.held_units, separator=separator)
        engine.offload = offload
        engine.update_on = update_on
        engine.store_root = root if offload != "ram" else None
        engine.plan = plan
        # Whether the RAM tier's page-locking took: refused, the run is correct but its
        # copies stage at a lower rate, which its results must say.
        engine.page_locked = isinstance(ram, RamStore) and bool(ram.locked)
        engine.startup = startup
        engine.store_cached = offload != "ram" and planner.store_cached(model_cfg, profile, offload, state, ram_units)
        engine.predicted_peak_bytes = planner.peak_bytes(plan, profile)
        engine.replan = lambda rates: planner.make_plan(
            model_cfg, planner.replace(profile, **rates), train_cfg.tokens_per_step(), train_cfg.seq_len, offload,
            micro_tokens=train_cfg.batch_size * train_cfg.seq_len, prefetch_depth=plan.prefetch_depth,
            memory_budget=run.budget, kept_graphs=plan.kept_graphs, state=state, ram_units=ram_units,
            early_updates=plan.early_updates, held_units=plan.held_units, recommend=False).predicted_step_s
        return engine

    # --- unit state and transfers ------------------------------------------------

    def _transition(self, unit: int, new: UnitState) -> None:
        old = self.state[unit]
        assert new in _TRANSITIONS[old], f"unit {unit}: illegal transition {old.value} -> {new.value}"
        self.state[unit] = new

    def acquire(self, unit: int) -> None:
        """Pin `unit` for a visit; issue its transfer unless it is already here or coming."""
        self.pins[unit] += 1
        if self.state[unit] in (UnitState.IN_FLIGHT, UnitState.RESIDENT):
            return
        self._transition(unit, UnitState.IN_FLIGHT)
        slot = self.tied_slot if (self.tied and unit == 0) else self.free_slots.pop()
        self.slot_of[unit] = slot
        # Ask the kernel to start reading the unit's files now; the worker reads them later.
        self.store.advise(unit, BUFFERS if self.update_due[unit] else ("param",))
        # Decided before the worker takes the held state: on a GPU its update writes the
        # slot from state already there, and nothing crosses.
        held = self.update_due[unit] and unit in self.held and self.grad_host is not None
        self.staged[unit] = self.worker.submit(self._stage, unit, slot)
        if held:
            return
        with self._counter_lock:  # the worker adds an on-device update's bytes
            self.counters["bytes_in"] += self.layouts[unit].numel * self._weight_bytes(unit)

    def _weight_bytes(self, unit: int) -> int:
        """Bytes per element of a unit's weights on their way in: from a page-locked store
        as the master weights are kept (cast on the device), else in the compute dtype."""
        if self.device.type == "cuda" and self.store.pinned(unit):
            return self.store.format.buffer("param").itemsize
        return self.slots[0].element_size()

    def wait(self, unit: int) -> torch.Tensor:
        """Block until `unit`'s weights are usable on the device; returns its slot buffer."""
        if self.state[unit] == UnitState.IN_FLIGHT:
            started = time.perf_counter()
            self.staged[unit].result()
            self.staged[unit] = None
            slot = self.slot_of[unit]
            # Host time blocked on the worker counts as stall (an upper bound on CUDA,
            # where the device may still be busy with queued work meanwhile).
            self.counters["stall_s"] += time.perf_counter() - started
            if self.copy_done_events is not None:
                # The device, not the host, waits for the copy. To measure that wait, mark
                # when compute was ready and when it resumed; see `_device_stall_s`.
                stream = torch.cuda.current_stream(self.device)
                ready, resumed = self.ready_events[len(self.waits)], self.resumed_events[len(self.waits)]
                ready.record(stream)
                stream.wait_event(self.copy_done_events[slot])
                resumed.record(stream)
                self.waits.append((ready, resumed))
            self._transition(unit, UnitState.RESIDENT)
        assert self.state[unit] == UnitState.RESIDENT, f"unit {unit} waited on while {self.state[unit].value}"
        return self.slots[self.slot_of[unit]]

    def release(self, unit: int) -> None:
        """Unpin after a visit; the slot returns to the pool when no visit needs it."""
        assert self.pins[unit] > 0, f"unit {unit} released more often than acquired"
        self.pins[unit] -= 1
        if self.pins[unit]:
            return
        self._transition(unit, UnitState.RELEASED)
        slot = self.slot_of[unit]
        if self.slot_free_events is not None:
            # The next copy into this slot must wait for the kernels that read it.
            self.slot_free_events[slot].record(torch.cuda.current_stream(self.device))
        self.slot_of[unit] = None
        if slot != self.tied_slot:
            self.free_slots.append(slot)

    @contextlib.contextmanager
    def _link_timed(self, stream: torch.cuda.Stream, nbytes: int):  # noqa: ANN202 - a context manager
        """Time the host-to-device copies enqueued inside on `stream` with a pair of
        events; `_finish_step` reads them once the device is synchronised."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        yield
        end.record(stream)
        with self._counter_lock:
            self.link_timings.append((start, end, nbytes))

    def _stage(self, unit: int, slot: int) -> None:
        """Host worker: apply a due update, then copy the weights towards the device,
        a chunk at a time (see `HostStore.chunks`).

        On CUDA the weights reach the slot in one of three ways: an update on the
        device writes them there itself; a page-locked store is copied from directly;
        other host memory (the disk tier's chunk buffers) goes through the slot's
        pinned staging buffer."""
        early = self.early.pop(unit, None)
        if early is not None:
            early.result()  # the unit's update ran on the lane; read its new weights
        if self.update_due[unit] and unit in self.held:
            self._update_held(unit, slot)
            return
        if self.staging is None:  # a CPU device computes from the slot the worker fills
            self._stage_on_cpu(unit, slot)
        else:
            self._stage_on_cuda(unit, slot)

    def _stage_on_cpu(self, unit: int, slot: int) -> None:
        """`_stage` for a CPU device: the update's chunks, each copied into the slot."""
        numel, first = self.layouts[unit].numel, self.store.owned[unit][0]
        due = self.update_due[unit]
        read, write = (BUFFERS, UPDATED) if due else (("param",), ())
        for start, stop, buffers in self.store.stream(unit, read, write):
            if due:
                self._update_chunk(unit, start, stop, buffers)
            self.slots[slot][first + start : first + stop].copy_(buffers["param"])  # casts to the compute dtype
        self.update_due[unit] = False
        self.dp.gather_weights(self.slots[slot], numel)

    def _stage_on_cuda(self, unit: int, slot: int) -> None:
        """`_stage` for a CUDA device: the chunks' update on the host or the device, and
        their way into the slot, directly or through the staging buffer."""
        numel, first = self.layouts[unit].numel, self.store.owned[unit][0]
        due = self.update_due[unit]
        read, write = (BUFFERS, UPDATED) if due else (("param",), ())
        torch.cuda.set_device(self.device)  # this thread's CUDA calls go to our device
        on_device = due and self.update_device.type == "cuda"
        direct = on_device or self.store.pinned(unit)
        # A page-locked unit's chunks need no wait between them, so consecutive chunks go
        # to two streams and overlap; a disk tier's buffers are committed chunk by chunk.
        streams = (self.copy_stream, self.update_stream) if on_device and self.store.pinned(unit) else None
        if self.held_written[unit] is not None:  # the store's copy of a held unit's last update
            self.copy_stream.wait_event(self.held_written[unit])
            if streams:
                self.update_stream.wait_event(self.held_written[unit])
        if direct:
            # Writes into the slot wait for the kernels that still read its previous unit.
            self.copy_stream.wait_event(self.slot_free_events[slot])
            if streams:
                self.update_stream.wait_event(self.slot_free_events[slot])
        else:
            self.copy_done_events[slot].synchronize()  # the previous copy out of the staging buffer is done
        for k, (start, stop, buffers) in enumerate(self.store.stream(unit, read, write)):
            into = slice(first + start, first + stop)
            if on_device:
                self._update_chunk(unit, start, stop, buffers, weights=self.slots[slot][into],
                                   stream=streams[k % 2] if streams else None)
                continue
            if due:
                self._update_chunk(unit, start, stop, buffers)
            if direct:
                nbytes = buffers["param"].numel() * buffers["param"].element_size()
                with torch.cuda.stream(self.copy_stream), self._link_timed(self.copy_stream, nbytes):
                    self.slots[slot][into].copy_(buffers["param"], non_blocking=True)
            else:
                self.staging[slot][into].copy_(buffers["param"])
        if streams:  # the copy stream's events below then cover both streams' work
            self.copy_stream.wait_stream(self.update_stream)
        if on_device:
            self._await_update(unit, self.copy_stream)
        self.update_due[unit] = False
        lo, hi = self.store.owned[unit]
        with torch.cuda.stream(self.copy_stream):
            if not direct:
                self.copy_stream.wait_event(self.slot_free_events[slot])
                with self._link_timed(self.copy_stream, (hi - lo) * self.staging[slot].element_size()):
                    self.slots[slot][lo:hi].copy_(self.staging[slot][lo:hi], non_blocking=True)
            self.dp.gather_weights(self.slots[slot], numel)
            self.copy_done_events[slot].record(self.copy_stream)
            if direct:
                self.store_read_events[unit].record(self.copy_stream)

    def _update_chunk(self, unit: int, start: int, stop: int, buffers: dict[str, torch.Tensor],
                      weights: torch.Tensor | None = None, stream: torch.cuda.Stream | None = None) -> None:
        """AdamW, in place, on elements [start, stop) of a unit's owned part.

        With `update_on="device"` the chunk's state crosses the link, is updated on the
        copy stream (beside the compute, not queued behind it) and crosses back; the
        updated weights also go straight into `weights` (the unit's slot) when given,
        so the forward that needs them does not fetch them again."""
        started = time.perf_counter()
        fmt, settings = self.store.format, self._update_settings(unit, start, stop)
        if self.update_device.type == "cpu":
            if self.store_read_events is not None:
                self.store_read_events[unit].synchronize()  # no copy out of these buffers is still reading
            fmt.update_(buffers, **settings)
        else:
            torch.cuda.set_device(self.device)  # `flush` may be this thread's first CUDA work
            stream = stream or self.copy_stream
            nbytes = sum(buffer.numel() * buffer.element_size() for buffer in buffers.values())
            with torch.cuda.stream(stream):
                with self._link_timed(stream, nbytes):
                    work = {name: buffer.to(self.update_device, non_blocking=True)
                            for name, buffer in buffers.items()}
                fmt.update_(work, **settings)
                if weights is not None:
                    weights.copy_(work["param"])  # casts to the compute dtype
                for name in fmt.expand(UPDATED):
                    buffers[name].copy_(work[name], non_blocking=True)
                if not self.store.pinned(unit):  # the store commits these buffers next (a disk tier writes them)
                    stream.synchronize()
                # A page-locked unit's chunks follow each other with no wait (nothing on the
                # host reads them before its next update); `_await_update` waits for the last.
            # The link carried the whole state in and the updated state out; the weights
            # that went into the slot were counted when the visit was issued.
            counted = (stop - start) * self._weight_bytes(unit) if weights is not None else 0
            with self._counter_lock:  # totals, as update time: the lane's run across a step's end
                self.update_bytes_total[0] += nbytes - counted
                self.update_bytes_total[1] += sum(buffers[n].numel() * buffers[n].element_size()
                                                  for n in fmt.expand(UPDATED))
        with self._counter_lock:
            self.update_s_total += time.perf_counter() - started

    def _update_settings(self, unit: int, start: int, stop: int) -> dict:
        """What AdamW needs for elements [start, stop) of a unit's owned part."""
        update = self.pending
        first = self.store.owned[unit][0] + start  # the chunk's offset within the whole unit
        decay_numel = min(max(self.layouts[unit].decay_numel - first, 0), stop - start)
        # The compact format's stochastic rounding draws from a seed fixed by the step and
        # the chunk's place in the model, so a resumed run rounds exactly as an unbroken one.
        return dict(step=update.adam_step, lr=update.lr, cfg=self.optim, decay_numel=decay_numel,
                    grad_scale=update.grad_scale, seed=hash((update.adam_step, unit, first)))

    # --- held updates (see [Note: updates held on the device]) -------------------------

    def _hold(self, unit: int, grad: torch.Tensor, buffer_index: int | None) -> None:
        """A held unit's backward is done: code its gradient into a buffer of its own on
        the device, and have the worker bring the rest of its state after it."""
        fmt, numel = self.store.format, self.store.owned_numel(unit)
        spec = {n: fmt.buffer(n) for n in fmt.expand(("grad",))}
        if self.grad_host is None:  # a CPU device: the gradient worker codes it, in order with the others
            state = {n: torch.empty(b.numel(numel), dtype=b.dtype) for n, b in spec.items()}
            self.held[unit] = state
            future = self.grad_worker.submit(lambda: fmt.store_grad(self._reduce(unit, grad)[:numel], state))
            self.fetching.append(self.worker.submit(self._fetch_held, unit))
            if buffer_index is None:
                future.result()
            else:
                self.grad_futures[buffer_index] = future
            return
        event = self.grad_events[2 if buffer_index is None else buffer_index]
        self.grad_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.grad_stream):
            state = {n: torch.empty(b.numel(numel), dtype=b.dtype, device=self.device) for n, b in spec.items()}
            fmt.store_grad(self._reduce(unit, grad)[:numel], state)
            event.record(self.grad_stream)
            # Its own event (the buffer's is recorded again for later units): the fetch
            # waits for it, so the update, which waits for the fetch, reads a whole gradient.
            coded = torch.cuda.Event()
            coded.record(self.grad_stream)
        self.held[unit] = state
        self.held_coded[unit] = coded
        self.fetching.append(self.worker.submit(self._fetch_held, unit))
        # The gradient buffer is refilled once the coding has read it.
        if buffer_index is None:
            event.synchronize()
        else:
            self.grad_futures[buffer_index] = self.grad_worker.submit(event.synchronize)

    def _fetch_held(self, unit: int) -> None:
        """Host worker: a held unit's weights and moments, whole, towards the device."""
        state, numel = self.held[unit], self.store.owned_numel(unit)
        names = self.store.format.expand(UPDATED)
        source = self.store.open(unit, names, 0, numel)
        nbytes = sum(t.numel() * t.element_size() for t in source.values())
        if self.grad_host is None:
            state.update({n: t.clone() for n, t in source.items()})
        else:
            torch.cuda.set_device(self.device)
            self.copy_stream.wait_event(self.held_coded.pop(unit))
            if self.held_written[unit] is not None:  # its last update's state is back in the store
                self.copy_stream.wait_event(self.held_written[unit])
            with torch.cuda.stream(self.copy_stream), self._link_timed(self.copy_stream, nbytes):
                state.update({n: t.to(self.device, non_blocking=True) for n, t in source.items()})
            fetched = torch.cuda.Event()
            fetched.record(self.copy_stream)
            self.held_fetched[unit] = fetched
        if self.grad_host is not None:  # what crossed the link (a CPU device has none)
            with self._counter_lock:
                self.update_bytes_total[0] += nbytes

    def _update_held(self, unit: int, slot: int | None) -> None:
        """Host worker: a held unit's due update, from its state on the device, into
        `slot` (None from `flush`: the store only); the new state goes back to the store."""
        started = time.perf_counter()
        state, fmt = self.held.pop(unit), self.store.format
        numel, first = self.store.owned_numel(unit), self.store.owned[unit][0]
        names = fmt.expand(UPDATED)

        def chunk(start: int, stop: int) -> dict[str, torch.Tensor]:
            return {n: fmt.part(n, t, start, stop) for n, t in state.items()}

        if self.grad_host is None:
            for start, stop in self.store.chunks(unit):
                fmt.update_(chunk(start, stop), **self._update_settings(unit, start, stop))
            target = self.store.open(unit, names, 0, numel)
            for n in names:
                target[n].copy_(state[n])
            self.store.commit(unit, names, 0, numel)
            if slot is not None:
                self.slots[slot][first : first + numel].copy_(state["param"])  # casts to the compute dtype
        else:
            torch.cuda.set_device(self.device)
            stream = self.held_stream
            stream.wait_event(self.held_fetched.pop(unit))
            if slot is not None:  # its kernels write the slot once the last unit's are done with it
                stream.wait_event(self.slot_free_events[slot])
            with torch.cuda.stream(stream):
                for start, stop in self.store.chunks(unit):
                    fmt.update_(chunk(start, stop), **self._update_settings(unit, start, stop))
                if slot is not None:
                    self.slots[slot][first : first + numel].copy_(state["param"])
                    self.copy_done_events[slot].record(stream)
            # Back to the store on the gradient stream (device to host), beside the other
            # units' updated states.
            self.grad_stream.wait_stream(stream)
            target = self.store.open(unit, names, 0, numel)
            with torch.cuda.stream(self.grad_stream):
                for n in names:
                    target[n].copy_(state[n], non_blocking=True)
                written = torch.cuda.Event()
                written.record(self.grad_stream)
            self.held_written[unit] = written
            for t in state.values():  # freed once both streams are done with them, not before
                t.record_stream(stream)
                t.record_stream(self.grad_stream)
        with self._counter_lock:
            if self.grad_host is not None:
                self.update_bytes_total[1] += sum(state[n].numel() * state[n].element_size() for n in names)
            self.update_s_total += time.perf_counter() - started
        self.update_due[unit] = False

    def _await_update(self, unit: int, stream: torch.cuda.Stream) -> None:
        """Wait for a page-locked unit's updates on the device to finish: the update's time
        is then the device's, and the worker runs at most a unit ahead of it."""
        if self.update_device.type == "cuda" and self.store.pinned(unit):
            started = time.perf_counter()
            stream.synchronize()
            with self._counter_lock:
                self.update_s_total += time.perf_counter() - started

    def _apply_update(self, unit: int) -> None:
        for start, stop, buffers in self.store.stream(unit, BUFFERS, UPDATED):
            self._update_chunk(unit, start, stop, buffers)
        self._await_update(unit, self.copy_stream)
        self.store.settle()
        self.update_due[unit] = False

    def _early_update(self, unit: int) -> None:
        """The lane: a disk unit's due update, written back; its staging reads the
        weights again (see [Note: early updates of the disk part])."""
        for start, stop, buffers in self.store.stream(unit, BUFFERS, UPDATED, lane=1):
            self._update_chunk(unit, start, stop, buffers, stream=self.lane_stream)
        if self.lane_stream is not None:
            self._await_update(unit, self.lane_stream)
        self.update_due[unit] = False

    def _start_early_updates(self) -> None:
        for unit in self.early_units:
            self.early[unit] = self.lane.submit(self._early_update, unit)

    def _wait_early_updates(self) -> None:
        """Wait for the lane's updates (each one's error is raised here, the first first)."""
        early, self.early = self.early, {}
        for future in early.values():
            future.exception()
        for future in early.values():
            future.result()

    def _sparse_rows(self, unit: int) -> tuple[int, int] | None:
        """(rows, cols) when the unit's gradient is row-sparse: an untied token table
        (a tied one also takes the head's dense gradient)."""
        names = [t.name for t in self.layouts[unit].tensors]
        if unit == 0 and not self.tied and names == ["wte.weight"]:
            return self.layouts[0].tensors[0].shape
        return None

    def _reduce(self, unit: int, grad: torch.Tensor) -> torch.Tensor:
        """Average the unit's gradient over ranks and add its shard to the norm."""
        sparse = self._sparse_rows(unit)
        shard = self.dp.reduce_grad(grad, self.layouts[unit].numel, sparse, self.batch_rows if sparse else None)
        self.shard_sq_norm += squared_norm(shard)
        return shard

    def emit_grad(self, unit: int, grad: torch.Tensor, buffer_index: int | None) -> None:
        """Reduce a unit's gradient across ranks and stream this rank's shard out; the
        host worker writes it into the store.

        `buffer_index` names the double-buffered slot the gradient came from; None means
        the tied table's own buffer, which is written out synchronously at step end."""
        # The bytes that leave: float32, or on CUDA as the format keeps the gradient
        # when the device casts or codes it (bf16: 2 bytes, compact8: about 1).
        fmt, target = self.store.format, self.store.grad_target(unit)
        kept = self.grad_host is not None and (target is not None or fmt.codes_grad)
        per_element = fmt.bytes_per_param(("grad",)) if kept else 4
        with self._counter_lock:
            self.counters["bytes_out"] += round(self.store.owned_numel(unit) * per_element)
        if self.grad_host is None:
            future = self.grad_worker.submit(lambda: self.store.write_grad(unit, self._reduce(unit, grad)))
        else:
            if buffer_index is None:
                hosts, k, event = self.tied_grad_host, 0, self.grad_events[2]
            else:
                self._drain(buffer_index)
                hosts, k, event = self.grad_host, buffer_index, self.grad_events[buffer_index]
            # A page-locked store takes the gradient straight from the device, already
            # as it keeps it (bf16 in the compact format, coded on the device in 8 bits
            # in compact8); anything else goes through a pinned float32 buffer that the
            # worker writes out, holding the gradient coded when the format codes it
            # (the host's cores code it ~100x slower than the device).
            staged = host = None
            self.grad_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.grad_stream):
                shard = self._reduce(unit, grad)
                if target is not None:
                    fmt.store_grad(shard[: target["grad"].numel()], target, non_blocking=True)
                elif fmt.codes_grad:
                    staged = fmt.grad_buffers_in(hosts[k], shard.numel())
                    fmt.store_grad(shard, staged, non_blocking=True)
                else:
                    host = hosts[k]
                    host[: shard.numel()].copy_(shard, non_blocking=True)
                event.record(self.grad_stream)

            def write() -> None:
                event.synchronize()
                if target is None:
                    self.store.write_grad(unit, staged if staged is not None else host)

            future = self.grad_worker.submit(write)
        if buffer_index is not None:
            self.grad_futures[buffer_index] = future
        else:
            future.result()

    def _drain(self, k: int) -> None:
        """Wait until gradient buffer k has been written out, so it can be refilled."""
        if self.grad_futures[k] is not None:
            self.grad_futures[k].result()
            self.grad_futures[k] = None

    # --- compute -----------------------------------------------------------------

    def params(self, unit: int) -> dict[str, torch.Tensor]:
        """Leaf views of the unit's weights in its slot, in layout order (cached per slot)."""
        key = (unit, self.slot_of[unit])
        if key not in self._views:
            views = self.layouts[unit].views(self.slots[key[1]])
            self._views[key] = {name: v.requires_grad_() for name, v in views.items()}
        return self._views[key]

    def _tied_weight(self) -> torch.Tensor | None:
        return self.params(0)["wte.weight"] if self.tied else None

    def _run(self, unit: int, params: dict, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """A unit other than the head on one micro-batch, whose token ids are `ids`. With a
        separator, attention stays within documents; their mask is made again for each
        unit (a comparison per pair of positions, little next to the attention), so no
        micro-batch's mask outlives its use."""
        if self.separator is None:
            return functional_call(self.modules[unit], params, (x,))
        return functional_call(self.modules[unit], params, (x,), {"documents": Documents.of(ids, self.separator)})

    def _forward_unit(self, unit: int, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list]:
        """Run every micro-batch through a unit. With recompute, keep only the outputs;
        without, keep each micro-batch's autograd graph for the backward visit."""
        self.wait(unit)
        params = self.params(unit)
        if not self.keeps_graph[unit]:
            with torch.no_grad():
                return [self._run(unit, params, x, ids) for x, ids in zip(inputs, self.step_ids)], []
        outputs, graphs = [], []
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(*self._weight_hooks(unit)):
            for x, ids in zip(inputs, self.step_ids):
                x = x.detach().requires_grad_(unit > 0)  # unit 0 reads token ids
                out = self._run(unit, params, x, ids)
                outputs.append(out.detach())
                graphs.append((x, out, list(params.values())))
        return outputs, graphs

    def _weight_hooks(self, unit: int) -> tuple:
        """Saved-tensor hooks that keep activations but never the unit's weights.

        [Note: backward without recompute]
        Autograd saves weights (or views of them) for the backward matmuls. Keeping them
        would pin the unit's slot until backward and defeat streaming. The pack hook
        replaces any tensor that lives in the unit's slot by its (shape, stride, offset)
        within the slot; the unpack hook rebuilds it from whichever slot holds the unit
        when backward runs. Every layout starts at offset 0 of its slot, so offsets carry
        over between slots.
        """
        slot_ptr = self.slots[self.slot_of[unit]].untyped_storage().data_ptr()

        def pack(t: torch.Tensor):  # noqa: ANN202 - returns a tensor or a weight reference
            if t.device == self.device and t.untyped_storage().data_ptr() == slot_ptr:
                return ("weight", unit, tuple(t.shape), t.stride(), t.storage_offset())
            return t

        def unpack(packed):  # noqa: ANN001, ANN202
            if isinstance(packed, tuple):
                _, owner, shape, stride, offset = packed
                assert self.state[owner] == UnitState.RESIDENT, f"unit {owner} backward while not resident"
                return self.slots[self.slot_of[owner]].as_strided(shape, stride, offset)
            return packed

        return pack, unpack

    def _backward_unit(self, unit: int, inputs: list[torch.Tensor], graphs: list,
                       grad_outputs: list[torch.Tensor], grad: torch.Tensor) -> list[torch.Tensor]:
        """Backpropagate every micro-batch through a unit (recomputing its forward from the
        saved inputs unless the graphs were kept); parameter gradients accumulate into
        the flat `grad` buffer."""
        self.wait(unit)
        grad_views = list(self.layouts[unit].views(grad).values())
        params = None if graphs else self.params(unit)
        grad_inputs = []
        # Each micro-batch's graph, saved input and incoming gradient are dropped as it
        # is used, so the lists going out grow as the lists coming in shrink.
        for i in range(len(grad_outputs)):
            grad_out, grad_outputs[i] = grad_outputs[i], None
            if graphs:
                (x, out, weights), graphs[i] = graphs[i], None
            else:
                # Recomputed one micro-batch at a time, just before its backward: one
                # micro-batch's graph is alive, as the planner's memory model has it (all
                # 24 of a 20B step at once would add 10 GB).
                x, inputs[i] = inputs[i].detach().requires_grad_(unit > 0), None
                with torch.enable_grad():
                    out = self._run(unit, params, x, self.step_ids[i])
                weights = list(params.values())
            wrt = [*weights, *([x] if unit > 0 else [])]
            grads = torch.autograd.grad(out, wrt, grad_outputs=grad_out)
            for acc, g in zip(grad_views, grads):
                acc.add_(g)
            grad_inputs.append(grads[-1] if unit > 0 else None)
        return grad_inputs

    def _head_unit(self, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                   grad: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Forward, loss and backward of the head in one visit (see the note above)."""
        head = self.n_units - 1
        self.wait(head)
        params = self.params(head)
        grad_views = list(self.layouts[head].views(grad).values())
        tied = self._tied_weight()
        tied_grad = self.layouts[0].views(self.tied_grad)["wte.weight"] if self.tied else None
        losses, grad_inputs = [], []
        for x, y in zip(inputs, targets):
            x = x.detach().requires_grad_()
            with torch.enable_grad():
                loss = loss_fn(functional_call(self.modules[head], params, (x, tied)), y)
            wrt = [*params.values(), *([tied] if self.tied else []), x]
            # Each micro-batch's loss is divided by their number, as resident
            # accumulation does, so gradients sum to the step's mean-loss gradient.
            grads = torch.autograd.grad(loss / len(inputs), wrt)
            for acc, g in zip(grad_views, grads):
                acc.add_(g)
            if self.tied:
                tied_grad.add_(grads[len(grad_views)])
            losses.append(loss.detach())
            grad_inputs.append(grads[-1])
        return losses, grad_inputs

    # --- the step ----------------------------------------------------------------

    def visits(self) -> list[tuple[str, int]]:
        head = self.n_units - 1
        return [("forward", u) for u in range(head)] + [("head", head)] + [("backward", u)
                                                                            for u in range(head - 1, -1, -1)]

    def step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float) -> StepStats:
        with self._counter_lock:
            for key in self.counters:
                self.counters[key] = 0
        xs = [x.to(self.device, non_blocking=True) for x, _ in micro_batches]
        ys = [y.to(self.device, non_blocking=True) for _, y in micro_batches]
        self.step_ids = list(xs)  # a list of its own: the backward empties the inputs' lists as it goes
        if self.dp.world > 1 and self._sparse_rows(0):
            # Only these rows of the token table can have a gradient: the sparse all-reduce
            # then skips scanning the whole table for non-zero rows.
            self.batch_rows = torch.unique(torch.cat([x.flatten() for x in xs]))
        visits = self.visits()
        saved: list[list[torch.Tensor] | None] = [None] * self.n_units
        graphs: list[list] = [[] for _ in range(self.n_units)]
        acts, grads_in, losses = xs, None, []
        self.shard_sq_norm.zero_()
        started = head_started = time.perf_counter()
        # What was predicted before this step ran: a calibration made at its end
        # applies to the steps after it.
        self.step_prediction = (self.predicted_step_s, self.prediction)
        if self.tied:
            self.acquire(0)  # the head reads the embedding table: keep it for the whole step
            self.tied_grad.zero_()
        for v in range(min(self.depth, len(visits))):
            self.acquire(visits[v][1])
        for v, (phase, unit) in enumerate(visits):
            if v + self.depth < len(visits):
                self.acquire(visits[v + self.depth][1])
            if phase == "head":
                head_started = time.perf_counter()
                self.counters["forward_s"] = head_started - started
            if phase == "forward":
                saved[unit] = acts
                acts, graphs[unit] = self._forward_unit(unit, acts)
            else:
                k = v % 2
                self._drain(k)
                buffer = self.tied_grad if (self.tied and unit == 0) else self.grad_buffers[k]
                if buffer is not self.tied_grad:
                    buffer.zero_()
                if phase == "head":
                    losses, grads_in = self._head_unit(acts, ys, buffer)
                else:
                    grads_in = self._backward_unit(unit, saved[unit], graphs[unit], grads_in, buffer)
                    saved[unit], graphs[unit] = None, []
                if unit < self.held_units:
                    self._hold(unit, buffer, None if buffer is self.tied_grad else k)
                else:
                    self.emit_grad(unit, buffer, None if buffer is self.tied_grad else k)
            self.release(unit)
        if self.tied:
            self.release(0)
        for k in range(2):
            self._drain(k)
        # Every held fetch is issued (their copies are timed with the step's) and raised
        # its error, if any, here.
        fetching, self.fetching = self.fetching, []
        for future in fetching:
            future.result()
        self.counters["backward_s"] = time.perf_counter() - head_started
        self.step_ids = []
        return self._finish_step(losses, lr)

    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, int]:
        """The summed token loss over `batches` and the number of tokens: one forward
        visit per unit, streamed and prefetched as a step's are, with no graphs and no
        gradients. A pending update is applied as the unit is staged, as the next step's
        forward would have (so the loss is that of the weights after the last step), and
        counts as this evaluation's work, not the next step's."""
        xs = [x.to(self.device, non_blocking=True) for x, _ in batches]
        ys = [y.to(self.device, non_blocking=True) for _, y in batches]
        ids = xs
        order, head, sums = list(range(self.n_units)), self.n_units - 1, []
        if self.tied:
            self.acquire(0)  # the head reads the embedding table
        for v in range(min(self.depth, len(order))):
            self.acquire(order[v])
        with torch.no_grad():
            for v, unit in enumerate(order):
                if v + self.depth < len(order):
                    self.acquire(order[v + self.depth])
                self.wait(unit)
                params = self.params(unit)
                if unit == head:
                    tied = self._tied_weight()
                    sums = [loss_fn(functional_call(self.modules[head], params, (x, tied)), y).double() * y.numel()
                            for x, y in zip(xs, ys)]
                else:
                    xs = [self._run(unit, params, x, i) for x, i in zip(xs, ids)]
                self.release(unit)
        if self.tied:
            self.release(0)
        total = float(torch.stack(sums).sum()) if sums else 0.0  # synchronises the device
        if self.ready_events is not None:
            torch.cuda.synchronize(self.device)
            self.waits.clear()
        with self._counter_lock:  # what the evaluation moved and updated is not the next step's
            self.link_timings = []
            self._update_s_seen, self._update_bytes_seen = self.update_s_total, list(self.update_bytes_total)
        return total, sum(y.numel() for y in ys)

    def _device_stall_s(self) -> float:
        """Seconds the compute stream sat waiting for weight copies this step: from
        'compute ready' to 'copy finished, compute resumes' for each awaited visit."""
        torch.cuda.synchronize(self.device)
        stall = sum(ready.elapsed_time(resumed) for ready, resumed in self.waits) / 1000
        self.waits.clear()
        return stall

    def _finish_step(self, losses: list[torch.Tensor], lr: float) -> StepStats:
        with self._counter_lock:
            total, moved = self.update_s_total, list(self.update_bytes_total)
        self.counters["update_s"], self._update_s_seen = total - self._update_s_seen, total
        self.counters["bytes_in"] += moved[0] - self._update_bytes_seen[0]
        self.counters["bytes_out"] += moved[1] - self._update_bytes_seen[1]
        self._update_bytes_seen = moved
        if self.ready_events is not None:
            self.counters["stall_s"] += self._device_stall_s()  # synchronises the device
            with self._counter_lock:
                timings, self.link_timings = self.link_timings, []
            self.counters["h2d_busy_s"] = _busy_ms(timings) / 1000
            self.counters["h2d_bytes"] = sum(nbytes for _, _, nbytes in timings)
        # Every rank's mean loss weighs the same: ranks run equal shares of the batch.
        loss = float(self.dp.sum(torch.stack(losses).float().mean()) / self.dp.world)
        grad_norm = math.sqrt(float(self.dp.sum(self.shard_sq_norm)))
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not skipped:
            self.adam_step += 1
            self.pending = PendingUpdate(self.adam_step, lr, clip_coefficient(grad_norm, self.optim.grad_clip))
            self.update_due = [True] * self.n_units
        else:  # no update is due: the held gradients go unused, as a stored one would
            self._drop_held()
        peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else self.device_bytes()
        io_now = self.store.io_seconds()
        self.io_step = {f"store_{k}": io_now[k] - self.io_before.get(k, 0) for k in io_now}
        self.io_before = io_now
        if self.counters["update_s"] > 0 and self.replan is not None:
            self._calibrate()
        if not skipped:  # after this step's I/O counters, which the lane's must not join
            self._start_early_updates()
        return StepStats(loss=loss, grad_norm=grad_norm, skipped=skipped, bytes_in=self.counters["bytes_in"],
                         bytes_out=self.counters["bytes_out"], stall_s=self.counters["stall_s"],
                         peak_device_bytes=peak,
                         peak_reserved_bytes=torch.cuda.max_memory_reserved(self.device) if self.device.type == "cuda"
                         else 0)

    def device_bytes(self) -> int:
        """Bytes of the engine's own device buffers (slots and gradient buffers)."""
        buffers = [*self.slots, *self.grad_buffers, *([self.tied_grad] if self.tied else [])]
        return sum(b.numel() * b.element_size() for b in buffers)

    def step_extra(self) -> dict:
        """Per-step timings beside the totals: the forward and backward phases (the
        forward carries the previous step's updates), the host worker's update compute,
        and, for the disk tier, seconds and bytes of storage reads and writes."""
        predicted, source = getattr(self, "step_prediction", (self.predicted_step_s, self.prediction))
        return {"predicted_step_s": predicted, "prediction": source,
                "predicted_peak_bytes": getattr(self, "predicted_peak_bytes", 0),
                "offload": getattr(self, "offload", "ram"),
                "prefetch_depth": self.depth, "recompute": self.recompute, "kept_graphs": self.kept_graphs,
                "early_updates": bool(self.early_units), "held_units": self.held_units,
                **{k: self.counters[k] for k in ("forward_s", "backward_s", "update_s")}, **self.io_step,
                # The link's rate while it copied (CUDA): bytes over the copies' own time.
                **({"h2d_copy_gbps": self.counters["h2d_bytes"] / self.counters["h2d_busy_s"] / 1e9}
                   if self.counters["h2d_busy_s"] > 0 else {})}

    def _calibrate(self) -> None:
        """Re-predict the step from rates this run measured in its steps that carried
        updates: the host AdamW rate (under the compute it shares the machine with; the
        fastest step's, since the first update also pays first-touch page faults and
        other tenants only ever add time) and, for the disk tier, the last step's store
        read and write rates (busy time of its I/O threads, page-cache hits included).
        A profile's figures, or a short fsync'd probe, miss both contention and the
        page cache."""
        # On a GPU held units update from the device's memory, so the worker's update time
        # is the other units'.
        first = self.held_units if self.device.type == "cuda" else 0
        owned = sum(self.store.owned_numel(u) for u in range(first, self.n_units))
        self.fastest_update_s = min(self.fastest_update_s, self.counters["update_s"])
        rates = {"host_update_bytes_per_s": 28 * owned / self.fastest_update_s,
                 "update_state": self.store.format.name}
        io = self.io_step
        if io.get("store_read_s", 0) > 0 and io.get("store_write_s", 0) > 0:
            # These are the rates the store's I/O threads saw: the kernel's copies when
            # the page cache holds the store, copies and waits on the disk when it does
            # not. Each calibrates the rate the plan uses for that case; the kernel's copy
            # rate of a store the cache cannot hold stays at its probe's (see the
            # planner's [Note: buffered I/O costs core time]).
            if self.store_cached:
                rates["cached_io_bytes_per_s"] = ((io["store_read_bytes"] + io["store_write_bytes"])
                                                  / (io["store_read_s"] + io["store_write_s"]))
            else:
                rates.update(disk_read_bytes_per_s=io["store_read_bytes"] / io["store_read_s"],
                             disk_write_bytes_per_s=io["store_write_bytes"] / io["store_write_s"])
        self.predicted_step_s = self.replan(rates)
        self.prediction = "calibrated"

    # --- results -----------------------------------------------------------------

    def flush(self) -> None:
        """Apply every due update now (before export or a checkpoint)."""
        self._wait_early_updates()
        for unit in range(self.n_units):
            if self.update_due[unit] and unit in self.held:
                self.worker.submit(self._update_held, unit, None).result()  # into the store only
            elif self.update_due[unit]:
                self.worker.submit(self._apply_update, unit).result()
        self._await_held_writes()

    def _await_held_writes(self) -> None:
        """Wait until every held unit's updated state is back in the store (the host reads it next)."""
        for unit, written in enumerate(self.held_written):
            if written is not None:
                written.synchronize()
                self.held_written[unit] = None

    def _drop_held(self) -> None:
        """Forget held state that no update will use (its fetch may still be in flight)."""
        if self.held and self.grad_host is not None:
            self.worker.submit(lambda: None).result()  # every fetch is issued
            torch.cuda.synchronize(self.device)
        self.held.clear()
        self.held_fetched.clear()
        self.held_coded.clear()

    def unit_state_dict(self, unit: int) -> dict[str, torch.Tensor]:
        """Unit `unit`'s master weights keyed by `GPT.state_dict()` names, in the store's
        precision (every rank must call it: shards are gathered)."""
        self.flush()
        numel = self.layouts[unit].numel
        param = torch.zeros(self.dp.padded(numel), device=self.device if self.dp.world > 1 else "cpu")
        first = self.store.owned[unit][0]

        def read() -> None:
            for start, stop in self.store.chunks(unit):
                param[first + start : first + stop].copy_(self.store.open(unit, ("param",), start, stop)["param"])
            self.dp.gather_weights(param, numel)

        self.worker.submit(read).result()
        # The master weights' own precision (bfloat16 in the compact formats): exact.
        param = param[:numel].cpu().to(self.store.format.buffer("param").dtype)
        return {f"units.{unit}.{name}": t for name, t in self.layouts[unit].views(param).items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {}
        for unit in range(self.n_units):
            state.update(self.unit_state_dict(unit))
        return state

    def shards(self) -> list:
        """One shard per unit, so export never holds the whole model in memory."""
        return [lambda unit=unit: self.unit_state_dict(unit) for unit in range(self.n_units)]

    def close(self) -> None:
        # The lane's errors reach the run through staging or `flush`; here it only must
        # be done with the store before the store closes.
        for future in self.early.values():
            future.exception()
        self.early = {}
        if self.lane is not None:
            self.lane.shutdown(wait=True)
        self.worker.shutdown(wait=True)
        self.grad_worker.shutdown(wait=True)
        if self.device.type == "cuda":  # after a failed step, copies from the store may still be queued
            torch.cuda.synchronize(self.device)
        self.store.close()
        if self.store_root is not None:  # streamer.store's [Note: the disk tier is scratch]
            remove_store(self.store_root, self.dp.rank, self.dp.world)

    # --- checkpoint state ----------------------------------------------------------

    def _state_file(self, unit: int) -> str:
        return f"unit-{unit:05d}-rank{self.dp.rank}.safetensors"

    def checkpoint_bytes(self) -> int:
        """The data bytes `save_state` writes for this rank: its shard of every unit's
        checkpointed buffers, in the store's format."""
        fmt = self.store.format
        return sum(fmt.buffer(name).itemsize * fmt.buffer(name).numel(self.store.owned_numel(unit))
                   for unit in range(self.n_units) for name in fmt.expand(CHECKPOINT_BUFFERS))

    def save_state(self, folder: Path) -> tuple[dict[str, dict], dict]:
        """Write this rank's shard of every unit's param, exp_avg and exp_avg_sq into
        `folder`, after applying every due update; returns {file: size and sha256} and
        the engine's own state. A copy, a chunk at a time: see streamer.checkpoint's
        [Note: copy-on-checkpoint for the disk tier]."""
        from streamer.checkpoint import TensorSpec, write_tensor_file

        self.flush()  # now the store holds the post-update state and no update is due

        fmt = self.store.format
        names = fmt.expand(CHECKPOINT_BUFFERS)

        def write(unit: int) -> dict:
            numel, (first, stop) = self.store.owned_numel(unit), self.store.owned[unit]
            specs = [TensorSpec(name, fmt.buffer(name).dtype, (fmt.buffer(name).numel(numel),)) for name in names]
            chunks = (self.store.open(unit, (name,), start, end)[name]
                      for name in names for start, end in self.store.chunks(unit))
            metadata = {"unit": str(unit), "owned": f"{first}:{stop}", "numel": str(self.layouts[unit].numel),
                        "state": fmt.name}
            return write_tensor_file(folder / self._state_file(unit), specs, chunks, metadata)

        # The store belongs to the host worker thread (see streamer.store).
        files = {self._state_file(u): self.worker.submit(write, u).result() for u in range(self.n_units)}
        return files, {"adam_step": self.adam_step}

    def load_state(self, folder: Path, state: dict, saved_world: int | None = None) -> None:
        """Fill the store from a verified checkpoint written by `save_state` for the same
        model, by this many processes or (float32 state) by `saved_world` others; no
        update is due afterwards.

        [Note: resuming on another world size]
        Each rank's file holds its shard [first, stop) of each unit's buffers. A shard of
        another partition is the same elements, read from whichever saved shards overlap
        it: in float32 (and the compact formats' bf16 weights) one value per element,
        so that state is exactly the saved one, and the steps after it are those the new
        world computes (the same global batch gives the same run, to float32 summation
        order). The compact formats' moments are coded in blocks that start at their
        shard, so they are decoded from the saved blocks and coded again in the new
        shard's (to the nearest code: one more rounding of the kind every update makes)."""
        self._await_held_writes()  # nothing may still copy into the buffers about to be filled
        saved_world = saved_world or self.dp.world
        for unit in range(self.n_units):
            self.worker.submit(self._read_unit, folder, unit, saved_world).result()
        self.adam_step = int(state["adam_step"])
        self.pending = None
        self.update_due = [False] * self.n_units
        self._drop_held()

    def _saved_shards(self, folder: Path, unit: int, saved_world: int) -> list[tuple[TensorFile, int, int]]:
        """The saved shards of `unit` that this rank reads, with their [first, stop)."""
        from streamer.checkpoint import CorruptCheckpointError, TensorFile, overlapping_shards

        fmt = self.store.format
        names = fmt.expand(CHECKPOINT_BUFFERS)
        ranks = [self.dp.rank] if saved_world == self.dp.world else overlapping_shards(
            self.layouts[unit].numel, self.dp.rank, self.dp.world, saved_world)
        found = []
        for rank in ranks:
            source = TensorFile(folder / f"unit-{unit:05d}-rank{rank}.safetensors")
            saved = source.header.metadata.get("state", "fp32")
            if saved != fmt.name:
                raise CorruptCheckpointError(f"checkpoint file '{source.path}' holds --state {saved} state but "
                                             f"this run asks for --state {fmt.name}: resume with --state {saved}")
            first, _, stop = source.header.metadata.get("owned", "").partition(":")
            if not (first.isdigit() and stop.isdigit()) or any(
                    source.header.tensors.get(n) is None
                    or source.shape(n) != (fmt.buffer(n).numel(int(stop) - int(first)),) for n in names):
                raise CorruptCheckpointError(f"checkpoint file '{source.path}' does not hold a shard of unit "
                                             f"{unit} of this model")
            found.append((source, int(first), int(stop)))
        return found

    def _gathered(self, sources: list[tuple[TensorFile, int, int]], name: str, lo: int, hi: int) -> torch.Tensor:
        """Elements [lo, hi) of buffer `name` from the saved shards that hold them:
        its values, or a coded moment's, decoded, in float32."""
        from streamer.state import decode_part

        fmt = self.store.format
        coded = f"{name}_scale" in fmt.names
        out = torch.empty(hi - lo, dtype=torch.float32 if coded else fmt.buffer(name).dtype)
        for source, a, b in sources:
            i, j = max(lo, a) - a, min(hi, b) - a  # the overlap, in the saved shard
            if i < j:
                values = source.read(name, i, j)
                if coded:
                    scales = source.read(f"{name}_scale", i // BLOCK, (j - 1) // BLOCK + 1)
                    values = decode_part(name, values, scales, i)
                out[a + i - lo : a + j - lo] = values
        return out

    def _read_unit(self, folder: Path, unit: int, saved_world: int) -> None:
        """This rank's shard of one unit, from the checkpoint's files into the store."""
        from streamer.checkpoint import CorruptCheckpointError
        from streamer.state import encode

        fmt = self.store.format
        names = fmt.expand(CHECKPOINT_BUFFERS)
        sources = self._saved_shards(folder, unit, saved_world)
        first, stop = self.store.owned[unit]
        if saved_world == self.dp.world:
            if sources[0][1:] != (first, stop):
                raise CorruptCheckpointError(f"checkpoint file '{sources[0][0].path}' does not hold unit "
                                             f"{unit}'s shard [{first}, {stop}) of this model")
            for name in names:
                for start, end in self.store.chunks(unit):
                    target = self.store.open(unit, (name,), start, end)[name]
                    offset = fmt.buffer(name).offset(start)
                    target.copy_(sources[0][0].read(name, offset, offset + target.numel()))
                    self.store.commit(unit, (name,), start, end)
            return
        for name in CHECKPOINT_BUFFERS:  # another partition: see the note above
            held = fmt.expand((name,))
            for start, end in self.store.chunks(unit):
                parts = self.store.open(unit, held, start, end)
                values = self._gathered(sources, name, first + start, first + end)
                if len(held) == 2:
                    encode(name, values, parts[name], parts[held[1]], noise=None)
                else:
                    parts[name].copy_(values)
                self.store.commit(unit, held, start, end)

