"""Token files: text in, a flat array of token ids on disk out, sampled reproducibly.

A token file is a `.npy` array (uint16 when the vocabulary fits, else uint32) with a
JSON sidecar recording the tokenizer and vocabulary size, so a run can check that the
data matches its model before it reads a single batch.

A run that evaluates holds out the file's tail (`holdout_split`): training windows are
drawn from the rest only, and the held-out loss is measured on the same evenly spaced
windows of the tail every time (`eval_windows`), so its curve compares like with like.
A run may train on several token files in fixed shares (`Mixture`, [Note: data
mixtures]); each keeps its own tail.
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import gzip
import hashlib
import io
import json
import lzma
import os
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from streamer.errors import UserError
from streamer.io import atomic_path, atomic_write_bytes, atomic_write_json

BYTE_VOCAB = 256


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library sources: real text on every machine."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise UserError(f"no Python sources under {root}: pass text files to 'streamer prepare'")
    return files


COMPRESSED = (".gz", ".bz2", ".xz", ".zst")


def text_files(paths: Iterable[Path]) -> tuple[list[Path], int]:
    """The files to read, and how many a folder held that are not text: a file named is
    read whatever it holds; a folder's files in sorted order, but for hidden ones (in
    `.git`, say), compiled Python (`__pycache__`) and binary files (a NUL byte in their
    first 8 KiB, unless compressed: a token file, an image, a wheel)."""
    files, skipped = [], 0
    for path in paths:
        if path.is_dir():
            for found in sorted(p for p in path.rglob("*") if p.is_file()):
                parts = found.relative_to(path).parts
                if any(part.startswith(".") or part == "__pycache__" for part in parts) or _binary(found):
                    skipped += 1
                else:
                    files.append(found)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"input '{path}' does not exist: pass existing text files or folders")
    return files, skipped


def _binary(path: Path) -> bool:
    if path.suffix.lower() in COMPRESSED:
        return False
    with open(path, "rb") as f:
        return b"\0" in f.read(8192)


class ByteTokenizer:
    """UTF-8 bytes as tokens: no vocabulary file, nothing to download, never unknown."""

    name = "bytes"
    vocab_size = BYTE_VOCAB

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")

    def encode_pieces(self, pieces: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(piece.encode("utf-8", errors="replace"), dtype=np.uint8) for piece in pieces]


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
        self.name = str(Path(path).resolve())  # found again from any folder (sample, export)
        self.vocab_size = self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids)

    def token_id(self, text: str) -> int | None:
        """The id of the token that is exactly `text`, if the vocabulary has one."""
        return self._tok.token_to_id(text)

    def encode_pieces(self, pieces: list[str]) -> list[np.ndarray]:
        """Pieces of text (`text_pieces`) tokenized in parallel, without special tokens:
        none is added, and a special token's text in the pieces (a document about GPT-2
        that writes `<|endoftext|>`) is read as the text it is, so that only `prepare`
        puts the separator's id in the data."""
        # encode_batch_fast (tokenizers >= 0.20) skips the offsets: 1.6 times as fast
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        as_text = getattr(self._tok, "encode_special_tokens", None)  # tokenizers >= 0.19
        if as_text is not None:
            self._tok.encode_special_tokens = True
        try:
            encodings = encode(pieces, add_special_tokens=False)
        finally:
            if as_text is not None:
                self._tok.encode_special_tokens = as_text
        return [np.asarray(encoding.ids, dtype=np.uint32) for encoding in encodings]


def train_tokenizer(files: list[Path], vocab_size: int, out: Path, separator: str | None = None,
                    lines: JsonLines | None = None) -> Path:
    """Learn a byte-level BPE of `vocab_size` tokens from the files (GPT-2's scheme: all
    256 bytes are tokens, so no text is ever unknown, and the merges make the rest),
    and write it to `out` as a Hugging Face tokenizer.json. Its only special token is
    `separator`, if given (`prepare` puts it between documents); any other text, that
    of a special token included, decodes back as it was. The text is read in pieces
    (`text_pieces`), so a corpus larger than memory can teach one."""
    least = BYTE_VOCAB + (separator is not None)
    if vocab_size < least:
        raise UserError(f"--train-tokenizer needs at least {least} tokens (one per byte"
                        f"{', and the separator' if separator is not None else ''}), got {vocab_size}")
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    except ImportError:
        raise UserError("--train-tokenizer needs the 'tokenizers' package: pip install tokenizers") from None
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[separator] if separator is not None else [])
    tokenizer.train_from_iterator((piece for path in files for piece in text_pieces(path, lines=lines)), trainer)
    atomic_write_bytes(out, tokenizer.to_str().encode())
    return out


PIECE_BYTES = 256 << 10  # a larger file is read, decoded and tokenized this much at a time
LONGEST_PIECE = 64  # pieces: a stretch without a token-exact cut is cut anyway at this many
BATCH_BYTES = 4 << 20  # text tokenized together: 16 pieces keep 16 cores busy, while a Hugging
# Face tokenizer's encodings (~300 bytes a token) take ~350 MB


def text_pieces(path: Path, piece_bytes: int | None = None, lines: JsonLines | None = None) -> Iterator[str]:
    """A file's text as `Path.read_text` reads it (UTF-8, undecodable bytes replaced,
    CRLF and CR line ends made LF): whole, up to `piece_bytes` (default `PIECE_BYTES`);
    a larger one in pieces of about that size, so that a file of any size is tokenized
    in bounded memory. A file named `.gz`, `.bz2`, `.xz` or `.zst` is read decompressed;
    a JSON Lines file (`.jsonl`, `.ndjson`, compressed or not: The Pile's layout) holds
    a document a line, read as `lines` says (default: its "text", every line), each cut
    as a file is.

    [Note: token-exact pieces]
    A piece ends just after a newline between two printable, non-blank ASCII characters
    (a line ending in `)` and the next starting `class`), where the pre-tokenizers of
    byte-level BPE (GPT-2, GPT-J, GPT-NeoX, `--train-tokenizer`) and of whitespace
    splitting end a pre-token however the text goes on: tokenizing the pieces one by one
    gives exactly the tokens of the whole file (the bytes, too, are the same: a cut at
    an ASCII byte never splits a character). Next to a blank the cut would change them
    (a run of blanks ending a piece, two newlines or a newline and an indent, is one
    pre-token, but is split when text follows it; a tokenizer may have tokens for runs
    of spaces), so no other place is a cut. A stretch of `LONGEST_PIECE` pieces without
    one (minified text, one long line) is cut after its last newline, else before its
    last character: only there may tokens differ from the whole file's. Tokenizers that
    mark a text's start (SentencePiece's prefix space) mark each piece's."""
    for _, text, _ in _marked_pieces(path, piece_bytes, lines):
        yield text


JSON_LINES = (".jsonl", ".ndjson")  # a document a line: {"text": "...", ...}


@dataclass(frozen=True)
class JsonLines:
    """How to read a JSON Lines file's documents: the text from `field`, and only the
    lines whose fields (dotted: `meta.pile_set_name`) hold the values `where` gives."""

    field: str = "text"
    where: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, field: str, where: list[str] | None) -> JsonLines:
        """From --text-field and --where FIELD=VALUE flags."""
        pairs = []
        for condition in where or []:
            name, equals, value = condition.partition("=")
            if not equals or not name:
                raise UserError(f"--where takes FIELD=VALUE (as meta.pile_set_name=Github), got '{condition}'")
            pairs.append((name, value))
        return cls(field, tuple(pairs))

    def selects(self, record: dict) -> bool:
        for name, value in self.where:
            found = record
            for key in name.split("."):
                found = found.get(key) if isinstance(found, dict) else None
            if found is None or (found if isinstance(found, str) else json.dumps(found)) != value:
                return False
        return True


def _marked_pieces(path: Path, piece_bytes: int | None = None, lines: JsonLines | None = None,
                   ) -> Iterator[tuple[int, str, bool]]:
    """`text_pieces`, each with the bytes of the file (as on disk) read for it, and
    whether it ends a document: the file's last piece, or a JSON Lines document's."""
    piece_bytes = piece_bytes or PIECE_BYTES
    suffixes = [suffix.lower() for suffix in path.suffixes[-2:]]
    with open(path, "rb") as raw:
        stream = _decompressed(path, raw, suffixes[-1] if suffixes else "")
        done = 0

        def read() -> int:  # what the file gave since the last piece, for the progress bar
            nonlocal done
            done, before = raw.tell(), done
            return done - before

        try:
            if _is_json_lines(path):
                for number, line in enumerate(stream, 1):
                    text = _document(path, number, line, lines or JsonLines()) if line.strip() else ""
                    if len(text) <= piece_bytes:  # the common case: one piece, no round trip through bytes
                        if text:
                            yield read(), text, True
                        continue
                    encoded = text.encode()
                    blocks = (encoded[i : i + piece_bytes] for i in range(0, len(encoded), piece_bytes))
                    for piece, last in _with_last(_cut_pieces(blocks, piece_bytes)):
                        yield read(), piece, last
            else:
                blocks = iter(lambda: stream.read(piece_bytes), b"")
                for piece, last in _with_last(_cut_pieces(blocks, piece_bytes)):
                    yield read(), piece, last
        except (OSError, EOFError, lzma.LZMAError) as exc:  # a damaged or truncated archive
            raise UserError(f"cannot read '{path}' ({exc}): check the file, or leave it out") from None


def _is_json_lines(path: Path) -> bool:
    return any(suffix.lower() in JSON_LINES for suffix in path.suffixes[-2:])


def _decompressed(path: Path, raw: BinaryIO, suffix: str) -> BinaryIO:
    """The file's bytes, decompressed by its last suffix."""
    if suffix == ".gz":
        return gzip.GzipFile(fileobj=raw)
    if suffix == ".bz2":
        return bz2.BZ2File(raw)
    if suffix == ".xz":
        return lzma.LZMAFile(raw)
    if suffix == ".zst":
        try:
            import zstandard
        except ImportError:
            raise UserError(f"'{path}' is zstd-compressed: pip install zstandard, or decompress it first "
                            f"(zstd -d '{path}')") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw))  # buffered: read by lines
    return raw


def _document(path: Path, number: int, line: bytes, lines: JsonLines) -> str:
    """A JSON Lines document's text, line ends made LF as in a file; "" for a line that
    `lines.where` leaves out."""
    try:
        record = json.loads(line)
    except ValueError:
        raise UserError(f"'{path}' line {number} is not JSON: a .jsonl file holds one JSON object a line (rename "
                        "a plain text file)") from None
    if not isinstance(record, dict):
        raise UserError(f"'{path}' line {number} is not a JSON object: a .jsonl file holds one a line")
    if not lines.selects(record):
        return ""
    text = record.get(lines.field)
    if not isinstance(text, str):
        raise UserError(f"'{path}' line {number} has no '{lines.field}' string: name the field that holds the "
                        "text with --text-field")
    return _lf(text)


def _cut_pieces(blocks: Iterator[bytes], piece_bytes: int) -> Iterator[str]:
    """Text from blocks of bytes, in pieces ([Note: token-exact pieces]). What the last
    block ends goes out whole, so a file no larger than a block is one piece."""
    pending = bytearray()
    block = next(blocks, b"")
    while block:
        following = next(blocks, b"")
        searched = max(len(pending) - 1, 1)  # what was pending had no cut, but maybe a last newline
        pending += block
        if following:
            cut = _cut(pending, searched, fallback=len(pending) >= LONGEST_PIECE * piece_bytes)
            if cut:
                yield _decode(pending[:cut])
                del pending[:cut]
        block = following
    if pending:
        yield _decode(pending)


def _with_last(items: Iterator[str]) -> Iterator[tuple[str, bool]]:
    """Each item, and whether it is the last: one is held back until the next shows it is not."""
    held = None
    for item in items:
        if held is not None:
            yield held, False
        held = item
    if held is not None:
        yield held, True


def _decode(raw: bytes | bytearray) -> str:
    """UTF-8 text as `Path.read_text` gives it: undecodable bytes replaced, CRLF and CR
    made LF."""
    return _lf(raw.decode("utf-8", errors="replace"))


def _lf(text: str) -> str:
    """CRLF and CR line ends made LF, as Python's text files read them."""
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _printable(byte: int) -> bool:
    return 0x21 <= byte <= 0x7E


def _cut(text: bytearray, start: int, fallback: bool) -> int:
    """Where `text_pieces` may end a piece in `text`: after the last newline (LF or CRLF),
    from `start` on, between two printable ASCII characters; else, with `fallback`, after
    the last newline or before the last character; 0: nowhere."""
    end = len(text) - 1  # the newline needs a byte after it
    while (newline := text.rfind(b"\n", start, end)) > 0:
        before = newline - 2 if text[newline - 1] == 0x0D else newline - 1  # a CRLF reads as LF
        if before >= 0 and _printable(text[before]) and _printable(text[newline + 1]):
            return newline + 1
        end = newline
    if not fallback:
        return 0
    if (newline := text.rfind(b"\n")) >= 0:
        return newline + 1
    # Before a byte that starts a character (not 0b10xxxxxx): the bytes on either side
    # decode, broken ones included, as they do together. (No CRLF is split: its LF
    # would have been the cut.)
    return next((i for i in range(len(text) - 1, 0, -1) if text[i] & 0xC0 != 0x80), 0)


class TokenFileWriter:
    """A flat `.npy` token array written as it grows, in memory only a batch at a time.

    The header is written last, over 128 bytes kept for it at the start: the count is
    known only at the end. numpy's own header for a flat array is 128 bytes for any
    count (it pads to 64 and leaves room for the shape to grow), so the file is the one
    `np.save` would write, byte for byte."""

    HEADER_BYTES = 128

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.file, self.dtype, self.n_tokens = open(path, "wb"), np.dtype(dtype), 0
        self.file.write(bytes(self.HEADER_BYTES))

    def append(self, tokens: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(tokens, dtype=self.dtype).tobytes())
        self.n_tokens += tokens.size

    def close(self) -> None:
        """Write the header and close; the caller fsyncs and renames (`atomic_path`)."""
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {
            "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.n_tokens,)})
        if len(header.getvalue()) != self.HEADER_BYTES:
            raise RuntimeError(f"numpy wrote a {len(header.getvalue())}-byte header, not {self.HEADER_BYTES}")
        self.file.seek(0)
        self.file.write(header.getvalue())
        self.file.close()


def _prepare_inputs(out: Path, inputs: list[Path] | None, tokenizer_path: Path | None, train_vocab: int | None,
                    separator: str | None, lines: JsonLines | None, eval_out: Path | None,
                    eval_fraction: float) -> tuple[list[Path], int]:
    """`prepare`'s text files (and how many a folder's walk left out), its flags checked
    against each other before anything is read or written."""
    for flag, path in (("--out", out), ("--eval-out", eval_out)):
        if path is not None and Path(path).is_dir():
            raise UserError(f"{flag} '{path}' is a folder: name the token file to write (as "
                            f"{Path(path) / 'tokens.npy'})")
    if eval_out is not None:
        if Path(eval_out).resolve() == Path(out).resolve():
            raise UserError(f"--eval-out '{eval_out}' is --out itself: name another file for the held-out documents")
        if not 0 < eval_fraction < 1:
            raise UserError(f"--eval-fraction must be a fraction of the documents between 0 and 1, got "
                            f"{eval_fraction}")
    files, skipped = text_files(inputs) if inputs else (stdlib_files(), 0)
    if not files:
        raise UserError("the inputs hold no text file (a folder's hidden, compiled and binary files are left out): "
                        "pass text files or folders holding them")
    if lines is not None and lines.where and not any(_is_json_lines(path) for path in files):
        raise UserError("--where chooses among JSON Lines documents, and no input is JSON Lines (.jsonl, .ndjson): "
                        "drop --where, or pass JSON Lines files")
    if lines is not None and lines.where:
        plain = next((path for path in files if not _is_json_lines(path)), None)
        if plain is not None:
            raise UserError(f"--where chooses among JSON Lines documents, and '{plain}' is not JSON Lines: it would "
                            "be taken whole; prepare it on its own, or leave it out")
    if lines is not None and lines.field != "text" and not any(_is_json_lines(path) for path in files):
        raise UserError(f"--text-field names the field of JSON Lines documents that holds their text, and no input "
                        f"is JSON Lines (.jsonl, .ndjson): drop --text-field {lines.field}, or pass JSON Lines files")
    if separator is not None and tokenizer_path is None and train_vocab is None:
        raise UserError("--separator needs a tokenizer with a token for it (bytes have none to spare): pass "
                        "--tokenizer, or --train-tokenizer to learn one with it")
    if train_vocab is not None and tokenizer_path is not None:
        raise UserError("--tokenizer and --train-tokenizer both given: use one tokenizer, or learn one")
    return files, skipped


def _prepare_tokenizer(
    out: Path, files: list[Path], tokenizer_path: Path | None, train_vocab: int | None, separator: str | None,
    lines: JsonLines | None,
) -> tuple[ByteTokenizer | HFTokenizer, int | None]:
    """`prepare`'s tokenizer (given, learned from `files` with `train_vocab` tokens, or
    bytes) and the id of its `separator` token (None without one)."""
    if train_vocab is not None:
        if separator is not None:  # before learning a tokenizer, so that an empty one fails fast
            _separator_text(separator)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        tokenizer_path = train_tokenizer(files, train_vocab, Path(out).with_suffix(".tokenizer.json"),
                                         separator, lines).resolve()
    tokenizer = HFTokenizer(tokenizer_path) if tokenizer_path else ByteTokenizer()
    separator_id = None
    if separator is not None:
        separator_id = tokenizer.token_id(_separator_text(separator))
        if separator_id is None:
            raise UserError(f"--separator '{separator}' is not a token of {tokenizer.name}: name one of its tokens "
                            "(GPT-2's and GPT-NeoX's end texts with '<|endoftext|>')")
    return tokenizer, separator_id


def prepare(out: Path, inputs: list[Path] | None = None, tokenizer_path: Path | None = None,
            train_vocab: int | None = None, progress: bool = False, separator: str | None = None,
            lines: JsonLines | None = None, eval_out: Path | None = None, eval_fraction: float = 0.01) -> dict:
    """Tokenize text files (default: the standard library) into `out` (.npy) plus `out`.json.
    With `train_vocab`, a byte-level BPE of that many tokens is first learned from the
    same files and written beside `out` (`STEM.tokenizer.json`), and the files are
    tokenized with it; the sidecar names it, as it names any tokenizer.json, so a run
    on the data finds it (sample, export).

    The text streams through: files are read in pieces ([Note: token-exact pieces]),
    tokenized a batch of pieces at a time and appended to the token file, so memory
    stays bounded whatever the corpus's size. Compressed files are read as they are
    (`.gz`, `.bz2`, `.xz`, `.zst`). Each file is a document, but for JSON Lines
    (`.jsonl`), whose every line is one (read as `lines` says): `separator`, a token of
    the tokenizer (GPT-2's `<|endoftext|>`), follows each document, and the sidecar
    records its id, so that a model learns where a text ends and `sample` stops there.
    Without it nothing is added: documents are joined as they are.

    With `eval_out`, a share `eval_fraction` of the documents goes there instead, a
    held-out set for `train --eval-data` drawn from the whole corpus rather than its
    tail (a corpus sorted by source or date would otherwise be judged on its last
    source or its newest texts). Which documents is a hash of each one's place in the
    inputs' order: the same inputs in the same order split the same way, streaming
    still, and a document is never cut between the two files."""
    files, skipped = _prepare_inputs(out, inputs, tokenizer_path, train_vocab, separator, lines, eval_out,
                                     eval_fraction)
    tokenizer, separator_id = _prepare_tokenizer(out, files, tokenizer_path, train_vocab, separator, lines)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=sum(path.stat().st_size for path in files), unit="B", unit_scale=True,
               desc="tokenizing", disable=not progress)
    if eval_out is not None:
        Path(eval_out).parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(out) as tmp, (atomic_path(eval_out) if eval_out else contextlib.nullcontext()) as tmp_eval:
            writer = TokenFileWriter(tmp, dtype)
            held = TokenFileWriter(tmp_eval, dtype) if eval_out else None
            try:
                documents, held_documents = _tokenize(files, lines, tokenizer, separator_id, writer, held,
                                                      eval_fraction, bar)
            finally:
                writer.close()
                if held is not None:
                    held.close()
            _check_prepared(writer, held, lines, documents, eval_fraction)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise UserError(f"the disk filled while writing '{out}' (nothing was kept): free space there or "
                        "choose another --out") from None
    finally:
        bar.close()
    meta = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "dtype": str(dtype),
            "n_tokens": writer.n_tokens, "n_files": len(files), "n_documents": documents - held_documents,
            "separator": separator_id}
    if skipped:
        meta["n_skipped"] = skipped
    if lines is not None and lines.where:
        meta["where"] = meta_where(lines)
    if held is not None:
        split = {"eval_fraction": eval_fraction, "training": str(out), "held_out": str(eval_out)}
        atomic_write_json(meta_path(eval_out), {**meta, "n_tokens": held.n_tokens, "n_documents": held_documents,
                                                "split": split})
        meta["split"] = split
    atomic_write_json(meta_path(out), meta)
    return meta


def _tokenize(files: list[Path], lines: JsonLines | None, tokenizer: ByteTokenizer | HFTokenizer,
              separator_id: int | None, writer: TokenFileWriter, held: TokenFileWriter | None,
              eval_fraction: float, bar: tqdm) -> tuple[int, int]:
    """The files' documents tokenized into `writer`, or, for those `_held_out` picks, into
    `held`; each followed by the separator, if there is one. Returns how many documents
    there were, and how many of them were held out."""
    documents, held_documents = 0, 0
    ends = np.array([separator_id if separator_id is not None else 0], dtype=writer.dtype)
    for batch, n_bytes, last in _batches(files, lines):
        for tokens, ends_a_document in zip(tokenizer.encode_pieces(batch), last):
            into = held if held is not None and _held_out(documents, eval_fraction) else writer
            into.append(tokens)
            if ends_a_document and separator_id is not None:
                into.append(ends)
            if ends_a_document:
                documents += 1
                held_documents += into is held
        bar.update(n_bytes)
    return documents, held_documents


def _check_prepared(writer: TokenFileWriter, held: TokenFileWriter | None, lines: JsonLines | None,
                    documents: int, eval_fraction: float) -> None:
    """Refuses a token file too short to train on, and a held-out file likewise."""
    if writer.n_tokens < 2 and lines is not None and lines.where:
        raise UserError(f"no document of the inputs meets --where {' '.join(meta_where(lines))} (or those "
                        "that do are empty): check the fields' names and values")
    if writer.n_tokens < 2:
        raise UserError("the inputs hold no text: pass non-empty text files"
                        + (" (or every document was held out: lower --eval-fraction)" if held else ""))
    if held is not None and held.n_tokens < 2:
        raise UserError(f"--eval-fraction {eval_fraction:g} held out none of the {documents:,} documents: "
                        "raise it, or give more documents (each input file is one, each JSON Lines line)")


def _held_out(document: int, fraction: float) -> bool:
    """Whether the document at this place in the inputs goes to the held-out file: a
    hash of its place, so that the held-out share is spread over the whole corpus."""
    digest = hashlib.blake2b(document.to_bytes(8, "little"), digest_size=8, person=b"held-out").digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def meta_where(lines: JsonLines) -> list[str]:
    """The --where conditions as given."""
    return [f"{name}={value}" for name, value in lines.where]


def _batches(files: list[Path], lines: JsonLines | None = None) -> Iterator[tuple[list[str], int, list[bool]]]:
    """The files' pieces, in order, gathered into batches of about `BATCH_BYTES`, each
    with the bytes read for it and, for each piece, whether it ends a document (a file,
    or a JSON Lines document; one without text has no piece)."""
    batch, last, text, read = [], [], 0, 0
    for path in files:
        for n_bytes, piece, ends_document in _marked_pieces(path, PIECE_BYTES, lines):
            batch.append(piece)
            last.append(ends_document)
            text, read = text + len(piece), read + n_bytes
            if text >= BATCH_BYTES:  # by the text, not the bytes read: a compressed file's are fewer
                yield batch, read, last
                batch, last, text, read = [], [], 0, 0
    if batch:
        yield batch, read, last


def _separator_text(separator: str) -> str:
    if not separator:
        raise UserError("--separator is empty: name a token, such as '<|endoftext|>'")
    return separator


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
                            f"{vocab_size}: prepare the data with the model's tokenizer (a model of the data's "
                            f"vocabulary trains with train --vocab-size {data_vocab})")
    else:
        # No sidecar: scan once (a linear pass, cheap next to training) for out-of-range ids.
        top = int(tokens.max())
        if top >= vocab_size:
            raise UserError(f"data file '{path}' holds token id {top} >= the model's vocabulary of "
                            f"{vocab_size}: prepare the data with the model's tokenizer")
    return tokens


@dataclass(frozen=True)
class Mixture:
    """Several token files trained on in fixed shares ([Note: data mixtures]).

    [Note: data mixtures]
    `--data A B --data-weights 3 1` draws each training window from A with probability
    3/4 and from B with 1/4, from anywhere in the file drawn, so the shares hold
    whatever the files' sizes (a small file of high quality is read more often than its
    size alone would have it; without weights the shares are the sizes, as if the files
    were one). Each file keeps its own held-out tail, and an evaluation reads windows
    from every tail in the same shares, so its loss weighs the files as training does.
    The draw is a pure function of (seed, step), as with one file."""

    parts: tuple[np.ndarray, ...]
    weights: tuple[float, ...]  # the shares, summing to 1
    names: tuple[str, ...]  # for messages: the files


Tokens = np.ndarray | Mixture  # one token file, or several in shares


def load_data(paths: list[Path], weights: list[float] | None, vocab_size: int) -> Tokens:
    """One token file (`load_tokens`), or a `Mixture` of several: in the shares
    `weights` (any positive numbers, normalised), else in proportion to their sizes.
    Their sidecars must name the same tokenizer: a mixture's ids mean one thing."""
    if weights is not None and len(paths) < 2:
        raise UserError("--data-weights shares the windows among several --data files: give two or more, or drop "
                        "--data-weights")
    if len(paths) == 1:
        return load_tokens(paths[0], vocab_size)
    if weights is not None and len(weights) != len(paths):
        raise UserError(f"--data-weights gives {len(weights)} weights for {len(paths)} data files: give one per "
                        "file, in the same order")
    if weights is not None and not all(0 < w < float("inf") for w in weights):
        raise UserError(f"--data-weights must be positive numbers, got {' '.join(f'{w:g}' for w in weights)}")
    parts = [load_tokens(path, vocab_size) for path in paths]
    check_one_tokenizer(paths)
    shares = weights if weights is not None else [part.size for part in parts]
    return Mixture(tuple(parts), tuple(w / sum(shares) for w in shares), tuple(str(path) for path in paths))


def check_one_tokenizer(paths: list[Path]) -> None:
    """Refuse token files whose sidecars name different tokenizers: read together (a
    mixture, or training data and its evaluation's), their ids must mean one thing."""
    tokenizers = {}
    for path in paths:
        try:
            tokenizers[path] = json.loads(meta_path(path).read_text()).get("tokenizer")
        except (OSError, ValueError, AttributeError):
            tokenizers[path] = None  # no sidecar: its ids were checked against the vocabulary only
    named = {path: name for path, name in tokenizers.items() if isinstance(name, str)}
    if len({_tokenizer_identity(name) for name in named.values()}) > 1:
        listed = ", ".join(f"'{path}' ({name})" for path, name in named.items())
        raise UserError(f"the data files were prepared with different tokenizers: {listed}; prepare them all "
                        "with one (--tokenizer)")


def document_separator(paths: list[Path]) -> int:
    """The token that ends every document of these token files (`prepare --separator`),
    for attention within documents (`train --document-mask`); refused where a file
    names none, or the files name different ones."""
    found = {}
    for path in paths:
        try:
            separator = json.loads(meta_path(path).read_text()).get("separator")
        except (OSError, ValueError, AttributeError):
            separator = None
        if not isinstance(separator, int) or isinstance(separator, bool):
            raise UserError(f"--document-mask needs documents ended by a separator, and data file '{path}' has none "
                            "recorded: prepare it with --separator TOKEN (a token of its tokenizer, such as "
                            "'<|endoftext|>'), or attend across documents (train: drop --document-mask; eval: "
                            "--document-mask no)")
        found[path] = separator
    if len(set(found.values())) > 1:
        listed = ", ".join(f"'{path}' ({separator})" for path, separator in found.items())
        raise UserError(f"the data files end their documents with different separators: {listed}; prepare them all "
                        "with one --separator")
    return next(iter(found.values()))


def times_read(tokens: Tokens, tokens_read: int) -> list[tuple[str | None, int, float, float]]:
    """How a run that reads `tokens_read` tokens reads each file: its name (None for one
    file), its size, its share of the windows and how many times over the run reads it
    (on average: windows are drawn at random)."""
    if not isinstance(tokens, Mixture):
        return [(None, tokens.size, 1.0, tokens_read / tokens.size)]
    return [(name, part.size, share, tokens_read * share / part.size)
            for name, part, share in zip(tokens.names, tokens.parts, tokens.weights)]


def _tokenizer_identity(name: str) -> str:
    """What makes two sidecars' tokenizers the same: a tokenizer.json's contents, where
    the file is there (one file copied or named by another path is the same), else
    its name."""
    path = Path(name)
    if name != ByteTokenizer.name and path.is_file():
        return hashlib.sha256(path.read_bytes()).hexdigest()
    return name


def holdout_split(tokens: Tokens, fraction: float, seq_len: int, name: str = "the data") -> tuple[Tokens, Tokens]:
    """(training part, held-out tail): the last `fraction` of the tokens, views of the file
    (of each file of a mixture).

    The tail, not random windows, so that no training window can overlap a held-out one;
    with files prepared in order, the tail is whole files the run never trains on."""
    if isinstance(tokens, Mixture):
        splits = [holdout_split(part, fraction, seq_len, f"'{path}'") for part, path in zip(tokens.parts, tokens.names)]
        return (Mixture(tuple(s[0] for s in splits), tokens.weights, tokens.names),
                Mixture(tuple(s[1] for s in splits), tokens.weights, tokens.names))
    if not 0 < fraction < 1:
        raise UserError(f"--holdout must be a fraction between 0 and 1, got {fraction}")
    cut = tokens.size - round(tokens.size * fraction)
    for part, size in (("held-out", tokens.size - cut), ("training", cut)):
        if size < seq_len + 1:
            raise UserError(f"the {part} part of {name} ({size} of {tokens.size} tokens, --holdout {fraction}) "
                            f"is shorter than one sequence of {seq_len + 1}: use more text, "
                            f"{'a larger' if part == 'held-out' else 'a smaller'} --holdout or a shorter --seq-len")
    return tokens[:cut], tokens[cut:]


def eval_windows(heldout: Tokens, seq_len: int, n_sequences: int) -> tuple[np.ndarray, np.ndarray]:
    """`n_sequences` windows of `seq_len + 1` tokens spread evenly over the held-out
    tokens, as (inputs, targets); fewer when the tail holds fewer disjoint windows, so
    that none repeats a token another reads. Always the same windows for the same tail.
    A mixture's: from each file's tail, as many as its share of `n_sequences` (at least
    one)."""
    if isinstance(heldout, Mixture):
        windows = [eval_windows(part, seq_len, count)
                   for part, count in zip(heldout.parts, eval_window_counts(heldout, seq_len, n_sequences))]
        return np.concatenate([x for x, _ in windows]), np.concatenate([y for _, y in windows])
    n = _window_count(heldout, seq_len, n_sequences)
    starts = np.linspace(0, heldout.size - seq_len - 1, n).round().astype(np.int64)
    windows = np.stack([np.asarray(heldout[s : s + seq_len + 1], dtype=np.int64) for s in starts])
    return windows[:, :-1], windows[:, 1:]


def eval_windows_by_file(heldout: Tokens, seq_len: int, n_sequences: int
                         ) -> tuple[np.ndarray, np.ndarray, list[tuple[str | None, int]]]:
    """`eval_windows`, and the files they come from, in order, each with how many of
    them it gives: one unnamed for one file, each of a mixture's by name."""
    x, y = eval_windows(heldout, seq_len, n_sequences)
    if not isinstance(heldout, Mixture):
        return x, y, [(None, len(x))]
    return x, y, list(zip(heldout.names, eval_window_counts(heldout, seq_len, n_sequences)))


def eval_window_counts(heldout: Mixture, seq_len: int, n_sequences: int) -> list[int]:
    """How many of a mixture's `n_sequences` evaluation windows each file's tail gives, in
    order: its share (at least one), or all it holds disjoint when that is fewer."""
    return [_window_count(part, seq_len, round(n_sequences * share))
            for part, share in zip(heldout.parts, heldout.weights)]


def eval_window_total(heldout: Tokens, seq_len: int, n_sequences: int) -> int:
    """How many evaluation windows `eval_windows` gives, counted without making them."""
    if isinstance(heldout, Mixture):
        return sum(eval_window_counts(heldout, seq_len, n_sequences))
    return _window_count(heldout, seq_len, n_sequences)


def _window_count(tokens: np.ndarray, seq_len: int, wanted: int) -> int:
    """At least one window, and no more than the tokens hold disjoint."""
    return max(1, min(wanted, tokens.size // (seq_len + 1)))


@dataclass(frozen=True)
class BatchSampler:
    """Random windows of `seq_len + 1` tokens, a pure function of (seed, step).

    Drawing each step's positions from a generator seeded by (seed, step) makes the data
    cursor just the step number: resuming, or splitting a global batch over ranks, reads
    exactly the windows an uninterrupted single-process run would.
    """

    tokens: Tokens
    seq_len: int
    seed: int

    def __post_init__(self) -> None:
        parts = zip(self.tokens.parts, self.tokens.names) if isinstance(self.tokens, Mixture) else [
            (self.tokens, None)]
        for part, name in parts:
            if part.size < self.seq_len + 1:
                raise UserError(f"{f'data file {name!r}' if name else 'the data'} holds {part.size} tokens, fewer "
                                f"than one sequence of {self.seq_len + 1}: use more text or a shorter --seq-len")

    def global_batch(self, step: int, n_sequences: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, step])
        if not isinstance(self.tokens, Mixture):
            starts = rng.integers(0, self.tokens.size - self.seq_len, size=n_sequences)
            sources = [self.tokens] * n_sequences
        else:  # [Note: data mixtures]: a file by its share, then a place in it
            files = rng.choice(len(self.tokens.parts), size=n_sequences, p=self.tokens.weights)
            sources = [self.tokens.parts[f] for f in files]
            starts = (rng.random(n_sequences) * [s.size - self.seq_len for s in sources]).astype(np.int64)
        windows = np.stack([np.asarray(source[s : s + self.seq_len + 1], dtype=np.int64)
                            for source, s in zip(sources, starts)])
        return windows[:, :-1], windows[:, 1:]
