"""Parity with Hugging Face: tiny random GPT-2, GPT-J and GPT-NeoX models give the
same logits after `load_hf`, and `save_hf` writes what `transformers` loads back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import models
import models.hf
from models import GPT, ModelConfig

# Set before transformers is first imported: every model here is built locally, never fetched.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

VOCAB = 97  # not a multiple of anything, so padding and slicing are exercised
TINY = dict(n_layer=2, d_model=64, n_head=4, block_size=32, vocab_size=VOCAB)
# Keep GPT-2's default bos/eos (50256) from warning about a 97-token vocabulary.
TOKENS = dict(bos_token_id=0, eos_token_id=0)


def gpt2(**overrides: object) -> transformers.PreTrainedModel:
    settings = dict(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=VOCAB, **TOKENS)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**settings, **overrides}))


def gptj(**overrides: object) -> transformers.PreTrainedModel:
    settings = dict(n_embd=64, n_layer=2, n_head=4, n_positions=32, vocab_size=VOCAB, rotary_dim=8, **TOKENS)
    return transformers.GPTJForCausalLM(transformers.GPTJConfig(**{**settings, **overrides}))


def neox(**overrides: object) -> transformers.PreTrainedModel:
    settings = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=32,
        vocab_size=VOCAB,
        rotary_pct=0.5,
        **TOKENS,
    )
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**{**settings, **overrides}))


def randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random, so biases and norm weights are tested, not left at 0 and 1.

    A std of 0.3 makes attention far from uniform, so a wrong rotary convention moves
    the logits by ~0.2 rather than ~1e-4, well clear of the tolerance.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def tokens(batch: int = 2, seq_len: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(1))


def hf_logits(model: transformers.PreTrainedModel, idx: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(idx).logits


def our_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(idx)


def saved(model: transformers.PreTrainedModel, directory: Path, **kwargs: object) -> Path:
    randomise(model)
    model.save_pretrained(directory, **kwargs)
    return directory


CASES = {
    "gpt2": lambda: gpt2(),
    "gpt2-untied-gelu": lambda: gpt2(tie_word_embeddings=False, activation_function="gelu", n_inner=96),
    "gptj": lambda: gptj(),
    "gptj-full-rotary": lambda: gptj(rotary_dim=16),
    "neox-parallel": lambda: neox(use_parallel_residual=True),
    "neox-sequential": lambda: neox(use_parallel_residual=False, rotary_emb_base=500.0),
    "neox-no-attn-bias-tied": lambda: neox(attention_bias=False, tie_word_embeddings=True, rotary_pct=1.0),
}


@pytest.mark.parametrize("case", list(CASES))
def test_load_matches_transformers_logits(case: str, tmp_path: Path) -> None:
    reference = CASES[case]()
    ours = models.load_hf(saved(reference, tmp_path))
    idx = tokens()
    torch.testing.assert_close(our_logits(ours, idx), hf_logits(reference, idx), atol=1e-5, rtol=1e-4)


def test_sharded_checkpoint_loads_with_and_without_index(tmp_path: Path) -> None:
    reference = neox()
    saved(reference, tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    idx = tokens()
    expected = hf_logits(reference, idx)
    torch.testing.assert_close(our_logits(models.load_hf(tmp_path), idx), expected, atol=1e-5, rtol=1e-4)
    (tmp_path / "model.safetensors.index.json").unlink()
    torch.testing.assert_close(our_logits(models.load_hf(tmp_path), idx), expected, atol=1e-5, rtol=1e-4)


OUR_CONFIGS = {
    "gpt3": dict(ModelConfig.from_name("tiny").to_dict(), **TINY),
    "gptj": dict(ModelConfig.from_name("tiny-gptj").to_dict(), **TINY),
    "neox": dict(ModelConfig.from_name("tiny-neox").to_dict(), **TINY),
    "neox-sequential-tied": dict(
        ModelConfig.from_name("tiny-neox").to_dict(), **TINY, parallel_residual=False, tie_embeddings=True
    ),
}


@pytest.mark.parametrize("family", list(OUR_CONFIGS))
def test_save_hf_loads_in_transformers(family: str, tmp_path: Path) -> None:
    # Padded to 128 rows: the export must drop the padding and still agree.
    model = GPT(ModelConfig(**{**OUR_CONFIGS[family], "padding_multiple": 64}))
    assert model.cfg.padded_vocab_size > VOCAB
    randomise(model)
    models.save_hf(model, tmp_path)
    reference, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    idx = tokens()
    torch.testing.assert_close(hf_logits(reference, idx), our_logits(model, idx), atol=1e-5, rtol=1e-4)
    reloaded = models.load_hf(tmp_path)
    torch.testing.assert_close(our_logits(reloaded, idx), our_logits(model, idx), atol=0, rtol=0)
    assert not list(tmp_path.glob("*.tmp")), "temporary files left behind"


def test_save_hf_rejects_a_config_no_family_expresses(tmp_path: Path) -> None:
    cfg = ModelConfig(**{**OUR_CONFIGS["gptj"], "rotary_base": 500.0})
    with pytest.raises(ValueError, match="rotary base"):
        models.save_hf(GPT(cfg), tmp_path)
    assert not list(tmp_path.iterdir()), "nothing is written when the config is refused"


def test_unsupported_model_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="unsupported model_type 'llama'.*gpt2, gptj, gpt_neox"):
        models.load_hf(tmp_path)


def test_unsupported_activation(tmp_path: Path) -> None:
    saved(gpt2(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="unsupported activation 'relu'"):
        models.load_hf(tmp_path)


def test_pickle_only_checkpoint_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(gpt2().config.to_json_string())
    (tmp_path / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(ValueError, match="pytorch_model.bin.*safetensors"):
        models.load_hf(tmp_path)


def _rewrite_weights(directory: Path, edit: dict[str, torch.Tensor | None]) -> None:
    tensors = load_file(directory / "model.safetensors")
    for name, tensor in edit.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    save_file(tensors, directory / "model.safetensors")


def test_missing_unexpected_and_misshapen_tensors_are_named(tmp_path: Path) -> None:
    saved(gptj(), tmp_path)
    original = load_file(tmp_path / "model.safetensors")
    name = "transformer.h.1.attn.k_proj.weight"
    _rewrite_weights(tmp_path, {name: None})
    with pytest.raises(ValueError, match=f"lacks tensor '{name}'"):
        models.load_hf(tmp_path)
    _rewrite_weights(tmp_path, {name: original[name], "transformer.h.0.attn.k_proj.bias": torch.zeros(64)})
    with pytest.raises(ValueError, match="unexpected tensor 'transformer.h.0.attn.k_proj.bias'"):
        models.load_hf(tmp_path)
    _rewrite_weights(tmp_path, {"transformer.h.0.attn.k_proj.bias": None, name: original[name][:32]})
    with pytest.raises(ValueError, match=rf"'{name}' has shape \[32, 64\]"):
        models.load_hf(tmp_path)


def test_legacy_names_and_buffers_are_accepted(tmp_path: Path) -> None:
    # The original GPT-2 release was saved from the base model: no `transformer.` prefix,
    # plus causal-mask buffers that are not weights.
    reference = gpt2()
    saved(reference, tmp_path)
    tensors = {
        k.removeprefix("transformer."): v for k, v in load_file(tmp_path / "model.safetensors").items()
    }
    tensors["h.0.attn.bias"] = torch.ones(1, 1, 32, 32)
    save_file(tensors, tmp_path / "model.safetensors")
    idx = tokens()
    torch.testing.assert_close(
        our_logits(models.load_hf(tmp_path), idx), hf_logits(reference, idx), atol=1e-5, rtol=1e-4
    )


# --- Pretrained: a checkpoint's weights a tensor at a time, for training from them ---------


@pytest.mark.parametrize("case", ["gpt2", "gptj", "neox-parallel", "neox-no-attn-bias-tied"])
def test_pretrained_reads_each_tensor_as_load_hf_does(case: str, tmp_path: Path) -> None:
    saved(CASES[case](), tmp_path)
    whole = models.load_hf(tmp_path)
    with models.hf.Pretrained(tmp_path, whole.cfg) as weights:
        for name, param in whole.state_dict().items():
            assert torch.equal(weights.tensor(name).float(), param), name


def test_pretrained_pads_a_padded_vocabulary_with_zero_rows(tmp_path: Path) -> None:
    saved(neox(), tmp_path)
    cfg = ModelConfig(**{**models.load_hf(tmp_path).cfg.to_dict(), "padding_multiple": 64})
    target = torch.full((cfg.padded_vocab_size, 64), 7.0)
    with models.hf.Pretrained(tmp_path, cfg) as weights:
        weights.into("units.0.wte.weight", target)
        assert torch.equal(target[:VOCAB], weights.tensor("units.0.wte.weight"))
    assert cfg.padded_vocab_size > VOCAB and not target[VOCAB:].any()


def test_pretrained_reads_this_projects_own_export(tmp_path: Path) -> None:
    from streamer.io import atomic_write_json, write_safetensors

    model = GPT(ModelConfig.from_name("tiny-neox"))
    randomise(model)
    write_safetensors(tmp_path / "model.safetensors", {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()})
    atomic_write_json(tmp_path / "config.json", model.cfg.to_dict())
    with models.hf.Pretrained(tmp_path, model.cfg) as weights:
        for name, param in model.state_dict().items():
            assert torch.equal(weights.tensor(name), param.to(torch.bfloat16)), name


def test_pretrained_refuses_another_architecture_naming_the_fields(tmp_path: Path) -> None:
    saved(neox(), tmp_path)
    cfg = ModelConfig.from_name("tiny-neox")  # 4 layers of 96, 256 tokens of context
    with pytest.raises(ValueError, match=r"architecture than tiny-neox's: n_layer 2, not 4; d_model 64, not 96"):
        models.hf.Pretrained(tmp_path, cfg)
    with pytest.raises(ValueError, match=r"rotary_style 'half', not 'interleaved'"):
        models.hf.Pretrained(tmp_path, ModelConfig(**{**models.load_hf(tmp_path).cfg.to_dict(),
                                                      "rotary_style": "interleaved"}))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.hf.Pretrained(tmp_path / "..", cfg)


# The fields of each model's published config.json that decide its architecture.
_PYTHIA = dict(model_type="gpt_neox", hidden_act="gelu", layer_norm_eps=1e-05, max_position_embeddings=2048,
               rotary_emb_base=10000, rotary_pct=0.25, tie_word_embeddings=False, use_parallel_residual=True,
               vocab_size=50304)
PUBLISHED_CONFIGS = {
    "gpt-j-6b": dict(model_type="gptj", activation_function="gelu_new", n_embd=4096, n_head=16, n_layer=28,
                     n_positions=2048, rotary_dim=64, vocab_size=50400, layer_norm_epsilon=1e-05,
                     tie_word_embeddings=False),
    # 20B's activation is "gelu_fast", the tanh approximation (Pythia's is the exact "gelu").
    "gpt-neox-20b": dict(_PYTHIA, hidden_act="gelu_fast", hidden_size=6144, intermediate_size=24576,
                         num_attention_heads=64, num_hidden_layers=44, vocab_size=50432),
    "pythia-160m": dict(_PYTHIA, hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12),
    "pythia-410m": dict(_PYTHIA, hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                        num_hidden_layers=24),
    "pythia-1.4b": dict(_PYTHIA, hidden_size=2048, intermediate_size=8192, num_attention_heads=16,
                        num_hidden_layers=24),
}


@pytest.mark.parametrize("name", list(PUBLISHED_CONFIGS))
def test_the_published_checkpoints_are_the_registry_entries(name: str) -> None:
    """`--model NAME --init-from` the published weights passes the architecture check:
    each registry entry is its published model, activation included."""
    hf = PUBLISHED_CONFIGS[name]
    theirs = models.hf.ADAPTERS[hf["model_type"]].config_to_internal(hf, name)
    assert models.hf.architecture_differences(theirs, ModelConfig.from_name(name)) == []
