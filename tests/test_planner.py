"""The planner's arithmetic, checked without hardware."""

from __future__ import annotations

import math

import pytest
import torch

from models import REGISTRY, ModelConfig
from models.gpt import build_unit
from streamer import planner
from streamer.errors import UserError
from streamer.planner import PROFILES, choose_offload, make_plan, state_bytes, unit_param_counts

GIB = 2**30


@pytest.mark.parametrize("name", list(REGISTRY))
def test_unit_param_counts_match_the_modules(name: str) -> None:
    cfg = ModelConfig.from_name(name)
    counts = unit_param_counts(cfg)
    assert len(counts) == cfg.n_layer + 2
    assert sum(counts) == cfg.n_params()
    with torch.device("meta"):
        for index in (0, 1, cfg.n_layer + 1):  # embedding, a block (all alike), head
            assert sum(p.numel() for p in build_unit(cfg, index).parameters()) == counts[index]


@pytest.mark.parametrize("profile", list(PROFILES.values()), ids=list(PROFILES))
def test_forward_hiding_threshold(profile: object) -> None:
    """[Note: when streaming hides]: T >= F·b / (2·W) tokens per step hide the forward's
    transfers, b the bytes a parameter crosses with: in the compute dtype through a
    staging buffer (the disk tier), as the float32 master from a GPU's page-locked RAM
    tier (cast on the device)."""
    for offload, crossing in (("disk", profile.compute_bytes),
                              ("ram", profile.compute_bytes if profile.shares_host_cores else 4)):
        plan = make_plan(ModelConfig.from_name("gpt3-xl"), profile, 2048, 2048, offload)
        expected = profile.matmul_flops * crossing / (2 * profile.h2d_bytes_per_s)
        assert plan.min_tokens_forward == math.ceil(expected), offload
        assert plan.min_tokens_per_step >= plan.min_tokens_forward


@pytest.mark.parametrize("offload", ["ram", "disk"])
@pytest.mark.parametrize("profile", ["h100", "a100", "cpu"])
@pytest.mark.parametrize("name", ["tiny", "gpt3-xl", "gpt-neox-20b"])
def test_more_tokens_never_beat_compute(name: str, profile: str, offload: str) -> None:
    """However many tokens a step carries, streaming can hide transfers but never make a
    step faster than its own arithmetic."""
    cfg = ModelConfig.from_name(name)
    for tokens in (256, 1024, 8192, 65536, 2**20, 2**24):
        plan = make_plan(cfg, PROFILES[profile], tokens, min(256, cfg.block_size), offload)
        assert plan.compute_s > 0
        assert plan.predicted_step_s / tokens >= plan.compute_s / tokens * (1 - 1e-12)


def test_below_the_threshold_the_link_sets_the_step_time() -> None:
    plan = make_plan(ModelConfig.from_name("gpt3-xl"), PROFILES["h100"], 2048, 2048, "ram")
    assert plan.tokens_per_step < plan.min_tokens_forward
    assert plan.predicted_step_s > 2 * plan.compute_s


def test_disk_offload_moves_state_to_disk() -> None:
    cfg = ModelConfig.from_name("gpt3-xl")
    ram = make_plan(cfg, PROFILES["h100"], 2**16, 2048, "ram")
    disk = make_plan(cfg, PROFILES["h100"], 2**16, 2048, "disk")
    assert ram.disk_bytes == 0 and disk.disk_bytes == state_bytes("fp32")[0] * cfg.n_params()
    assert disk.host_bytes < ram.host_bytes / 4  # host RAM keeps only staging buffers
    assert ram.min_tokens_disk == 0
    assert disk.min_tokens_per_step >= disk.min_tokens_disk > 0


def test_choose_offload_prefers_ram_when_it_fits() -> None:
    cfg = ModelConfig.from_name("gpt3-xl")  # about 19.6 GiB of state
    assert choose_offload(cfg, host_available=64 * GIB, disk_free=0) == "ram"


def test_choose_offload_falls_back_to_disk() -> None:
    cfg = ModelConfig.from_name("gpt3-xl")
    assert choose_offload(cfg, host_available=16 * GIB, disk_free=100 * GIB) == "disk"
    assert choose_offload(cfg, host_available=64 * GIB, disk_free=100 * GIB, asked="disk") == "disk"


def test_choose_offload_refuses_when_nothing_fits() -> None:
    cfg = ModelConfig.from_name("gpt3-xl")  # 20.9 GiB of fp32 state, 7.8 GiB compact
    with pytest.raises(UserError, match="fit in RAM.*need disk.*--state compact"):
        choose_offload(cfg, host_available=8 * GIB, disk_free=5 * GIB)
    with pytest.raises(UserError, match="short.*--offload disk"):
        choose_offload(cfg, host_available=16 * GIB, disk_free=100 * GIB, asked="ram")
    assert choose_offload(cfg, host_available=8 * GIB, disk_free=5 * GIB, state="compact") == "split"


def test_a_state_that_fits_neither_tier_alone_is_split_between_them() -> None:
    """A 20B model's compact state (115 GiB) on a 128 GiB host with 64 GiB of disk: the
    leading units that fit 80% of RAM stay there, the rest go to disk, and only the
    disk part is read and written from storage each step."""
    cfg = ModelConfig.from_name("gpt-neox-20b")
    host, disk = 120 * GIB, 60 * GIB
    assert choose_offload(cfg, host, disk, state="compact") == "split"
    with pytest.raises(UserError):
        choose_offload(cfg, host, disk, asked="disk", state="compact")
    ram_units = planner.split_ram_units(cfg, host, "compact")
    counts = unit_param_counts(cfg)
    per_param = state_bytes("compact")[0]
    assert per_param * sum(counts[:ram_units]) <= 0.8 * host < per_param * sum(counts[: ram_units + 1])
    profile = planner.PROFILES["h200"]
    split = make_plan(cfg, profile, 2**18, 2048, "split", state="compact", ram_units=ram_units)
    disk_only = make_plan(cfg, profile, 2**18, 2048, "disk", state="compact")
    assert split.disk_bytes == pytest.approx(per_param * sum(counts[ram_units:]), rel=1e-9)
    share = sum(counts[ram_units:]) / sum(counts)
    assert split.disk_read_bytes_per_step == pytest.approx(share * disk_only.disk_read_bytes_per_step, rel=1e-6)
    assert split.storage_s < share * 1.01 * disk_only.storage_s


def test_an_8bit_gradient_keeps_a_20b_state_in_ram_and_the_step_off_the_disk() -> None:
    """compact8 on the same 128 GiB host: 5 bytes per parameter (97 GiB) fit 80% of its
    RAM, so no unit goes to disk; on the h200 profile its step then waits on no disk,
    only on the updates the forward runs on the device, and is faster than compact's."""
    cfg = ModelConfig.from_name("gpt-neox-20b")
    host, disk = 128 * GIB, 60 * GIB
    assert choose_offload(cfg, host, disk, state="compact") == "split"
    assert choose_offload(cfg, host, disk, state="compact8") == "ram"
    with pytest.raises(UserError, match="--state compact8"):
        choose_offload(cfg, 90 * GIB, 10 * GIB, state="compact")

    def plan(state: str, offload: str, ram_units: int | None = None, fused: bool = True,
             device_rate: float | None = None) -> planner.Plan:
        gpu = planner.replace(PROFILES["h200"], fused_update=fused)
        profile = planner.with_device_update(gpu, state, device_rate)
        return planner.make_plan(cfg, profile, 49152, 2048, offload, micro_tokens=2048, prefetch_depth=2,
                                 kept_graphs=0, state=state, ram_units=ram_units)

    compact = plan("compact", "split", planner.split_ram_units(cfg, host, "compact"))
    compact8 = plan("compact8", "ram")
    assert compact8.disk_bytes == 0 and compact8.disk_read_bytes_per_step == 0
    assert compact8.storage_s == 0 < compact.storage_s
    assert compact8.compute_s < compact8.predicted_step_s < compact.predicted_step_s
    # What the device's update costs: the PyTorch ops' ~80 kernels per chunk lengthen the
    # step; the fused kernel's one pass hides behind the link, as free kernels would.
    free_kernels, ops = plan("compact8", "ram", device_rate=1e30), plan("compact8", "ram", fused=False)
    assert free_kernels.predicted_step_s == pytest.approx(compact8.predicted_step_s, rel=0.01)
    assert compact8.predicted_step_s < 0.95 * ops.predicted_step_s


def test_fit_memory_keeps_as_many_graphs_as_fit() -> None:
    cfg, profile = ModelConfig.from_name("gpt3-2.7b"), planner.PROFILES["cpu"]

    def plan(limit: float, recompute: str = "auto") -> planner.Plan:
        return planner.fit_memory(cfg, profile, 1024, 256, "disk", 1024, limit, recompute=recompute)

    every = planner.peak_bytes(plan(float("inf"), "no"), profile)
    none = planner.peak_bytes(plan(float("inf"), "yes"), profile)
    assert none < every
    assert plan(every).kept_graphs == cfg.n_layer and not plan(every).recompute
    middle = plan((none + every) / 2)
    assert 0 < middle.kept_graphs < cfg.n_layer and middle.recompute
    assert planner.peak_bytes(middle, profile) <= (none + every) / 2
    # Faster than recomputing everything, slower than recomputing nothing.
    assert plan(every).compute_s < middle.compute_s < plan(none).compute_s
    with pytest.raises(UserError, match="--max-memory"):
        plan(none / 2)
    with pytest.raises(UserError, match="allow --recompute yes"):
        plan((none + every) / 2, "no")


def test_memory_model_counts_what_the_engine_allocates() -> None:
    """A CPU engine's own buffers (slots, gradient buffers) are exactly the plan's
    device bytes less activations and autograd's transient gradients of one unit."""
    from streamer.optim import OptimConfig
    from streamer.scheduler import StreamEngine
    from streamer.store import RamStore, UnitLayout

    cfg = ModelConfig.from_name("tiny-neox")
    with torch.device("meta"):
        layouts = [UnitLayout.of(i, build_unit(cfg, i)) for i in range(cfg.n_layer + 2)]
    profile = planner.replace(planner.PROFILES["cpu"], compute_bytes=4)
    plan = planner.make_plan(cfg, profile, 256, 64, "ram", micro_tokens=256, prefetch_depth=2, recompute="yes")
    engine = StreamEngine(cfg, OptimConfig(), RamStore(layouts), torch.device("cpu"), torch.float32, 2)
    try:
        activations = planner.kept_activation_bytes(cfg, 256, 256, 4, kept=0)
        transient = 4 * max(layout.numel for layout in layouts)
        assert engine.device_bytes() == plan.device_bytes - activations - transient
    finally:
        engine.close()


@pytest.mark.parametrize("name", ["tiny", "tiny-gptj", "tiny-neox"])
def test_graph_memory_per_block_is_what_autograd_saves(name: str) -> None:
    """The planner's bytes for a kept graph cover what a block's forward actually saves
    for backward (weights excluded), without overcounting by more than a fifth."""
    cfg = ModelConfig.from_name(name)
    block = build_unit(cfg, 1)
    x = torch.randn(2, cfg.block_size, cfg.d_model, requires_grad=True)
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x)
    planned = planner.graph_activation_bytes(cfg, x.shape[0] * x.shape[1], 4) / cfg.n_layer
    assert sum(saved.values()) <= planned <= 1.2 * sum(saved.values())


def test_the_compact_update_is_planned_at_its_own_cost_on_the_host_or_as_copies_on_the_device() -> None:
    """Host cores code 8-bit moments far slower than they run float32 AdamW; run on the
    device, the update costs the host nothing and the link the state's copies, in and
    back out."""
    cfg, profile = ModelConfig.from_name("gpt3-xl"), planner.PROFILES["h100"]

    def step(state: str, prof: planner.DeviceProfile = profile) -> planner.Plan:
        return make_plan(cfg, prof, 16384, 2048, "ram", state=state, held_units=0)  # every update crosses

    exact, compact = step("fp32"), step("compact")
    on_device = step("compact", planner.with_device_update(profile, "compact"))
    assert compact.host_s > 10 * exact.host_s
    assert on_device.host_s < compact.host_s / 5
    link = cfg.n_params() * (state_bytes("compact")[0] / profile.h2d_bytes_per_s
                             + state_bytes("compact")[1] / profile.d2h_bytes_per_s)
    assert on_device.link_s > link  # the update's copies, plus the backward's weights and gradients


def test_a_gpu_reads_a_page_locked_ram_tier_directly_and_an_update_there_writes_the_weights() -> None:
    """On a GPU the RAM tier is page-locked: no host copy stages weights in or
    gradients out (the disk tier's chunks still go through staging), gradients leave
    in the store's dtype, and an update on the device writes the forward's weights into
    the slot itself, so they do not cross the link."""
    cfg, profile = ModelConfig.from_name("gpt3-xl"), PROFILES["h100"]

    def visits(offload: str, prof: planner.DeviceProfile = profile, state: str = "fp32") -> list:
        return planner.step_visits(cfg, prof, 16384, 2048, offload, 2, cfg.n_layer, state)

    fetched = [v for v in visits("ram") if v.phase == "backward" and v.link_in_s > 0]
    assert fetched and all(v.host_in_s == 0 for v in fetched)
    assert all(v.host_in_s > 0 for v in visits("disk") if v.phase == "backward" and v.link_in_s > 0)
    counts = unit_param_counts(cfg)
    grads = [v.grad_out_s for v in visits("ram", state="compact") if v.phase == "backward"]
    assert grads[-1] == pytest.approx(2 * counts[0] / profile.d2h_bytes_per_s)  # bf16 straight into the store
    on_device = visits("ram", planner.with_device_update(profile, "compact"), "compact")
    whole, updated = state_bytes("compact")[:2]
    forward = [v for v in on_device if v.phase == "forward"]
    # The state crosses and comes back; the weights it updates do not cross besides it.
    assert [v.link_in_s for v in forward] == pytest.approx([whole * p / profile.h2d_bytes_per_s
                                                            for p in counts[: len(forward)]])
    assert [v.d2h_s for v in forward] == pytest.approx([updated * p / profile.d2h_bytes_per_s
                                                        for p in counts[: len(forward)]])


def test_the_page_cache_holds_a_split_stores_disk_part_only_beside_its_ram_part() -> None:
    """A 20B compact state split 40/6 on a 128 GiB host: the RAM part leaves too little
    memory for the kernel to cache the 14.5 GiB disk part, which then costs storage
    time; on a host with memory to spare it is served from the cache."""
    cfg, profile = ModelConfig.from_name("gpt-neox-20b"), PROFILES["h200"]

    def storage(prof: planner.DeviceProfile) -> float:
        visits = planner.step_visits(cfg, prof, 2048, 2048, "split", 2, 0, "compact", 40)
        return sum(v.disk_read_s + v.disk_write_s for v in visits)

    assert storage(profile) > 0
    assert storage(planner.replace(profile, host_memory_bytes=2**40)) == 0


def test_on_shared_cores_a_disk_tier_pays_the_kernels_copies_as_well_as_the_disk() -> None:
    """A store too big for the page cache still moves through it: on a CPU device the
    kernel's copies take the cores that compute, besides the time the disk takes."""
    cfg = ModelConfig.from_name("gpt3-2.7b")
    small_cache = planner.replace(PROFILES["cpu"], page_cache_bytes=8 * GIB, host_memory_bytes=24 * GIB)
    whole, updated, master, grad = state_bytes("fp32")
    counts = unit_param_counts(cfg)

    def core_s(profile: planner.DeviceProfile) -> float:
        visits = planner.step_visits(cfg, profile, 1024, 256, "disk", 2, 0)
        assert any(v.disk_read_s > 0 for v in visits)  # the store does not fit the cache
        return sum(v.host_in_s + v.out_s for v in visits)

    slow_copies = planner.replace(small_cache, cached_io_bytes_per_s=small_cache.cached_io_bytes_per_s / 2)
    # Forward: the update reads the whole state and writes back all but the gradient;
    # backward: the weights are read again and the gradient written. (Within 2%: the
    # head and the tied table, pinned across visits, are not read a second time.)
    copied = sum(counts) * (whole + updated + master + grad)
    assert core_s(slow_copies) - core_s(small_cache) == pytest.approx(
        copied / small_cache.cached_io_bytes_per_s, rel=0.02)
    gpu = planner.replace(PROFILES["h100"], page_cache_bytes=8 * GIB, host_memory_bytes=24 * GIB)
    # On a GPU the copies run on host cores beside the device: no change to core time.
    assert core_s(planner.replace(gpu, cached_io_bytes_per_s=1e9)) == core_s(gpu)


def test_early_updates_take_the_disk_parts_update_io_out_of_the_forwards_window() -> None:
    """A 20B compact state split 40/6 on a GPU host: with each disk unit's update run
    when the unit is staged, two visits ahead, the disk idles through the 40 RAM units
    and then stalls the forward; started on their own lane when the backward ends, the
    same updates overlap those units. The plan picks the faster and counts the staging
    pass's re-read of the weights; a CPU device, whose lane would take the cores that
    compute, and a store without a disk part never update early."""
    cfg = ModelConfig.from_name("gpt-neox-20b")
    profile = planner.with_device_update(PROFILES["h200"], "compact")

    def plan(early: bool | None, prof: planner.DeviceProfile = profile, offload: str = "split") -> planner.Plan:
        return planner.make_plan(cfg, prof, 49152, 2048, offload, micro_tokens=2048, prefetch_depth=2,
                                 kept_graphs=0, state="compact", ram_units=40, early_updates=early)

    staged, early, chosen = plan(False), plan(True), plan(None)
    assert early.predicted_step_s < 0.95 * staged.predicted_step_s
    assert chosen.early_updates and chosen.predicted_step_s == early.predicted_step_s
    disk_params = sum(unit_param_counts(cfg)[40:])
    assert early.disk_read_bytes_per_step - staged.disk_read_bytes_per_step == pytest.approx(
        state_bytes("compact")[2] * disk_params, rel=1e-6)
    # The lane ends each unit's update in forward order; that unit's staging waits for it.
    lane, _ = planner.early_lane_s(cfg, profile, "compact", 40)
    assert list(lane) == list(range(40, 46)) and sorted(lane.values()) == list(lane.values())
    visits = planner.step_visits(cfg, profile, 49152, 2048, "split", 2, 0, "compact", 40, early=True)
    assert [v.ready_s for v in visits[:46]] == [0.0] * 40 + [lane[u] for u in range(40, 46)]
    assert not plan(None, PROFILES["cpu"], "disk").early_updates
    assert not plan(None, offload="ram").early_updates


def test_the_heads_visit_applies_its_update() -> None:
    """The head's one visit stages it with the update due from the last step, as the
    engine does: on the disk tier that visit reads the head's whole state and writes
    back all but its gradient (before, the plan left the head's update out)."""
    cfg, profile = ModelConfig.from_name("gpt-neox-20b"), PROFILES["h200"]
    whole, updated, _, grad = state_bytes("compact")
    head = unit_param_counts(cfg)[-1]
    visit = next(v for v in planner.step_visits(cfg, profile, 2048, 2048, "disk", 2, 0, "compact")
                 if v.phase == "head")
    assert visit.disk_read_s == pytest.approx(whole * head / profile.disk_read_bytes_per_s)
    # The gradient is written in the same visit, after the head's backward.
    assert visit.disk_write_s == pytest.approx((updated + grad) * head / profile.disk_write_bytes_per_s)


def test_the_disk_probe_leaves_nothing_in_the_folder(tmp_path) -> None:
    """The probe moves its bytes through two files at once, fsync'd, and removes them:
    a user's --store-dir folder holds nothing of it afterwards."""
    read, write = planner.measure_disk_bandwidth(tmp_path, nbytes=32 * 2**20)
    assert read > 0 and write > 0
    assert list(tmp_path.iterdir()) == []


def test_a_page_locked_ram_tier_plans_no_staging_buffers_on_a_gpu() -> None:
    """On a GPU the RAM tier is page-locked and copies in place, so the host holds the
    state and the runtime only; a disk tier stages every unit through pinned mirrors of
    the slots and gradient buffers."""
    cfg, gpu = ModelConfig.from_name("gpt-neox-20b"), PROFILES["h200"]
    args = (cfg, gpu, 49152, 2048)
    _, ram = planner.memory_bytes(*args, "ram", depth=2, kept=0, state="compact8")
    state = state_bytes("compact8")[0] * sum(unit_param_counts(cfg))
    from streamer.state import FORMATS
    from streamer.store import CHUNK_NUMEL

    workspace = FORMATS["compact8"].workspace_bytes * min(CHUNK_NUMEL, max(unit_param_counts(cfg)))
    assert ram == pytest.approx(state + workspace + planner.RUNTIME_BYTES, rel=1e-9)
    _, disk = planner.memory_bytes(*args, "disk", depth=2, kept=0, state="compact8")
    ring = max(unit_param_counts(cfg))
    assert disk > 3 * ring * 2 + 3 * ring * 4  # three bf16 slot mirrors and the float32 gradient buffers


def test_the_compact_updates_device_cost_is_the_bytes_its_kernels_move() -> None:
    """A profile estimates the device's update in a compact format from float32 AdamW's
    rate and the bytes each format's kernels read and write: recounted here op by op."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    from streamer.optim import OptimConfig
    from streamer.state import FORMATS

    class Bytes(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            if func.is_view:  # a view moves nothing
                return out
            tensors = {id(t): t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)}
            written = [t for a, v in zip(func._schema.arguments, args) if a.alias_info and a.alias_info.is_write
                       for t in tree_flatten(v)[0] if isinstance(t, torch.Tensor)]
            Bytes.total += sum(t.numel() * t.element_size() for t in [*tensors.values(), *written] if t.numel() > 64)
            return out

    def counted(state: str, n: int = 2**16) -> float:
        fmt = FORMATS[state]
        buffers = {b.name: torch.zeros(b.numel(n), dtype=b.dtype) for b in fmt.buffers}
        buffers["param"].copy_(torch.randn(n))
        fmt.store_grad(torch.randn(n), buffers)
        Bytes.total = 0
        with Bytes():
            fmt.update_(buffers, step=2, lr=1e-3, cfg=OptimConfig(), decay_numel=n, grad_scale=0.5, seed=1)
        return Bytes.total / n

    for state in ("compact", "compact8"):
        assert FORMATS[state].device_update_cost == pytest.approx(counted(state) / counted("fp32"), rel=0.1), state


def test_a_page_locked_tier_overlaps_the_device_updates_chunks_and_the_plan_holds_two() -> None:
    """On the device, a RAM tier's update chunks alternate between two streams: a chunk
    costs its kernels (or half of copy in, kernels and copy out when the copies are the
    longer) instead of all three one after the other; the device holds two chunks' state
    and temporaries."""
    gpu, state = PROFILES["h200"], "compact8"
    whole, updated, _, _ = state_bytes(state)
    copy_in, copy_out = whole / gpu.h2d_bytes_per_s, updated / gpu.d2h_bytes_per_s

    def per_param(rate: float, pipelined: bool) -> float:
        return 28 / planner.with_device_update(gpu, state, rate, pipelined=pipelined).host_update_bytes_per_s

    slow, fast = 28 / (copy_in + copy_out), 28 / (0.1 * (copy_in + copy_out))  # kernels 1x and 0.1x the copies
    assert per_param(slow, False) == pytest.approx(2 * (copy_in + copy_out))
    assert per_param(slow, True) == pytest.approx(copy_in + copy_out)  # the kernels' time
    assert per_param(fast, True) == pytest.approx(1.1 * (copy_in + copy_out) / 2)  # half of the three
    cfg = ModelConfig.from_name("gpt-neox-20b")
    on_host, on_device = (planner.memory_bytes(cfg, p, 40960, 2048, "ram", depth=2, kept=0, state=state)[0]
                          for p in (gpu, planner.with_device_update(gpu, state)))
    from streamer.state import FORMATS
    from streamer.store import CHUNK_NUMEL

    # The fused kernel's only temporary is its random bits; the PyTorch ops' are float32.
    assert planner.device_workspace(gpu, state) == 4
    assert on_device - on_host == 2 * CHUNK_NUMEL * (state_bytes(state)[0] + 4)
    ops = planner.replace(gpu, fused_update=False)
    assert planner.device_workspace(ops, state) == FORMATS[state].workspace_bytes


def test_fsdp2_with_cpu_offload_waits_on_the_link_or_compute_then_on_the_hosts_adamw() -> None:
    """One GPU, CPU offload: float32 parameters in twice and gradients out once, beside
    the compute; the host's AdamW after it, beside nothing."""
    cfg = ModelConfig.from_name("gpt3-xl")
    p, tokens = cfg.n_params(), 16384
    compute = cfg.flops_per_token(2048) * tokens / 5e14
    fast_link = planner.predict_fsdp_offload_step_s(cfg, tokens, 2048, 5e14, 1e15, 1e15, 2e10)
    assert fast_link == pytest.approx(compute + 28 * p / 2e10)
    slow_link = planner.predict_fsdp_offload_step_s(cfg, tokens, 2048, 5e14, 1e9, 1e15, 2e10)
    assert slow_link == pytest.approx(8 * p / 1e9 + 28 * p / 2e10)


def _xl_on_device(state: str = "compact8", name: str = "h100", fused: bool = True) -> planner.DeviceProfile:
    return planner.with_device_update(planner.replace(PROFILES[name], fused_update=fused), state, pipelined=True)


def test_held_units_are_weighed_only_for_updates_on_a_gpu() -> None:
    """streamer.scheduler's [Note: updates held on the device]: a CPU device updates
    on its own cores and a host update has no state on the device to hold, so neither
    holds a unit. With AdamW on the GPU the planner holds units when that is faster by
    more than 1%, never the head: float32's 16 bytes a parameter in leave the forward's
    link. compact8's update as PyTorch ops (~80 kernels a chunk, which held units run
    one after another like the others) is what bounds its step, so it then holds none;
    the fused kernel's is not, and its step comes within 5% of the compute."""
    cfg = ModelConfig.from_name("gpt3-xl")
    assert make_plan(cfg, PROFILES["cpu"], 4096, 2048, "ram").held_units == 0
    assert make_plan(cfg, PROFILES["h100"], 32768, 2048, "ram", micro_tokens=16384).held_units == 0
    held = make_plan(cfg, _xl_on_device("fp32"), 32768, 2048, "ram", micro_tokens=16384)
    plain = make_plan(cfg, _xl_on_device("fp32"), 32768, 2048, "ram", micro_tokens=16384, held_units=0)
    assert 0 < held.held_units < held.n_units
    assert held.predicted_step_s < 0.95 * plain.predicted_step_s
    assert held.fits_device
    ops = make_plan(cfg, _xl_on_device(fused=False), 28672, 2048, "ram", micro_tokens=14336, state="compact8")
    assert ops.held_units == 0
    fused = make_plan(cfg, _xl_on_device(), 28672, 2048, "ram", micro_tokens=14336, state="compact8")
    assert fused.predicted_step_s < 1.05 * fused.compute_s < 0.8 * ops.predicted_step_s


def test_held_state_must_fit_beside_the_activations() -> None:
    """Held units need device memory beside the activations (their stream's update
    temporaries, the deeper prefetch's slots, their state while the backward frees
    graphs): a budget the activations fill leaves none, and what is chosen fits."""
    cfg, profile = ModelConfig.from_name("gpt3-xl"), _xl_on_device("fp32")
    kept, tokens, micro = 24, 32768, 16384
    activations = planner.kept_activation_bytes(cfg, tokens, micro, 2, kept)

    def plan(budget: float) -> planner.Plan:
        return make_plan(cfg, profile, tokens, 2048, "ram", micro_tokens=micro, kept_graphs=kept,
                         memory_budget=budget)

    tight, roomy = plan(activations), plan(activations + 2 * GIB)
    assert tight.held_units == 0 < roomy.held_units
    base = make_plan(cfg, profile, tokens, 2048, "ram", micro_tokens=micro, kept_graphs=kept, held_units=0,
                     memory_budget=activations)
    assert roomy.device_bytes - base.device_bytes <= 2 * GIB


def test_held_units_move_their_state_in_the_backward_and_all_state_out_in_the_forward() -> None:
    """A held unit's state comes in after its backward (without its gradient, which
    never left), so its forward moves nothing in; every unit's updated state still
    leaves during the forward, held or not. The per-step link bytes say the same."""
    cfg, profile = ModelConfig.from_name("gpt3-xl"), _xl_on_device()
    whole, updated, master, grad = state_bytes("compact8")
    counts = unit_param_counts(cfg)
    held = 5
    visits = planner.step_visits(cfg, profile, 28672, 2048, "ram", 2, cfg.n_layer, "compact8", held=held)
    forward = [v for v in visits if v.phase == "forward"]
    backward = {u: v for u, v in zip(range(len(counts) - 2, -1, -1), [v for v in visits if v.phase == "backward"])}
    assert all(v.link_in_s == 0 for v in forward[:held]) and all(v.link_in_s > 0 for v in forward[held:])
    assert sum(v.d2h_s for v in forward) == pytest.approx(updated * sum(counts[:-1]) / profile.d2h_bytes_per_s)
    for unit in range(held):
        assert backward[unit].fetch_s == pytest.approx((whole - grad) * counts[unit] / profile.h2d_bytes_per_s)
        assert backward[unit].grad_out_s == 0
    h2d, d2h = planner.link_bytes(cfg, profile, "compact8", len(counts), held)
    h2d0, d2h0 = planner.link_bytes(cfg, profile, "compact8", len(counts))
    assert h2d0 - h2d == pytest.approx(sum(counts[:held]) * grad, rel=1e-6)  # the gradient never crosses back in
    assert d2h0 - d2h == pytest.approx(sum(counts[:held]) * grad, rel=1e-6)  # nor out


def test_the_recommendation_counts_recompute_against_the_step() -> None:
    """Where memory forces blocks to recompute before the link is hidden (float32 state
    updated on an 80 GB GPU), no count comes within 3% of the step that recomputes
    nothing; the recommendation is then the count, of those tried, that comes closest,
    not the first count that hides the link behind recompute."""
    cfg, profile = ModelConfig.from_name("gpt3-xl"), _xl_on_device("fp32")

    def ratio(tokens: int) -> float:
        plan = make_plan(cfg, profile, tokens, 2048, "ram", micro_tokens=16384)
        return planner.predict_resident_step_s(cfg, PROFILES["h100"], tokens, 2048) / plan.predicted_step_s

    recommended = make_plan(cfg, profile, 16384, 2048, "ram", micro_tokens=16384).recommended_tokens_per_step
    assert ratio(recommended) < 0.95  # the 12 bytes per parameter back in the forward: see the README
    assert all(ratio(recommended) >= ratio(t) - 0.005 for t in (32768, 65536, 81920, 131072, 262144))


def test_the_plan_says_what_runs_the_update_on_the_device() -> None:
    """Which kernels update a state on the device, the bytes they move per parameter and
    their time per step: what the planner assumed, said where the user reads the plan."""
    cfg = ModelConfig.from_name("gpt3-xl")

    def text(state: str, fused: bool) -> str:
        profile = _xl_on_device(state, fused=fused)
        plan = make_plan(cfg, profile, 32768, 2048, "ram", micro_tokens=16384, state=state)
        return planner.format_plan(plan, profile).splitlines()[-1]

    fused, ops = text("compact8", True), text("compact8", False)
    assert fused.startswith("  AdamW on the device: the fused compact8 kernel (kernels/compact.py, 17 bytes/parameter)")
    assert ops.startswith("  AdamW on the device: the compact8 format's PyTorch ops (~80 kernels, 479 bytes/parameter)")
    seconds = [float(line.split(", ")[-1].split()[0]) for line in (fused, ops)]
    assert seconds[1] == pytest.approx(seconds[0] * 479 / 17.08, rel=0.02)
    assert "PyTorch's fused AdamW (32 bytes/parameter)" in text("fp32", True)
    host = make_plan(cfg, PROFILES["h100"], 32768, 2048, "ram", micro_tokens=16384)
    assert "AdamW on the device" not in planner.format_plan(host, PROFILES["h100"])


def test_auto_puts_the_update_where_the_step_is_shorter() -> None:
    """--update-on auto: the place whose plan predicts the shorter step, of those that fit
    (--max-memory may refuse one); the host on a tie. For gpt3-xl on the h100 profile the
    device's update wins (the host's fp32 AdamW bounds the step); for 20B in compact8, by
    far (host cores code 8-bit moments ~70x slower)."""
    cfg = ModelConfig.from_name("gpt3-xl")
    host = make_plan(cfg, PROFILES["h100"], 32768, 2048, "ram", micro_tokens=16384)
    device = make_plan(cfg, _xl_on_device("fp32", fused=True), 32768, 2048, "ram", micro_tokens=16384)
    assert device.predicted_step_s < host.predicted_step_s
    assert planner.faster_update_place({"host": host, "device": device}) == "device"
    assert planner.faster_update_place({"host": device, "device": host}) == "host"
    assert planner.faster_update_place({"host": host, "device": host}) == "host"
    assert planner.faster_update_place({"device": host}) == "device"
    assert planner.faster_update_place({"host": host}) == planner.faster_update_place({}) == "host"


def test_a_streamed_run_says_whether_its_step_hides_the_transfers() -> None:
    """The line a streamed run starts with: where the state lives and AdamW runs, and
    when the step is too small to hide the transfers, by how much and what
    accumulation would hide them; at that accumulation, that they are hidden."""
    cfg = ModelConfig.from_name("gpt3-xl")
    profile = _xl_on_device("fp32")
    small = make_plan(cfg, profile, 4096, 2048, "ram", micro_tokens=2048)
    line = planner.run_summary(small, "device", 2048)
    assert line.startswith("plan: fp32 state in RAM, AdamW on the device, prefetch ")
    assert f"the transfers add {small.predicted_step_s - small.compute_s:.3g} s (" in line
    accum = -(-small.recommended_tokens_per_step // 2048)
    assert accum > 2 and line.endswith(f": {small.recommended_tokens_per_step:,} tokens a step would hide them "
                                       f"(--grad-accum {accum})")
    large = make_plan(cfg, profile, accum * 2048, 2048, "ram", micro_tokens=2048)
    assert planner.run_summary(large, "device", 2048).endswith(", the transfers hidden")


def test_a_sampled_tokens_floor_held_and_streamed() -> None:
    """gpt-neox-20b in bf16 on the h100 profile: 41 GB held whole fits its 80 GB, a
    token reading every weight from device memory once; streamed, two of its 0.45B
    units on the device and every weight over the 50 GB/s link once a token (~0.82 s),
    or from the disk at its rate; on a 24 GB device it cannot be held whole."""
    from streamer.planner import PROFILES, replace, sampling_estimate

    cfg = ModelConfig.from_name("gpt-neox-20b")
    h100 = PROFILES["h100"]
    estimate = sampling_estimate(cfg, h100)
    assert estimate.held_fits and estimate.weight_bytes == pytest.approx(2 * 20.55e9, rel=1e-3)
    assert estimate.streamed_device_bytes == pytest.approx(2 * 2 * 453_064_704, rel=1e-6)
    assert estimate.streamed_s_per_token == pytest.approx(estimate.weight_bytes / 50e9)
    assert estimate.held_s_per_token < estimate.streamed_s_per_token / 10
    assert estimate.disk_s_per_token == pytest.approx(estimate.weight_bytes / h100.disk_read_bytes_per_s)
    assert not sampling_estimate(cfg, replace(h100, device_memory_bytes=24e9)).held_fits


def test_messages_give_small_amounts_of_memory_as_they_are() -> None:
    """A limit of 0.45 GiB is not called 0.5 (above what a step needs) in an error."""
    from streamer.planner import gib

    assert [gib(x * 2**30) for x in (0.45, 0.05, 0.0074, 1.94, 306.27, 0)] == ["0.45", "0.05", "0.0074", "1.9",
                                                                                 "306.3", "0.0"]
