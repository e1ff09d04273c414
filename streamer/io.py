"""Crash-safe file writes: temporary name, fsync, atomic rename, fsync of the folder."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def utc_stamp(seconds: float | None = None) -> str:
    """A moment (seconds since the epoch; default now) as the records write it, in UTC."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def absolute(paths: str | list[str] | None) -> str | list[str] | None:
    """A path setting (one path, several, or none) with each path made absolute against
    the working directory, as a run records it: a resume, evaluation or export started
    elsewhere then finds the same files."""
    if paths is None:
        return None
    if isinstance(paths, str):
        return os.path.abspath(paths)
    return [os.path.abspath(path) for path in paths]


def existing_parent(path: Path) -> Path:
    """`path`, or its nearest folder that exists: what it would be created in, and where
    its free space is read."""
    return next(p for p in [path, *path.parents] if p.exists() or p == p.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


UMASK = os.umask(0o022)  # read once, on import (setting it is the only way to read it)
os.umask(UMASK)


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary name beside `path` to write the file under. When the block ends
    without an error the file is fsync'd, renamed over `path` and its folder fsync'd, so
    readers see the old file or the whole new one, never a torn write; on an error the
    temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        # The mode a new file gets: a writer may have made it private (safetensors'
        # save_file creates 0600 files, which other users of a shared machine could not read).
        os.chmod(tmp, 0o666 & ~UMASK)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_safetensors(path: Path, tensors: dict) -> None:
    """`safetensors.torch.save_file` through `atomic_path`."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
