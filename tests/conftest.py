"""Shared fixtures: a small byte-level token file (and its text as short documents),
random Hugging Face checkpoints,
skipping `gpu` tests without CUDA, skipping tests of the CUDA kernels' host
emulation without a C++20 compiler, and checking that bad command lines fail in one
line."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sysconfig
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from streamer.data import meta_path, prepare

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
def documents_file(token_file: Path) -> Path:
    """`token_file`'s text as short documents, each paragraph ended by token 0 (a byte
    the text never holds), with a sidecar that names 0 its separator, as `prepare
    --separator` records one: windows of 32 to 64 tokens cross several boundaries."""
    text = np.load(token_file)
    assert not (text == 0).any()
    ends = np.flatnonzero((text[:-1] == ord("\n")) & (text[1:] == ord("\n"))) + 2  # after each blank line
    path = token_file.parent / "documents.npy"
    np.save(path, np.insert(text, ends, 0).astype(np.uint16))
    meta = json.loads(meta_path(token_file).read_text())
    meta_path(path).write_text(json.dumps({**meta, "separator": 0, "n_documents": len(ends) + 1}))
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


@pytest.fixture
def hugging_face_checkpoint() -> Callable[..., torch.nn.Module]:
    """Makes a random transformers model of a registry entry's architecture (with any
    field overridden), saves it as safetensors into a folder and returns it:
    `make(model, folder, std=0.1, **overrides)`.
    Every parameter is drawn (biases and norms too), so a tensor put in the wrong
    place shows; a larger `std` keeps predictions far from ties."""
    transformers = pytest.importorskip("transformers")
    import models.hf as hf
    from models import ModelConfig

    def make(model: str, folder: Path, std: float = 0.1, **overrides: object) -> torch.nn.Module:
        cfg = ModelConfig.from_name(model, **overrides)
        adapter = hf._adapter_for_model(cfg)
        reference = transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.for_model(adapter.model_type, vocab_size=cfg.vocab_size, bos_token_id=0,
                                              eos_token_id=0, pad_token_id=0, **adapter.config_to_hf(cfg)))
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in reference.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * std)
        reference.save_pretrained(folder)
        return reference.eval()

    return make


@pytest.fixture
def first_step_loss() -> Callable[..., float]:
    """The first step's loss of a run on the default corpus, as `streamer train` reports
    it (the mean over the step's micro-batches), for a model given as a function from
    tokens to logits: `loss(logits_of, seq_len, batch_size, grad_accum, eval_every)`,
    where batch_size is per micro-batch and the step reads batch_size x grad_accum
    sequences (over all ranks: a data-parallel run with N ranks of batch b reports what
    one process with batch N x b does, to rounding); a run that evaluates samples its
    batches from all but the held-out tail."""
    from models import loss_fn
    from streamer.data import BatchSampler, default_corpus, load_tokens
    from streamer.train import TrainConfig

    def loss(logits_of: Callable[[torch.Tensor], torch.Tensor], seq_len: int = 32, batch_size: int = 2,
             grad_accum: int = 2, eval_every: int = 0) -> float:
        run = TrainConfig(seq_len=seq_len, eval_every=eval_every)
        sampler = BatchSampler(run.training_tokens(load_tokens(default_corpus(), 256)), seq_len, 0)
        x, y = (torch.from_numpy(a) for a in sampler.global_batch(0, batch_size * grad_accum))
        with torch.no_grad():
            losses = [loss_fn(logits_of(x[i : i + batch_size]), y[i : i + batch_size]).item()
                      for i in range(0, len(x), batch_size)]
        return sum(losses) / len(losses)

    return loss


def run_main(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`streamer ARGS` run in this process, through `streamer.cli.main` as `python -m
    streamer` runs it, with `env` set and its output captured (an exception that escapes
    it fails the test, as a traceback would): a process each would pay for importing
    torch, for nothing more."""
    from streamer.cli import main

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        for name, value in (env or {}).items():
            patch.setenv(name, value)
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's own refusals
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["streamer", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture
def fails_in_one_line() -> Callable[[str, dict[str, tuple[list[str], list[str]]]], None]:
    """`check(command, cases)`: each case, {name: (arguments, fragments)}, run as
    `streamer COMMAND ARGUMENTS` (`run_main`) must exit 2 with one line on stderr, no
    traceback, holding every fragment."""
    def check(command: str, cases: dict[str, tuple[list[str], list[str]]]) -> None:
        for name, (args, fragments) in cases.items():
            result = run_main([command, *args])
            lines = result.stderr.strip().splitlines()
            assert result.returncode == 2 and len(lines) == 1, (name, result.stderr)
            for fragment in fragments:
                assert fragment in lines[0], (name, fragment, lines[0])

    return check
