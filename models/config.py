"""Model configurations as data: one dataclass, one registry of named entries.

Architecture differences between GPT-3, GPT-J and GPT-NeoX are fields, never
checks on a name, so a new family member is a new dict, not new code.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal


@dataclass
class ModelConfig:
    name: str = "custom"
    family: str = "gpt3"  # informational: gpt3, gptj, neox
    n_layer: int = 2
    d_model: int = 64
    n_head: int = 4
    block_size: int = 128  # the longest sequence the model accepts (its context)
    vocab_size: int = 256
    # Padding the embedding rows to a multiple of 64 keeps matmuls on fast tiles;
    # 1 keeps the published shape (GPT-J's 50400 rows, GPT-3's 50257).
    padding_multiple: int = 1
    d_ff: int | None = None  # None: 4 x d_model, as in all three families
    positional: Literal["learned", "rotary"] = "learned"
    rotary_fraction: float = 1.0  # share of each head's dims that are rotated
    # GPT-J rotates interleaved pairs (x0,x1),(x2,x3); GPT-NeoX rotates halves.
    rotary_style: Literal["interleaved", "half"] = "half"
    rotary_base: float = 10000.0
    parallel_residual: bool = False  # x + attn(n1(x)) + mlp(n2(x)) instead of sequential
    shared_norm: bool = False  # parallel branches read one norm (GPT-J) or two (NeoX)
    attn_bias: bool = True  # bias on q, k, v and the attention output projection
    mlp_bias: bool = True
    head_bias: bool = False  # GPT-J's lm_head carries a bias
    tie_embeddings: bool = True  # GPT-2/3 reuse the token embedding as the output head
    activation: Literal["gelu", "gelu_tanh"] = "gelu_tanh"
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # Derived in __post_init__.
    padded_vocab_size: int = field(init=False, default=0)
    head_dim: int = field(init=False, default=0)
    rotary_dim: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        if self.d_model % self.n_head:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_head {self.n_head}")
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        m = self.padding_multiple
        self.padded_vocab_size = -(-self.vocab_size // m) * m
        self.head_dim = self.d_model // self.n_head
        if self.positional == "rotary":
            # Rounded down to an even count: rotation acts on pairs of dims.
            self.rotary_dim = int(self.head_dim * self.rotary_fraction) // 2 * 2
        else:
            self.rotary_dim = 0

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> ModelConfig:
        if name not in REGISTRY:
            raise UnknownModelError(name)
        return cls(**{**REGISTRY[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """The init fields only, so `ModelConfig(**cfg.to_dict())` round-trips."""
        d = asdict(self)
        return {f.name: d[f.name] for f in fields(self) if f.init}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls) if f.init}
        return cls(**{k: v for k, v in d.items() if k in known})

    def n_params(self) -> int:
        """Analytic parameter count, independent of the module code."""
        d, f, v = self.d_model, self.d_ff, self.padded_vocab_size
        norm = 2 * d
        attn = 4 * d * d + (4 * d if self.attn_bias else 0)
        mlp = 2 * d * f + ((f + d) if self.mlp_bias else 0)
        norms = norm if (self.parallel_residual and self.shared_norm) else 2 * norm
        block = attn + mlp + norms
        embed = v * d + (self.block_size * d if self.positional == "learned" else 0)
        head = norm + (0 if self.tie_embeddings else v * d + (v if self.head_bias else 0))
        return embed + self.n_layer * block + head

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 per weight (forward + backward) plus attention.

        Attention scores and the weighted sum add 2 x 2 x seq_len x d_model per layer in
        the forward, x3 for forward + backward (the PaLM appendix B count). Embedding
        lookups are not matmuls and are left out, as is usual.
        """
        # A tied table is read twice (lookup and head matmul) but only the head is a
        # matmul; an untied model's input table is a lookup only.
        lookup_only = 0 if self.tie_embeddings else self.padded_vocab_size * self.d_model
        positions = self.block_size * self.d_model if self.positional == "learned" else 0
        matmul_params = self.n_params() - lookup_only - positions
        attention = 12 * self.n_layer * seq_len * self.d_model
        return 6 * matmul_params + attention


class UnknownModelError(KeyError):
    def __init__(self, name: str) -> None:
        close = difflib.get_close_matches(name, list(REGISTRY), n=1, cutoff=0.0)
        hint = f"did you mean '{close[0]}'? " if close else ""
        super().__init__(f"unknown model '{name}': {hint}run 'streamer models' for the list")
        self.message = self.args[0]

    def __str__(self) -> str:
        return self.message


_GPT3 = dict(
    family="gpt3",
    block_size=2048,
    vocab_size=50257,
    positional="learned",
    tie_embeddings=True,
    activation="gelu_tanh",
)
_GPTJ = dict(
    family="gptj",
    block_size=2048,
    vocab_size=50400,
    positional="rotary",
    rotary_style="interleaved",
    parallel_residual=True,
    shared_norm=True,
    attn_bias=False,
    head_bias=True,
    tie_embeddings=False,
    activation="gelu_tanh",
    rotary_fraction=0.25,  # GPT-J-6B rotates 64 of 256 head dims
)
_NEOX = dict(
    family="neox",
    block_size=2048,
    vocab_size=50432,  # published already padded
    positional="rotary",
    rotary_fraction=0.25,
    rotary_style="half",
    parallel_residual=True,
    shared_norm=False,
    tie_embeddings=False,
    activation="gelu",
)

# The architecture fields each family fixes; Hugging Face import starts from these too.
FAMILIES: dict[str, dict[str, Any]] = {"gpt3": _GPT3, "gptj": _GPTJ, "neox": _NEOX}

# Shapes from the GPT-3 paper (table 2.1; 13B uses 40 heads of 128 = 5120, the
# width whose count matches the published 12.85B), the GPT-J-6B and
# GPT-NeoX-20B releases, and the Pythia suite.
# The tiny entries use the byte-level vocabulary so they train on raw text.
REGISTRY: dict[str, dict[str, Any]] = {
    "tiny": dict(_GPT3, n_layer=4, d_model=96, n_head=4, block_size=256, vocab_size=256),
    "tiny-gptj": dict(_GPTJ, n_layer=4, d_model=96, n_head=4, rotary_fraction=0.5, block_size=256, vocab_size=256),
    "tiny-neox": dict(_NEOX, n_layer=4, d_model=96, n_head=4, block_size=256, vocab_size=256),
    "gpt3-125m": dict(_GPT3, n_layer=12, d_model=768, n_head=12),
    "gpt3-xl": dict(_GPT3, n_layer=24, d_model=2048, n_head=16),
    "gpt3-2.7b": dict(_GPT3, n_layer=32, d_model=2560, n_head=32),
    "gpt-j-6b": dict(_GPTJ, n_layer=28, d_model=4096, n_head=16),
    "gpt3-13b": dict(_GPT3, n_layer=40, d_model=5120, n_head=40),
    # 20B's published activation is the tanh approximation ("gelu_fast"); Pythia's the exact one.
    "gpt-neox-20b": dict(_NEOX, n_layer=44, d_model=6144, n_head=64, activation="gelu_tanh"),
    "pythia-160m": dict(_NEOX, n_layer=12, d_model=768, n_head=12, vocab_size=50304),
    "pythia-410m": dict(_NEOX, n_layer=24, d_model=1024, n_head=16, vocab_size=50304),
    "pythia-1.4b": dict(_NEOX, n_layer=24, d_model=2048, n_head=16, vocab_size=50304),
}
for _name, _entry in REGISTRY.items():
    _entry["name"] = _name

# Published parameter counts that the registry must reproduce within 0.5%.
PUBLISHED_N_PARAMS = {
    "gpt3-xl": 1_315_723_264,
    "gpt-j-6b": 6_050_882_784,
    "gpt3-13b": 12_853_386_240,
    "gpt-neox-20b": 20_554_567_680,
}
