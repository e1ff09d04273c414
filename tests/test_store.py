"""Host stores: packing, and byte-exact disk I/O checked against plain file reads."""

from __future__ import annotations

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


def test_disk_store_files_are_valid_safetensors_with_exact_bytes(tmp_path):
    layouts, units = _layouts_and_units()
    store = DiskStore(layouts, tmp_path / "store")
    for i, unit in enumerate(units):
        store.init_params(i, unit)
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
        ram.init_params(i, unit)
        disk.init_params(i, unit)
    for i in range(len(layouts)):
        numel = layouts[i].numel
        a, b = ram.open(i, ("param",), 0, numel), disk.open(i, ("param",), 0, numel)
        assert torch.equal(a["param"], b["param"])
    assert disk.bytes_on_disk() == 16 * sum(lay.numel for lay in layouts)
    disk.close()
