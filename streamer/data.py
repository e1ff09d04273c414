"""Token files: text in, a flat array of token ids on disk out, sampled reproducibly.

A token file is a `.npy` array (uint16 when the vocabulary fits, else uint32) with a
JSON sidecar recording the tokenizer and vocabulary size, so a run can check that the
data matches its model before it reads a single batch.

A run that evaluates holds out the file's tail (`holdout_split`): training windows are
drawn from the rest only, and the held-out loss is measured on the same evenly spaced
windows of the tail every time (`eval_windows`), so its curve compares like with like.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from streamer.errors import UserError
from streamer.io import atomic_write_bytes, atomic_write_json

BYTE_VOCAB = 256


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library sources: real text on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise UserError(f"no Python sources under {root}: pass text files to 'streamer prepare'")
    return files


def iter_text_files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            yield path
        else:
            raise UserError(f"input '{path}' does not exist: pass existing text files or folders")


class ByteTokenizer:
    """UTF-8 bytes as tokens: no vocabulary file, nothing to download, never unknown."""

    name = "bytes"
    vocab_size = BYTE_VOCAB

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, loaded offline through the `tokenizers` library."""

    def __init__(self, path: Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError as exc:
            raise UserError("the 'tokenizers' package is needed for --tokenizer: pip install tokenizers") from exc
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the library raises bare Exceptions on bad files
            raise UserError(f"cannot read tokenizer '{path}': {exc}") from exc
        self.name = str(path)
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)


def train_tokenizer(files: list[Path], vocab_size: int, out: Path) -> Path:
    """Learn a byte-level BPE of `vocab_size` tokens from the files (GPT-2's scheme: all
    256 bytes are tokens, so no text is ever unknown, and the merges make the rest),
    and write it to `out` as a Hugging Face tokenizer.json. No special token: `prepare`
    joins files without a separator, and any text, that of a special token included,
    decodes back as it was."""
    if vocab_size < BYTE_VOCAB:
        raise UserError(f"--train-tokenizer needs at least {BYTE_VOCAB} tokens (one per byte), got {vocab_size}")
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise UserError("--train-tokenizer needs the 'tokenizers' package: pip install tokenizers") from None
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator((path.read_text(encoding="utf-8", errors="replace") for path in files), trainer)
    atomic_write_bytes(out, tokenizer.to_str().encode())
    return out


def prepare(out: Path, inputs: list[Path] | None = None, tokenizer_path: Path | None = None,
            train_vocab: int | None = None) -> dict:
    """Tokenize text files (default: the standard library) into `out` (.npy) plus `out`.json.
    With `train_vocab`, a byte-level BPE of that many tokens is first learned from the
    same files and written beside `out` (`STEM.tokenizer.json`), and the files are
    tokenized with it; the sidecar names it, as it names any tokenizer.json, so a run
    on the data finds it (sample, export)."""
    files = list(iter_text_files(inputs)) if inputs else stdlib_files()
    if train_vocab is not None:
        if tokenizer_path is not None:
            raise UserError("--tokenizer and --train-tokenizer both given: use one tokenizer, or learn one")
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tokenizer_path = train_tokenizer(files, train_vocab, Path(out).with_suffix(".tokenizer.json")).resolve()
    tokenizer = HFTokenizer(tokenizer_path) if tokenizer_path else ByteTokenizer()
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    chunks = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        if text:
            chunks.append(np.asarray(tokenizer.encode(text), dtype=dtype))
    tokens = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    if tokens.size < 2:
        raise UserError("the inputs hold no text: pass non-empty text files")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, _npy_bytes(tokens))
    meta = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "dtype": str(tokens.dtype),
            "n_tokens": int(tokens.size), "n_files": len(files)}
    atomic_write_json(meta_path(out), meta)
    return meta


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def meta_path(tokens_path: Path) -> Path:
    return Path(str(tokens_path) + ".json")


def default_corpus(cache_dir: Path | None = None) -> Path:
    """The byte-tokenized standard library, prepared once and cached."""
    cache_dir = cache_dir or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamer"
    path = cache_dir / f"stdlib-{sysconfig.get_python_version()}-bytes.npy"
    if not (path.exists() and meta_path(path).exists()):
        prepare(path)
    return path


def load_tokens(path: Path, vocab_size: int) -> np.ndarray:
    """Memory-map a token file after checking it exists, is non-empty and fits the vocabulary."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file '{path}' not found: create it with 'streamer prepare --out {path}'")
    if path.stat().st_size == 0:
        raise UserError(f"data file '{path}' is empty: prepare it from non-empty text with 'streamer prepare'")
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        reason = str(exc).split(". ")[0]
        raise UserError(f"data file '{path}' is not a token file ({reason}): recreate it with 'streamer prepare'"
                        ) from None
    if tokens.ndim != 1 or tokens.dtype not in (np.uint16, np.uint32):
        raise UserError(f"data file '{path}' holds {tokens.dtype} {tokens.shape}, not a flat uint16/uint32 "
                        "token array: recreate it with 'streamer prepare'")
    if tokens.size < 2:
        raise UserError(f"data file '{path}' is empty: prepare it from non-empty text")
    meta = meta_path(path)
    if meta.exists():
        try:
            data_vocab = int(json.loads(meta.read_text())["vocab_size"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"token file sidecar '{meta}' is unreadable ({type(exc).__name__}): recreate the data "
                            "with 'streamer prepare'") from None
        if data_vocab > vocab_size:
            raise UserError(f"data file '{path}' uses a vocabulary of {data_vocab} but the model has "
                            f"{vocab_size}: prepare the data with the model's tokenizer")
    else:
        # No sidecar: scan once (a linear pass, cheap next to training) for out-of-range ids.
        top = int(tokens.max())
        if top >= vocab_size:
            raise UserError(f"data file '{path}' holds token id {top} >= the model's vocabulary of "
                            f"{vocab_size}: prepare the data with the model's tokenizer")
    return tokens


def holdout_split(tokens: np.ndarray, fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(training part, held-out tail): the last `fraction` of the tokens, views of the file.

    The tail, not random windows, so that no training window can overlap a held-out one;
    with files prepared in order, the tail is whole files the run never trains on."""
    if not 0 < fraction < 1:
        raise UserError(f"--holdout must be a fraction between 0 and 1, got {fraction}")
    cut = tokens.size - round(tokens.size * fraction)
    for part, size in (("held-out", tokens.size - cut), ("training", cut)):
        if size < seq_len + 1:
            raise UserError(f"the {part} part of the data ({size} of {tokens.size} tokens, --holdout {fraction}) "
                            f"is shorter than one sequence of {seq_len + 1}: use more text, "
                            f"{'a larger' if part == 'held-out' else 'a smaller'} --holdout or a shorter --seq-len")
    return tokens[:cut], tokens[cut:]


def eval_windows(heldout: np.ndarray, seq_len: int, n_sequences: int) -> tuple[np.ndarray, np.ndarray]:
    """`n_sequences` windows of `seq_len + 1` tokens spread evenly over the held-out
    tokens, as (inputs, targets); fewer when the tail holds fewer disjoint windows, so
    that none repeats a token another reads. Always the same windows for the same tail."""
    n = max(1, min(n_sequences, heldout.size // (seq_len + 1)))
    starts = np.linspace(0, heldout.size - seq_len - 1, n).round().astype(np.int64)
    windows = np.stack([np.asarray(heldout[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    return windows[:, :-1], windows[:, 1:]


@dataclass(frozen=True)
class BatchSampler:
    """Random windows of `seq_len + 1` tokens, a pure function of (seed, step).

    Drawing each step's positions from a generator seeded by (seed, step) makes the data
    cursor just the step number: resuming, or splitting a global batch over ranks, reads
    exactly the windows an uninterrupted single-process run would.
    """

    tokens: np.ndarray
    seq_len: int
    seed: int

    def __post_init__(self) -> None:
        if self.tokens.size < self.seq_len + 1:
            raise UserError(f"the data holds {self.tokens.size} tokens, fewer than one sequence of "
                            f"{self.seq_len + 1}: use more text or a shorter --seq-len")

    def global_batch(self, step: int, n_sequences: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        starts = rng.integers(0, self.tokens.size - self.seq_len, size=n_sequences)
        windows = np.stack([np.asarray(self.tokens[s : s + self.seq_len + 1], dtype=np.int64) for s in starts])
        return windows[:, :-1], windows[:, 1:]
