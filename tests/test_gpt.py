"""The GPT model: shapes, causality, and the unit structure the streamer relies on."""

from __future__ import annotations

import pytest
import torch

from models import GPT, Documents, ModelConfig
from models.gpt import KVCache, build_unit, init_unit

TINY = ["tiny", "tiny-gptj", "tiny-neox"]


def tiny_model(name: str, seed: int = 0, **overrides: object) -> GPT:
    model = GPT(ModelConfig.from_name(name, **overrides))
    model.init_weights(seed)
    return model.eval()


def random_tokens(batch: int, seq_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", TINY)
def test_logits_shape(name: str) -> None:
    model = tiny_model(name)
    logits = model(random_tokens(3, 17, 256))
    assert logits.shape == (3, 17, 256)
    assert torch.isfinite(logits).all()


def test_padding_rows_are_never_predicted() -> None:
    model = tiny_model("tiny", vocab_size=250, padding_multiple=64)
    assert model.embedding.wte.weight.shape[0] == 256
    assert model(random_tokens(2, 8, 250)).shape == (2, 8, 250)


@pytest.mark.parametrize("name", TINY)
def test_later_tokens_do_not_change_earlier_logits(name: str) -> None:
    model = tiny_model(name)
    idx = random_tokens(2, 32, 256)
    changed = idx.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 256
    with torch.no_grad():
        before, after = model(idx), model(changed)
    torch.testing.assert_close(after[:, :20], before[:, :20], rtol=0, atol=1e-6)
    assert not torch.allclose(after[:, 20:], before[:, 20:]), "the changed token must reach later positions"


@pytest.mark.parametrize("name", TINY)
def test_units_built_alone_reproduce_the_whole_model(name: str) -> None:
    """The streamer runs one unit at a time, each its own module: chaining them must be the model."""
    model = tiny_model(name)
    cfg = model.cfg
    idx = random_tokens(2, 24, 256)
    units = []
    for index, whole_unit in enumerate(model.units):
        unit = build_unit(cfg, index)
        unit.load_state_dict(whole_unit.state_dict())
        units.append(unit.eval())
    with torch.no_grad():
        x = idx
        for unit in units[:-1]:
            x = unit(x)
        tied = units[0].wte.weight if cfg.tie_embeddings else None
        logits = units[-1](x, tied)
        expected = model(idx)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", TINY)
def test_init_is_a_function_of_seed_and_unit(name: str) -> None:
    cfg = ModelConfig.from_name(name)
    torch.manual_seed(123)  # the global generator must play no part
    model = tiny_model(name, seed=7)
    torch.manual_seed(456)
    for index, whole_unit in enumerate(model.units):
        unit = build_unit(cfg, index)
        init_unit(unit, cfg, seed=7, index=index)
        for (key, alone), whole in zip(unit.state_dict().items(), whole_unit.state_dict().values(), strict=True):
            assert torch.equal(alone, whole), f"unit {index} {key}"


def test_init_differs_by_seed_and_by_unit() -> None:
    a, b = tiny_model("tiny", seed=0), tiny_model("tiny", seed=1)
    assert not torch.equal(a.units[1].attn.qkv.weight, b.units[1].attn.qkv.weight)
    assert not torch.equal(a.units[1].attn.qkv.weight, a.units[2].attn.qkv.weight)


def test_init_scales_residual_projections() -> None:
    model = tiny_model("tiny-neox", seed=0)
    block = model.units[1]
    assert block.ln_1.weight.eq(1).all() and block.attn.qkv.bias.eq(0).all()
    residual_std = 0.02 / (2 * model.cfg.n_layer) ** 0.5
    assert block.mlp.fc_out.weight.std().item() == pytest.approx(residual_std, rel=0.1)
    assert block.mlp.fc_in.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_sequence_longer_than_context_is_refused() -> None:
    model = tiny_model("tiny", block_size=16)
    model(random_tokens(1, 16, 256))
    with pytest.raises(ValueError, match="exceeds the context of 16"):
        model(random_tokens(1, 17, 256))


@pytest.mark.parametrize("name", TINY)
def test_a_cached_pass_equals_the_whole_sequence(name: str) -> None:
    """The sequence fed in pieces (a prompt, one token, several) with a cache per block
    gives the logits the whole sequence does: learned positions and both rotary styles
    continue from the cache's length, and a piece sees exactly the positions before it."""
    model = tiny_model(name)
    idx = random_tokens(2, 40, 256)
    caches = [KVCache(model.cfg, 2, 40, torch.device("cpu"), torch.float32) for _ in range(model.cfg.n_layer)]
    with torch.no_grad():
        whole = model(idx)
        pieces = torch.cat([model(idx[:, a:b], caches) for a, b in [(0, 17), (17, 18), (18, 25), (25, 40)]], dim=1)
    assert caches[0].length == 40
    torch.testing.assert_close(pieces, whole, rtol=0, atol=2e-6)


def test_a_cache_refuses_positions_past_its_room_and_the_context() -> None:
    model = tiny_model("tiny-neox", block_size=16)
    caches = [KVCache(model.cfg, 1, 8, torch.device("cpu"), torch.float32) for _ in range(model.cfg.n_layer)]
    model(random_tokens(1, 6, 256), caches)
    with pytest.raises(ValueError, match="holds 8 positions, not 9"):
        model(random_tokens(1, 3, 256), caches)
    caches = [KVCache(model.cfg, 1, 32, torch.device("cpu"), torch.float32) for _ in range(model.cfg.n_layer)]
    model(random_tokens(1, 16, 256), caches)
    with pytest.raises(ValueError, match="sequence of 17 exceeds the context of 16"):
        model(random_tokens(1, 1, 256), caches)


@pytest.mark.parametrize("name", TINY)
def test_each_packed_document_is_computed_as_if_alone(name: str) -> None:
    """[Note: documents in a window]: with `Documents`, a window holding the tail of one
    document, two whole ones and the head of a fourth gives each document's positions
    the logits that document gets run by itself, learned positions and rotary alike;
    without, a document sees the ones before it."""
    model, separator = tiny_model(name), 0
    lengths = [5, 9, 1, 7]  # the 1: a document that is only its separator
    pieces = [random_tokens(1, n, 255, seed=n)[0] + 1 for n in lengths]  # no separator inside a document
    for piece in pieces[:-1]:
        piece[-1] = separator
    other = [pieces[2], pieces[0], pieces[1], pieces[3]]  # the head of a document stays last
    windows = torch.stack([torch.cat(pieces), torch.cat(other)])
    with torch.no_grad():
        packed = model(windows, documents=Documents.of(windows, separator))
        unmasked = model(windows)
        for row, order in ((0, pieces), (1, other)):
            start = 0
            for piece in order:
                alone = model(piece[None])[0]
                torch.testing.assert_close(packed[row, start : start + len(piece)], alone, atol=1e-5, rtol=1e-5)
                start += len(piece)
    assert not torch.allclose(unmasked[0, 5:14], packed[0, 5:14], atol=1e-3)  # the second document sees the first
    torch.testing.assert_close(unmasked[0, :5], packed[0, :5])  # the first has nothing before it


def test_documents_mark_starts_after_each_separator() -> None:
    windows = torch.tensor([[7, 0, 3, 4, 0, 0, 5], [0, 1, 2, 3, 4, 5, 6]])
    documents = Documents.of(windows, separator=0)
    assert documents.positions.tolist() == [[0, 1, 0, 1, 2, 0, 0], [0, 0, 1, 2, 3, 4, 5]]
    assert documents.mask.shape == (2, 1, 7, 7)
    assert documents.mask[0, 0, 4].tolist() == [False, False, True, True, True, False, False]
    assert documents.mask[1, 0].sum(1).tolist() == [1, 1, 2, 3, 4, 5, 6]
