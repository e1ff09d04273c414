"""Token files: what `prepare` writes, what `load_tokens` refuses, how batches are drawn."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from streamer.data import BatchSampler, eval_windows, holdout_split, load_tokens, meta_path, prepare
from streamer.errors import UserError

TEXTS = {
    "a.txt": "def f(x):\n    return x + 1\n",
    "b.txt": "Unicode is bytes here: caf\u00e9, \u2713, \U0001f600.\n",
    "c.txt": "",  # empty files are skipped, not an error
}


def write_texts(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, text in TEXTS.items():
        (folder / name).write_text(text, encoding="utf-8")
        paths.append(folder / name)
    return paths


def save_npy(path: Path, array: np.ndarray) -> Path:
    np.save(path, array, allow_pickle=False)
    return path


def test_prepare_writes_byte_tokens_and_sidecar(tmp_path: Path) -> None:
    paths = write_texts(tmp_path / "text")
    out = tmp_path / "tokens.npy"
    meta = prepare(out, paths)
    tokens = np.load(out)
    expected = b"".join(p.read_bytes() for p in paths)
    assert tokens.dtype == np.uint16
    assert tokens.tobytes() == np.frombuffer(expected, dtype=np.uint8).astype(np.uint16).tobytes()
    sidecar = json.loads(meta_path(out).read_text())
    assert sidecar == meta
    assert sidecar == {
        "tokenizer": "bytes",
        "vocab_size": 256,
        "dtype": "uint16",
        "n_tokens": len(expected),
        "n_files": 3,
        "n_documents": 2,  # the empty file is none
        "separator": None,
    }


def test_prepare_reads_folders_in_sorted_order(tmp_path: Path) -> None:
    paths = write_texts(tmp_path / "text")
    prepare(tmp_path / "tokens.npy", [tmp_path / "text"])
    expected = b"".join(p.read_bytes() for p in sorted(paths))
    assert np.load(tmp_path / "tokens.npy").astype(np.uint8).tobytes() == expected


def test_prepared_file_loads_for_a_byte_model(tmp_path: Path) -> None:
    prepare(tmp_path / "tokens.npy", write_texts(tmp_path / "text"))
    tokens = load_tokens(tmp_path / "tokens.npy", vocab_size=256)
    assert tokens.size == json.loads(meta_path(tmp_path / "tokens.npy").read_text())["n_tokens"]


def test_prepare_missing_input(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        prepare(tmp_path / "tokens.npy", [tmp_path / "nowhere.txt"])


def test_prepare_empty_inputs(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="no text"):
        prepare(tmp_path / "tokens.npy", [tmp_path / "empty.txt"])
    assert not (tmp_path / "tokens.npy").exists()


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not found.*streamer prepare"):
        load_tokens(tmp_path / "absent.npy", vocab_size=256)


def test_load_empty_file(tmp_path: Path) -> None:
    path = save_npy(tmp_path / "empty.npy", np.zeros(0, dtype=np.uint16))
    with pytest.raises(UserError, match="empty"):
        load_tokens(path, vocab_size=256)


def test_load_wrong_dtype(tmp_path: Path) -> None:
    path = save_npy(tmp_path / "floats.npy", np.arange(100, dtype=np.float32))
    with pytest.raises(UserError, match="float32"):
        load_tokens(path, vocab_size=256)


def test_load_not_a_flat_array(tmp_path: Path) -> None:
    path = save_npy(tmp_path / "matrix.npy", np.zeros((4, 4), dtype=np.uint16))
    with pytest.raises(UserError, match="flat"):
        load_tokens(path, vocab_size=256)


def test_load_not_an_npy_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.npy"
    path.write_text("these are not tokens")
    with pytest.raises(UserError, match="not a token file"):
        load_tokens(path, vocab_size=256)


def test_load_token_beyond_vocab_without_sidecar(tmp_path: Path) -> None:
    path = save_npy(tmp_path / "wide.npy", np.array([1, 2, 300, 4], dtype=np.uint16))
    with pytest.raises(UserError, match="token id 300"):
        load_tokens(path, vocab_size=256)
    assert load_tokens(path, vocab_size=301).size == 4


def test_load_sidecar_vocab_larger_than_model(tmp_path: Path) -> None:
    path = save_npy(tmp_path / "gpt2.npy", np.array([1, 2, 3, 4], dtype=np.uint16))
    meta_path(path).write_text(json.dumps({"vocab_size": 50257}))
    with pytest.raises(UserError, match="vocabulary of 50257"):
        load_tokens(path, vocab_size=256)


def test_sequence_longer_than_data() -> None:
    with pytest.raises(UserError, match="shorter --seq-len"):
        BatchSampler(np.arange(64, dtype=np.uint16), seq_len=64, seed=0)
    BatchSampler(np.arange(65, dtype=np.uint16), seq_len=64, seed=0)  # exactly one window fits


def test_batches_are_windows_with_targets_shifted_by_one() -> None:
    tokens = np.arange(5000, dtype=np.uint16)  # token value = position, so windows are easy to check
    x, y = BatchSampler(tokens, seq_len=32, seed=0).global_batch(step=3, n_sequences=6)
    assert x.shape == y.shape == (6, 32)
    assert x.dtype == y.dtype == np.int64  # what nn.Embedding and cross_entropy take
    starts = x[:, :1]
    np.testing.assert_array_equal(x, starts + np.arange(32))
    np.testing.assert_array_equal(y, x + 1)


def test_batches_are_a_function_of_seed_and_step() -> None:
    tokens = np.arange(5000, dtype=np.uint16)
    first, again = BatchSampler(tokens, 32, seed=0), BatchSampler(tokens, 32, seed=0)
    for step in (0, 1, 7):
        np.testing.assert_array_equal(first.global_batch(step, 4)[0], again.global_batch(step, 4)[0])
    assert not np.array_equal(first.global_batch(0, 4)[0], first.global_batch(1, 4)[0])
    assert not np.array_equal(first.global_batch(0, 4)[0], BatchSampler(tokens, 32, seed=1).global_batch(0, 4)[0])


def test_prepare_with_a_tokenizer_json(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.trainers import BpeTrainer

    text = "the quick brown fox jumps over the lazy dog\n" * 50 + "the dog sleeps while the fox runs\n" * 50
    source = tmp_path / "corpus.txt"
    source.write_text(text)
    tokenizer = tokenizers.Tokenizer(BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.train_from_iterator([text], BpeTrainer(vocab_size=300, special_tokens=["[UNK]"]))
    tokenizer.save(str(tmp_path / "tokenizer.json"))

    out = tmp_path / "tokens.npy"
    meta = prepare(out, [source], tmp_path / "tokenizer.json")
    assert meta["vocab_size"] == tokenizer.get_vocab_size()
    assert meta["tokenizer"] == str(tmp_path / "tokenizer.json")
    tokens = np.load(out)
    assert tokens.dtype == np.uint16
    assert tokens.tolist() == tokenizer.encode(text).ids
    assert tokens.size < len(text) // 2, "BPE tokens, not bytes"
    with pytest.raises(UserError, match="vocabulary"):
        load_tokens(out, vocab_size=tokenizer.get_vocab_size() - 1)


def test_prepare_with_an_unreadable_tokenizer(tmp_path: Path) -> None:
    pytest.importorskip("tokenizers")
    (tmp_path / "tokenizer.json").write_text("{not json")
    (tmp_path / "a.txt").write_text("text")
    with pytest.raises(UserError, match="cannot read tokenizer"):
        prepare(tmp_path / "tokens.npy", [tmp_path / "a.txt"], tmp_path / "tokenizer.json")


def test_the_held_out_part_is_the_tail_and_training_gets_the_rest() -> None:
    tokens = np.arange(10_000, dtype=np.uint16)
    train, held = holdout_split(tokens, 0.05, 64)
    assert held.size == 500 and train.size == 9_500
    np.testing.assert_array_equal(np.concatenate([train, held]), tokens)
    assert np.shares_memory(train, tokens) and np.shares_memory(held, tokens)  # views: a memory map stays one
    # Every window the sampler can draw from the training part ends before the tail.
    sampler = BatchSampler(train, 64, seed=0)
    for step in range(50):
        _, y = sampler.global_batch(step, 8)
        assert y.max() < 9_500


@pytest.mark.parametrize(("fraction", "part"), [(0.001, "held-out"), (0.999, "training")])
def test_a_part_shorter_than_one_sequence_is_refused(fraction: float, part: str) -> None:
    with pytest.raises(UserError, match=f"the {part} part of the data .* shorter than one sequence of 65"):
        holdout_split(np.arange(10_000, dtype=np.uint16), fraction, 64)


def test_evaluation_windows_are_fixed_disjoint_and_spread_over_the_tail() -> None:
    held = np.arange(1_000, 2_000, dtype=np.uint16)
    x, y = eval_windows(held, 32, 10)
    assert x.shape == y.shape == (10, 32)
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one
    starts = x[:, 0].astype(np.int64) - 1_000
    assert starts[0] == 0 and starts[-1] + 33 == 1_000  # the first and the last windows of the tail
    assert (np.diff(starts) >= 33).all()  # no token read twice
    x2, _ = eval_windows(held, 32, 10)
    np.testing.assert_array_equal(x, x2)
    # More windows than the tail holds disjoint: as many as it does.
    assert eval_windows(held, 32, 1_000)[0].shape == (1_000 // 33, 32)


def test_prepare_learns_a_byte_level_tokenizer(tmp_path: Path, fails_in_one_line) -> None:
    """--train-tokenizer: a BPE of the asked size learned from the inputs, written beside
    the token file and named by its sidecar; any text, even unseen scripts, decodes
    back exactly, and the tokens are far fewer than the bytes."""
    pytest.importorskip("tokenizers")
    from streamer.data import HFTokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    inputs = [stdlib / name for name in ("textwrap.py", "argparse.py", "json/decoder.py")]
    out = tmp_path / "data" / "tokens.npy"
    meta = prepare(out, inputs, train_vocab=600)
    learned = tmp_path / "data" / "tokens.tokenizer.json"
    assert meta["tokenizer"] == str(learned.resolve()) and meta["vocab_size"] == 600
    tokenizer = HFTokenizer(learned)
    text = inputs[0].read_text()
    assert np.load(out)[: len(tokenizer.encode(text))].tolist() == tokenizer.encode(text)
    assert len(tokenizer.encode(text)) < len(text.encode()) / 2
    for sample in (text, "naïve café ✓ 中文 \x00\t", "a <|endoftext|> b"):
        assert tokenizer.decode(tokenizer.encode(sample)) == sample
    fails_in_one_line("prepare", {
        "fewer tokens than bytes": ([str(inputs[0]), "--out", str(tmp_path / "t.npy"), "--train-tokenizer", "100"],
                                    ["at least 256"]),
        "two tokenizers": ([str(inputs[0]), "--out", str(tmp_path / "t.npy"), "--train-tokenizer", "300",
                            "--tokenizer", str(learned)], ["both given"]),
    })


def stdlib_text(n_bytes: int) -> bytes:
    """Real text: standard-library sources, in order, up to about `n_bytes`."""
    text = bytearray()
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text += path.read_bytes()
        if len(text) >= n_bytes:
            break
    return bytes(text)


def test_a_large_file_is_tokenized_in_pieces_into_the_whole_files_tokens(tmp_path: Path, monkeypatch) -> None:
    """A file larger than a piece is read, decoded and tokenized a piece at a time, yet
    its tokens are those of the whole file, as bytes and as byte-level BPE."""
    pytest.importorskip("tokenizers")
    from streamer import data
    from streamer.data import HFTokenizer, text_pieces, train_tokenizer

    big = tmp_path / "big.py"
    big.write_bytes(stdlib_text(400_000))
    monkeypatch.setattr(data, "PIECE_BYTES", 4096)
    monkeypatch.setattr(data, "LONGEST_PIECE", 10**6)  # no cut where tokens could change
    pieces = list(text_pieces(big))
    assert len(pieces) > 10
    assert "".join(pieces) == big.read_text(encoding="utf-8", errors="replace")

    prepare(tmp_path / "bytes.npy", [big])
    assert np.load(tmp_path / "bytes.npy").astype(np.uint8).tobytes() == big.read_bytes()
    tokenizer = HFTokenizer(train_tokenizer([big], 1000, tmp_path / "tokenizer.json"))
    prepare(tmp_path / "bpe.npy", [big], tmp_path / "tokenizer.json")
    whole = tokenizer._tok.encode(big.read_text(encoding="utf-8"), add_special_tokens=False).ids
    assert np.load(tmp_path / "bpe.npy", mmap_mode="r").tolist() == whole


def test_a_long_line_without_a_cut_is_cut_anyway_and_keeps_its_text(tmp_path: Path, monkeypatch) -> None:
    """Minified text, one line with no token-exact cut, is still read in bounded pieces
    (never inside a character), and bytes, undecodable ones included, come out as the
    whole file's."""
    from streamer import data
    from streamer.data import text_pieces

    line = ("caf\u00e9 \u2713 x=1;" * 3000).encode() + b"\xff\xfe broken" + "\U0001f600".encode() * 2000
    path = tmp_path / "min.js"
    path.write_bytes(line)
    monkeypatch.setattr(data, "PIECE_BYTES", 1024)
    monkeypatch.setattr(data, "LONGEST_PIECE", 4)
    pieces = list(text_pieces(path))
    assert len(pieces) > 10 and max(len(p.encode()) for p in pieces) <= (4 + 1) * 1024
    assert "".join(pieces) == line.decode("utf-8", errors="replace")
    prepare(tmp_path / "tokens.npy", [path])
    assert np.load(tmp_path / "tokens.npy").astype(np.uint8).tobytes() == line.decode(
        "utf-8", errors="replace").encode()


def test_a_full_disk_leaves_the_old_token_file_and_no_partial_one(tmp_path: Path, monkeypatch) -> None:
    """The token file grows under a temporary name: a disk that fills midway is one
    clear error, the file from before is intact, and nothing half-written stays."""
    import errno

    from streamer.data import TokenFileWriter

    text = tmp_path / "text.txt"
    text.write_bytes(stdlib_text(100_000))
    out = tmp_path / "tokens.npy"
    prepare(out, [text])
    before = out.read_bytes()
    appended = []

    def append(self, tokens: np.ndarray) -> None:
        appended.append(tokens.size)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(TokenFileWriter, "append", append)
    with pytest.raises(UserError, match="the disk filled while writing .*tokens.npy.* free space"):
        prepare(out, [text, text])
    assert appended and out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt", "tokens.npy", "tokens.npy.json"]


def test_line_ends_are_read_as_python_reads_text(tmp_path: Path, monkeypatch) -> None:
    """CRLF and CR line ends become LF, as `Path.read_text` makes them, in a file read
    whole and in one read in pieces, cut at ordinary places or, with no such place, anyway."""
    from streamer import data

    monkeypatch.setattr(data, "PIECE_BYTES", 1024)
    monkeypatch.setattr(data, "LONGEST_PIECE", 2)
    cases = {"small.txt": b"a\r\nb\rc\n", "crlf.txt": b"x = 1\r\ny = 2\r\n" * 500,
             "cut-anyway.txt": (b"z" * 1500 + b"\r\n" + b"w" * 700 + b"\r") * 20}
    for name, raw in cases.items():
        path = tmp_path / name
        path.write_bytes(raw)
        prepare(tmp_path / "tokens.npy", [path])
        tokens = np.load(tmp_path / "tokens.npy").astype(np.uint8).tobytes()
        assert tokens == path.read_text().encode() and b"\r" not in tokens, name
    # A CRLF between two lines of text is an ordinary cut: a piece every block read.
    pieces = list(data.text_pieces(tmp_path / "crlf.txt"))
    assert len(pieces) >= len(cases["crlf.txt"]) // 1024 and all(p.endswith(("1\n", "2\n")) for p in pieces)


def test_each_document_ends_with_the_separator(tmp_path: Path, monkeypatch, fails_in_one_line) -> None:
    """--separator: the token follows each file with text (not an empty one), also where
    a file is read in several pieces and batches, and only there: a text that writes the
    token out is read as text. The sidecar records its id; the learned tokenizer holds
    it as one token."""
    pytest.importorskip("tokenizers")
    from streamer import data
    from streamer.data import HFTokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    inputs = [stdlib / "textwrap.py", tmp_path / "empty.txt", stdlib / "argparse.py", tmp_path / "about.txt"]
    inputs[1].write_text("")
    inputs[3].write_text("GPT-2 ends its documents with <|endoftext|>, a token of its own.\n")
    monkeypatch.setattr(data, "PIECE_BYTES", 8192)
    monkeypatch.setattr(data, "BATCH_BYTES", 20_000)
    out = tmp_path / "tokens.npy"
    meta = prepare(out, inputs, train_vocab=400, separator="<|endoftext|>")
    tokenizer = HFTokenizer(tmp_path / "tokens.tokenizer.json")
    separator = tokenizer.token_id("<|endoftext|>")
    assert meta["separator"] == separator is not None
    expected = []
    for path in (inputs[0], inputs[2], inputs[3]):
        expected += tokenizer.encode_pieces([path.read_text()])[0].tolist() + [separator]
    tokens = np.load(out).tolist()
    assert tokens == expected and tokens.count(separator) == 3  # the text's own "<|endoftext|>" is text
    assert json.loads(meta_path(out).read_text())["separator"] == separator
    learned = str(tmp_path / "tokens.tokenizer.json")
    fails_in_one_line("prepare", {
        "bytes have no token to spare": ([str(inputs[0]), "--out", str(tmp_path / "t.npy"), "--separator", "x"],
                                         ["--separator needs a tokenizer", "--train-tokenizer"]),
        "not a token": ([str(inputs[0]), "--out", str(tmp_path / "t.npy"), "--tokenizer", learned,
                         "--separator", "<|im_end|>"], ["'<|im_end|>' is not a token of"]),
        "empty": ([str(inputs[0]), "--out", str(tmp_path / "t.npy"), "--train-tokenizer", "300",
                   "--separator", ""], ["--separator is empty"]),
    })
    assert not (tmp_path / "t.npy").exists()


def _two_files(tmp_path: Path, sizes: tuple[int, int] = (20_000, 5_000)) -> list[Path]:
    """Two token files whose ids tell them apart: the first's below 100, the second's above."""
    paths = [tmp_path / "low.npy", tmp_path / "high.npy"]
    for path, size, base in zip(paths, sizes, (0, 100)):
        save_npy(path, (base + np.arange(size) % 100).astype(np.uint16))
    return paths


def test_a_mixture_draws_each_file_by_its_share(tmp_path: Path) -> None:
    """[Note: data mixtures]: each window is one file's, drawn by the files' shares
    (given, or by default their sizes), from anywhere in it; the draw is a function of
    (seed, step); one file is sampled as it always was."""
    from streamer.data import Mixture, load_data

    paths = _two_files(tmp_path)
    mixture = load_data(paths, [1, 3], 256)
    assert isinstance(mixture, Mixture) and mixture.weights == (0.25, 0.75)
    assert load_data(paths, None, 256).weights == (0.8, 0.2)
    assert isinstance(load_data(paths[:1], None, 256), np.ndarray)
    sampler = BatchSampler(mixture, 16, seed=0)
    x = np.concatenate([sampler.global_batch(step, 64)[0] for step in range(40)])
    from_high = x[:, 0] >= 100
    assert ((x < 100).all(1) | (x >= 100).all(1)).all()  # no window crosses from one file to the other
    assert 0.72 < from_high.mean() < 0.78  # 2,560 draws of a 3/4 share: within 3.5 standard deviations
    starts = x[~from_high, 0]
    assert len(np.unique(starts)) == 100  # anywhere in the file (all 100 residues)
    again = BatchSampler(mixture, 16, seed=0)
    np.testing.assert_array_equal(sampler.global_batch(7, 8)[0], again.global_batch(7, 8)[0])


def test_a_mixture_holds_out_each_files_tail_and_evaluates_by_the_shares(tmp_path: Path) -> None:
    """Each file keeps its own tail; an evaluation reads every tail, as many windows
    from each as its share."""
    from streamer.data import Mixture, load_data

    mixture = load_data(_two_files(tmp_path), [1, 3], 256)
    train_part, held = holdout_split(mixture, 0.1, 16)
    assert isinstance(held, Mixture) and [p.size for p in held.parts] == [2_000, 500]
    assert [p.size for p in train_part.parts] == [18_000, 4_500]
    assert np.shares_memory(held.parts[1], mixture.parts[1])  # views of each file's tail
    x, y = eval_windows(held, 16, 8)
    assert len(x) == 8 and (x[:, 0] < 100).sum() == 2 and (x[:, 0] >= 100).sum() == 6
    np.testing.assert_array_equal(y[:, :-1], x[:, 1:])
    with pytest.raises(UserError, match="the held-out part of '.*high.npy' .* shorter than one sequence"):
        holdout_split(load_data(_two_files(tmp_path, (20_000, 100)), None, 256), 0.1, 16)


def test_a_mixture_of_unlike_files_is_refused(tmp_path: Path) -> None:
    from streamer.data import load_data

    paths = _two_files(tmp_path)
    with pytest.raises(UserError, match="2 weights for 3 data files"):
        load_data([*paths, paths[0]], [1, 2], 256)
    with pytest.raises(UserError, match="--data-weights must be positive numbers, got 1 0"):
        load_data(paths, [1, 0], 256)
    for path, tokenizer in zip(paths, ("bytes", "/data/gpt2/tokenizer.json")):
        meta_path(path).write_text(json.dumps({"tokenizer": tokenizer, "vocab_size": 256}))
    with pytest.raises(UserError, match="prepared with different tokenizers: .*low.npy' \\(bytes\\)"):
        load_data(paths, None, 256)
    # One tokenizer.json named by two paths (a copy) is one tokenizer; another file's is not.
    (tmp_path / "a.json").write_text('{"model": "one"}')
    (tmp_path / "b.json").write_text('{"model": "one"}')
    (tmp_path / "c.json").write_text('{"model": "two"}')
    for path, tokenizer in zip(paths, ("a.json", "b.json")):
        meta_path(path).write_text(json.dumps({"tokenizer": str(tmp_path / tokenizer), "vocab_size": 256}))
    assert load_data(paths, None, 256).weights == (0.8, 0.2)
    meta_path(paths[1]).write_text(json.dumps({"tokenizer": str(tmp_path / "c.json"), "vocab_size": 256}))
    with pytest.raises(UserError, match="different tokenizers"):
        load_data(paths, None, 256)


DOCUMENTS = ["def f():\n    return 1\n", "caf\u00e9 \u2713\r\nline two", "", "x = [1, 2]\n" * 300]


def _compress(path: Path, suffix: str) -> Path:
    """`path` compressed as `suffix` says, beside it."""
    import bz2
    import gzip
    import lzma

    raw = path.read_bytes()
    if suffix == ".zst":
        packed = pytest.importorskip("zstandard").ZstdCompressor().compress(raw)
    else:
        packed = {"": lambda b: b, ".gz": gzip.compress, ".bz2": bz2.compress, ".xz": lzma.compress}[suffix](raw)
    out = path.with_name(path.name + suffix)
    out.write_bytes(packed)
    return out


@pytest.mark.parametrize("suffix", ["", ".gz", ".bz2", ".xz", ".zst"])
def test_json_lines_and_compressed_files_are_read_as_their_documents(tmp_path: Path, monkeypatch,
                                                                     suffix: str) -> None:
    """A .jsonl line is a document, its text in a field (one longer than a piece is cut
    as a file is); blank lines and empty texts are none; compressed files, JSON Lines
    or text, are read decompressed; each document is followed by the separator."""
    from streamer import data

    monkeypatch.setattr(data, "PIECE_BYTES", 1024)
    lines = [json.dumps({"text": text, "meta": {"source": i}}) for i, text in enumerate(DOCUMENTS)]
    (tmp_path / "corpus.jsonl").write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
    (tmp_path / "story.txt").write_text("Once upon a time.\r\nThe end.\n")
    inputs = [_compress(tmp_path / "corpus.jsonl", suffix), _compress(tmp_path / "story.txt", suffix)]
    meta = prepare(tmp_path / "tokens.npy", inputs)
    texts = [t.replace("\r\n", "\n") for t in DOCUMENTS if t] + ["Once upon a time.\nThe end.\n"]
    assert np.load(tmp_path / "tokens.npy").astype(np.uint8).tobytes() == "".join(texts).encode()
    assert meta["n_documents"] == 4 and meta["n_files"] == 2

    pytest.importorskip("tokenizers")
    meta = prepare(tmp_path / "bpe.npy", inputs, train_vocab=300, separator="<|endoftext|>")
    tokens = np.load(tmp_path / "bpe.npy").tolist()
    assert tokens.count(meta["separator"]) == 4 and tokens[-1] == meta["separator"]


def test_unreadable_json_lines_and_archives_are_one_clear_error(tmp_path: Path, monkeypatch) -> None:
    """Nothing is written, and the message names the file, the line and the fix."""
    import gzip
    import sys

    cases = {
        "bad.jsonl": (b'{"text": "a"}\n{"text": oops}\n', "'.*bad.jsonl' line 2 is not JSON"),
        "field.jsonl": (b'{"body": "abc"}\n', "line 1 has no 'text' string: .* --text-field"),
        "cut.txt.gz": (gzip.compress(b"some text\n" * 1000)[:40], "cannot read '.*cut.txt.gz'"),
        "a.jsonl.zst": (b"(\xb5/\xfd", "zstd-compressed: pip install zstandard, or decompress it first"),
    }
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as where it is not installed
    for name, (raw, message) in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(UserError, match=message):
            prepare(tmp_path / "tokens.npy", [tmp_path / name])
    assert not (tmp_path / "tokens.npy").exists()
    from streamer.data import JsonLines

    assert prepare(tmp_path / "tokens.npy", [tmp_path / "field.jsonl"], lines=JsonLines("body"))["n_tokens"] == 3
    with pytest.raises(UserError, match="--where takes FIELD=VALUE .*, got 'meta'"):
        JsonLines.parse("text", ["meta"])
    (tmp_path / "plain.txt").write_text("no documents to choose among")
    with pytest.raises(UserError, match="no input is JSON Lines"):
        prepare(tmp_path / "tokens.npy", [tmp_path / "plain.txt"], lines=JsonLines.parse("text", ["a=b"]))


def test_where_keeps_the_documents_whose_fields_hold_the_values(tmp_path: Path) -> None:
    """--where FIELD=VALUE, nested fields dotted, numbers as their JSON text, every
    condition met; the sidecar records the conditions."""
    from streamer.data import JsonLines

    records = [{"text": "alpha ", "meta": {"pile_set_name": "Github", "stars": 5}},
               {"text": "beta ", "meta": {"pile_set_name": "ArXiv", "stars": 5}},
               {"text": "gamma ", "meta": {"pile_set_name": "Github", "stars": 7}},
               {"text": "delta ", "meta": "not an object"}]
    path = tmp_path / "pile.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cases = {("meta.pile_set_name=Github",): "alpha gamma ", ("meta.pile_set_name=Github", "meta.stars=7"): "gamma ",
             ("meta.stars=5",): "alpha beta "}
    for where, text in cases.items():
        meta = prepare(tmp_path / "tokens.npy", [path], lines=JsonLines.parse("text", list(where)))
        assert np.load(tmp_path / "tokens.npy").astype(np.uint8).tobytes() == text.encode(), where
        assert meta["where"] == list(where) and meta["n_documents"] == text.count(" ")
    with pytest.raises(UserError, match="no document of the inputs meets --where meta.pile_set_name=Wiki"):
        prepare(tmp_path / "tokens.npy", [path], lines=JsonLines.parse("text", ["meta.pile_set_name=Wiki"]))
    # A plain text file among them would pass whole, whatever --where says; --text-field
    # without a JSON Lines input names nothing.
    (tmp_path / "notes.txt").write_text("epsilon ")
    with pytest.raises(UserError, match="notes.txt' is not JSON Lines: it would be taken whole"):
        prepare(tmp_path / "tokens.npy", [path, tmp_path / "notes.txt"],
                lines=JsonLines.parse("text", ["meta.stars=5"]))
    with pytest.raises(UserError, match="--text-field names the field of JSON Lines documents.*--text-field body"):
        prepare(tmp_path / "tokens.npy", [tmp_path / "notes.txt"], lines=JsonLines.parse("body", None))


def test_a_folders_hidden_compiled_and_binary_files_are_left_out(tmp_path: Path) -> None:
    """A project folder: its text and compressed files are read; its .git, __pycache__
    and binary files (a token file) are not, and are counted; a binary file named
    on its own is read as asked."""
    import gzip

    folder = tmp_path / "project"
    for name, raw in {"main.py": b"print(1)\n", "notes/a.txt": b"notes\n", "data.txt.gz": gzip.compress(b"zipped\n"),
                      ".git/objects/ab": b"x\x00y", "__pycache__/main.cpython-311.pyc": b"\x00\x01",
                      "tokens.npy": b"\x93NUMPY\x01\x00"}.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(raw)
    meta = prepare(tmp_path / "tokens.npy", [folder])
    assert np.load(tmp_path / "tokens.npy").astype(np.uint8).tobytes() == b"zipped\nprint(1)\nnotes\n"
    assert meta["n_files"] == 3 and meta["n_skipped"] == 3
    assert prepare(tmp_path / "named.npy", [folder / "tokens.npy"])["n_tokens"] == 10  # 0x93 read as U+FFFD
    with pytest.raises(UserError, match="the inputs hold no text file"):
        prepare(tmp_path / "none.npy", [folder / "__pycache__"])


def test_held_out_documents_are_drawn_over_the_corpus_and_never_cut(tmp_path: Path, monkeypatch,
                                                                     fails_in_one_line) -> None:
    """prepare --eval-out: each document, whole, goes to one file or the other, by a hash
    of its place (read in pieces, a long one too); the two files hold every document
    once, in order, and the same inputs split the same way again."""
    from streamer import data

    monkeypatch.setattr(data, "PIECE_BYTES", 4096)  # the long document is read in pieces
    folder = tmp_path / "docs"
    folder.mkdir()
    texts = [f"document {k}: " + "text " * (3000 if k == 7 else k + 1) + "\n" for k in range(40)]
    for k, text in enumerate(texts):
        (folder / f"{k:02d}.txt").write_text(text)
    train_file, held_file = tmp_path / "train.npy", tmp_path / "held.npy"
    meta = prepare(train_file, [folder], eval_out=held_file, eval_fraction=0.25)
    held = [k for k in range(40) if data._held_out(k, 0.25)]
    assert 4 <= len(held) <= 16  # about a quarter of them, spread by the hash
    as_bytes = [np.frombuffer(t.encode(), np.uint8) for t in texts]
    assert np.load(train_file).astype(np.uint8).tobytes() == b"".join(
        as_bytes[k].tobytes() for k in range(40) if k not in held)
    assert np.load(held_file).astype(np.uint8).tobytes() == b"".join(as_bytes[k].tobytes() for k in held)
    held_meta = json.loads(meta_path(held_file).read_text())
    assert meta["n_documents"] == 40 - len(held) and held_meta["n_documents"] == len(held)
    assert held_meta["split"] == meta["split"] == {"eval_fraction": 0.25, "training": str(train_file),
                                                   "held_out": str(held_file)}
    assert held_meta["tokenizer"] == meta["tokenizer"] and held_meta["n_tokens"] == np.load(held_file).size
    again = tmp_path / "again.npy"
    prepare(again, [folder], eval_out=tmp_path / "again-held.npy", eval_fraction=0.25)
    assert np.load(again).tobytes() == np.load(train_file).tobytes()
    x, y, z = (str(tmp_path / name) for name in ("x.npy", "y.npy", "z.npy"))
    quiet = ["--no-progress", str(folder)]
    fails_in_one_line("prepare", {
        "the same file": ([*quiet, "--out", x, "--eval-out", x], ["--eval-out", "is --out itself"]),
        "a fraction of 1": ([*quiet, "--out", y, "--eval-out", z, "--eval-fraction", "1"],
                            ["--eval-fraction must be a fraction", "got 1.0"]),
        "a fraction without a file": ([*quiet, "--out", y, "--eval-fraction", "0.1"], ["add --eval-out FILE"]),
        "a folder for the file": ([*quiet, "--out", str(folder)], ["--out '", "is a folder", "name the token file"]),
        "a folder for the held-out file": ([*quiet, "--out", y, "--eval-out", str(tmp_path)],
                                           ["--eval-out '", "is a folder"]),
        "nothing held out": (["--no-progress", str(folder / "00.txt"), "--out", y, "--eval-out", z],
                             ["held out none of the 1 documents", "raise it"]),
    })
    assert not any((tmp_path / name).exists() for name in ("x.npy", "y.npy", "z.npy"))
