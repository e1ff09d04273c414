"""The planner: pure functions from (model, device profile, run shape) to a plan.

Nothing here touches hardware except `measure_profile`, which calibrates a profile on
this machine; everything else is arithmetic that tests check without a GPU.

[Note: when streaming hides]
A unit of P parameters costs 2·P·T FLOPs forward and, with recompute, 2·P·T + 4·P·T
backward for T tokens per step (all micro-batches pass while the unit is resident).
Moving its weights costs P·b bytes (b bytes per parameter as they cross: the compute
dtype through a staging buffer; from a GPU's page-locked RAM tier the master weights
as kept, float32 or bf16, cast on the device). Compute
covers the transfer when 2·P·T / F >= P·b / W, i.e. T >= F·b / (2·W) for the forward
and T >= F·max(b/W_in, g/W_out) / 6 for the backward (weights in and gradients of g
bytes out overlap on a full-duplex link). Below that the link, not the device, sets
the step time; above it streaming costs only the recompute and the optimizer.

[Note: the update's bytes on the link]
With AdamW on the GPU a unit's whole state (S bytes per parameter: 16 in float32, about
5 in compact8) comes in once a step and all of it but the gradient (U: 12, about 4)
goes back. The clip coefficient is known only when the backward ends, so the update
runs in the next forward, and both directions must then hide behind a third of the
step's compute: T >= F·S / (2·W_in) and T >= F·U / (2·W_out). A held unit (streamer.
scheduler's [Note: updates held on the device]) keeps its gradient on the device and
takes the rest of its state in after its backward, so the forward's way in carries
only the other units' states; every unit's U still leaves in the forward. Each
direction is a queue of its own in `simulate_step`, and how many units to hold, with
how deep a prefetch, is what `fastest_schedule` weighs against the device memory the
held state takes beside the activations the backward has not yet freed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import psutil
import torch

from models import ModelConfig
from streamer.errors import UserError
from streamer.io import existing_parent
from streamer.state import FORMATS


def units_in_ram(n_units: int, offload: str, ram_units: int | None = None) -> int:
    """How many leading units the store keeps in RAM: all for the RAM tier, none for the
    disk tier, `ram_units` for the split tier (the rest on disk)."""
    if offload == "split":
        assert ram_units is not None, "the split tier needs its count of RAM units"
        return ram_units
    return n_units if offload == "ram" else 0


def split_ram_units(cfg: ModelConfig, host_available: float, state: str = "fp32") -> int:
    """The most leading units whose state fits in 80% of available host memory (the
    rest is for the runtime, pinned buffers and the page cache the disk part uses)."""
    per_param, held = state_bytes(state)[0], 0.0
    for k, count in enumerate(unit_param_counts(cfg)):
        held += per_param * count
        if held > 0.8 * host_available:
            return k
    return cfg.n_layer + 2


HOST_MEMORY_ENV = "STREAMER_HOST_MEMORY_GIB"


def host_available(asked_gib: float | None = None) -> float:
    """Host memory a run may plan with, in bytes: `--host-memory` when given, else the
    machine-wide setting in $STREAMER_HOST_MEMORY_GIB, else what the OS reports available
    now. The override is for machines where that reading is not what they can give: a
    virtual machine whose RAM grows as it is used reports far less at start, and a
    shared host may report memory that others will take."""
    if asked_gib is None and os.environ.get(HOST_MEMORY_ENV):
        text = os.environ[HOST_MEMORY_ENV]
        try:
            asked_gib = float(text)
        except ValueError:
            asked_gib = float("nan")
        if not 0 < asked_gib < math.inf:
            raise UserError(f"{HOST_MEMORY_ENV} must be a positive number of GiB, got '{text}': "
                            f"fix it or unset it")
    if asked_gib is not None:
        return asked_gib * 2**30
    return float(psutil.virtual_memory().available)


def host_rates(profile: DeviceProfile) -> tuple[float, float]:
    """(float32 AdamW's host update rate, host copy rate), in bytes per second. A
    profile calibrated on another format's update converts back through that format's
    relative cost."""
    update = profile.host_update_bytes_per_s * FORMATS[profile.update_state].update_cost
    return update, profile.host_copy_bytes_per_s


def host_threads(device_is_host: bool, store_in_ram: bool) -> bool:
    """Whether the host work (updates, copies, gradient writes) runs on worker threads.
    Not when the device is the host's own cores and nothing waits on storage: threads
    would then only split the same cores (see streamer.scheduler's
    [Note: no worker thread on a CPU device])."""
    return not (device_is_host and store_in_ram)


def with_device_update(profile: DeviceProfile, state: str, device_rate: float | None = None,
                       pipelined: bool = False) -> DeviceProfile:
    """The profile as seen by a run whose AdamW runs on the device (`--update-on device`):
    the host worker's part of an update is a chunk at a time, the whole state in, the
    update's kernels, all but the gradient back. `device_rate` is the update's rate on
    the device in float32 AdamW's bytes per second (28 per parameter), measured
    (`measure_update_rate`); without it, the profile's float32 rate scaled by the
    format's counted cost: the fused kernel's (about half of float32's bytes), or on a
    device without it the PyTorch ops' (about 80 elementwise kernels, 15x the bytes).

    A disk tier's chunks run one after the other (each is committed before the next);
    a page-locked RAM tier's (`pipelined`) alternate between two streams, so one
    chunk's kernels overlap the next one's copy in and the previous one's copy out:
    a chunk then costs its kernels' time, or half of the three parts when the copies
    are the longer. That is the host worker's rate for a disk tier's units; a
    page-locked unit's update is planned as what it is, copies in, kernels and copies
    out, each direction of the link a queue of its own (`step_visits`)."""
    whole, updated, _, _ = state_bytes(state)
    fmt = FORMATS[state]
    cost = fmt.fused_update_cost if profile.fused_update else fmt.device_update_cost
    rate = device_rate or profile.device_update_bytes_per_s / cost
    parts = (whole / profile.h2d_bytes_per_s, 28 / rate, updated / profile.d2h_bytes_per_s)
    per_param = max(parts[1], sum(parts) / 2) if pipelined else sum(parts)
    return replace(profile, host_update_bytes_per_s=28 / per_param, update_state=state,
                   host_copy_bytes_per_s=host_rates(profile)[1], update_on_device=True, device_update_rate=rate)


def device_workspace(profile: DeviceProfile, state: str) -> float:
    """Bytes per chunk element that an update on the device allocates besides the chunk's
    state: the fused kernel's random bits, or the PyTorch ops' float32 temporaries."""
    fmt = FORMATS[state]
    return 4 if profile.fused_update and fmt.name != "fp32" else fmt.workspace_bytes


@functools.cache  # called per visit, per schedule weighed: a buffer's itemsize makes a tensor
def state_bytes(state: str) -> tuple[float, float, int, float]:
    """Per parameter, for a state format (see streamer.state): the whole state, what an
    update writes back (all but the gradient), the master weight, the gradient."""
    fmt = FORMATS[state]
    grad = fmt.bytes_per_param(("grad",))  # with its scales, for a coded gradient
    return fmt.bytes_per_param(), fmt.bytes_per_param() - grad, fmt.buffer("param").itemsize, grad


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    matmul_flops: float  # sustained dense matmul rate in the compute dtype (FLOP/s)
    h2d_bytes_per_s: float  # pinned host -> device copy
    d2h_bytes_per_s: float  # device -> pinned host copy
    device_memory_bytes: float
    disk_read_bytes_per_s: float
    disk_write_bytes_per_s: float
    # AdamW on the host in the `update_state` format, in float32 AdamW's bytes (28 per
    # parameter) per second; other formats scale it by their measured relative cost.
    host_update_bytes_per_s: float
    compute_bytes: int = 2  # bytes per parameter on the device (bf16)
    host_memory_bytes: float = 128 * 2**30  # the host the device sits in
    disk_free_bytes: float = 64 * 2**30
    device_update_bytes_per_s: float = 2e12  # resident AdamW on the device (HBM-bound)
    # A CPU "device" runs compute and the host worker on the same cores, so host work
    # adds to the step instead of hiding behind compute.
    shares_host_cores: bool = False
    # Free memory the kernel can use as page cache: a disk-tier store that fits is
    # served at memory speed after its first pass.
    page_cache_bytes: float = 64 * 2**30
    update_state: str = "fp32"
    # Host memory copies (staging, gradient writes): bytes read plus bytes written per
    # second, as the update's rate counts them. Not the update's rate: the fused AdamW
    # kernel streams 28 bytes per parameter in one vectorised pass, well above a copy
    # (51 vs 20-35 GB/s on 2 CPU cores).
    host_copy_bytes_per_s: float = 2.0e10
    # AdamW runs on the device (`--update-on device`, see `with_device_update`), its
    # kernels at this rate, in float32 AdamW's bytes (28 per parameter) per second.
    update_on_device: bool = False
    device_update_rate: float = 0.0
    # A compact format's update on this device is the fused kernel (kernels/compact.py),
    # not the PyTorch ops: a CUDA device with CuPy, once the kernel has matched the ops
    # there (streamer.state's [Note: the fused update, checked before use]).
    fused_update: bool = False
    # A disk-tier store the page cache holds: bytes its I/O threads read or write per
    # second (the kernel's copies, one thread each way; see `measure_page_cache_rate`).
    cached_io_bytes_per_s: float = 8e9


# Sustained (not datasheet) figures; `--measure` replaces them with this machine's.
PROFILES: dict[str, DeviceProfile] = {
    "h100": DeviceProfile("h100", 6.5e14, 5.0e10, 5.0e10, 80e9, 3.0e9, 2.0e9, 2.0e10, fused_update=True),
    "h200": DeviceProfile("h200", 6.5e14, 5.0e10, 5.0e10, 141e9, 3.0e9, 2.0e9, 2.0e10, fused_update=True),
    "a100": DeviceProfile("a100", 2.5e14, 2.4e10, 2.4e10, 80e9, 3.0e9, 2.0e9, 2.0e10, fused_update=True),
    # A 2-core CPU "device": the link is a host memory copy, the update shares the cores.
    "cpu": DeviceProfile("cpu", 8e10, 5e9, 5e9, 0.0, 1.0e9, 0.8e9, 3e10, compute_bytes=4,
                         host_memory_bytes=24 * 2**30, device_update_bytes_per_s=3e10, shares_host_cores=True,
                         page_cache_bytes=12 * 2**30, host_copy_bytes_per_s=1e10),
}


@dataclass(frozen=True)
class Plan:
    """Where every byte lives and what a step costs; the streamer runs what this says."""

    model: str
    device: str
    offload: str
    prefetch_depth: int
    tokens_per_step: int
    seq_len: int
    n_params: int
    n_units: int
    max_unit_params: int
    device_bytes: int
    host_bytes: int
    disk_bytes: int
    h2d_bytes_per_step: int
    d2h_bytes_per_step: int
    disk_read_bytes_per_step: int
    disk_write_bytes_per_step: int
    min_tokens_forward: int
    min_tokens_backward: int
    min_tokens_disk: int
    min_tokens_per_step: int
    recommended_tokens_per_step: int
    recompute: bool  # some blocks recompute their forward in backward
    kept_graphs: int  # blocks (the last ones) that keep their autograd graph instead
    fits_device: bool  # device_bytes within the device's memory (always true for a CPU device)
    compute_s: float
    predicted_step_s: float
    state: str = "fp32"  # the host state's format (streamer.state)
    ram_units: int = 0  # leading units whose state is in RAM (the rest on disk)
    # The disk units' updates run on a lane of their own as soon as they are due
    # (streamer.scheduler's [Note: early updates of the disk part]).
    early_updates: bool = False
    # The leading units whose state comes to the device during the backward, so that
    # their updates run there once it ends (streamer.scheduler's
    # [Note: updates held on the device]).
    held_units: int = 0
    # Where the step's time goes (each a sum over the step's visits; they overlap):
    host_s: float = 0.0  # the host worker: updates and copies
    link_s: float = 0.0  # host <-> device copies, both directions (each a queue of its own)
    storage_s: float = 0.0  # disk reads and writes (their threads run side by side)


def unit_param_counts(cfg: ModelConfig) -> list[int]:
    """Parameters per unit (embedding, blocks, head), from the analytic count."""
    d, v = cfg.d_model, cfg.padded_vocab_size
    embed = v * d + (cfg.block_size * d if cfg.positional == "learned" else 0)
    head = 2 * d + (0 if cfg.tie_embeddings else v * d + (v if cfg.head_bias else 0))
    block = (cfg.n_params() - embed - head) // cfg.n_layer
    return [embed, *([block] * cfg.n_layer), head]


def streamed_inference_params(cfg: ModelConfig) -> int:
    """Parameters a model streamed for inference keeps on the device: two units' buffers
    (the one computing, the next arriving) and a tied embedding table, which the head
    reads (streamer.inference's [Note: streamed inference])."""
    counts = unit_param_counts(cfg)
    ring = counts[1:] if cfg.tie_embeddings else counts
    return 2 * max(ring) + (counts[0] if cfg.tie_embeddings else 0)


@dataclass(frozen=True)
class SamplingEstimate:
    """A sampled token's floor on a profile, one pass over the model: held whole, every
    weight read once from device memory; streamed, every weight over the link once;
    streamed from disk (`--mode disk`, for a model larger than host memory), every
    weight read from the disk once, too."""

    weight_bytes: float  # in the compute dtype
    held_fits: bool  # the weights alone in 90% of the device's memory (caches and activations need the rest)
    streamed_device_bytes: float
    held_s_per_token: float
    streamed_s_per_token: float
    disk_s_per_token: float  # at the profile's disk read rate, with the checkpoint stored in the compute dtype


def sampling_estimate(cfg: ModelConfig, profile: DeviceProfile) -> SamplingEstimate:
    weights = sum(unit_param_counts(cfg)) * profile.compute_bytes
    # Device memory bandwidth: the profile's HBM-bound update rate, the closest figure it has.
    held = weights / profile.device_update_bytes_per_s
    streamed = max(held, weights / profile.h2d_bytes_per_s)
    return SamplingEstimate(weights, weights <= 0.9 * profile.device_memory_bytes,
                            streamed_inference_params(cfg) * profile.compute_bytes, held, streamed,
                            max(streamed, weights / profile.disk_read_bytes_per_s))


def _unit_flops_per_token(cfg: ModelConfig, seq_len: int) -> list[float]:
    """Forward FLOPs per token for each unit (the embedding lookup is free; a tied head
    is a matmul over the embedding table)."""
    counts = unit_param_counts(cfg)
    head_matmul = cfg.padded_vocab_size * cfg.d_model
    block = 2 * counts[1] + 4 * seq_len * cfg.d_model  # weights + attention scores and sum
    return [0.0, *([float(block)] * cfg.n_layer), 2.0 * head_matmul]


# The head's loss forward and backward hold three float32 vocabulary-sized rows per
# token at once (the loss's saved log-probabilities, their gradient and the logits'
# gradient; the logits themselves are freed after the forward): 3.0 measured for
# gpt3-125m at 512 to 2,048 tokens.
HEAD_VALUES_PER_TOKEN = 3


def head_bytes(cfg: ModelConfig, micro_tokens: int) -> int:
    """The head's loss forward and backward for one micro-batch (float32 logits)."""
    return micro_tokens * HEAD_VALUES_PER_TOKEN * cfg.padded_vocab_size * 4


def working_bytes(cfg: ModelConfig, micro_tokens: int, act_bytes: int) -> int:
    """One unit's working set while it recomputes and backpropagates a micro-batch:
    about 34 x d_model values per token for a block (its graph and the gradients
    flowing through it), or the head's logits, whichever is larger."""
    return max(micro_tokens * 34 * cfg.d_model * act_bytes, head_bytes(cfg, micro_tokens))


# Values per token, in units of d_model, that autograd saves for one block's backward
# (weights excluded), counted with saved-tensor hooks on CPU, where attention is flash
# attention and keeps no T x T scores: 16.0 for GPT-3 blocks, 17.2 (GPT-J) and 18.1
# (NeoX) with rotary tables; each rounded up here. (The Megatron paper's 34 counts
# bytes at 2 bytes per value, with dropout masks this model does not have.)
def graph_values_per_token(cfg: ModelConfig) -> int:
    return 19 if cfg.positional == "rotary" else 17


def graph_activation_bytes(cfg: ModelConfig, tokens_per_step: int, act_bytes: int) -> int:
    """What autograd keeps for the whole step when no unit is recomputed."""
    return cfg.n_layer * tokens_per_step * graph_values_per_token(cfg) * cfg.d_model * act_bytes


def kept_activation_bytes(cfg: ModelConfig, tokens_per_step: int, micro_tokens: int, act_bytes: int,
                          kept: int) -> int:
    """Activations when the last `kept` blocks keep their graphs and the others recompute:
    the kept graphs, the boundary activations of the other units, and the working set
    of one unit's backward (the head's logits for most models)."""
    kept = min(kept, cfg.n_layer)
    per_block = graph_activation_bytes(cfg, tokens_per_step, act_bytes) // max(cfg.n_layer, 1)
    boundary = (cfg.n_layer + 2 - kept) * tokens_per_step * cfg.d_model * act_bytes
    return boundary + kept * per_block + working_bytes(cfg, micro_tokens, act_bytes)


def held_peak_bytes(cfg: ModelConfig, tokens_per_step: int, micro_tokens: int, act_bytes: int, kept: int,
                    state: str, held: int) -> int:
    """Activations and held state together at their peak while the first `held` units'
    state comes to the device (see streamer.scheduler's [Note: updates held on the
    device]): when the backward reaches unit j, units j..held-1 hold their whole state
    (the gradient coded as the store keeps it) and units 0..j still hold their graphs
    or boundary activations. The next forward frees each unit's state before the
    graphs it builds grow past this."""
    if not held:
        return 0
    counts = unit_param_counts(cfg)
    per_block = graph_activation_bytes(cfg, tokens_per_step, act_bytes) // max(cfg.n_layer, 1)
    boundary = tokens_per_step * cfg.d_model * act_bytes
    work = working_bytes(cfg, micro_tokens, act_bytes)
    whole = state_bytes(state)[0]
    peak = 0
    for j in range(held):
        alive = sum(per_block if u >= cfg.n_layer + 1 - kept else boundary for u in range(1, j + 1))
        peak = max(peak, int(whole * sum(counts[j:held])) + alive + work)
    return peak


def choose_kept_graphs(cfg: ModelConfig, tokens_per_step: int, micro_tokens: int, act_bytes: int,
                       budget_bytes: float, asked: str = "auto") -> int:
    """How many blocks keep their graphs: all (`--recompute no`), none (`yes`), or, on
    auto, as many as the activation budget holds. Each kept block saves a third of its
    backward compute; which blocks does not change the peak, which is reached when the
    forward ends with every kept graph alive."""
    if asked in ("yes", "no"):
        return 0 if asked == "yes" else cfg.n_layer
    for kept in range(cfg.n_layer, -1, -1):
        if kept_activation_bytes(cfg, tokens_per_step, micro_tokens, act_bytes, kept) <= budget_bytes:
            return kept
    return 0


def choose_prefetch_depth(unit_compute_s: float, unit_transfer_s: float) -> int:
    """Enough units in flight that one unit's compute covers the next transfers, with one
    spare to absorb jitter; capped because each one costs a unit of device memory."""
    if unit_compute_s <= 0:
        return 2
    return max(1, min(4, math.ceil(unit_transfer_s / unit_compute_s) + 1))


@dataclass(frozen=True)
class Visit:
    """One unit visit of a step, in seconds: device compute, host-worker work to bring
    the unit in (update, copies), the device link in, gradient work out, and storage
    time (the disk tier's reads and writes, which run on their own threads and overlap
    the host work: see streamer.store's note on the pipeline)."""

    compute_s: float
    host_in_s: float
    link_in_s: float
    out_s: float
    disk_read_s: float = 0.0
    disk_write_s: float = 0.0
    phase: str = "forward"  # forward | head | backward
    ready_s: float = 0.0  # not staged before this time: the lane's early update of the unit ends
    # Link time queued once the visit's compute ends: a held unit's state on its way to
    # the device (see streamer.scheduler's [Note: updates held on the device]).
    fetch_s: float = 0.0
    # An update on the device of a page-locked unit: its kernels' time, and its state's
    # way back (device to host); `link_in_s` is then its state's way in, and the worker
    # waits for all three (a held unit's update moves nothing in and nobody waits).
    kernel_s: float = 0.0
    d2h_s: float = 0.0
    # The gradient's copy out of a page-locked unit (device to host); the compute that
    # refills its buffer two visits later waits for it.
    grad_out_s: float = 0.0

    @property
    def disk_s(self) -> float:
        """Storage time: the reader and writer threads run side by side."""
        return max(self.disk_read_s, self.disk_write_s)


def store_cached(cfg: ModelConfig, profile: DeviceProfile, offload: str, state: str = "fp32",
                 ram_units: int | None = None) -> bool:
    """Whether the page cache holds a store's disk part, so that its I/O runs at the
    kernel's copy rate: it must fit in half of the cache, and the RAM part of a split
    store takes its memory from the cache."""
    counts = unit_param_counts(cfg)
    whole = state_bytes(state)[0]
    in_ram = units_in_ram(len(counts), offload, ram_units)
    cache = min(profile.page_cache_bytes, profile.host_memory_bytes - whole * sum(counts[:in_ram]))
    return whole * sum(counts[in_ram:]) <= 0.5 * cache


def early_lane_s(cfg: ModelConfig, profile: DeviceProfile, state: str, in_ram: int) -> tuple[dict[int, float], float]:
    """When each disk unit's early update ends, from the step's start (see streamer.
    scheduler's [Note: early updates of the disk part]), and the update work the lane
    shares with the host worker. In forward order, each update reads the whole state
    and writes all but the gradient, and the unit's staging reads the weights again:
    the lane is charged that re-read too, since the reads share the disk. Its update
    work (AdamW on host cores, or the state's copies over the link for an update on the
    device) uses what the worker's updates use, so the worker pays it as well."""
    counts = unit_param_counts(cfg)
    whole, updated, master, _ = state_bytes(state)
    update_rate, _ = host_rates(profile)
    ends, t, shared = {}, 0.0, 0.0
    for unit in range(in_ram, len(counts)):
        p = counts[unit]
        io = max((whole + master) * p / profile.disk_read_bytes_per_s, updated * p / profile.disk_write_bytes_per_s)
        work = 28 * p * FORMATS[state].update_cost / update_rate
        t += max(io, work)
        shared += work
        ends[unit] = t
    return ends, shared


def can_update_early(cfg: ModelConfig, profile: DeviceProfile, offload: str, state: str = "fp32",
                     ram_units: int | None = None) -> bool:
    """Early updates need a disk part whose I/O waits on storage, beside a device that
    computes on its own: on a CPU device the lane would take the cores that compute."""
    counts = unit_param_counts(cfg)
    return (units_in_ram(len(counts), offload, ram_units) < len(counts) and not profile.shares_host_cores
            and not store_cached(cfg, profile, offload, state, ram_units))


def visit_order(cfg: ModelConfig, depth: int) -> list[tuple[str, int, bool]]:
    """(phase, unit, pinned) for each visit of a step, as `StreamEngine.visits` makes
    them: forward 0..U-2, the head, backward U-2..0. `pinned`: the unit is still in the
    prefetch window from its last visit (or is a tied table, resident all step), so the
    visit moves no weights."""
    head = cfg.n_layer + 1
    order = [("forward", u) for u in range(head)] + [("head", head)]
    order += [("backward", u) for u in range(head - 1, -1, -1)]
    last_seen: dict[int, int] = {}
    visits = []
    for v, (phase, unit) in enumerate(order):
        pinned = unit in last_seen and v - last_seen[unit] <= depth or (cfg.tie_embeddings and unit == 0 and v > 0)
        last_seen[unit] = v
        visits.append((phase, unit, pinned))
    return visits


@dataclass(frozen=True)
class _StepRates:
    """What each visit of a step is costed with: the profile's rates and the state
    format's bytes per parameter (`state_bytes`)."""

    profile: DeviceProfile
    update_rate: float  # the host worker's AdamW rate, in float32 AdamW's bytes per second
    memory_rate: float  # the host's copy rate
    whole: float  # the state, per parameter
    updated: float  # what an update writes back
    master: int  # the master weight
    grad: float  # the gradient
    update_cost: float  # the format's update cost, against float32 AdamW's
    cached: bool  # the page cache holds the disk part (`store_cached`)

    @classmethod
    def of(cls, cfg: ModelConfig, profile: DeviceProfile, offload: str, state: str,
           ram_units: int | None) -> _StepRates:
        update_rate, memory_rate = host_rates(profile)  # the update scales by its format's cost
        return cls(profile, update_rate, memory_rate, *state_bytes(state), FORMATS[state].update_cost,
                   store_cached(cfg, profile, offload, state, ram_units))


def _visit_in(rates: _StepRates, p: int, updates: bool, pinned: bool, on_lane: bool, on_disk: bool,
              locked: bool, held: bool) -> dict[str, float]:
    """A visit's costs of bringing a unit of `p` parameters in: the update due from the
    previous step (when `updates`), the weights' copies and the storage's reads and
    writes, as `Visit` fields."""
    profile, costs = rates.profile, {}
    # The update reads p, g, m, v (16 bytes per parameter in float32) and writes p,
    # m, v (12); a staging pass without an update reads p only.
    read, written = (rates.whole * p, rates.updated * p) if updates else (rates.master * p, 0)
    if updates and profile.update_on_device and locked:
        # State in (none for a held unit: it came during the backward), the update's
        # kernels (which write the slot), and the updated state back out.
        return {"kernel_s": 28 * p / (profile.device_update_rate or profile.device_update_bytes_per_s),
                "d2h_s": rates.updated * p / profile.d2h_bytes_per_s,
                "link_in_s": 0.0 if held else rates.whole * p / profile.h2d_bytes_per_s}
    if pinned:
        return costs  # still in the window: nothing moves
    host_in = 0.0
    # The weights' way in: a CPU device computes from the slot the worker copies them
    # into; a GPU copies them from a page-locked RAM tier directly, and from a staging
    # buffer the worker fills otherwise; an update on the device writes them into the
    # slot itself.
    if not (updates and profile.update_on_device):
        # From a page-locked tier the master weights cross as they are kept (a float32
        # master as float32, cast on the device); staging casts first.
        crossing = rates.master if locked else profile.compute_bytes
        costs["link_in_s"] = 0.0 if profile.shares_host_cores else p * crossing / profile.h2d_bytes_per_s
        host_in = 0.0 if locked else p * (rates.master + profile.compute_bytes) / rates.memory_rate
    if updates:
        host_in += 28 * p * rates.update_cost / rates.update_rate  # the AdamW update due from the previous step
    if on_lane:
        pass  # the lane's time holds this pass's re-read (see early_lane_s)
    elif on_disk and rates.cached:
        host_in += (read + written) / profile.cached_io_bytes_per_s
    elif on_disk:
        costs["disk_read_s"] = read / profile.disk_read_bytes_per_s
        costs["disk_write_s"] = written / profile.disk_write_bytes_per_s
        if profile.shares_host_cores:
            # [Note: buffered I/O costs core time] Every byte also passes through the
            # page cache, copied by the kernel on the cores that compute: 94 GB per
            # gpt3-2.7b step on 2 cores, ~12 s of a 135 s step that the disk time
            # (overlapped) does not account for.
            host_in += (read + written) / profile.cached_io_bytes_per_s
    costs["host_in_s"] = host_in
    return costs


def _visit_out(rates: _StepRates, p: int, on_disk: bool, locked: bool, held: bool) -> dict[str, float]:
    """A backward visit's (or the head's) costs of sending a unit's gradient out, as
    `Visit` fields, the disk's write of it included."""
    profile = rates.profile
    if held:  # the gradient stays; the rest of the state comes in behind the compute
        return {"fetch_s": (rates.whole - rates.grad) * p / profile.h2d_bytes_per_s}
    if locked:  # straight into the page-locked store
        return {"grad_out_s": rates.grad * p / profile.d2h_bytes_per_s}
    out, costs = p * 4 / profile.d2h_bytes_per_s, {}
    if not on_disk:
        out += (4 + rates.grad) * p / rates.memory_rate
    elif rates.cached:
        out += rates.grad * p / profile.cached_io_bytes_per_s
    else:
        costs["disk_write_s"] = rates.grad * p / profile.disk_write_bytes_per_s
        if profile.shares_host_cores:  # see [Note: buffered I/O costs core time]
            out += rates.grad * p / profile.cached_io_bytes_per_s
    return {**costs, "out_s": out}


def step_visits(cfg: ModelConfig, profile: DeviceProfile, tokens_per_step: int, seq_len: int, offload: str,
                depth: int, kept: int, state: str = "fp32", ram_units: int | None = None,
                early: bool = False, held: int = 0) -> list[Visit]:
    """The visits of one step (forward 0..U-2, head, backward U-2..0) with their costs,
    mirroring `StreamEngine.visits`; units still pinned in the window move nothing.
    With `early`, the disk units' updates run on the lane (`early_lane_s`) and their
    staging waits for it, then reads the weights only. The first `held` units keep
    their gradients on the device and fetch their state after their backward; their
    update then moves nothing in (see streamer.scheduler's
    [Note: updates held on the device])."""
    counts = unit_param_counts(cfg)
    flops = _unit_flops_per_token(cfg, seq_len)
    # A store that fits the page cache moves at memory speed after its first pass, and
    # then its "I/O" is host copies on the cores, not time on the storage device.
    rates = _StepRates.of(cfg, profile, offload, state, ram_units)
    in_ram = units_in_ram(len(counts), offload, ram_units)
    lane, shared = early_lane_s(cfg, profile, state, in_ram) if early else ({}, 0.0)
    visits = []
    for v, (phase, unit, pinned) in enumerate(visit_order(cfg, depth)):
        p, f = counts[unit], flops[unit] * tokens_per_step / profile.matmul_flops
        on_disk = unit >= in_ram
        locked = not profile.shares_host_cores and not on_disk  # a GPU's page-locked RAM tier
        recomputes = unit < len(counts) - 1 - kept and not (kept >= cfg.n_layer and unit == 0)
        compute = {"forward": f, "head": 3 * f, "backward": (3 if recomputes else 2) * f}[phase]
        # A unit's first visit of the step (its forward, or the head's one visit) stages
        # it with the update due from the previous step, unless the lane ran it.
        on_lane = unit in lane and phase != "backward"
        costs = {"host_in_s": 0.0, "link_in_s": 0.0, "out_s": 0.0}
        costs.update(_visit_in(rates, p, phase != "backward" and not on_lane, pinned, on_lane, on_disk, locked,
                               unit < held))
        if phase != "forward":
            written = costs.pop("disk_write_s", 0.0)
            costs.update(_visit_out(rates, p, on_disk, locked, unit < held and phase == "backward"))
            costs["disk_write_s"] = written + costs.get("disk_write_s", 0.0)
        if v == 0:
            costs["host_in_s"] += shared  # the lane's update work, charged to the worker from the start
        visits.append(Visit(compute, phase=phase, ready_s=lane[unit] if on_lane else 0.0, **costs))
    return visits


def fastest_visits(cfg: ModelConfig, profile: DeviceProfile, tokens_per_step: int, seq_len: int, offload: str,
                   depth: int, kept: int, state: str = "fp32", ram_units: int | None = None,
                   early: bool | None = None, held: int = 0) -> tuple[list[Visit], bool]:
    """The step's visits with or without early updates (`early`), or, when None,
    whichever the model predicts faster where they are possible."""
    options = [False, True] if early is None else [early]
    if not can_update_early(cfg, profile, offload, state, ram_units):
        options = [False]
    best = None
    for option in options:
        visits = step_visits(cfg, profile, tokens_per_step, seq_len, offload, depth, kept, state, ram_units, option,
                             held)
        predicted = predicted_stream_s(visits, depth, profile)
        if best is None or predicted < best[0]:
            best = (predicted, visits, option)
    return best[1], best[2]


# [Note: where AdamW runs]
# The update runs on the host, beside the store, or on the compute device (--update-on).
# On the host a step's updates cost host cores: float32 AdamW at memory speed, but a
# compact state's 8-bit coding ~70x slower, which bounds a 20B step at tens of minutes on
# 16 cores. On the GPU they cost link traffic instead: each unit's state crosses both
# ways, and the kernels take milliseconds. Which is faster depends on the state, the
# tiers, the link and the tokens per step, so `--update-on auto` (the default) plans the
# run both ways, with the device's update rate measured on one chunk, and takes the
# shorter predicted step; a place whose plan does not fit --max-memory is out. On a CPU
# device the two are one processor: auto is the host (the device, with --held-units,
# whose bookkeeping needs it). The run records its choice (run.json's `update_on`).
def faster_update_place(plans: dict[str, Plan]) -> str:
    """--update-on auto: of the plans that fit ({place: plan}), the place whose step is
    predicted shorter (the host on a tie, or when neither fits)."""
    if "device" in plans and ("host" not in plans
                              or plans["device"].predicted_step_s < plans["host"].predicted_step_s):
        return "device"
    return "host"


def check_held_units(cfg: ModelConfig, held: int | None, update_on: str, in_ram: int | None = None) -> None:
    """Refuse a `--held-units` count the engine cannot run: out of range (the head is
    never held), without the update on the device, or past the units in RAM (`in_ram`,
    once the tiers are known)."""
    if held is None:
        return
    if not 0 <= held <= cfg.n_layer + 1:
        raise UserError(f"--held-units must be 0..{cfg.n_layer + 1} for {cfg.name} (the head is never held), "
                        f"got {held}")
    if held and update_on == "host":
        raise UserError("--held-units holds units for AdamW on the device: give --update-on device or auto "
                        "(with --mode stream), or drop it")
    if held and in_ram is not None and held > in_ram:
        raise UserError(f"--held-units {held} exceeds the {in_ram} units in RAM (held units update from the RAM "
                        "tier): lower it")


def held_options(cfg: ModelConfig, profile: DeviceProfile, offload: str, ram_units: int | None = None) -> list[int]:
    """Counts of held units worth weighing (see streamer.scheduler's [Note: updates
    held on the device]): only with the update on a GPU, only units of the page-locked
    RAM tier, and never the head, whose gradient comes first and is needed last."""
    counts = unit_param_counts(cfg)
    if not profile.update_on_device or profile.shares_host_cores:
        return [0]
    top = min(units_in_ram(len(counts), offload, ram_units), len(counts) - 1)
    return sorted(set(range(0, top + 1, max(1, top // 8))) | {top})


# Prefetch depths weighed with held units: their updates take nothing from the link in
# the forward, so the units after them can stage that far ahead (a slot each).
DEEPER_PREFETCH = (4, 8, 12, 16)


def fastest_schedule(cfg: ModelConfig, profile: DeviceProfile, tokens_per_step: int, seq_len: int, offload: str,
                     depth: int, kept: int, state: str = "fp32", ram_units: int | None = None,
                     early: bool | None = None, held: int | None = None, micro_tokens: int | None = None,
                     budget: float = math.inf, deepen: bool = True) -> tuple[list[Visit], bool, int, int]:
    """(visits, early, held, depth): the step's visits with `held` units, or, when None,
    the count (and, with `deepen`, the deeper prefetch it makes useful) predicted
    fastest among `held_options`, by at least 1%, whose held state and extra slots fit
    `budget` beside the activations."""
    visits, lane = fastest_visits(cfg, profile, tokens_per_step, seq_len, offload, depth, kept, state, ram_units,
                                  early, held or 0)
    best = (predicted_stream_s(visits, depth, profile), visits, lane, held or 0, depth)
    if held is not None:
        return best[1:]
    from streamer.store import CHUNK_NUMEL

    counts, b = unit_param_counts(cfg), profile.compute_bytes
    whole = state_bytes(state)[0]
    ring = max(counts[1:] if cfg.tie_embeddings else counts)
    micro = micro_tokens or tokens_per_step
    activations = kept_activation_bytes(cfg, tokens_per_step, micro, b, kept)
    threshold = 0.99 * best[0]
    for option in held_options(cfg, profile, offload, ram_units)[1:]:
        held_peak = held_peak_bytes(cfg, tokens_per_step, micro, b, kept, state, option)
        for d in [depth] + [d for d in DEEPER_PREFETCH if deepen and d > depth]:
            # Besides what `memory_bytes` counts without held units: the extra slots, the
            # held stream's chunk of update temporaries, and the held state's peak.
            extra = (d - depth) * ring * b + min(CHUNK_NUMEL, max(counts)) * (whole + device_workspace(profile, state))
            if max(activations, held_peak) + extra > budget:
                continue
            visits, lane = fastest_visits(cfg, profile, tokens_per_step, seq_len, offload, d, kept, state,
                                          ram_units, early, option)
            predicted, _, backlog_s = simulate_step(visits, d)
            backlog = held_backlog_bytes(backlog_s, profile, state)
            if predicted < threshold and predicted < best[0] and max(held_peak, activations + backlog) \
                    + extra <= budget:
                best = (predicted, visits, lane, option, d)
    return best[1:]


def held_backlog_bytes(backlog_s: float, profile: DeviceProfile, state: str) -> int:
    """Held state still on the device when the forward ends, because its way back
    (device to host, a queue the forward's updates share) has `backlog_s` seconds of
    copies still ahead of it (`simulate_step`): it adds to the activations' peak."""
    whole, updated, _, _ = state_bytes(state)
    return int(backlog_s * profile.d2h_bytes_per_s * whole / updated)


def link_bytes(cfg: ModelConfig, profile: DeviceProfile, state: str, in_ram: int, held: int = 0,
               depth: int = 0) -> tuple[int, int]:
    """Bytes over the device link per step, in and out, visit by visit as `step_visits`
    (a unit still in the prefetch window, or a tied table, is not fetched again): the
    weights for the forward and again for the backward, in the compute dtype through a
    staging buffer or as the master weights are kept from a page-locked RAM tier;
    gradients out, in float32 through a staging buffer or in the store's dtype straight
    into a page-locked RAM tier. An update on the device takes the whole state in instead
    of the forward's weights, and sends back all of it but the gradient; a held unit's
    gradient never leaves, so its state comes in without it."""
    whole, updated, master, grad = state_bytes(state)
    counts = unit_param_counts(cfg)
    b, h2d, d2h = profile.compute_bytes, 0.0, 0.0
    for phase, unit, pinned in visit_order(cfg, depth):
        p = counts[unit]
        locked = not profile.shares_host_cores and unit < in_ram
        weights = master if locked else b
        if phase != "backward":  # the unit's first visit of the step carries its update
            if unit < held:
                d2h += p * updated
            elif profile.update_on_device:
                h2d, d2h = h2d + p * whole, d2h + p * updated
            else:
                h2d += p * weights
        elif not pinned:
            h2d += p * weights
        if phase == "backward" and unit < held:
            h2d += p * (whole - grad)
        elif phase != "forward":
            d2h += p * (grad if locked else 4)
    return int(h2d), int(d2h)


def simulate_step(visits: list[Visit], depth: int) -> tuple[float, float, float]:
    """Step time, stall time, and the device-to-host work still queued when the head's
    visit starts (seconds), of the engine's pipeline: a single host worker serves
    staging jobs (issued `depth` visits ahead) in FIFO order; each direction of the
    link is a queue; compute starts when its weights have arrived. A host-side update
    precedes its unit's copy in; an update on the device follows its state in, its
    kernels and its copy out overlapping chunk by chunk. The device is synchronised at
    every step's end, so the step ends when every queue is empty."""
    n = len(visits)
    arrive = [0.0] * n
    grad_done = [0.0] * n
    worker = link = d2h = disk = compute_end = stall = 0.0
    held = backlog = 0.0  # held: when the held units' stream is free

    def issue(w: int, at: float) -> None:
        nonlocal worker, link, disk, d2h, held
        visit = visits[w]
        # Storage has its own queue; the worker's job is done when both its own work
        # and the unit's I/O are (the two are pipelined chunk by chunk).
        at = max(at, visit.ready_s)
        disk = max(disk, worker, at) + visit.disk_s
        worker = max(max(worker, at) + visit.host_in_s, disk)
        if visit.kernel_s or visit.d2h_s:  # an update on the device
            begin = max(link, worker)
            if not visit.link_in_s:  # held: one after another on their own stream, the state back after each
                held = max(held, begin) + visit.kernel_s
                d2h = max(d2h, held) + visit.d2h_s
                arrive[w] = held
                return
            link = begin + visit.link_in_s
            d2h = max(d2h, begin) + visit.d2h_s
            worker = arrive[w] = max(link, d2h, begin + visit.kernel_s)  # the worker waits for the round trip
            return
        link = max(link, worker) + visit.link_in_s
        arrive[w] = link

    for w in range(min(depth, n)):
        issue(w, 0.0)
    for v, visit in enumerate(visits):
        start = max(compute_end, arrive[v], grad_done[v - 2] if v >= 2 else 0.0)
        stall += start - compute_end
        if visit.phase == "head":
            backlog = max(0.0, d2h - start)
        if v + depth < n:
            issue(v + depth, start)
        compute_end = start + visit.compute_s
        if visit.out_s:
            worker = max(worker, compute_end) + visit.out_s
        if visit.grad_out_s:  # the gradient buffer is reused two visits on
            d2h = max(d2h, compute_end) + visit.grad_out_s
            grad_done[v] = d2h
        if visit.fetch_s:
            link = max(link, compute_end) + visit.fetch_s
    return max(compute_end, worker, link, d2h), stall, backlog


def predicted_stream_s(visits: list[Visit], depth: int, profile: DeviceProfile) -> float:
    """Step time of the streamer: the pipeline simulation, or, when compute and host
    work share the CPU cores, per phase the larger of the cores' work (their sum) and
    the storage time, which the I/O threads spend waiting on the device, not computing.

    The two phases are separate because the forward carries the previous step's
    updates (most of the I/O) and cannot borrow time from the backward: the clip
    coefficient that the updates need is known only when the backward ends. (Held
    units, on a GPU only, move their state in during the backward instead.)"""
    if profile.shares_host_cores:
        forward = [v for v in visits if v.phase == "forward"]
        rest = [v for v in visits if v.phase != "forward"]
        return sum(max(sum(v.compute_s + v.host_in_s + v.link_in_s + v.out_s for v in phase),
                       sum(v.disk_read_s for v in phase), sum(v.disk_write_s for v in phase))
                   for phase in (forward, rest))
    return simulate_step(visits, depth)[0]


# The recommendation aims at 3% so that it still holds streaming within 5% of resident
# when the prediction is off by a couple of points (it has been, both ways, on CPU).
RECOMMENDED_OVERHEAD = 0.03


def recommended_tokens(cfg: ModelConfig, profile: DeviceProfile, seq_len: int, offload: str, depth: int,
                       kept: int, overhead: float = RECOMMENDED_OVERHEAD, state: str = "fp32",
                       ram_units: int | None = None, micro_tokens: int | None = None,
                       budget: float = math.inf, deepen: bool = True, fit_kept: bool = False,
                       held: int | None = None) -> int:
    """The fewest tokens per step (whole sequences) at which moving data costs at most
    `overhead` of the step: the predicted step is within that share of its compute plus
    the optimizer time resident training also pays, each count with `held` units, or
    those that suit it (`fastest_schedule`). Doublings, then a binary search.

    With `fit_kept`, each count keeps as many graphs as `budget` holds, and what it
    recomputes counts against it as moving data does: resident training, a micro-batch
    at a time, recomputes nothing. Past the count where memory starts to force
    recompute the step may never come that close; the recommendation is then the count,
    of those tried, that comes closest."""
    update_s = 28 * cfg.n_params() / profile.device_update_bytes_per_s
    act_bytes = profile.compute_bytes
    closest: list[tuple[float, int]] = []  # (predicted over ideal, tokens), of the counts that fit

    def fits(tokens: int) -> bool:
        """Whether the count's leanest activations (every block recomputing) fit the budget."""
        micro = min(micro_tokens or tokens, tokens)
        return not fit_kept or kept_activation_bytes(cfg, tokens, micro, act_bytes, 0) <= budget

    def too_slow(tokens: int) -> bool:
        if not fits(tokens):
            return True
        micro = min(micro_tokens or tokens, tokens)
        kept_here = choose_kept_graphs(cfg, tokens, micro, act_bytes, budget) if fit_kept else kept
        visits, _, _, d = fastest_schedule(cfg, profile, tokens, seq_len, offload, depth, kept_here, state,
                                           ram_units, held=held, micro_tokens=micro, budget=budget, deepen=deepen)
        ideal = sum(v.compute_s for v in visits) + update_s
        if fit_kept:  # the compute of a step that recomputes nothing
            ideal = (sum(v.compute_s for v in step_visits(cfg, profile, tokens, seq_len, offload, d, cfg.n_layer,
                                                         state, ram_units)) + update_s)
        ratio = predicted_stream_s(visits, d, profile) / ideal
        closest.append((ratio, tokens))
        return ratio > 1 + overhead

    sequences = 1
    while too_slow(sequences * seq_len) and sequences < 2**20:
        if not fits(sequences * 2 * seq_len):
            break  # more tokens do not fit even recomputing every block
        sequences *= 2
        if fit_kept and choose_kept_graphs(cfg, sequences * seq_len, min(micro_tokens or sequences * seq_len,
                                                                         sequences * seq_len),
                                           act_bytes, budget) == 0:
            break  # every block recomputes from here on: more tokens only add to it
    if fit_kept and too_slow(sequences * seq_len):
        if not closest:  # not even one sequence fits: the plan at it says what it needs
            return seq_len
        best = min(closest)[1] // seq_len  # on the doublings; then between its neighbours
        for share in (0.625, 0.75, 0.875, 1.25, 1.5, 1.75):
            if round(best * share) not in (0, best):
                too_slow(round(best * share) * seq_len)
        return min(closest)[1]
    low = sequences // 2 + 1 if sequences > 1 else 1
    while low < sequences:
        mid = (low + sequences) // 2
        if too_slow(mid * seq_len):
            low = mid + 1
        else:
            sequences = mid
    return sequences * seq_len


def activation_budget(profile: DeviceProfile, state: str, ram_params: int) -> float:
    """What activations may use by default: 80% of the device's memory, or on a CPU
    device half the host's, less the RAM tier's state, which shares it."""
    if profile.device_memory_bytes:
        return 0.8 * profile.device_memory_bytes
    return 0.5 * profile.host_memory_bytes - state_bytes(state)[0] * ram_params


def crossing_bytes(profile: DeviceProfile, state: str, offload: str) -> float:
    """Bytes per parameter of the weights on their way to the device: the compute dtype
    from a staging buffer, the master weights as kept from a page-locked RAM tier."""
    if offload == "ram" and not profile.shares_host_cores:
        return state_bytes(state)[2]
    return profile.compute_bytes


class Thresholds(NamedTuple):
    """Tokens per step below which each part of the transfers outlasts the compute that
    could hide it, and a step's bytes on the disk."""

    forward: float
    backward: float
    disk: float
    disk_read_bytes: int
    disk_write_bytes: int


def hiding_thresholds(profile: DeviceProfile, state: str, offload: str, recompute: bool, disk_params: int,
                      n_params: int, early: bool) -> Thresholds:
    """The tokens per step that hide the weights' way in during the forward (2 FLOPs
    per parameter per token against `crossing_bytes`), the backward's traffic (weights
    in, float32 gradients out, against 4 FLOPs, 6 with recompute) and the disk part's
    reads and writes (against its share of the step's compute)."""
    F, b, g = profile.matmul_flops, crossing_bytes(profile, state, offload), 4
    backward_ratio = 6 if recompute else 4  # backward FLOPs per parameter per token
    forward = F * b / (2 * profile.h2d_bytes_per_s)
    backward = F * max(b / profile.h2d_bytes_per_s, g / profile.d2h_bytes_per_s) / backward_ratio
    if not disk_params:
        return Thresholds(forward, backward, 0.0, 0, 0)
    # The update reads p, g, m, v and writes p, m, v, and hands p straight to the
    # forward; backward re-reads p; gradients are written once.
    whole, updated, master, grad = state_bytes(state)
    read, written = whole + master + (master if early else 0), updated + grad  # early: staging re-reads p
    share = disk_params / n_params  # of the compute that hides the disk part
    disk = (F * (read / profile.disk_read_bytes_per_s + written / profile.disk_write_bytes_per_s)
            * share / (2 + backward_ratio))
    return Thresholds(forward, backward, disk, int(read * disk_params), int(written * disk_params))


def make_plan(cfg: ModelConfig, profile: DeviceProfile, tokens_per_step: int, seq_len: int,
              offload: str, micro_tokens: int | None = None, prefetch_depth: int | None = None,
              memory_budget: float | None = None, recompute: str = "auto", kept_graphs: int | None = None,
              state: str = "fp32", ram_units: int | None = None, early_updates: bool | None = None,
              held_units: int | None = None, recommend: bool = True) -> Plan:
    """Bytes per tier, bytes per link, the hiding threshold and the predicted step time
    (and, with `recommend`, the recommended tokens per step: the slowest part to plan).

    `memory_budget` is what activations may use (default: 80% of the device's memory;
    a CPU device passes its host's). `early_updates` None: the faster of the two
    schedules where early updates are possible (see `fastest_visits`). `held_units`
    None: as many as `fastest_schedule` finds worth it within the budget, with the
    deeper prefetch they allow unless `prefetch_depth` is given."""
    counts = unit_param_counts(cfg)
    in_ram = units_in_ram(len(counts), offload, ram_units)
    ram_params, disk_params = sum(counts[:in_ram]), sum(counts[in_ram:])
    budget = activation_budget(profile, state, ram_params) if memory_budget is None else memory_budget
    micro = micro_tokens or tokens_per_step
    kept = (min(kept_graphs, cfg.n_layer) if kept_graphs is not None
            else choose_kept_graphs(cfg, tokens_per_step, micro, profile.compute_bytes, budget, recompute))
    do_recompute = kept < cfg.n_layer
    n_params, biggest = sum(counts), max(counts)
    flops = _unit_flops_per_token(cfg, seq_len)
    unit_compute = flops[1] * tokens_per_step / profile.matmul_flops if cfg.n_layer else 0.0
    unit_transfer = counts[1] * crossing_bytes(profile, state, offload) / profile.h2d_bytes_per_s
    depth = prefetch_depth or choose_prefetch_depth(unit_compute, unit_transfer)
    visits, early, held, depth = fastest_schedule(cfg, profile, tokens_per_step, seq_len, offload, depth, kept,
                                                  state, in_ram, early_updates, held_units, micro, budget,
                                                  deepen=prefetch_depth is None)
    predicted = predicted_stream_s(visits, depth, profile)
    backlog = held_backlog_bytes(simulate_step(visits, depth)[2], profile, state) if held else 0

    thresholds = hiding_thresholds(profile, state, offload, do_recompute, disk_params, n_params, early)

    recommended = recommended_tokens(cfg, profile, seq_len, offload, depth, kept, state=state, ram_units=in_ram,
                                     micro_tokens=micro, budget=budget, deepen=prefetch_depth is None,
                                     fit_kept=recompute == "auto" and kept_graphs is None and budget < math.inf,
                                     held=held_units) if recommend else tokens_per_step
    device_bytes, host_bytes = memory_bytes(cfg, profile, tokens_per_step, micro, offload, depth, kept, state,
                                            in_ram, early, held, backlog)
    h2d_bytes, d2h_bytes = link_bytes(cfg, profile, state, in_ram, held, depth)
    lane_s = max(v.ready_s for v in visits)  # when the lane's last update ends (0 without it)
    return Plan(
        model=cfg.name, device=profile.name, offload=offload, prefetch_depth=depth,
        tokens_per_step=tokens_per_step, seq_len=seq_len, n_params=n_params, n_units=len(counts),
        max_unit_params=biggest, device_bytes=int(device_bytes), host_bytes=int(host_bytes),
        disk_bytes=int(state_bytes(state)[0] * disk_params), state=state, ram_units=in_ram,
        h2d_bytes_per_step=h2d_bytes, d2h_bytes_per_step=d2h_bytes,
        disk_read_bytes_per_step=thresholds.disk_read_bytes, disk_write_bytes_per_step=thresholds.disk_write_bytes,
        min_tokens_forward=math.ceil(thresholds.forward), min_tokens_backward=math.ceil(thresholds.backward),
        min_tokens_disk=math.ceil(thresholds.disk),
        min_tokens_per_step=math.ceil(max(thresholds.forward, thresholds.backward, thresholds.disk)),
        recommended_tokens_per_step=recommended, recompute=do_recompute, kept_graphs=kept,
        fits_device=not profile.device_memory_bytes or device_bytes <= profile.device_memory_bytes,
        compute_s=sum(v.compute_s for v in visits), predicted_step_s=predicted,
        host_s=sum(v.host_in_s + v.out_s for v in visits),
        link_s=sum(v.link_in_s + v.fetch_s + v.d2h_s + v.grad_out_s for v in visits),
        storage_s=max(sum(v.disk_read_s for v in visits), sum(v.disk_write_s for v in visits)) + lane_s,
        early_updates=early, held_units=held,
    )


# A training process before its model: Python, torch, this package, the token data and
# the loop's own objects (the peak of `streamer train --model tiny` on CPU).
RUNTIME_BYTES = 450 * 2**20


def memory_bytes(cfg: ModelConfig, profile: DeviceProfile, tokens_per_step: int, micro_tokens: int,
                 offload: str, depth: int, kept: int, state: str = "fp32",
                 ram_units: int | None = None, early: bool = False, held: int = 0,
                 backlog: float = 0.0) -> tuple[int, int]:
    """(device bytes, host bytes) at the step's peak, mirroring what `StreamEngine`
    and the stores allocate. On a CPU device the two are the same memory: the
    process's resident set is their sum.

    Device: K + 1 ring slots sized for the largest unit outside a tied table, the tied
    table's own slot, two gradient buffers (and the tied table's), one unit's fresh
    gradients, activations (with the held state whose way back the forward has
    not yet reached, `backlog` bytes; or, where larger, the held units' state beside the
    activations still alive: `held_peak_bytes`), and with the update on the device two
    chunks' state and update temporaries (one more with the lane of early updates, one
    more with held units).
    Host: pinned staging mirrors of the slots and gradient buffers (CUDA only, and not
    for a RAM tier, which is page-locked and copies in place), the
    store (the whole state for the RAM tier; for the disk tier the pipeline's ring of
    chunk buffers, and a second ring for the lane of early updates; a compact update's
    temporaries), and the runtime itself.
    """
    from streamer.store import CHUNK_NUMEL, RING  # the store's own sizes, not copies of them

    counts = unit_param_counts(cfg)
    b, g = profile.compute_bytes, 4
    tied = counts[0] if cfg.tie_embeddings else 0
    ring = max(counts[1:] if cfg.tie_embeddings else counts)
    weights = (depth + 1) * ring * b + tied * b
    # Two gradient buffers (and the tied table's), plus the fresh gradients autograd
    # returns for one unit before they are added into its buffer.
    grads = 2 * ring * g + tied * g + max(ring, tied) * g
    activations = max(kept_activation_bytes(cfg, tokens_per_step, micro_tokens, b, kept) + backlog,
                      held_peak_bytes(cfg, tokens_per_step, micro_tokens, b, kept, state, held))
    device = weights + grads + activations
    if profile.update_on_device:  # a chunk's state and update temporaries per stream (the lane's, the held units')
        streams = 2 + early + (held > 0)
        device += streams * min(CHUNK_NUMEL, max(counts)) * (state_bytes(state)[0] + device_workspace(profile, state))
    # A page-locked RAM tier copies to and from the device in place: nothing stages.
    staging = 0 if profile.shares_host_cores or offload == "ram" else weights + grads
    # The RAM part of the state; for a disk part, the pipeline's ring (the disk store's
    # scratch set is touched only by export and resume, never during a step, so it holds
    # no resident pages then).
    in_ram = units_in_ram(len(counts), offload, ram_units)
    store = state_bytes(state)[0] * sum(counts[:in_ram])
    store += FORMATS[state].workspace_bytes * min(CHUNK_NUMEL, max(counts))  # the update's temporaries
    if in_ram < len(counts):
        store += (2 if early else 1) * RING * state_bytes(state)[0] * min(CHUNK_NUMEL, max(counts[in_ram:]))
    return int(device), int(staging + store + RUNTIME_BYTES)


def predicted_peak_rss(plan: Plan) -> int:
    """The process's peak resident set on a CPU device: device and host are one memory."""
    return plan.device_bytes + plan.host_bytes


def peak_bytes(plan: Plan, profile: DeviceProfile) -> int:
    """The memory a `--max-memory` limit applies to: the device's (a CPU device's
    is the process's whole resident set)."""
    return predicted_peak_rss(plan) if profile.shares_host_cores else plan.device_bytes


def fit_memory(cfg: ModelConfig, profile: DeviceProfile, tokens_per_step: int, seq_len: int, offload: str,
               micro_tokens: int, limit_bytes: float, prefetch_depth: int | None = None,
               recompute: str = "auto", state: str = "fp32", ram_units: int | None = None,
               held_units: int | None = None) -> Plan:
    """The fastest plan whose peak memory stays within `limit_bytes`: as many blocks
    keep their graphs as fit (all of them with `--recompute no`, none with `yes`);
    refuse when even the leanest allowed plan does not fit. Held units, if any are
    worth it (`held_units` None), only where they fit too."""
    first = make_plan(cfg, profile, tokens_per_step, seq_len, offload, micro_tokens=micro_tokens,
                      prefetch_depth=prefetch_depth, memory_budget=float("inf"), recompute="yes", state=state,
                      ram_units=ram_units, held_units=0, recommend=False)
    depth = first.prefetch_depth
    allowed = {"auto": range(cfg.n_layer, -1, -1), "yes": [0], "no": [cfg.n_layer]}[recompute]
    peaks = {}
    for kept in allowed:  # memory alone decides; plan only the chosen count
        device, host = memory_bytes(cfg, profile, tokens_per_step, micro_tokens, offload, depth, kept, state,
                                    ram_units, first.early_updates)
        peaks[kept] = device + host if profile.shares_host_cores else device
        if peaks[kept] <= limit_bytes:
            # What the activations may use under the limit: held units must fit in it too.
            allowance = limit_bytes - peaks[kept] + kept_activation_bytes(cfg, tokens_per_step, micro_tokens,
                                                                          profile.compute_bytes, kept)
            plan = make_plan(cfg, profile, tokens_per_step, seq_len, offload, micro_tokens=micro_tokens,
                             prefetch_depth=prefetch_depth, memory_budget=allowance, kept_graphs=kept,
                             state=state, ram_units=ram_units, held_units=held_units, recommend=False)
            # Recommended within the same limit, each count with the graphs it can keep.
            plan = replace(plan, recommended_tokens_per_step=recommended_tokens(
                cfg, profile, seq_len, offload, plan.prefetch_depth, kept, state=state, ram_units=ram_units,
                micro_tokens=micro_tokens, budget=allowance, deepen=prefetch_depth is None,
                fit_kept=recompute == "auto", held=held_units))
            if peak_bytes(plan, profile) <= limit_bytes or not plan.held_units:
                return plan
            if held_units:  # asked for, and they do not fit
                raise UserError(f"{cfg.name} at {tokens_per_step:,} tokens per step with --held-units {held_units} "
                                f"needs about {gib(peak_bytes(plan, profile))} GiB but --max-memory is "
                                f"{gib(limit_bytes)} GiB: hold fewer units, or drop --held-units to let "
                                "the plan choose")
            return make_plan(cfg, profile, tokens_per_step, seq_len, offload, micro_tokens=micro_tokens,
                             prefetch_depth=depth, memory_budget=float("inf"), kept_graphs=kept, state=state,
                             ram_units=ram_units, held_units=0)
    need = min(peaks.values())
    raise UserError(f"{cfg.name} at {tokens_per_step:,} tokens per step needs about {gib(need)} GiB "
                    f"{'' if recompute == 'auto' else f'with --recompute {recompute} '}but --max-memory is "
                    f"{gib(limit_bytes)} GiB: lower --batch-size or --seq-len, "
                    f"{'allow --recompute yes, ' if recompute == 'no' else ''}or raise --max-memory")


def gib(nbytes: float) -> str:
    """Bytes in GiB for a message: a decimal above 1, two significant digits below, so
    that a limit of 0.45 GiB is not told it is 0.5 (nor 0.05, that it is 0.1)."""
    value = nbytes / 2**30
    return f"{value:.1f}" if value >= 1 or value == 0 else f"{value:.2g}"


def _dense_peak_bytes(params: float, largest: int, gathered: float, activations: float, accum: int) -> int:
    """The peak of a process that holds `params` parameters' weights and AdamW moments
    (12 bytes each), `gathered` bytes of parameters it holds whole all step, and whose
    gradients (4 bytes each) are freed after every update. With one micro-batch the
    gradients appear during backward as the graph is freed, so the peak is the larger
    of backward's start (every activation, no gradient yet) and the update (every
    gradient, and AdamW's scratch for the largest tensor); with accumulation the later
    micro-batches' backward starts with all of them, and autograd's fresh gradient of
    the largest tensor before it is added into `.grad`."""
    grads = 4 * params
    at_start = activations + (grads + 4 * largest if accum > 1 else 0)
    return int(12 * params + gathered + max(at_start, grads + 4 * largest) + RUNTIME_BYTES)


def predict_resident_peak_bytes(cfg: ModelConfig, micro_tokens: int, act_bytes: int, accum: int = 1) -> int:
    """Resident training's peak: weights, gradients and AdamW moments of the whole
    model, one micro-batch's autograd graph and the head's logits (see
    `_dense_peak_bytes` for when they coincide), and the runtime."""
    activations = graph_activation_bytes(cfg, micro_tokens, act_bytes) + head_bytes(cfg, micro_tokens)
    return _dense_peak_bytes(cfg.n_params(), max(unit_param_counts(cfg)), 0, activations, accum)


def predict_fsdp_step_s(cfg: ModelConfig, tokens_per_rank: int, seq_len: int, world: int, rank_flops: float,
                        gather_bytes_per_s: float, scatter_bytes_per_s: float, update_bytes_per_s: float) -> float:
    """FSDP2 over `world` processes, each at `rank_flops`: its share of forward and
    backward, the all-gathers of parameters (forward, and again in backward after
    resharding, 2 x 4 x P x (N - 1) / N bytes received), the reduce-scatter of
    gradients (4 x P x (N - 1) / N, slower per byte: it also sums), and AdamW on its
    1/N shard. Summed: on a CPU the collectives use the same cores."""
    compute = cfg.flops_per_token(seq_len) * tokens_per_rank / rank_flops
    moved = 4 * cfg.n_params() * (world - 1) / world
    return (compute + 2 * moved / gather_bytes_per_s + moved / scatter_bytes_per_s
            + 28 * cfg.n_params() / world / update_bytes_per_s)


def predict_fsdp_offload_step_s(cfg: ModelConfig, tokens: int, seq_len: int, device_flops: float,
                                h2d_bytes_per_s: float, d2h_bytes_per_s: float, update_bytes_per_s: float) -> float:
    """FSDP2 on one GPU with `CPUOffloadPolicy`: float32 parameters live on the host and
    cross to the device for the forward and again for the backward (8 x P bytes in),
    gradients come back in float32 (4 x P out), the copies prefetched beside the compute
    on their own streams; then AdamW runs on the host over every parameter, after the
    backward and beside nothing."""
    compute = cfg.flops_per_token(seq_len) * tokens / device_flops
    p = cfg.n_params()
    return max(compute, 8 * p / h2d_bytes_per_s, 4 * p / d2h_bytes_per_s) + 28 * p / update_bytes_per_s


def predict_fsdp_peak_bytes(cfg: ModelConfig, micro_tokens: int, world: int, act_bytes: int) -> int:
    """One FSDP2 process: its 1/N shard of weights, moments and gradients; the root's
    parameters (embeddings, final norm, an untied head) gathered whole for the step;
    two blocks gathered at a time (the one running and the one prefetched); one
    micro-batch's graph and logits; the runtime (see `_dense_peak_bytes`)."""
    counts = unit_param_counts(cfg)
    root = counts[0] + counts[-1]
    block = counts[1] if cfg.n_layer else 0
    activations = graph_activation_bytes(cfg, micro_tokens, act_bytes) + head_bytes(cfg, micro_tokens)
    return _dense_peak_bytes(sum(counts) / world, max(root, block), 4 * root + 2 * 4 * block, activations, 1)


def predict_resident_step_s(cfg: ModelConfig, profile: DeviceProfile, tokens_per_step: int, seq_len: int) -> float:
    """Resident training: forward + backward on the device, then the AdamW update there."""
    flops = sum(_unit_flops_per_token(cfg, seq_len)) * tokens_per_step
    return 3 * flops / profile.matmul_flops + 28 * cfg.n_params() / profile.device_update_bytes_per_s


def offload_for_plan(cfg: ModelConfig, host_available: float, disk_free: float, asked: str,
                     state: str = "fp32") -> tuple[str, str]:
    """The tier `streamer train` would pick, and what does not fit (empty when all fits);
    the plan command reports a shortfall instead of refusing."""
    try:
        return choose_offload(cfg, host_available, disk_free, asked, state), ""
    except UserError as exc:
        return ("split" if asked == "auto" else asked), str(exc)


def choose_offload(cfg: ModelConfig, host_available: float, disk_free: float, asked: str = "auto",
                   state: str = "fp32") -> str:
    """RAM when the whole state fits in 80% of available memory; else the disk when it
    fits there; else split (the leading units in RAM, the rest on disk) when the two
    together hold it. Refuse when nothing fits, saying what is short and by how much."""
    need = state_bytes(state)[0] * cfg.n_params()
    smaller = {"fp32": "use --state compact (6 bytes per parameter) or compact8 (5), ",
               "compact": "use --state compact8 (5 bytes per parameter), "}.get(state, "")
    fits_ram = need <= 0.8 * host_available
    if asked == "ram" and not fits_ram:
        raise UserError(f"{cfg.name} needs {gib(need)} GiB of host RAM for its state but "
                        f"{gib(0.8 * host_available)} GiB is usable "
                        f"({gib(need - 0.8 * host_available)} GiB short): use --offload disk or split")
    if asked == "ram" or (asked == "auto" and fits_ram):
        return "ram"
    if asked == "split" or (asked == "auto" and need > disk_free):
        in_ram = split_ram_units(cfg, host_available, state)
        on_disk = state_bytes(state)[0] * sum(unit_param_counts(cfg)[in_ram:])
        if on_disk <= disk_free:
            return "split"
        raise UserError(f"{cfg.name} needs {gib(need)} GiB for its state: {gib(need - on_disk)} GiB fit "
                        f"in RAM, and the other {gib(on_disk)} GiB need disk but {gib(disk_free)} GiB is "
                        f"free: free disk space, {smaller}or choose a smaller --model")
    if need > disk_free:
        raise UserError(f"{cfg.name} needs {gib(need)} GiB of disk for its state but "
                        f"{gib(disk_free)} GiB is free ({gib(need - disk_free)} GiB short): "
                        f"free disk space, use --offload split, {smaller}or choose a smaller --model")
    return "disk"


# --- measurement -------------------------------------------------------------------

_PEAK_CACHE: dict[tuple[str, str], float] = {}


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 1024, seconds: float = 0.3,
                         rounds: int = 1) -> float:
    """Sustained square-matmul rate on `device`, FLOP/s: over `seconds`, or with `rounds`
    the fastest of that many rounds of at least `seconds` / `rounds` each (what the
    device does when no other tenant of a shared machine takes its cores or clocks)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    c = a @ b  # warm-up: first call pays for library set-up
    _sync(device)
    best = 0.0
    for _ in range(rounds):
        count, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds / rounds:
            torch.matmul(a, b, out=c)
            count += 1
        _sync(device)
        best = max(best, 2 * size**3 * count / (time.perf_counter() - started))
    return best


def peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """The matmul rate MFU is measured against: measured once per process, the fastest of
    a few rounds (a rate measured while another process took the cores made a later,
    undisturbed step's MFU pass 100%)."""
    key = (str(device), str(dtype))
    if key not in _PEAK_CACHE:
        _PEAK_CACHE[key] = measure_matmul_flops(device, dtype, size=4096 if device.type == "cuda" else 2048,
                                                rounds=3)
    return _PEAK_CACHE[key]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_copy_bandwidth(device: torch.device, nbytes: int = 256 * 2**20) -> tuple[float, float]:
    """Host -> device and device -> host bytes/s (pinned on CUDA; a memcpy on CPU)."""
    pin = device.type == "cuda"
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rates = []
    for dst, src in ((dev, host), (host, dev)):
        dst.copy_(src, non_blocking=pin)
        _sync(device)
        started = time.perf_counter()
        for _ in range(4):
            dst.copy_(src, non_blocking=pin)
        _sync(device)
        rates.append(4 * nbytes / (time.perf_counter() - started))
    return rates[0], rates[1]


def measure_disk_bandwidth(folder: Path, nbytes: int = 512 * 2**20, streams: int = 2) -> tuple[float, float]:
    """Sequential read and write bytes/s of `streams` files at once, as the store's I/O
    threads move them (a pass's writer beside the gradient writes; a second lane): 16 MiB
    writes then one fsync each (so the time counts the data reaching storage, as a long
    run's writeback does), and reads with the page cache dropped first. One stream alone
    understates the disk: 0.33-1.05 GB/s of fsync'd writes on the project's CPU machine,
    where two streams wrote 1.66-1.95 GB/s in the same minute."""
    from concurrent.futures import ThreadPoolExecutor

    folder.mkdir(parents=True, exist_ok=True)
    piece = os.urandom(16 * 2**20)
    share = max(len(piece), nbytes // streams // len(piece) * len(piece))
    files = [tempfile.mkstemp(dir=folder, prefix=".bw-probe-") for _ in range(streams)]

    def write(fd: int) -> None:
        for offset in range(0, share, len(piece)):
            os.pwrite(fd, piece, offset)
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)

    def read(fd: int) -> int:
        total = 0
        while chunk := os.pread(fd, 16 * 2**20, total):
            total += len(chunk)
        return total

    try:
        with ThreadPoolExecutor(streams) as pool:
            started = time.perf_counter()
            list(pool.map(write, [fd for fd, _ in files]))
            write_rate = streams * share / (time.perf_counter() - started)
            started = time.perf_counter()
            total = sum(pool.map(read, [fd for fd, _ in files]))
            read_rate = total / (time.perf_counter() - started)
    finally:
        for fd, name in files:
            os.close(fd)
            os.unlink(name)
    return read_rate, write_rate


def measure_page_cache_rate(folder: Path, nbytes: int = 256 * 2**20) -> float:
    """Bytes per second that one thread writes into and reads back from the page cache,
    as the disk tier's I/O threads move a store that the cache holds: the kernel's
    copies, single-threaded, at a third to a half of a two-thread memcpy on 2 CPU cores."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = memoryview(bytearray(os.urandom(16 * 2**20)))
    fd, name = tempfile.mkstemp(dir=folder, prefix=".cache-probe-")
    try:
        for offset in range(0, nbytes, len(buffer)):  # first touch: allocate the cache pages
            os.pwrite(fd, buffer, offset)
        started = time.perf_counter()
        for offset in range(0, nbytes, len(buffer)):
            os.pwrite(fd, buffer, offset)
        for offset in range(0, nbytes, len(buffer)):
            os.preadv(fd, [buffer], offset)
        return 2 * nbytes / (time.perf_counter() - started)
    finally:
        os.close(fd)
        os.unlink(name)


def measure_update_rate(numel: int = 8 * 2**20, state: str = "fp32", device: torch.device | None = None,
                        fused: bool | None = None) -> float:
    """AdamW over one chunk in a state format, on the host (or `device`, the state
    already there), in float32 AdamW's bytes per second (28 bytes per parameter
    touched), so that rates of all formats compare. `fused` as `StateFormat.update_`'s."""
    from streamer.optim import OptimConfig

    device = device or torch.device("cpu")
    fmt = FORMATS[state]
    buffers = {b.name: torch.zeros(b.numel(numel), dtype=b.dtype, device=device) for b in fmt.buffers}
    buffers["param"].copy_(torch.randn(numel, device=device))
    fmt.store_grad(torch.randn(numel, device=device), buffers)
    cfg = OptimConfig()

    def update(step: int) -> None:
        fmt.update_(buffers, step=step, lr=1e-3, cfg=cfg, decay_numel=numel, grad_scale=1.0, seed=step, fused=fused)

    update(1)
    fastest = math.inf
    for step in range(2, 5):  # the fastest pass, as in `measure_model_flops`
        _sync(device)
        started = time.perf_counter()
        update(step)
        _sync(device)
        fastest = min(fastest, time.perf_counter() - started)
    return 28 * numel / fastest


def measure_model_flops(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, batch: int, seq_len: int,
                        repeat: int = 3, before_pass: Callable[[], object] | None = None) -> float:
    """The FLOP rate this model's own compute sustains, forward and backward, at a
    micro-batch of `batch` x `seq_len`: a short profiling run of the embedding, one
    block and the head (with its loss), weighted as the model holds them.
    It sees what a square matmul does not: attention, norms, activations, the loss's
    memory-bound softmax, and the embedding's dense table gradient; on a 2-core CPU
    gpt3-125m's blocks run at 1.25x its head's rate. Each part's time is the fastest
    of `repeat` timed passes after a warm-up: other tenants of a shared machine only
    ever add time (on this project's CPU machine, up to 2x in a pass). Processes that
    share the machine pass a barrier as `before_pass`, so that every timed pass runs
    while the others run theirs: the rate under their contention, not beside an idle
    neighbour."""
    from models.gpt import build_unit, init_unit, loss_fn

    head_index = cfg.n_layer + 1
    x = torch.randn(batch, seq_len, cfg.d_model, device=device, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, cfg.vocab_size, (batch, seq_len), device=device)
    # A tied head reads the embedding table; an untied one owns its projection.
    tied = (torch.randn(cfg.padded_vocab_size, cfg.d_model, device=device, dtype=dtype) * 0.02).requires_grad_()

    def timed(index: int) -> float:
        # Built and drawn where it runs: a 20B block is 453 M parameters, seconds to
        # draw on a CPU core and moments on a GPU.
        with torch.device(device):
            unit = build_unit(cfg, index).to(dtype=dtype)
        init_unit(unit, cfg, seed=0, index=index)
        if index == head_index:
            run = lambda: loss_fn(unit(x, tied if cfg.tie_embeddings else None), targets).backward()  # noqa: E731
        else:
            inputs = targets if index == 0 else x  # the embedding reads token ids
            run = lambda: unit(inputs).float().square().mean().backward()  # noqa: E731
        run()  # warm-up: allocations, kernel selection
        times = []
        for _ in range(repeat):
            if before_pass is not None:
                before_pass()
            _sync(device)
            started = time.perf_counter()
            run()
            _sync(device)
            times.append(time.perf_counter() - started)
        return min(times)

    per_token = _unit_flops_per_token(cfg, seq_len)
    # The embedding does no matmul FLOPs but costs time: its backward writes a dense
    # gradient of the whole table (154 MB for gpt3-125m) every micro-batch.
    seconds = timed(0) + cfg.n_layer * timed(1) + timed(head_index)
    flops = 3 * (cfg.n_layer * per_token[1] + per_token[-1]) * batch * seq_len  # forward + 2x backward
    return flops / seconds


def measure_profile(device: torch.device, dtype: torch.dtype, disk_folder: Path,
                    model: tuple[ModelConfig, int, int] | None = None, state: str = "fp32",
                    host_memory_gib: float | None = None) -> DeviceProfile:
    """Calibrate every rate on this machine. With `model=(cfg, batch, seq_len)` the
    compute rate comes from profiling one block of that model (`measure_model_flops`)
    instead of a square matmul."""
    base = PROFILES["cpu" if device.type == "cpu" else "h100"]
    h2d, d2h = measure_copy_bandwidth(device)
    # A copy of n bytes reads n and writes n.
    host_copy = 2 * (h2d if device.type == "cpu" else measure_copy_bandwidth(torch.device("cpu"))[0])
    read, write = measure_disk_bandwidth(disk_folder)
    cached_io = measure_page_cache_rate(disk_folder)
    update = measure_update_rate(state=state)
    # Resident training's AdamW (what the recommendation weighs a step against) is
    # float32's, whatever the store's format costs.
    fp32_update = update if state == "fp32" else measure_update_rate(state="fp32")
    device_update = fp32_update if device.type == "cpu" else measure_update_rate(device=device)
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else 0
    # What the OS reports, unless the user says what this machine can give (see host_available).
    free = host_available(host_memory_gib)
    told = host_memory_gib is not None or bool(os.environ.get(HOST_MEMORY_ENV))
    total = free if told else psutil.virtual_memory().total
    if model is not None:
        flops = measure_model_flops(model[0], device, dtype, model[1], model[2])
    else:
        flops = measure_matmul_flops(device, dtype, size=4096 if device.type == "cuda" else 1024, seconds=0.5)
    return replace(base, name=f"measured-{device.type}", matmul_flops=flops,
                   h2d_bytes_per_s=h2d, d2h_bytes_per_s=d2h, device_memory_bytes=memory,
                   disk_read_bytes_per_s=read, disk_write_bytes_per_s=write, cached_io_bytes_per_s=cached_io,
                   host_update_bytes_per_s=update, update_state=state, host_copy_bytes_per_s=host_copy,
                   page_cache_bytes=free, host_memory_bytes=total,
                   device_update_bytes_per_s=device_update,
                   compute_bytes=torch.tensor([], dtype=dtype).element_size())


# --- command line ------------------------------------------------------------------


def add_plan_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="bytes per tier, bytes per link, hiding threshold, predicted step time")
    p.add_argument("--model", default="tiny",
                   help="a registry name, or a folder of weights whose architecture to plan for (as train's)")
    p.add_argument("--device", default=None,
                   help=f"a profile ({', '.join(PROFILES)}; default cpu), or with --measure the device to measure: "
                        "cuda or cpu (default: cuda when there is one)")
    p.add_argument("--tokens-per-step", type=int, default=None, help="default: the hiding threshold")
    p.add_argument("--seq-len", type=int, default=None, help="default: the model's context")
    p.add_argument("--micro-tokens", type=int, default=None,
                   help="tokens per micro-batch (train's --batch-size x --seq-len); it sizes the "
                        "head's logits and the working set. Default: the whole step in one, or one sequence "
                        "with the recommended tokens per step")
    p.add_argument("--offload", default="auto", choices=["auto", "ram", "disk", "split"])
    p.add_argument("--state", default="fp32", choices=list(FORMATS),
                   help="host state format: fp32 (16 bytes/parameter), compact (about 6) or compact8 (about 5)")
    p.add_argument("--update-on", default="auto", choices=["auto", "host", "device"],
                   help="where AdamW runs, as train's flag: the device's update costs the host only copies; auto: "
                        "the faster of the two plans")
    p.add_argument("--held-units", type=int, default=None,
                   help="with --update-on device, as train's flag: units whose state comes in during the backward "
                        "(default: as many as the plan finds worth it)")
    p.add_argument("--max-memory", type=float, default=None, metavar="GIB",
                   help="plan for this peak memory (the device's; a CPU's: the process's), as train does")
    p.add_argument("--host-memory", type=float, default=None, metavar="GIB",
                   help="host RAM to plan with (default: the profile's; with --measure or the cpu profile, "
                        "what this machine reports available)")
    p.add_argument("--measure", action="store_true", help="calibrate on this machine instead of a profile")
    p.add_argument("--store-dir", "--disk", dest="disk", type=Path, default=Path("."),
                   help="folder the disk tier would use (train's --store-dir; default: here)")
    p.add_argument("--json", action="store_true")


class _PlanReport(NamedTuple):
    plan: Plan
    profile: DeviceProfile  # the profile as the update's place sees it
    shortfall: str  # why the state does not fit the host, or ""
    alternatives: list[Plan]  # smaller state formats that keep more units in RAM


def _planned(args: argparse.Namespace, cfg: ModelConfig, measured: DeviceProfile, device: torch.device | None,
             place: str) -> _PlanReport:
    """`streamer plan`'s plan, with AdamW in `place` (host or device)."""
    rates: dict[str, float | None] = {}  # each state's update rate on this GPU, measured once
    profile = measured

    def on_device(state: str, offload: str) -> DeviceProfile:
        """The update's rate on this GPU in `state`, measured, or the profile's estimate."""
        if state not in rates:
            rates[state] = (measure_update_rate(state=state, device=device)
                            if device is not None and device.type == "cuda" else None)
        return with_device_update(measured, state, rates[state], pipelined=offload == "ram")

    if place == "device":
        profile = on_device(args.state, "disk")  # for the recommendation only: the tiers are not chosen yet
    seq_len = args.seq_len or cfg.block_size
    if args.measure or args.device in (None, "cpu"):  # this machine's memory and disk
        host = host_available(args.host_memory)
        disk = shutil.disk_usage(existing_parent(args.disk)).free
    else:  # the profiled machine's
        host, disk = profile.host_memory_bytes, profile.disk_free_bytes
    offload, shortfall = offload_for_plan(cfg, host, disk, args.offload, args.state)
    ram_units = split_ram_units(cfg, host, args.state) if offload == "split" else None
    tokens = args.tokens_per_step
    if tokens is None:
        tokens = _recommended_for(args, cfg, profile, seq_len, offload, ram_units)
    # The recommendation plans one sequence per micro-batch unless told otherwise: a
    # whole recommended step in one would hold its logits for every token at once.
    micro = args.micro_tokens or (tokens if args.tokens_per_step else seq_len)
    if tokens % micro:
        raise UserError(f"--micro-tokens {micro} does not divide --tokens-per-step {tokens}: a step is whole "
                        "micro-batches")
    check_held_units(cfg, args.held_units, place)

    def plan_for(state: str, offload: str, ram_units: int | None) -> Plan:
        prof = on_device(state, offload) if place == "device" else measured
        held = args.held_units
        check_held_units(cfg, held, place, units_in_ram(cfg.n_layer + 2, offload, ram_units))
        if args.max_memory:
            return fit_memory(cfg, prof, tokens, seq_len, offload, micro, args.max_memory * 2**30,
                              state=state, ram_units=ram_units, held_units=held)
        return make_plan(cfg, prof, tokens, seq_len, offload, micro_tokens=micro, state=state, ram_units=ram_units,
                         held_units=held)

    plan = plan_for(args.state, offload, ram_units)
    # A state that does not fit, or leaves units on disk, is compared with each smaller
    # format that fits and keeps more of them in RAM: the choice the tiers force, with
    # its price in step time.
    in_ram = 0 if shortfall else units_in_ram(plan.n_units, offload, ram_units)
    alternatives = []
    for smaller, other, other_units in _smaller_states(cfg, args.state, host, disk, offload, shortfall):
        if units_in_ram(plan.n_units, other, other_units) > in_ram:
            with contextlib.suppress(UserError):  # it may not fit --max-memory: then there is nothing to weigh
                alternatives.append(plan_for(smaller, other, other_units))
    return _PlanReport(plan, profile, shortfall, alternatives)


def _recommended_for(args: argparse.Namespace, cfg: ModelConfig, profile: DeviceProfile, seq_len: int, offload: str,
                     ram_units: int | None) -> int:
    """`streamer plan`'s tokens per step when none are given: the recommendation, within
    `--max-memory` (what is left of it for activations once the leanest plan's own
    memory is counted), in whole micro-batches of `--micro-tokens`."""
    budget = None
    if args.max_memory:
        lean = make_plan(cfg, profile, seq_len, seq_len, offload, state=args.state, ram_units=ram_units,
                         recompute="yes", held_units=0, recommend=False)
        budget = (args.max_memory * 2**30 - peak_bytes(lean, profile)
                  + kept_activation_bytes(cfg, seq_len, seq_len, profile.compute_bytes, 0))
    tokens = make_plan(cfg, profile, seq_len, seq_len, offload, micro_tokens=args.micro_tokens or seq_len,
                       memory_budget=budget, state=args.state, ram_units=ram_units).recommended_tokens_per_step
    if args.micro_tokens and args.micro_tokens > 0:  # whole micro-batches: the next count train can run
        tokens = -(-tokens // args.micro_tokens) * args.micro_tokens
    return tokens


def _smaller_states(cfg: ModelConfig, state: str, host: float, disk: float, offload: str,
                    shortfall: str) -> list[tuple[str, str, int | None]]:
    """The formats smaller than `state` that fit this host, each with its tiers (offload,
    units in RAM): none when `state` fits in RAM already."""
    if offload == "ram" and not shortfall:
        return []
    smaller = []
    for other_state in list(FORMATS)[list(FORMATS).index(state) + 1:]:
        other, short = offload_for_plan(cfg, host, disk, "auto", other_state)
        if not short:
            smaller.append((other_state, other, split_ram_units(cfg, host, other_state) if other == "split" else None))
    return smaller


def cmd_plan(args: argparse.Namespace) -> None:
    from streamer.train import check_store_dir, model_config

    cfg = model_config(args.model)
    if args.host_memory is not None and not 0 < args.host_memory < math.inf:
        raise UserError(f"--host-memory must be a positive number of GiB, got {args.host_memory}")
    check_store_dir(args.disk)
    _check_plan_flags(args, cfg)
    profile, device = _plan_profile(args)
    # --update-on auto plans both places and takes the faster, as train does ([Note: where
    # AdamW runs]); a place whose plan is refused (--max-memory) is out.
    if args.update_on != "auto":
        places = [args.update_on]
    else:
        places = ["device"] if args.held_units else ["host"] if profile.shares_host_cores else ["host", "device"]
    reports, refused = {}, {}
    for place in places:
        try:
            reports[place] = _planned(args, cfg, profile, device, place)
        except UserError as exc:
            refused[place] = exc
    if not reports:
        raise refused[places[0]]
    chosen = faster_update_place({place: report.plan for place, report in reports.items()})
    plan, profile, shortfall, alternatives = reports[chosen]
    other = next((reports[place].plan for place in reports if place != chosen), None)
    sampling = sampling_estimate(cfg, profile) if profile.device_memory_bytes else None  # a GPU's
    if args.json:
        print(json.dumps({**asdict(plan), "fits": not shortfall, "shortfall": shortfall, "profile": asdict(profile),
                          "update_on": chosen,
                          "other_update_on": {"update_on": "host" if chosen == "device" else "device",
                                              "predicted_step_s": other.predicted_step_s} if other else None,
                          "smaller_state": asdict(alternatives[0]) if alternatives else None,
                          "smaller_states": [asdict(a) for a in alternatives],
                          "sampling": asdict(sampling) if sampling else None}, indent=2))
        return
    _print_plan(plan, profile, chosen, other, shortfall, alternatives, sampling)


def _check_plan_flags(args: argparse.Namespace, cfg: ModelConfig) -> None:
    """`streamer plan`'s counts: whole sequences within the model's context."""
    if args.seq_len is not None and not 0 < args.seq_len <= cfg.block_size:
        raise UserError(f"--seq-len must be in 1..{cfg.block_size} for {cfg.name}, got {args.seq_len}")
    seq_len = args.seq_len or cfg.block_size
    for flag, tokens in (("--tokens-per-step", args.tokens_per_step), ("--micro-tokens", args.micro_tokens)):
        if tokens is not None and (tokens <= 0 or tokens % seq_len):
            raise UserError(f"{flag} must be whole sequences, a positive multiple of --seq-len ({seq_len}), got "
                            f"{tokens}")
    if args.max_memory is not None and not 0 < args.max_memory < math.inf:
        raise UserError(f"--max-memory must be a positive number of GiB, got {args.max_memory}")


def _plan_profile(args: argparse.Namespace) -> tuple[DeviceProfile, torch.device | None]:
    """The profile `streamer plan` plans with: this machine's rates measured
    (`--measure`, with the device measured), or a named profile's."""
    if args.measure:
        if args.device not in (None, "cpu", "cuda"):
            raise UserError(f"--measure measures cuda or cpu, got --device {args.device}: drop --measure to plan "
                            "with that profile")
        if args.device == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda --measure needs a CUDA device, and this machine has none")
        device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        # Timed in the folder's nearest existing parent: a folder not yet made is not made.
        return measure_profile(device, dtype, existing_parent(args.disk), state=args.state,
                               host_memory_gib=args.host_memory), device
    if (args.device or "cpu") not in PROFILES:
        raise UserError(f"unknown device profile '{args.device}': use one of {', '.join(PROFILES)} or --measure")
    profile = PROFILES[args.device or "cpu"]
    if args.host_memory is not None:
        profile = replace(profile, host_memory_bytes=host_available(args.host_memory))
    return profile, None


def _print_plan(plan: Plan, profile: DeviceProfile, chosen: str, other: Plan | None, shortfall: str,
                alternatives: list[Plan], sampling: SamplingEstimate | None) -> None:
    """`streamer plan`'s text: the plan, the other place of the update, the smaller
    states weighed and what sampling would cost."""
    print(format_plan(plan, profile))
    if other is not None:
        print(f"  AdamW on the {chosen} (--update-on auto): on the {'host' if chosen == 'device' else 'device'} "
              f"the step would take {other.predicted_step_s:.3f} s")
    if shortfall:
        print(f"  does not fit: {shortfall.split(': ')[0]}")
    for alternative in alternatives:
        where = "all in RAM" if alternative.offload == "ram" else f"{alternative.ram_units} units in RAM"
        print(f"  --state {alternative.state} ({state_bytes(alternative.state)[0]:.2f} bytes/parameter) would "
              f"{'fit, with' if shortfall else 'keep'} {where}: predicted step {alternative.predicted_step_s:.3f} s, "
              f"device memory {alternative.device_bytes / 2**30:.2f} GiB")
    if sampling:
        held = (f"held whole ({sampling.weight_bytes / 2**30:.1f} GiB) at least {sampling.held_s_per_token:.3f} s"
                if sampling.held_fits else f"too large to hold whole ({sampling.weight_bytes / 2**30:.1f} GiB)")
        print(f"  streamer sample, a token: {held}; streamed ({sampling.streamed_device_bytes / 2**30:.1f} GiB on "
              f"the device) at least {sampling.streamed_s_per_token:.3f} s from host memory, "
              f"{sampling.disk_s_per_token:.2f} s from disk, for all samples together")


def bound_text(plan: Plan) -> str:
    """The step's parts, largest first: the largest is what more tokens per step (for
    compute) or faster hardware (for the rest) must beat."""
    parts = {"compute": plan.compute_s, "host worker (updates, copies)": plan.host_s,
             "host-device link": plan.link_s, "storage": plan.storage_s}
    ranked = sorted(((s, name) for name, s in parts.items() if s > 0), reverse=True)
    return ", ".join(f"{name} {s:.3f} s" for s, name in ranked)


def recompute_text(plan: Plan) -> str:
    if not plan.recompute:
        return "no"
    return f"all but the last {plan.kept_graphs} blocks" if plan.kept_graphs else "every block"


def format_plan(plan: Plan, profile: DeviceProfile) -> str:
    gib = 2**30
    lines = [
        f"plan for {plan.model} on {profile.name} ({profile.matmul_flops / 1e12:.1f} TFLOP/s, "
        f"h2d {profile.h2d_bytes_per_s / 1e9:.1f} GB/s), offload {plan.offload}"
        f"{f' ({plan.ram_units} of {plan.n_units} units in RAM)' if plan.offload == 'split' else ''}, "
        f"prefetch {plan.prefetch_depth}, "
        f"state {plan.state} ({state_bytes(plan.state)[0]:.2f} bytes/parameter)",
        f"  parameters        {plan.n_params:>16,} in {plan.n_units} units (largest {plan.max_unit_params:,})",
        f"  device memory     {plan.device_bytes / gib:>12.2f} GiB",
        f"  host memory       {plan.host_bytes / gib:>12.2f} GiB",
        f"  disk              {plan.disk_bytes / gib:>12.2f} GiB",
        f"  per step: h2d {plan.h2d_bytes_per_step / 1e9:.2f} GB, d2h {plan.d2h_bytes_per_step / 1e9:.2f} GB, "
        f"disk read {plan.disk_read_bytes_per_step / 1e9:.2f} GB, write {plan.disk_write_bytes_per_step / 1e9:.2f} GB",
        f"  tokens per step to hide transfers: forward {plan.min_tokens_forward:,}, backward "
        f"{plan.min_tokens_backward:,}, disk {plan.min_tokens_disk:,} -> {plan.min_tokens_per_step:,}",
        f"  recommended tokens per step (data movement <= {RECOMMENDED_OVERHEAD:.0%} of the step): "
        f"{plan.recommended_tokens_per_step:,}"
        f"; recompute in backward: {recompute_text(plan)}",
        *([] if plan.fits_device else [f"  device memory short: {plan.device_bytes / gib:.1f} GiB needed, "
                                       f"{profile.device_memory_bytes / gib:.1f} GiB on {profile.name}: "
                                       "use fewer tokens per step (unit-boundary activations grow with it)"]),
        f"  at {plan.tokens_per_step:,} tokens/step: compute {plan.compute_s:.3f} s, "
        f"predicted step {plan.predicted_step_s:.3f} s",
        f"  what bounds it: {bound_text(plan)}",
        *(["  the disk units update early, on a lane of their own, as soon as the backward ends"]
          if plan.early_updates else []),
        *([f"  the first {plan.held_units} units' state comes to the device during the backward: their updates "
           "run there as it ends, and the link is free for the next units' updates"] if plan.held_units else []),
        *([f"  AdamW on the device: {update_kernels_text(plan.state, profile)}, "
           f"{28 * plan.n_params / profile.device_update_rate:.3f} s of kernels per step"]
          if profile.update_on_device and profile.device_update_rate else []),
    ]
    return "\n".join(lines)


def run_summary(plan: Plan, update_on: str, micro_tokens: int) -> str:
    """The line a streamed run prints as it starts: where its state lives, where AdamW
    runs, and whether its step hides the transfers (the data movement at most
    RECOMMENDED_OVERHEAD of the step); when a larger step would, the accumulation that
    makes one, with `micro_tokens` per micro-batch."""
    where = {"ram": "in RAM", "disk": "on disk",
             "split": (f"{plan.ram_units} of {plan.n_units} units in RAM, the rest on disk"
                       if plan.ram_units < plan.n_units else f"split, with room in RAM for all {plan.n_units} units")
             }[plan.offload]
    recompute = f"recompute {recompute_text(plan)}" if plan.recompute else "no recompute"
    line = (f"plan: {plan.state} state {where}, AdamW on the {update_on}, prefetch {plan.prefetch_depth}, "
            f"{recompute}; {plan.tokens_per_step:,} tokens a step: predicted {plan.predicted_step_s:.3g} s, "
            f"compute {plan.compute_s:.3g} s")
    excess = plan.predicted_step_s - plan.compute_s
    if excess <= RECOMMENDED_OVERHEAD * plan.predicted_step_s:
        return line + ", the transfers hidden"
    parts = {"host worker": plan.host_s, "link": plan.link_s, "storage": plan.storage_s}
    busy = ", ".join(f"{name} {s:.3g} s" for s, name in sorted(((s, n) for n, s in parts.items() if s), reverse=True))
    line += f"; the transfers add {excess:.3g} s ({busy})"
    if plan.tokens_per_step < plan.recommended_tokens_per_step:
        accum = -(-plan.recommended_tokens_per_step // micro_tokens)
        line += f": {plan.recommended_tokens_per_step:,} tokens a step would hide them (--grad-accum {accum})"
    return line


def update_kernels_text(state: str, profile: DeviceProfile) -> str:
    """What runs a state's update on the device, and the device memory it moves."""
    fmt = FORMATS[state]
    if fmt.name == "fp32":
        return "PyTorch's fused AdamW (32 bytes/parameter)"
    if profile.fused_update:
        return f"the fused {state} kernel (kernels/compact.py, {32 * fmt.fused_update_cost:.0f} bytes/parameter)"
    return f"the {state} format's PyTorch ops (~80 kernels, {32 * fmt.device_update_cost:.0f} bytes/parameter)"
