"""`streamer sample`: continuations of a prompt from a run's final weights or a Hugging
Face checkpoint, checked against the transformers model's own greedy generation and
against running the whole context again for every token; a streamed model against the
same model held whole."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from models import GPT, ModelConfig
from streamer.cli import main
from streamer.inference import ResidentWeights, load_model, model_config, stream_model
from streamer.sample import SampleConfig, generate
from streamer.train import TrainConfig, save_final, train

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is built locally, never fetched

GREEDY = SampleConfig(new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sample") / "run"
    train(TrainConfig(model="tiny", steps=3, batch_size=2, seq_len=32, out=str(out), progress=False))
    return out


CPU = torch.device("cpu")


@pytest.mark.parametrize("model", ["tiny", "tiny-gptj", "tiny-neox"])
def test_greedy_continuation_is_the_hugging_face_models_own(tmp_path: Path, model: str,
                                                           hugging_face_checkpoint) -> None:
    """Held whole or streamed a unit at a time, from host memory or from disk (the tiny
    model's head is tied to its embedding, which then stays on the device)."""
    reference = hugging_face_checkpoint(model, tmp_path, std=0.3)  # far from ties
    cfg = model_config(tmp_path)
    prompt = list(b"def main():\n    ")
    expected = reference.generate(torch.tensor([prompt]), max_new_tokens=GREEDY.new_tokens, do_sample=False,
                                  min_new_tokens=GREEDY.new_tokens)[0, len(prompt):].tolist()
    assert generate(load_model(tmp_path, cfg, CPU, torch.float32), prompt, GREEDY) == [expected]
    for from_disk in (False, True):  # the weights in host memory, or read from the files for every token
        streamed = stream_model(tmp_path, cfg, CPU, torch.float32, from_disk=from_disk)
        assert generate(streamed, prompt, GREEDY) == [expected], from_disk
        streamed.close()


def _uncached_greedy(model: GPT, prompt: list[int], new_tokens: int) -> list[int]:
    """The definition: every token from the whole (cropped) context run again."""
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(new_tokens):
            following = model(tokens[:, -model.cfg.block_size:])[0, -1].argmax()
            tokens = torch.cat([tokens, following.view(1, 1)], dim=1)
    return tokens[0, len(prompt):].tolist()


@pytest.mark.parametrize("length", [5, 250, 356])
def test_cached_generation_continues_as_running_the_whole_context_again(length: int) -> None:
    """Inside the context (5), crossing its end mid-way (250 + 12 > 256: the cache is
    dropped and the last context's worth run again), and from a prompt longer than the
    context (cropped to its last 256 tokens)."""
    model = GPT(ModelConfig.from_name("tiny-neox"))  # 256 tokens of context
    model.init_weights(0)
    with torch.no_grad():  # far from ties
        for p in model.parameters():
            p.mul_(8)
    prompt = [(7 * i) % 256 for i in range(length)]
    expected = _uncached_greedy(model, prompt, GREEDY.new_tokens)
    assert len(set(expected)) > 2, "a degenerate continuation would not tell the positions apart"
    assert generate(model, prompt, GREEDY) == [expected]
    if length > 256:
        assert generate(model, prompt, GREEDY) == generate(model, prompt[-256:], GREEDY)


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


def test_nucleus_sampling_draws_only_from_the_nucleus() -> None:
    """--top-p: every drawn token is among the fewest likeliest whose probabilities
    (at the temperature) reach p; a p below the likeliest token's probability is greedy."""
    model = GPT(ModelConfig.from_name("tiny-neox"))
    model.init_weights(0)
    with torch.no_grad():  # a peaked distribution, so that the nucleus is a few tokens
        for p in model.parameters():
            p.mul_(6)
    prompt, p = list(b"return "), 0.6
    drawn = generate(model, prompt, SampleConfig(new_tokens=24, temperature=1.0, top_k=None, top_p=p),
                     torch.Generator().manual_seed(0), samples=3)
    sizes = []
    for continuation in drawn:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + continuation]))[0, len(prompt) - 1 : -1]
        for row, token in zip(logits.softmax(-1), continuation):
            ordered = row.sort(descending=True)
            nucleus = int((ordered.values.cumsum(0) < p).sum()) + 1
            sizes.append(nucleus)
            assert token in ordered.indices[:nucleus].tolist()
    assert max(sizes) > 1, "a nucleus of one token everywhere would not test the cut"
    assert len({tuple(d) for d in drawn}) > 1
    tiny_nucleus = SampleConfig(new_tokens=24, temperature=1.0, top_p=1e-6)
    assert generate(model, prompt, tiny_nucleus, torch.Generator().manual_seed(0)) == generate(
        model, prompt, SampleConfig(new_tokens=24, temperature=0))


def test_a_continuation_ends_before_its_stop_token(tmp_path: Path, hugging_face_checkpoint) -> None:
    """Each sample ends at its own first stop token (drawn together, the others go on,
    and their tokens are those they would be without the stop); the stop token is a
    Hugging Face checkpoint's end of text, and this project's exports name none."""
    from streamer.sample import end_of_text

    model = GPT(ModelConfig.from_name("tiny-gptj"))
    model.init_weights(0)
    prompt = list(b"x = ")
    [free] = generate(model, prompt, GREEDY)
    at = next(i for i in range(3, len(free)) if free[i] not in free[:i])
    stopped = SampleConfig(new_tokens=GREEDY.new_tokens, temperature=0, stop=free[at])
    assert generate(model, prompt, stopped) == [free[:at]]

    drawn = SampleConfig(new_tokens=30, temperature=1.0, top_k=None)
    rows = generate(model, prompt, drawn, torch.Generator().manual_seed(2), samples=4)
    stop = next(t for t in rows[0][2:] if t not in rows[0][:2])
    expected = [row[: row.index(stop)] if stop in row else row for row in rows]
    assert len({len(row) for row in expected}) > 1, "the samples end at different tokens"
    assert generate(model, prompt, SampleConfig(new_tokens=30, temperature=1.0, top_k=None, stop=stop),
                    torch.Generator().manual_seed(2), samples=4) == expected

    hugging_face_checkpoint("tiny-neox", tmp_path / "hf")
    assert end_of_text(tmp_path / "hf") == 0
    assert end_of_text(save_final([model.state_dict], model.cfg, tmp_path)) is None


def test_samples_drawn_together_are_each_a_continuation_of_the_prompt() -> None:
    """A batch of samples: greedy ones are all the single greedy continuation; drawn
    ones differ from one another, and each, fed back, is a continuation the model
    gives a probability (no row reads another's cache)."""
    model = GPT(ModelConfig.from_name("tiny-gptj"))
    model.init_weights(0)
    prompt = list(b"for i in ")
    assert generate(model, prompt, GREEDY, samples=3) == generate(model, prompt, GREEDY) * 3
    drawn = generate(model, prompt, SampleConfig(new_tokens=20, temperature=1.0, top_k=5),
                     torch.Generator().manual_seed(0), samples=4)
    assert len(drawn) == 4 and len({tuple(d) for d in drawn}) == 4
    for continuation in drawn:
        with torch.no_grad():
            logits = model(torch.tensor([prompt + continuation]))[0, len(prompt) - 1 : -1]
        top_5 = logits.topk(5).indices
        assert all(t in top_5[i] for i, t in enumerate(continuation)), "each token is among its top 5"


@pytest.mark.parametrize("model", ["tiny", "tiny-neox"])
def test_a_streamed_model_samples_as_the_model_held_whole(tmp_path: Path, model: str) -> None:
    """Bit for bit, greedy and drawn, from its export, with a tied head (its table kept
    on the device) and without."""
    gpt = GPT(ModelConfig.from_name(model, n_layer=6))
    gpt.init_weights(3)
    final = save_final([gpt.state_dict], gpt.cfg, tmp_path)
    streamed = stream_model(final, model_config(final), CPU, torch.float32)
    prompt = list(b"while True:")
    drawn = SampleConfig(new_tokens=16, temperature=0.9, top_k=50)
    assert generate(streamed, prompt, GREEDY, samples=2) == generate(gpt, prompt, GREEDY, samples=2)
    assert generate(streamed, prompt, drawn, torch.Generator().manual_seed(4), samples=3) == generate(
        gpt, prompt, drawn, torch.Generator().manual_seed(4), samples=3)


def test_the_cli_samples_a_runs_final_weights(trained_run: Path, capsys) -> None:
    """From the run folder or its final/, held or streamed, the same text for the same
    seed: the prompt and then as many bytes as asked for (the tiny models' tokens are
    bytes)."""
    from streamer.data import ByteTokenizer
    from streamer.train import load_final

    args = ["--prompt", "class ", "--tokens", "25", "--seed", "3", "--device", "cpu"]
    assert main(["sample", str(trained_run), *args]) == 0
    from_run = capsys.readouterr().out
    assert main(["sample", str(trained_run / "final"), *args]) == 0
    assert capsys.readouterr().out == from_run

    assert main(["sample", str(trained_run), *args, "--mode", "stream"]) == 0
    assert capsys.readouterr().out == from_run

    model = GPT(ModelConfig.from_name("tiny"))
    model.load_state_dict(load_final(trained_run / "final"))
    [expected] = generate(model, list(b"class "), SampleConfig(new_tokens=25), torch.Generator().manual_seed(3))
    assert from_run == "class " + ByteTokenizer().decode(expected) + "\n"


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, trained_run: Path, fails_in_one_line) -> None:
    (tmp_path / "neox").mkdir()
    (tmp_path / "neox" / "config.json").write_text(json.dumps(ModelConfig.from_name("pythia-160m").to_dict()))
    fails_in_one_line("sample", {
        "a folder that is not there": ([str(tmp_path / "absent")], ["absent': no folder", "a run's final/"]),
        "no tokenizer for a large vocabulary": ([str(tmp_path / "neox")], ["50304 tokens", "pass --tokenizer"]),
        "negative temperature": ([str(trained_run), "--temperature", "-1"], ["--temperature must be 0"]),
        "a temperature that is not a number": ([str(trained_run), "--temperature", "nan"],
                                               ["--temperature must be 0 (greedy) or a positive number, got nan"]),
        "an unknown device": ([str(trained_run), "--device", "tpu"], ["--device must be auto, cpu, cuda"]),
        "a nucleus of nothing": ([str(trained_run), "--top-p", "0"], ["--top-p must be above 0"]),
        "a stop past the vocabulary": ([str(trained_run), "--stop-token", "256"], ["token id below 256"]),
        "nothing to continue": ([str(trained_run), "--prompt", ""], ["encodes to no token"]),
    })


@pytest.mark.gpu
def test_sampling_on_the_gpu_continues_as_on_the_cpu(tmp_path: Path) -> None:
    """Greedy float32 continuations are the CPU's, held whole or streamed; a streamed
    model's continuations, from host memory or from disk, are the held model's in
    bfloat16 too, greedy and drawn, while the device holds two of its units. (An export
    of our own: the GPU machine has no transformers.)"""
    model = GPT(ModelConfig.from_name("tiny-neox", n_layer=8))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # far from ties, so that both devices' argmax agree
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    tmp_path = save_final([model.state_dict], model.cfg, tmp_path)
    cfg, cuda = model_config(tmp_path), torch.device("cuda")
    prompt = list(b"def main():\n    ")
    on_cpu = generate(load_model(tmp_path, cfg, CPU, torch.float32), prompt, GREEDY)
    assert on_cpu == generate(model, prompt, GREEDY)
    assert generate(load_model(tmp_path, cfg, cuda, torch.float32), prompt, GREEDY) == on_cpu
    assert generate(stream_model(tmp_path, cfg, cuda, torch.float32), prompt, GREEDY) == on_cpu

    drawn = SampleConfig(new_tokens=40, temperature=1.0)
    half = ResidentWeights(load_model(tmp_path, cfg, cuda, torch.bfloat16))
    first = generate(half, prompt, drawn, torch.Generator().manual_seed(5), samples=3)
    assert all(len(f) == 40 and all(0 <= t < cfg.vocab_size for t in f) for f in first)
    assert first == generate(half, prompt, drawn, torch.Generator().manual_seed(5), samples=3)
    for from_disk in (False, True):  # from host memory, and read from the files for every pass
        streamed = stream_model(tmp_path, cfg, cuda, torch.bfloat16, from_disk=from_disk)
        for k, _ in enumerate(streamed.units()):  # a pass left midway, its copies (and reads) in flight
            if k == 3:
                break
        assert generate(streamed, prompt, drawn, torch.Generator().manual_seed(5), samples=3) == first, from_disk
        assert generate(streamed, prompt, GREEDY) == generate(load_model(tmp_path, cfg, cuda, torch.bfloat16),
                                                              prompt, GREEDY), from_disk
        assert (streamed.disk.locked if from_disk else streamed.locked), "page-locked: the copies overlap the compute"
        streamed.close()
    weights = 2 * sum(p.numel() for p in model.parameters())
    assert streamed.device_bytes() < weights / 3
