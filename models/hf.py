"""Hugging Face import and export for GPT-2, GPT-J and GPT-NeoX checkpoints.

`models/gpt.py` knows nothing of checkpoint layouts: everything about Hugging Face
names, tensor orientations and config keys lives here, one adapter per family. An
adapter maps each of *our* parameter names to the Hugging Face tensor(s) it comes
from, with a transform each way; loading and saving are generic over that map.

Only safetensors are read. Pickled weights (`pytorch_model.bin`) can run arbitrary
code when loaded, so they are refused with a pointer to converting them first.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from models.config import FAMILIES, ModelConfig
from models.gpt import GPT

# A format check, not streaming: shared with the streamer's checkpoint loader.
from models.safety import check_safetensors

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# Hugging Face activation names -> ours. `gelu_new` is the tanh approximation written
# out by hand, `gelu_fast` the same with its constant folded (GPT-NeoX-20B's) and
# `gelu_pytorch_tanh` the same formula in one kernel: all three are ours.
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}
_HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu"}

Tensors = list[torch.Tensor]


@dataclass(frozen=True)
class TensorMap:
    """How one of our parameters relates to the Hugging Face tensors it is stored as."""

    hf_names: tuple[str, ...]
    to_internal: Callable[[Tensors], torch.Tensor]
    to_hf: Callable[[torch.Tensor], Tensors]


def _plain(hf_name: str) -> TensorMap:
    return TensorMap((hf_name,), lambda ts: ts[0], lambda t: [t])


def _transposed(hf_name: str) -> TensorMap:
    # GPT-2's Conv1D stores weights as [in, out], the transpose of nn.Linear's.
    return TensorMap((hf_name,), lambda ts: ts[0].t(), lambda t: [t.t()])


def _vocab_rows(hf_name: str, vocab_size: int) -> TensorMap:
    # Our padding rows exist for matmul speed only; Hugging Face gets the true vocabulary.
    return TensorMap((hf_name,), lambda ts: ts[0], lambda t: [t[:vocab_size]])


def _rotary_fraction(rotary_dim: int, head_dim: int) -> float:
    """A fraction f with int(head_dim * f) == rotary_dim, the way both sides compute it.

    rotary_dim / head_dim can land a hair below the integer after the product (as
    1/49 * 49 does), which truncation would turn into one dim fewer.
    """
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        # Rotation acts on pairs; an odd count has no faithful counterpart in our model.
        raise ValueError(f"rotary dims must be even and within the head, got {rotary_dim} of {head_dim}")
    fraction = rotary_dim / head_dim
    return fraction if int(head_dim * fraction) == rotary_dim else (rotary_dim + 0.5) / head_dim


def _get(hf: dict[str, Any], *keys: str, default: Any = None) -> Any:
    """The first of several spellings of one setting present in a config.json."""
    for key in keys:
        if hf.get(key) is not None:
            return hf[key]
    return default


def _activation(name: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation '{name}': supported are {', '.join(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _require(checks: list[tuple[bool, str]], family: str) -> None:
    """Raise naming every (failed, requirement) pair that failed."""
    problems = [requirement for failed, requirement in checks if failed]
    if problems:
        raise ValueError(f"cannot express this model as a {family} checkpoint: {'; '.join(problems)}")


class Adapter(ABC):
    """The name map of one family; subclasses fill in the names that differ.

    `prefix` is the base-model prefix of every tensor except the output head;
    `embedding`, `final_norm` and `block_names` map our module paths to theirs.
    """

    model_type: str
    architecture: str
    prefix: str
    layers: str
    head: str
    embedding: dict[str, str]
    final_norm: str
    block_names: dict[str, str]
    # Buffers some checkpoints carry (causal masks, cached frequencies); never weights.
    ignored: tuple[str, ...] = ()
    # Alternative spellings of names, rewritten before anything else looks at them.
    aliases: dict[str, str] = {}

    @abstractmethod
    def config_to_internal(self, hf: dict[str, Any], name: str) -> ModelConfig:
        """Our config for a Hugging Face config.json; padding_multiple=1 keeps shapes exact."""

    @abstractmethod
    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        """The family's config.json keys; ValueError if the family cannot express `cfg`."""

    def canonical_name(self, name: str) -> str:
        """Names as this adapter spells them: aliases resolved, base prefix present.

        Checkpoints saved from the base model (the original GPT-2 release) lack the
        prefix, and some NeoX exports call the head `lm_head` rather than `embed_out`.
        """
        for old, new in self.aliases.items():
            if name.startswith(old):
                name = new + name[len(old) :]
        if not name.startswith((self.prefix, self.head + ".")):
            name = self.prefix + name
        return name

    def is_ignored(self, name: str, cfg: ModelConfig) -> bool:
        if cfg.tie_embeddings and name == f"{self.head}.weight":
            return True  # a saved copy of the tied table; the embedding is the one we keep
        return any(re.search(pattern, name) for pattern in self.ignored)

    def tensor_map(self, name: str, cfg: ModelConfig) -> TensorMap:
        """The map for one of our parameter names, e.g. `units.3.attn.qkv.weight`."""
        _, unit, rest = name.split(".", 2)
        module, param = rest.rsplit(".", 1)
        index = int(unit)
        if index == 0:
            hf_name = f"{self.prefix}{self.embedding[module]}.{param}"
            return _vocab_rows(hf_name, cfg.vocab_size) if module == "wte" else _plain(hf_name)
        if index == cfg.n_layer + 1:
            if module == "lm_head":
                return _vocab_rows(f"{self.head}.{param}", cfg.vocab_size)
            return _plain(f"{self.prefix}{self.final_norm}.{param}")
        return self.block_map(f"{self.prefix}{self.layers}.{index - 1}", module, param, cfg)

    def block_map(self, layer: str, module: str, param: str, cfg: ModelConfig) -> TensorMap:
        return _plain(f"{layer}.{self.block_names[module]}.{param}")


class GPT2Adapter(Adapter):
    model_type = "gpt2"
    architecture = "GPT2LMHeadModel"
    prefix = "transformer."
    layers = "h"
    head = "lm_head"
    embedding = {"wte": "wte", "wpe": "wpe"}
    final_norm = "ln_f"
    block_names = {
        "ln_1": "ln_1",
        "attn.qkv": "attn.c_attn",
        "attn.proj": "attn.c_proj",
        "ln_2": "ln_2",
        "mlp.fc_in": "mlp.c_fc",
        "mlp.fc_out": "mlp.c_proj",
    }
    ignored = (r"\.attn\.bias$", r"\.attn\.masked_bias$")

    def config_to_internal(self, hf: dict[str, Any], name: str) -> ModelConfig:
        # Both change the attention scores and have no counterpart in our model.
        if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
            raise ValueError("GPT-2 checkpoints with non-standard attention scaling are not supported")
        if hf.get("add_cross_attention", False):
            raise ValueError("GPT-2 checkpoints with cross-attention are not supported")
        return ModelConfig(
            name=name,
            padding_multiple=1,
            family="gpt3",
            n_layer=_get(hf, "n_layer", "num_hidden_layers"),
            d_model=_get(hf, "n_embd", "hidden_size"),
            n_head=_get(hf, "n_head", "num_attention_heads"),
            block_size=_get(hf, "n_positions", "max_position_embeddings", "n_ctx"),
            vocab_size=hf["vocab_size"],
            d_ff=_get(hf, "n_inner", "intermediate_size"),
            positional="learned",
            tie_embeddings=hf.get("tie_word_embeddings", True),
            activation=_activation(_get(hf, "activation_function", default="gelu_new")),
            norm_eps=_get(hf, "layer_norm_epsilon", default=1e-5),
        )

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        checks = [
            (cfg.positional != "learned", "positions must be learned"),
            (cfg.parallel_residual, "residual must be sequential"),
            (not (cfg.attn_bias and cfg.mlp_bias), "attention and MLP need biases"),
            (cfg.head_bias, "the output head has no bias"),
        ]
        _require(checks, "GPT-2")
        return {
            "n_layer": cfg.n_layer,
            "n_embd": cfg.d_model,
            "n_head": cfg.n_head,
            "n_positions": cfg.block_size,
            "n_inner": cfg.d_ff,
            "activation_function": _HF_ACTIVATION[cfg.activation],
            "layer_norm_epsilon": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
            # Our model has no dropout; GPT-2's config would otherwise default to 0.1.
            "attn_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "resid_pdrop": 0.0,
        }

    def block_map(self, layer: str, module: str, param: str, cfg: ModelConfig) -> TensorMap:
        hf_name = f"{layer}.{self.block_names[module]}.{param}"
        if param == "weight" and not module.startswith("ln_"):
            return _transposed(hf_name)
        return _plain(hf_name)


class GPTJAdapter(Adapter):
    model_type = "gptj"
    architecture = "GPTJForCausalLM"
    prefix = "transformer."
    layers = "h"
    head = "lm_head"
    embedding = {"wte": "wte"}
    final_norm = "ln_f"
    block_names = {
        "ln_1": "ln_1",
        "attn.proj": "attn.out_proj",
        "mlp.fc_in": "mlp.fc_in",
        "mlp.fc_out": "mlp.fc_out",
    }
    ignored = (r"\.attn\.bias$", r"\.attn\.masked_bias$")

    def config_to_internal(self, hf: dict[str, Any], name: str) -> ModelConfig:
        if hf.get("tie_word_embeddings", False):
            raise ValueError("GPT-J checkpoints with tied embeddings are not supported (its head has a bias)")
        d_model = _get(hf, "n_embd", "hidden_size")
        head_dim = d_model // _get(hf, "n_head", "num_attention_heads")
        rotary_dim = hf.get("rotary_dim") or head_dim  # None rotates the whole head
        return ModelConfig(
            **{
                **FAMILIES["gptj"],  # rotary interleaved, parallel shared-norm blocks, biased head
                "name": name,
                "padding_multiple": 1,
                "n_layer": _get(hf, "n_layer", "num_hidden_layers"),
                "d_model": d_model,
                "n_head": _get(hf, "n_head", "num_attention_heads"),
                "block_size": _get(hf, "n_positions", "max_position_embeddings"),
                "vocab_size": hf["vocab_size"],
                "d_ff": _get(hf, "n_inner", "intermediate_size"),
                "rotary_fraction": _rotary_fraction(rotary_dim, head_dim),
                "activation": _activation(_get(hf, "activation_function", default="gelu_new")),
                "norm_eps": _get(hf, "layer_norm_epsilon", default=1e-5),
            }
        )

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        checks = [
            (cfg.rotary_style != "interleaved", "rotation must be interleaved"),
            (cfg.rotary_dim == 0, "positions must be rotary over at least one pair of dims"),
            (cfg.rotary_base != 10000.0, "GPT-J's rotary base is fixed at 10000"),
            (
                not (cfg.parallel_residual and cfg.shared_norm),
                "residual must be parallel with one shared norm",
            ),
            (cfg.attn_bias or not cfg.mlp_bias, "attention has no biases, the MLP does"),
            (cfg.tie_embeddings or not cfg.head_bias, "the output head is untied with a bias"),
        ]
        _require(checks, "GPT-J")
        return {
            "n_layer": cfg.n_layer,
            "n_embd": cfg.d_model,
            "n_head": cfg.n_head,
            "n_positions": cfg.block_size,
            "n_inner": cfg.d_ff,
            "rotary_dim": cfg.rotary_dim,
            "activation_function": _HF_ACTIVATION[cfg.activation],
            "layer_norm_epsilon": cfg.norm_eps,
            "tie_word_embeddings": False,
        }

    def block_map(self, layer: str, module: str, param: str, cfg: ModelConfig) -> TensorMap:
        if module != "attn.qkv":
            return super().block_map(layer, module, param, cfg)
        # Separate q, k, v projections; ours is their concatenation along the output rows.
        names = tuple(f"{layer}.attn.{part}_proj.{param}" for part in "qkv")
        return TensorMap(names, lambda ts: torch.cat(ts, dim=0), lambda t: list(t.chunk(3, dim=0)))


class NeoXAdapter(Adapter):
    model_type = "gpt_neox"
    architecture = "GPTNeoXForCausalLM"
    prefix = "gpt_neox."
    layers = "layers"
    head = "embed_out"
    embedding = {"wte": "embed_in"}
    final_norm = "final_layer_norm"
    block_names = {
        "ln_1": "input_layernorm",
        "attn.qkv": "attention.query_key_value",
        "attn.proj": "attention.dense",
        "ln_2": "post_attention_layernorm",
        "mlp.fc_in": "mlp.dense_h_to_4h",
        "mlp.fc_out": "mlp.dense_4h_to_h",
    }
    ignored = (r"\.attention\.bias$", r"\.attention\.masked_bias$", r"\.rotary_emb\.inv_freq$")
    # transformers 5 names the head lm_head in memory and embed_out on disk.
    aliases = {"lm_head.": "embed_out."}

    def config_to_internal(self, hf: dict[str, Any], name: str) -> ModelConfig:
        d_model = hf["hidden_size"]
        head_dim = d_model // hf["num_attention_heads"]
        # transformers 5 writes rope_parameters; earlier versions rotary_pct / rotary_emb_base.
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(
                f"GPT-NeoX rope type '{rope.get('rope_type', rope.get('type'))}' is not supported"
            )
        fraction = _get(rope, "partial_rotary_factor", default=hf.get("rotary_pct", 0.25))
        rotary_dim = int(head_dim * fraction)  # as transformers computes it
        return ModelConfig(
            name=name,
            padding_multiple=1,
            family="neox",
            n_layer=hf["num_hidden_layers"],
            d_model=d_model,
            n_head=hf["num_attention_heads"],
            block_size=hf.get("max_position_embeddings", 2048),
            vocab_size=hf["vocab_size"],
            d_ff=hf.get("intermediate_size"),
            positional="rotary",
            rotary_fraction=_rotary_fraction(rotary_dim, head_dim),
            rotary_style="half",
            rotary_base=float(
                _get(rope, "rope_theta", default=_get(hf, "rotary_emb_base", "rope_theta", default=10000.0))
            ),
            parallel_residual=hf.get("use_parallel_residual", True),
            shared_norm=False,
            attn_bias=hf.get("attention_bias", True),
            mlp_bias=True,
            head_bias=False,
            tie_embeddings=hf.get("tie_word_embeddings", False),
            activation=_activation(hf.get("hidden_act", "gelu")),
            norm_eps=hf.get("layer_norm_eps", 1e-5),
        )

    def config_to_hf(self, cfg: ModelConfig) -> dict[str, Any]:
        checks = [
            (cfg.rotary_style != "half", "rotation must be by halves"),
            (cfg.positional != "rotary", "positions must be rotary"),
            (cfg.parallel_residual and cfg.shared_norm, "NeoX always has two norms per layer"),
            (not cfg.mlp_bias, "the MLP needs biases"),
            (cfg.head_bias, "the output head has no bias"),
        ]
        _require(checks, "GPT-NeoX")
        return {
            "num_hidden_layers": cfg.n_layer,
            "hidden_size": cfg.d_model,
            "num_attention_heads": cfg.n_head,
            "max_position_embeddings": cfg.block_size,
            "intermediate_size": cfg.d_ff,
            # The pre-5.0 spelling: transformers 5 still reads it, 4.x reads nothing else.
            "rotary_pct": _rotary_fraction(cfg.rotary_dim, cfg.head_dim),
            "rotary_emb_base": cfg.rotary_base,
            "use_parallel_residual": cfg.parallel_residual,
            "attention_bias": cfg.attn_bias,
            "hidden_act": _HF_ACTIVATION[cfg.activation],
            "layer_norm_eps": cfg.norm_eps,
            "tie_word_embeddings": cfg.tie_embeddings,
        }

    def block_map(self, layer: str, module: str, param: str, cfg: ModelConfig) -> TensorMap:
        if module != "attn.qkv":
            return super().block_map(layer, module, param, cfg)
        # NeoX interleaves per head, rows [n_head, 3, head_dim]; ours are [3, n_head, head_dim].
        heads = (cfg.n_head, 3, cfg.head_dim)
        ours = (3, cfg.n_head, cfg.head_dim)
        return TensorMap(
            (f"{layer}.{self.block_names[module]}.{param}",),
            lambda ts: ts[0].unflatten(0, heads).transpose(0, 1).flatten(0, 2),
            lambda t: [t.unflatten(0, ours).transpose(0, 1).flatten(0, 2)],
        )


ADAPTERS: dict[str, Adapter] = {a.model_type: a for a in (GPT2Adapter(), GPTJAdapter(), NeoXAdapter())}


def _adapter_for_config(hf: dict[str, Any]) -> Adapter:
    model_type = hf.get("model_type")
    if model_type not in ADAPTERS:
        raise ValueError(f"unsupported model_type '{model_type}': load_hf reads {', '.join(ADAPTERS)}")
    return ADAPTERS[model_type]


def _adapter_for_model(cfg: ModelConfig) -> Adapter:
    """The family a model belongs to, read from its architecture fields, not its name."""
    if cfg.positional == "learned":
        return ADAPTERS["gpt2"]
    return ADAPTERS["gptj" if cfg.rotary_style == "interleaved" else "gpt_neox"]


def _weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint, in the order Hugging Face looks for them."""
    if (directory / SAFE_WEIGHTS).is_file():
        return [directory / SAFE_WEIGHTS]
    if (directory / SAFE_INDEX).is_file():
        weight_map = json.loads((directory / SAFE_INDEX).read_text())["weight_map"]
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for path in files:
            if not path.is_file():
                raise FileNotFoundError(f"{SAFE_INDEX} lists shard {path.name}, which is not in {directory}")
        return files
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        return shards
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(
            f"{directory} has only pickled weights ({', '.join(pickles)}); load_hf reads safetensors only, "
            "since unpickling can run arbitrary code: convert the checkpoint to safetensors first"
        )
    raise FileNotFoundError(f"no {SAFE_WEIGHTS}, {SAFE_INDEX} or *.safetensors in {directory}")


class _Checkpoint:
    """The tensors of one or more safetensors files by canonical name, read on demand,
    so that names and shapes are all checked before any weight is read."""

    def __init__(self, files: list[Path], canonical: Callable[[str], str], stack: contextlib.ExitStack):
        self._where: dict[str, tuple[Any, str]] = {}
        for path in files:
            check_safetensors(path)  # header sizes, dtypes and ranges, before the library allocates
            handle = stack.enter_context(safe_open(str(path), framework="pt"))
            for stored in handle.keys():
                name = canonical(stored)
                if name in self._where:
                    raise ValueError(
                        f"tensor '{stored}' appears twice in the checkpoint (second in {path.name})"
                    )
                self._where[name] = (handle, stored)

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        handle, stored = self._where[name]
        return tuple(handle.get_slice(stored).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        handle, stored = self._where[name]
        return handle.get_tensor(stored)


def _first(names: list[str]) -> str:
    more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
    return f"'{names[0]}'{more}"


def _validate(model: GPT, adapter: Adapter | _ExportNames, checkpoint: _Checkpoint) -> dict[str, TensorMap]:
    """Every expected tensor present with its shape, nothing unexplained left over."""
    cfg = model.cfg
    maps = {name: adapter.tensor_map(name, cfg) for name in model.state_dict()}
    expected = {hf: None for m in maps.values() for hf in m.hf_names}
    present = checkpoint.names()
    missing = [hf for hf in expected if hf not in present]
    if missing:
        raise ValueError(f"checkpoint lacks tensor {_first(missing)}")
    unexpected = sorted(n for n in present - expected.keys() if not adapter.is_ignored(n, cfg))
    if unexpected:
        raise ValueError(f"checkpoint has unexpected tensor {_first(unexpected)} for this config")
    for name, param in model.state_dict().items():
        # The transform applied to our (meta) tensor gives the shapes the checkpoint must have.
        for hf_name, want in zip(maps[name].hf_names, maps[name].to_hf(param), strict=True):
            found = checkpoint.shape(hf_name)
            if found != tuple(want.shape):
                raise ValueError(
                    f"tensor '{hf_name}' has shape {list(found)}, config implies {list(want.shape)}"
                )
    return maps


class _ExportNames:
    """This project's own exports (`DIR/final/`): tensors keyed by our names already."""

    def canonical_name(self, name: str) -> str:
        return name

    def is_ignored(self, name: str, cfg: ModelConfig) -> bool:
        return False

    def tensor_map(self, name: str, cfg: ModelConfig) -> TensorMap:
        return _plain(name)


# Fields that name or describe a model, or say how to initialise one: a checkpoint of
# the same architecture may differ in them. (A padded vocabulary pads rows: see
# `Pretrained.into`.)
_NOT_ARCHITECTURE = ("name", "family", "init_std", "padding_multiple")


def check_architecture(theirs: ModelConfig, ours: ModelConfig) -> None:
    """ValueError naming the fields (the first four) in which weights made for `theirs`
    would not fit `ours`."""
    differ = architecture_differences(theirs, ours)
    if differ:
        raise ValueError(f"it holds another architecture than {ours.name}'s: {'; '.join(differ[:4])}"
                         f"{f' (and {len(differ) - 4} more)' if len(differ) > 4 else ''}")


def architecture_differences(theirs: ModelConfig, ours: ModelConfig) -> list[str]:
    """'field theirs, not ours' for each architecture field in which two configs differ."""
    a, b = theirs.to_dict(), ours.to_dict()
    return [f"{k} {a[k]!r}, not {b[k]!r}" for k in a if k not in _NOT_ARCHITECTURE and a[k] != b[k]]


def _read_config(directory: Path) -> tuple[ModelConfig, Adapter | _ExportNames]:
    """A checkpoint folder's model config and how its tensors are named: a Hugging Face
    config.json (with `model_type`) or one of ours."""
    config_path = directory / "config.json"
    if not directory.is_dir():
        raise FileNotFoundError(f"no folder {directory}")
    if not config_path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{config_path} is not readable JSON ({type(exc).__name__})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} holds no config object")
    if "model_type" in config:
        adapter = _adapter_for_config(config)
        return adapter.config_to_internal(config, directory.resolve().name), adapter
    try:
        return ModelConfig.from_dict(config), _ExportNames()
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{config_path} is neither a Hugging Face config nor one of ours ({exc})") from None


def checkpoint_config(directory: str | os.PathLike[str]) -> ModelConfig:
    """The model a checkpoint folder holds (Hugging Face or this project's export), from
    its config.json alone (FileNotFoundError or ValueError, saying what is wrong)."""
    return _read_config(Path(directory))[0]


class Pretrained:
    """A checkpoint's weights under our parameter names, read one tensor at a time.

    For training from pretrained weights: a streamed run copies them into its store a
    unit at a time, never holding the model (a 20B checkpoint is 41 GB). Reads Hugging
    Face GPT-2, GPT-J and GPT-NeoX checkpoints and this project's own exports, after
    checking the architecture matches `cfg` and every tensor is present with its shape
    (ValueError, FileNotFoundError or UnsafeFileError, naming what does not fit).
    A context manager: the files stay open until it exits. Reads are serialised, so
    threads may share it.
    """

    def __init__(self, directory: str | os.PathLike[str], cfg: ModelConfig) -> None:
        self.directory, self.cfg = Path(directory), cfg
        theirs, adapter = _read_config(self.directory)
        check_architecture(theirs, cfg)
        self._stack = contextlib.ExitStack()
        try:
            self._checkpoint = _Checkpoint(_weight_files(self.directory), adapter.canonical_name, self._stack)
            with torch.device("meta"):
                self._maps = _validate(GPT(cfg), adapter, self._checkpoint)
        except BaseException:
            self._stack.close()
            raise
        self._lock = threading.Lock()

    def tensor(self, name: str) -> torch.Tensor:
        """Our parameter `name` (e.g. `units.3.attn.qkv.weight`), as the checkpoint
        stores it: its dtype, and the true vocabulary's rows only."""
        tensor_map = self._maps[name]
        with self._lock:
            parts = [self._checkpoint.tensor(n) for n in tensor_map.hf_names]
        return tensor_map.to_internal(parts)

    def into(self, name: str, target: torch.Tensor) -> None:
        """Copy parameter `name` into `target` (its shape, in any dtype). A padded
        vocabulary's extra rows, which the checkpoint lacks, become zeros: they are
        never a token (inputs come from the true vocabulary) nor a prediction (the head
        drops them)."""
        tensor = self.tensor(name)
        rows = tensor.shape[0]
        target[:rows].copy_(tensor)
        target[rows:].zero_()

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Pretrained:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_hf(directory: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> GPT:
    """Load a Hugging Face GPT-2, GPT-J or GPT-NeoX safetensors checkpoint (or one of
    this project's exports) as a `GPT`.

    `directory` holds `config.json` and either `model.safetensors`, shards with
    `model.safetensors.index.json`, or shards alone. Parameters come back in `dtype`
    on the CPU; the vocabulary is not padded, so shapes match the checkpoint exactly.
    Raises ValueError naming the tensor or setting that does not fit.
    """
    cfg = checkpoint_config(directory)
    # Built without storage: the checkpoint's tensors become the parameters (assign=True),
    # so no memory or time goes into a random initialisation that would be overwritten.
    with torch.device("meta"):
        model = GPT(cfg)
    with Pretrained(directory, cfg) as weights:
        state = {name: weights.tensor(name).to(dtype).contiguous() for name in model.state_dict()}
    model.load_state_dict(state, assign=True)
    return model


def _standalone(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor owning exactly its storage, as safetensors requires:
    views (q/k/v chunks, vocabulary slices) would otherwise share or overhang one."""
    tensor = tensor.detach().cpu().contiguous()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()
    return tensor


UMASK = os.umask(0o022)  # read once, on import (setting it is the only way to read it)
os.umask(UMASK)


@contextlib.contextmanager
def _atomic_path(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` that replaces it only once fully written and synced.

    Beside, not in /tmp: os.replace is atomic only within one filesystem. A unique
    name rather than mkstemp, whose 0600 mode would be kept by the final file.
    """
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~UMASK)  # safetensors' save_file creates files only their owner reads
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def save_hf(model: GPT, directory: str | os.PathLike[str]) -> None:
    """Write `model` as a Hugging Face checkpoint: `config.json` and `model.safetensors`
    (see `write_hf`). The result loads with `AutoModelForCausalLM.from_pretrained`."""
    write_hf(model.cfg, model.state_dict().items(), directory, next(model.parameters()).dtype)


def write_hf(cfg: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]], directory: str | os.PathLike[str],
             dtype: torch.dtype, shard_bytes: float = math.inf, eos_token_id: int | None = None) -> list[Path]:
    """Write a Hugging Face checkpoint of `cfg` from our named parameters, in `dtype`;
    returns the files written. `eos_token_id`, the token that ends a text, goes into
    config.json, where generation reads it.

    `tensors` may be read lazily (`Pretrained.tensor`, a name at a time): a shard is
    written once it would pass `shard_bytes`, so a model larger than memory is written
    a shard's worth at a time, and more than one shard gets the index Hugging Face reads
    (`model.safetensors.index.json`). The family (GPT-2, GPT-J or GPT-NeoX) follows from
    the architecture fields; a config no family can express raises ValueError before
    anything is written. Each file is written to a temporary name, synced and renamed,
    so a crash leaves whole files only, and config.json comes last: a folder without it
    is no checkpoint. Padding rows of the vocabulary are dropped.
    """
    directory = Path(directory)
    adapter = _adapter_for_model(cfg)
    hf_config = {
        "architectures": [adapter.architecture],
        "model_type": adapter.model_type,
        "vocab_size": cfg.vocab_size,
        **adapter.config_to_hf(cfg),
        "dtype": str(dtype).removeprefix("torch."),
        **({"eos_token_id": eos_token_id} if eos_token_id is not None else {}),
    }
    directory.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    written: list[tuple[Path, list[str]]] = []  # each shard's file and the names it holds
    size = total = 0

    def write(path: Path) -> None:
        with _atomic_path(path) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
        written.append((path, list(shard)))
        shard.clear()

    for name, param in tensors:
        tensor_map = adapter.tensor_map(name, cfg)
        for hf_name, tensor in zip(tensor_map.hf_names, tensor_map.to_hf(param), strict=True):
            tensor = _standalone(tensor.to(dtype))
            nbytes = tensor.numel() * tensor.element_size()
            if shard and size + nbytes > shard_bytes:  # named by its place; the count comes at the end
                write(directory / f"model-{len(written) + 1:05d}.safetensors")
                size = 0
            shard[hf_name] = tensor
            size, total = size + nbytes, total + nbytes
    if not written:  # one file, under the name a single checkpoint has
        write(directory / SAFE_WEIGHTS)
    else:
        write(directory / f"model-{len(written) + 1:05d}.safetensors")
        weight_map = {}
        for k, (path, names) in enumerate(written):
            final = path.with_name(f"model-{k + 1:05d}-of-{len(written):05d}.safetensors")
            os.replace(path, final)
            written[k] = (final, names)
            weight_map.update(dict.fromkeys(names, final.name))
        with _atomic_path(directory / SAFE_INDEX) as tmp:
            tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2,
                                      sort_keys=True) + "\n")
    with _atomic_path(directory / "config.json") as tmp:
        tmp.write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    # The renames are directory entries: sync the directory so they survive a crash too.
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return [path for path, _ in written]
