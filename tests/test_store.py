"""Host stores: packing, and byte-exact disk I/O checked against plain file reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models import ModelConfig
from models.gpt import build_unit, init_unit
from streamer.store import BUFFERS, DiskStore, RamStore, UnitLayout


def _layouts_and_units(name: str = "tiny-neox"):
    cfg = ModelConfig.from_name(name)
    units = []
    for i in range(cfg.n_layer + 2):
        unit = build_unit(cfg, i)
        init_unit(unit, cfg, seed=3, index=i)
        units.append(unit)
    return [UnitLayout.of(i, u) for i, u in enumerate(units)], units


def test_layout_puts_decayed_tensors_first_and_round_trips():
    layouts, units = _layouts_and_units()
    block = layouts[1]
    names = [s.name for s in block.tensors]
    decayed = [s.name for s in block.tensors if len(s.shape) >= 2]
    assert names[: len(decayed)] == decayed  # weight decay is a prefix of the flat buffer
    assert block.decay_numel == sum(s.numel for s in block.tensors if len(s.shape) >= 2)
    flat = torch.empty(block.numel)
    block.pack(units[1], flat)
    for name, view in block.views(flat).items():
        assert torch.equal(view, dict(units[1].named_parameters())[name].detach())


@pytest.mark.parametrize("name", ["tiny", "tiny-gptj", "tiny-neox"])
def test_a_unit_initialised_in_place_has_the_weights_of_one_built_whole(name):
    """The engine initialises each unit on the meta device, bound to one reused buffer;
    every unit's weights are bit for bit those of the unit built and initialised
    normally, whatever the buffer held before (here: the previous unit's weights)."""
    cfg = ModelConfig.from_name(name)
    layouts, units = _layouts_and_units(name)
    scratch = torch.full((max(lay.numel for lay in layouts),), float("nan"))
    for i, layout in enumerate(layouts):
        with torch.device("meta"):
            unit = build_unit(cfg, i)
        weights = scratch[: layout.numel]
        init_unit(layout.bind(unit, weights), cfg, seed=3, index=i)
        assert torch.equal(weights, layout.flatten(units[i])), f"unit {i}"
        assert all(p.data_ptr() >= scratch.data_ptr() for p in unit.parameters())  # views, not copies


def test_disk_store_files_are_valid_safetensors_with_exact_bytes(tmp_path):
    layouts, units = _layouts_and_units()
    store = DiskStore(layouts, tmp_path / "store")
    for i, unit in enumerate(units):
        store.init_params(i, layouts[i].flatten(unit))
    grad = torch.randn(layouts[2].numel)
    store.write_grad(2, grad)
    numel = layouts[2].numel
    buffers = store.open(2, BUFFERS, 0, numel)
    buffers["exp_avg"].copy_(torch.arange(numel, dtype=torch.float32))
    store.commit(2, ("exp_avg",), 0, numel)
    store.close()
    # Read the files back with the reference safetensors reader, not our own code.
    on_disk = load_file(tmp_path / "store" / "unit_00002.safetensors")
    expected = torch.empty(layouts[2].numel)
    layouts[2].pack(units[2], expected)
    assert torch.equal(on_disk["param"], expected)
    assert torch.equal(on_disk["grad"], grad)
    assert torch.equal(on_disk["exp_avg"], torch.arange(layouts[2].numel, dtype=torch.float32))
    assert torch.count_nonzero(on_disk["exp_avg_sq"]) == 0


def test_ram_and_disk_stores_return_the_same_buffers(tmp_path):
    layouts, units = _layouts_and_units("tiny")
    ram, disk = RamStore(layouts), DiskStore(layouts, tmp_path / "s")
    for i, unit in enumerate(units):
        ram.init_params(i, layouts[i].flatten(unit))
        disk.init_params(i, layouts[i].flatten(unit))
    for i in range(len(layouts)):
        numel = layouts[i].numel
        a, b = ram.open(i, ("param",), 0, numel), disk.open(i, ("param",), 0, numel)
        assert torch.equal(a["param"], b["param"])
    assert disk.bytes_on_disk() == 16 * sum(lay.numel for lay in layouts)
    disk.close()


def test_pipelined_disk_pass_matches_a_sequential_one_and_lands_on_disk(tmp_path, monkeypatch):
    """The read-update-write pipeline over many chunks gives the bytes a chunk-by-chunk
    open/commit would, and a later read sees every write."""
    import streamer.store as store_module

    monkeypatch.setattr(store_module, "CHUNK_NUMEL", 1000)  # many chunks, a ragged last one
    layouts, units = _layouts_and_units("tiny")
    unit = 1
    stores = {kind: DiskStore(layouts, tmp_path / kind) for kind in ("seq", "pipe")}
    grad = torch.randn(layouts[unit].numel)
    for store in stores.values():
        for i, u in enumerate(units):
            store.init_params(i, layouts[i].flatten(u))
        store.write_grad(unit, grad)

    def update(buffers):  # any in-place change that reads every buffer
        buffers["exp_avg"].add_(buffers["grad"])
        buffers["exp_avg_sq"].addcmul_(buffers["grad"], buffers["grad"])
        buffers["param"].sub_(0.1 * buffers["exp_avg"])

    seq, pipe = stores["seq"], stores["pipe"]
    assert len(seq.chunks(unit)) > store_module.RING  # the ring wraps around
    for start, stop in seq.chunks(unit):
        buffers = seq.open(unit, BUFFERS, start, stop)
        update(buffers)
        seq.commit(unit, ("param", "exp_avg", "exp_avg_sq"), start, stop)
    for second in (False, True):  # the second pass reads what the first wrote in the background
        if second:
            pipe.write_grad(unit, grad)
        for _start, _stop, buffers in pipe.stream(unit, BUFFERS, ("param", "exp_avg", "exp_avg_sq")):
            update(buffers)
    seq.write_grad(unit, grad)
    for start, stop in seq.chunks(unit):  # the sequential store takes its second pass
        buffers = seq.open(unit, BUFFERS, start, stop)
        update(buffers)
        seq.commit(unit, ("param", "exp_avg", "exp_avg_sq"), start, stop)
    for store in stores.values():
        store.close()
    assert pipe.bytes_read == seq.bytes_read and pipe.bytes_written == seq.bytes_written
    a = load_file(tmp_path / "seq" / f"unit_{unit:05d}.safetensors")
    b = load_file(tmp_path / "pipe" / f"unit_{unit:05d}.safetensors")
    for name in BUFFERS:
        assert torch.equal(a[name], b[name]), name


def test_passes_in_two_lanes_run_at_once_and_each_lands_whole(tmp_path, monkeypatch):
    """The engine's early updates (lane 1) run beside its staging (lane 0): two
    threads passing over different units at once, over many chunks each, leave exactly
    the bytes that one pass after the other would; a later pass over a unit in the
    other lane reads every write of the first."""
    import threading

    import streamer.store as store_module

    monkeypatch.setattr(store_module, "CHUNK_NUMEL", 1000)
    layouts, units = _layouts_and_units("tiny")
    stores = {kind: DiskStore(layouts, tmp_path / kind) for kind in ("serial", "lanes")}
    for store in stores.values():
        for i, u in enumerate(units):
            store.init_params(i, layouts[i].flatten(u))
        for i in (1, 2):
            store.write_grad(i, torch.full((layouts[i].numel,), float(i)))

    def update(store, unit, lane, barrier=None):
        for _start, _stop, buffers in store.stream(unit, BUFFERS, ("param", "exp_avg"), lane=lane):
            if barrier is not None:
                barrier.wait()  # both lanes are mid-pass together, chunk by chunk
            buffers["exp_avg"].add_(buffers["grad"])
            buffers["param"].sub_(buffers["exp_avg"])

    update(stores["serial"], 1, 0)
    update(stores["serial"], 2, 0)
    assert len(stores["lanes"].chunks(1)) == len(stores["lanes"].chunks(2)) > store_module.RING
    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=update, args=(stores["lanes"], unit, lane, barrier))
               for unit, lane in ((1, 0), (2, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for store in stores.values():
        update(store, 2, 0)  # unit 2 again, in the other lane: it must see lane 1's writes
        store.close()
    for unit in (1, 2):
        a = load_file(tmp_path / "serial" / f"unit_{unit:05d}.safetensors")
        b = load_file(tmp_path / "lanes" / f"unit_{unit:05d}.safetensors")
        for name in BUFFERS:
            assert torch.equal(a[name], b[name]), (unit, name)


def test_a_failed_background_write_is_raised_not_lost(tmp_path, monkeypatch):
    import pytest

    import streamer.store as store_module

    monkeypatch.setattr(store_module, "CHUNK_NUMEL", 1000)
    layouts, units = _layouts_and_units("tiny")
    store = DiskStore(layouts, tmp_path / "s")
    for i, u in enumerate(units):
        store.init_params(i, layouts[i].flatten(u))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_module.os, "pwrite", full_disk)
    with pytest.raises(OSError, match="No space left"):  # in the pass, or when it settles
        for _start, _stop, buffers in store.stream(1, BUFFERS, ("param",)):
            buffers["param"].add_(1.0)
        store.settle()
    monkeypatch.undo()
    store.close()


def _disk_store_with_a_gradient(tmp_path, state: str):
    """A disk store of tiny-neox in `state`, unit 2 given a gradient; its files closed.
    Returns the layouts, units, store, the gradient and unit 2's file as read back by
    the reference safetensors reader."""
    from streamer.state import FORMATS

    layouts, units = _layouts_and_units()
    store = DiskStore(layouts, tmp_path / "store", state=FORMATS[state])
    for i, unit in enumerate(units):
        store.init_params(i, layouts[i].flatten(unit))
    grad = torch.randn(layouts[2].numel)
    store.write_grad(2, grad)
    store.close()
    return layouts, units, store, grad, load_file(tmp_path / "store" / "unit_00002.safetensors")


def test_compact_disk_store_files_hold_bf16_weights_and_8_bit_moments(tmp_path):
    """The compact format on disk: bf16 param and grad, uint8 moments with float32 block
    scales, about 6 bytes per parameter, readable by the reference safetensors reader."""
    from streamer.state import BLOCK

    layouts, units, store, grad, on_disk = _disk_store_with_a_gradient(tmp_path, "compact")
    expected = torch.empty(layouts[2].numel)
    layouts[2].pack(units[2], expected)
    assert torch.equal(on_disk["param"], expected.to(torch.bfloat16))
    assert torch.equal(on_disk["grad"], grad.to(torch.bfloat16))
    assert on_disk["exp_avg"].dtype == on_disk["exp_avg_sq"].dtype == torch.uint8
    assert on_disk["exp_avg_scale"].numel() == -(-layouts[2].numel // BLOCK)
    total = sum(lay.numel for lay in layouts)
    assert 6 * total < store.bytes_on_disk() < 6.05 * total


def test_a_compact8_disk_store_keeps_the_coded_gradient_in_its_file(tmp_path):
    """compact8 on disk: the gradient as uint8 codes with float32 block scales, the bytes
    the format codes, in a file the reference safetensors reader reads."""
    from streamer.state import BLOCK, FORMATS

    fmt = FORMATS["compact8"]
    layouts, _, store, grad, on_disk = _disk_store_with_a_gradient(tmp_path, "compact8")
    expected = {"grad": torch.empty(grad.numel(), dtype=torch.uint8),
                "grad_scale": torch.empty(-(-grad.numel() // BLOCK))}
    fmt.store_grad(grad, expected)
    assert torch.equal(on_disk["grad"], expected["grad"]) and torch.equal(on_disk["grad_scale"], expected["grad_scale"])
    total = sum(lay.numel for lay in layouts)
    assert 5 * total < store.bytes_on_disk() < 5.05 * total


@pytest.mark.parametrize("state", ["fp32", "compact8"])
def test_a_gradient_coded_in_a_staging_buffer_is_stored_as_one_coded_by_the_store(tmp_path, state):
    """On CUDA a store that is not page-locked gets the gradient through a float32
    staging buffer; for compact8 the device codes it into that buffer's bytes and the
    store takes the codes as they are. Both tiers then hold the bytes they would have
    coded themselves."""
    from streamer.state import FORMATS

    fmt = FORMATS[state]
    layouts, units = _layouts_and_units("tiny")
    grad = torch.randn(layouts[1].numel)
    staging = torch.full((layouts[1].numel + 1000,), float("nan"))  # a ring buffer: longer than the unit
    coded = fmt.grad_buffers_in(staging, grad.numel())
    fmt.store_grad(grad, coded)
    for tier in ("ram", "disk"):
        stores = [RamStore(layouts, state=fmt) if tier == "ram" else DiskStore(layouts, tmp_path / f"{k}", state=fmt)
                  for k in ("float", "coded")]
        for store in stores:
            for i, u in enumerate(units):
                store.init_params(i, layouts[i].flatten(u))
        stores[0].write_grad(1, grad)
        stores[1].write_grad(1, coded if fmt.codes_grad else staging)
        names = fmt.expand(("grad",))
        a, b = (store.open(1, names, 0, layouts[1].numel) for store in stores)
        assert all(torch.equal(a[n], b[n]) for n in names)
        for store in stores:
            store.close()


@pytest.mark.parametrize("state", ["compact", "compact8"])
def test_compact_updates_through_ram_and_pipelined_disk_stores_agree(tmp_path, monkeypatch, state):
    """Two AdamW steps in a compact format, a chunk at a time (many chunks, a ragged
    last one): the RAM store and the disk pipeline hold the same bytes afterwards, so
    the scale buffers are sliced by block in both."""
    import streamer.store as store_module
    from streamer.optim import OptimConfig
    from streamer.state import FORMATS

    monkeypatch.setattr(store_module, "CHUNK_NUMEL", 1024)
    fmt = FORMATS[state]
    layouts, units = _layouts_and_units("tiny")
    unit = 1
    stores = [RamStore(layouts, state=fmt), DiskStore(layouts, tmp_path / "disk", state=fmt)]
    grad = torch.randn(layouts[unit].numel)
    for store in stores:
        for i, u in enumerate(units):
            store.init_params(i, layouts[i].flatten(u))
        assert len(store.chunks(unit)) > store_module.RING
        for step in (1, 2):
            store.write_grad(unit, grad * step)
            for start, _stop, buffers in store.stream(unit, BUFFERS, ("param", "exp_avg", "exp_avg_sq")):
                fmt.update_(buffers, step=step, lr=1e-2, cfg=OptimConfig(), decay_numel=0, grad_scale=1.0,
                            seed=hash((step, unit, start)))
        store.settle()
    ram, disk = stores
    numel = layouts[unit].numel
    for name in fmt.names:
        a = ram.open(unit, (name,), 0, numel)[name]
        b = disk.open(unit, (name,), 0, 1024)[name]  # the disk tier reads a chunk at a time
        assert torch.equal(a[: b.numel()], b), name
    initial = torch.empty(numel)
    layouts[unit].pack(units[unit], initial)
    assert not torch.equal(ram.open(unit, ("param",), 0, numel)["param"], initial.to(torch.bfloat16))
    disk.close()


def test_a_store_folder_of_its_own_per_run_and_per_rank(tmp_path):
    """store_root: under --out, or in --store-dir a folder named after --out's absolute
    path (two runs of one name in different places never share one); stale_store: what
    a resume on another number of processes will not reuse; remove_store: each rank's
    part, and the folder once the last part is gone."""
    from streamer.store import remove_store, stale_store, store_folder, store_root

    a, b = tmp_path / "x" / "run", tmp_path / "y" / "run"
    assert store_root(a) == a / "store"
    assert store_root(a, "/nvme").parent == Path("/nvme") and store_root(a, "/nvme") != store_root(b, "/nvme")
    assert store_root(a, "/nvme") == store_root(tmp_path / "x" / ".." / "x" / "run", "/nvme")
    root = store_root(a, tmp_path / "nvme")
    for rank in range(3):
        store_folder(root, rank, 3).mkdir(parents=True)
        (store_folder(root, rank, 3) / "unit_00000.safetensors").write_bytes(b"x")
    assert stale_store(root, 3, 3) == [] and stale_store(root, 3, 2) == [root / "rank2"]
    assert stale_store(root, 3, 1) == [root / f"rank{r}" for r in range(3)]
    for rank in (2, 0):
        remove_store(root, rank, 3)
    assert sorted(p.name for p in root.iterdir()) == ["rank1"]
    remove_store(root, 1, 3)
    assert not root.exists() and (tmp_path / "nvme").is_dir()
