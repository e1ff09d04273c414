"""Shared fixtures: a small byte-level token file, and skipping `gpu` tests without CUDA."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from streamer.data import prepare

# A few standard-library modules: real text on every machine, about 130 kB of bytes,
# enough for tiny to learn something in a few dozen steps without the whole corpus.
SMALL_CORPUS = ("textwrap.py", "argparse.py", "json/decoder.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-tokenized token file (uint16 .npy plus its .json sidecar) of a few stdlib modules."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    path = tmp_path_factory.mktemp("data") / "small.npy"
    prepare(path, [stdlib / name for name in SMALL_CORPUS])
    return path
