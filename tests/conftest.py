"""Shared fixtures: a small byte-level token file, skipping `gpu` tests without CUDA, and
skipping tests of the CUDA kernels' host emulation without a C++20 compiler."""

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


@pytest.fixture(scope="session")
def host_compiler() -> None:
    """A C++20 compiler for the host emulation of CUDA kernels (kernels/emulate.py; its
    barriers need C++20): the tests that need one are skipped, with the reason, without."""
    from kernels import emulate

    try:
        emulate.launch('extern "C" __global__ void probe() { __syncthreads(); }', "probe", (), grid=1, block=32,
                       args={})
    except emulate.HostCompilerError as error:
        pytest.skip(f"no host emulation of CUDA kernels here: {' '.join(str(error).splitlines()[:2])}")
