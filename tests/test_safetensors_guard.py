"""The safetensors header guard: every lie a header can tell is caught from the header
alone, with a one-line error naming the file; honest files pass."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models.safety import UnsafeFileError, check_safetensors


def craft(path: Path, header: object, data: bytes = b"", length: int | None = None) -> Path:
    blob = json.dumps(header).encode() if not isinstance(header, bytes) else header
    path.write_bytes(struct.pack("<Q", len(blob) if length is None else length) + blob + data)
    return path


def f32(name: str, shape: list[int], begin: int) -> dict:
    size = 4 * math.prod(shape)
    return {name: {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + size]}}


def test_library_files_pass(tmp_path: Path) -> None:
    tensors = {"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.bfloat16), "c": torch.zeros(0),
               "s": torch.tensor(2.0)}
    save_file(tensors, tmp_path / "ok.safetensors", metadata={"format": "pt"})
    header = check_safetensors(tmp_path / "ok.safetensors")
    assert {n: e.shape for n, e in header.tensors.items()} == {n: tuple(t.shape) for n, t in tensors.items()}
    assert header.metadata == {"format": "pt"}


def test_disk_store_files_pass(tmp_path: Path) -> None:
    from models import ModelConfig
    from models.gpt import build_unit
    from streamer.store import DiskStore, UnitLayout

    unit = build_unit(ModelConfig.from_name("tiny"), 1)
    layout = UnitLayout.of(1, unit)
    store = DiskStore([layout], tmp_path)
    store.init_params(0, layout.flatten(unit))
    store.close()
    assert set(check_safetensors(store.path(0)).tensors) == {"param", "grad", "exp_avg", "exp_avg_sq"}


BAD_HEADERS = {
    "too short": (b"\x01\x02", None, None, "too short"),
    "huge header length": ({}, b"", 2**60, "exceeds"),
    "header past the end": ({}, b"", 4096, "past the end"),
    "not JSON": (b"{not json", b"", None, "not JSON"),
    "not an object": ([1, 2], b"", None, "not a JSON object"),
    "unknown dtype": ({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16, None,
                      "unknown dtype"),
    "shape vs range": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}, b"\0" * 8, None,
                       "needs 16 bytes"),
    "negative dim": ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None,
                     "non-negative"),
    "reversed range": ({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 4]}}, b"\0" * 8, None,
                       "begin <= end"),
    "truncated data": (f32("a", [1024], 0), b"\0" * 100, None, "past the end"),
    "overlap": ({**f32("a", [2], 0), **f32("b", [2], 4)}, b"\0" * 12, None, "overlaps"),
    "gap": ({**f32("a", [1], 0), **f32("b", [1], 8)}, b"\0" * 12, None, "gap"),
    "trailing bytes": (f32("a", [1], 0), b"\0" * 12, None, "follow the last tensor"),
    "bad metadata": ({"__metadata__": {"k": 1}, **f32("a", [1], 0)}, b"\0" * 4, None, "__metadata__"),
    "extra keys": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4], "x": 1}}, b"\0" * 4, None,
                   "exactly dtype"),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_bad_headers_are_refused(case: str, tmp_path: Path) -> None:
    header, data, length, fragment = BAD_HEADERS[case]
    path = tmp_path / "bad.safetensors"
    if case == "too short":
        path.write_bytes(header)
    else:
        craft(path, header, data, length)
    with pytest.raises(UnsafeFileError) as error:
        check_safetensors(path)
    message = str(error.value)
    assert fragment in message and str(path) in message and "\n" not in message
    assert isinstance(error.value, ValueError)


def test_hf_loader_checks_headers_first(tmp_path: Path) -> None:
    from models.hf import load_hf

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 8,
                                                      "n_head": 2, "n_positions": 16, "vocab_size": 32}))
    # A header promising 4 GiB of weights in a 100-byte file.
    craft(tmp_path / "model.safetensors", f32("wte.weight", [2**30], 0), b"\0" * 100)
    with pytest.raises(UnsafeFileError, match="past the end"):
        load_hf(tmp_path)


def test_final_weights_loader_checks_headers(tmp_path: Path) -> None:
    from streamer.train import load_final

    craft(tmp_path / "model.safetensors", {"a": {"dtype": "X", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
    with pytest.raises(UnsafeFileError, match="unknown dtype"):
        load_final(tmp_path)
