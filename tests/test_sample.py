"""`streamer sample`: continuations of a prompt from a run's final weights or a Hugging
Face checkpoint, checked against the transformers model's own greedy generation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import GPT, ModelConfig
from streamer.cli import main
from streamer.sample import SampleConfig, generate, load_model, model_config
from streamer.train import TrainConfig, train

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is built locally, never fetched

GREEDY = SampleConfig(new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "run"
    train(TrainConfig(model="tiny", steps=3, batch_size=2, seq_len=32, out=str(out), progress=False))
    return out


@pytest.mark.parametrize("model", ["tiny", "tiny-gptj", "tiny-neox"])
def test_greedy_continuation_is_the_hugging_face_models_own(tmp_path: Path, model: str,
                                                           hugging_face_checkpoint) -> None:
    reference = hugging_face_checkpoint(model, tmp_path, std=0.3)  # far from ties
    ours = load_model(tmp_path, model_config(tmp_path), torch.device("cpu"), torch.float32)
    prompt = list(b"def main():\n    ")
    expected = reference.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.new_tokens, do_sample=False,
                                  min_new_tokens=GREEDY.new_tokens)[0, len(prompt):].tolist()
    assert generate(ours, prompt, GREEDY) == expected


def test_a_prompt_longer_than_the_context_is_continued_from_its_last_context(tmp_path: Path) -> None:
    model = GPT(ModelConfig.from_name("tiny-neox"))  # 256 tokens of context
    model.init_weights(0)
    prompt = list(range(256)) + list(range(100))
    continued = generate(model, prompt, GREEDY)
    assert len(continued) == GREEDY.new_tokens
    assert continued == generate(model, prompt[-256:], GREEDY)


def test_sampling_is_seeded_and_top_1_is_greedy() -> None:
    model = GPT(ModelConfig.from_name("tiny"))
    model.init_weights(0)
    prompt = list(b"import ")
    drawn = SampleConfig(new_tokens=30, temperature=1.0, top_k=None)
    first = generate(model, prompt, drawn, torch.Generator().manual_seed(1))
    assert first == generate(model, prompt, drawn, torch.Generator().manual_seed(1))
    assert first != generate(model, prompt, drawn, torch.Generator().manual_seed(2))
    top_1 = SampleConfig(new_tokens=30, temperature=1.0, top_k=1)
    assert generate(model, prompt, top_1, torch.Generator().manual_seed(1)) == generate(
        model, prompt, SampleConfig(new_tokens=30, temperature=0))


def test_the_cli_samples_a_runs_final_weights(trained_run: Path, capsys) -> None:
    """From the run folder or its final/, the same text for the same seed: the prompt
    and then as many bytes as asked for (the tiny models' tokens are bytes)."""
    from streamer.data import ByteTokenizer
    from streamer.train import load_final

    args = ["--prompt", "class ", "--tokens", "25", "--seed", "3", "--device", "cpu"]
    assert main(["sample", str(trained_run), *args]) == 0
    from_run = capsys.readouterr().out
    assert main(["sample", str(trained_run / "final"), *args]) == 0
    assert capsys.readouterr().out == from_run

    model = GPT(ModelConfig.from_name("tiny"))
    model.load_state_dict(load_final(trained_run / "final"))
    expected = generate(model, list(b"class "), SampleConfig(new_tokens=25), torch.Generator().manual_seed(3))
    assert from_run == "class " + ByteTokenizer().decode(expected) + "\n"


def _stderr_of(*args: str) -> tuple[int, str]:
    done = subprocess.run([sys.executable, "-m", "streamer", "sample", *args], capture_output=True, text=True,
                          timeout=300)
    return done.returncode, done.stderr


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, trained_run: Path) -> None:
    (tmp_path / "neox").mkdir()
    (tmp_path / "neox" / "config.json").write_text(json.dumps(ModelConfig.from_name("pythia-160m").to_dict()))
    cases = {
        "a folder that is not there": ([str(tmp_path / "absent")], ["absent': no folder", "a run's final/"]),
        "no tokenizer for a large vocabulary": ([str(tmp_path / "neox")], ["50304 tokens", "pass --tokenizer"]),
        "negative temperature": ([str(trained_run), "--temperature", "-1"], ["--temperature must be 0"]),
        "nothing to continue": ([str(trained_run), "--prompt", ""], ["encodes to no token"]),
    }
    for name, (args, fragments) in cases.items():
        code, stderr = _stderr_of(*args)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and "Traceback" not in stderr, (name, stderr)
        for fragment in fragments:
            assert fragment in lines[0], (name, fragment, lines[0])


@pytest.mark.gpu
def test_sampling_on_the_gpu_continues_as_on_the_cpu(tmp_path: Path) -> None:
    """Greedy float32 continuations are the CPU's; bfloat16 sampling is seeded the same
    way. (An export of our own: the GPU machine has no transformers.)"""
    from streamer.io import atomic_write_json, write_safetensors

    model = GPT(ModelConfig.from_name("tiny-neox"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # far from ties, so that both devices' argmax agree
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    write_safetensors(tmp_path / "model.safetensors", model.state_dict())
    atomic_write_json(tmp_path / "config.json", model.cfg.to_dict())
    cfg, cuda = model_config(tmp_path), torch.device("cuda")
    prompt = list(b"def main():\n    ")
    on_cpu = generate(load_model(tmp_path, cfg, torch.device("cpu"), torch.float32), prompt, GREEDY)
    assert on_cpu == generate(model, prompt, GREEDY)
    assert generate(load_model(tmp_path, cfg, cuda, torch.float32), prompt, GREEDY) == on_cpu
    half = load_model(tmp_path, cfg, cuda, torch.bfloat16)
    drawn = SampleConfig(new_tokens=40, temperature=1.0)
    first = generate(half, prompt, drawn, torch.Generator().manual_seed(5))
    assert len(first) == 40 and all(0 <= t < cfg.vocab_size for t in first)
    assert first == generate(half, prompt, drawn, torch.Generator().manual_seed(5))
