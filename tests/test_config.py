"""The registry: every named model builds, its size is what the paper says, and configs
survive a round trip through JSON."""

from __future__ import annotations

import json

import pytest
import torch

from models import GPT, PUBLISHED_N_PARAMS, REGISTRY, ModelConfig, UnknownModelError


@pytest.mark.parametrize("name", list(REGISTRY))
def test_module_parameter_count_equals_analytic_count(name: str) -> None:
    cfg = ModelConfig.from_name(name)
    with torch.device("meta"):  # shapes only: gpt-neox-20b costs no memory
        model = GPT(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.n_params()


@pytest.mark.parametrize("name", list(PUBLISHED_N_PARAMS))
def test_parameter_count_matches_published(name: str) -> None:
    published = PUBLISHED_N_PARAMS[name]
    assert abs(ModelConfig.from_name(name).n_params() - published) <= 0.005 * published


def test_published_counts_name_registry_entries() -> None:
    assert set(PUBLISHED_N_PARAMS) <= set(REGISTRY)


@pytest.mark.parametrize(
    ("typo", "closest"),
    [("gpt3-x1", "gpt3-xl"), ("tiny-gpt-j", "tiny-gptj"), ("neox-20b", "gpt-neox-20b"), ("tinyy", "tiny")],
)
def test_unknown_name_suggests_closest_entry(typo: str, closest: str) -> None:
    with pytest.raises(UnknownModelError) as info:
        ModelConfig.from_name(typo)
    message = str(info.value)
    assert f"'{closest}'" in message
    assert "streamer models" in message
    assert not message.startswith(('"', "'")), "KeyError's quoting must not leak into the message"


def test_from_name_applies_overrides() -> None:
    cfg = ModelConfig.from_name("tiny", n_layer=1, block_size=64)
    assert (cfg.name, cfg.n_layer, cfg.block_size, cfg.d_model) == ("tiny", 1, 64, 96)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_dict_round_trip_through_json(name: str) -> None:
    cfg = ModelConfig.from_name(name)
    restored = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert restored == cfg
    assert restored.n_params() == cfg.n_params()


def test_to_dict_holds_only_settable_fields() -> None:
    d = ModelConfig.from_name("tiny-neox").to_dict()
    assert {"padded_vocab_size", "head_dim", "rotary_dim"}.isdisjoint(d)
    assert ModelConfig(**d) == ModelConfig.from_name("tiny-neox")


def test_from_dict_ignores_unknown_and_derived_keys() -> None:
    d = {**ModelConfig.from_name("tiny").to_dict(), "padded_vocab_size": 7, "written_by": "a newer version"}
    assert ModelConfig.from_dict(d) == ModelConfig.from_name("tiny")


def test_padded_vocab_rounds_up_to_the_multiple() -> None:
    assert ModelConfig(vocab_size=50257, padding_multiple=64).padded_vocab_size == 50304
    assert ModelConfig(vocab_size=50304, padding_multiple=64).padded_vocab_size == 50304
    assert ModelConfig(vocab_size=50257).padded_vocab_size == 50257  # multiple 1: the published shape


def test_head_dim_and_default_ffn_width() -> None:
    cfg = ModelConfig.from_name("gpt3-13b")
    assert cfg.head_dim == 128
    assert cfg.d_ff == 4 * 5120
    assert ModelConfig(d_model=64, n_head=4, d_ff=100).d_ff == 100


@pytest.mark.parametrize(
    ("name", "rotary_dim"),
    [("gpt-j-6b", 64), ("gpt-neox-20b", 24), ("tiny-gptj", 12), ("tiny-neox", 6), ("tiny", 0), ("gpt3-xl", 0)],
)
def test_rotary_dim(name: str, rotary_dim: int) -> None:
    assert ModelConfig.from_name(name).rotary_dim == rotary_dim


def test_rotary_dim_rounds_down_to_an_even_count() -> None:
    cfg = ModelConfig(d_model=96, n_head=4, positional="rotary", rotary_fraction=0.3)  # 24 x 0.3 = 7.2
    assert cfg.rotary_dim == 6


def test_width_not_divisible_by_heads_is_refused() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        ModelConfig(d_model=100, n_head=3)
