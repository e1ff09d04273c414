"""A safetensors header guard: check a file's header before anything is allocated.

A safetensors file is an 8-byte little-endian header length, a JSON header naming each
tensor's dtype, shape and byte range, then the data. The `safetensors` library checks
most of this itself, but only after trusting the length and reading the header; a
crafted or truncated file can still ask for a huge allocation or point past the end.
`check_safetensors` reads only the header (capped in size) and checks every claim
against the file's real size, so a bad file costs one small read and a one-line error.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

# The safetensors library's own cap on header size; real headers are kilobytes.
MAX_HEADER_BYTES = 100 * 2**20

ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "C64": 8,
}


class UnsafeFileError(ValueError):
    """A file that is not what it claims: corrupt, truncated or crafted.

    A ValueError, so loaders documented to raise ValueError on bad checkpoints still
    do; the CLI prints it as one line, like its own user errors."""


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets within the file
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int  # 8 + header length


def _bad(path: Path, problem: str) -> UnsafeFileError:
    return UnsafeFileError(f"'{path}' is not a valid safetensors file: {problem}")


def _read_header_json(path: Path) -> tuple[dict, int, int]:
    """The parsed header, the header length and the file size; nothing read beyond them."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise _bad(path, f"{size} bytes, too short to hold a header (truncated?)")
        (length,) = struct.unpack("<Q", f.read(8))
        if length > MAX_HEADER_BYTES:
            raise _bad(path, f"header length {length} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + length > size:
            raise _bad(path, f"header of {length} bytes runs past the end of the {size}-byte file (truncated?)")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad(path, f"header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    return header, length, size


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(path: Path, name: str, raw: object, data_start: int) -> TensorEntry:
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise _bad(path, f"tensor '{name}' needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if dtype not in ITEMSIZE:
        raise _bad(path, f"tensor '{name}' has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _bad(path, f"tensor '{name}' has shape {shape!r}, not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise _bad(path, f"tensor '{name}' has data_offsets {offsets!r}, not [begin, end] with begin <= end")
    want = math.prod(shape) * ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != want:
        raise _bad(path, f"tensor '{name}' of shape {shape} {dtype} needs {want} bytes "
                         f"but its range holds {offsets[1] - offsets[0]}")
    return TensorEntry(dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


def check_safetensors(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Validate a safetensors file's header against the file; raises UnsafeFileError.

    Checks: header length sane and within the file; the header is a JSON object; every
    tensor has a known dtype, a shape whose size matches its byte range, and a range
    within the file; ranges do not overlap and leave no gaps (as the format requires).
    """
    path = Path(path)
    header, length, size = _read_header_json(path)
    data_start = 8 + length
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ must map strings to strings")
    tensors = {name: _entry(path, name, raw, data_start) for name, raw in header.items()}
    position = data_start
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if entry.begin < position:
            raise _bad(path, f"tensor '{name}' overlaps the tensor before it")
        if entry.begin > position:
            raise _bad(path, f"a gap of {entry.begin - position} bytes precedes tensor '{name}'")
        if entry.end > size:
            raise _bad(path, f"tensor '{name}' ends at byte {entry.end}, past the end of the "
                             f"{size}-byte file (truncated?)")
        position = entry.end
    if position != size:
        raise _bad(path, f"{size - position} bytes follow the last tensor")
    return SafetensorsHeader(tensors, metadata, data_start)
