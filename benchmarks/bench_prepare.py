"""Preparing a corpus: memory and speed of `streamer prepare`, which streams the text
through in pieces, against tokenizing each file whole in memory (what it did before).

A corpus of real text (the standard library's sources, repeated) is written as one
large file, the case that held everything in memory before: the whole text, its tokens
as Python integers, and the array made of them. Each preparation runs in a process of
its own, whose peak resident memory (VmHWM) is read at its end, and both ways must
write the same token file (their SHA-256 is compared). Two corpus sizes per tokenizer
show how the peak grows with the corpus: bytes, and a byte-level BPE learned from the
corpus's first 16 MB (`--train-tokenizer`'s kind).

    python benchmarks/bench_prepare.py --json benchmarks/results/prepare_cpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, machine_line, write_json  # noqa: E402

from streamer.data import ByteTokenizer, HFTokenizer, meta_path, prepare, train_tokenizer  # noqa: E402
from streamer.io import atomic_path  # noqa: E402

MB = 10**6


def write_corpus(path: Path, n_bytes: int) -> None:
    """Standard-library sources, repeated in order, to `n_bytes`, cut after a newline."""
    sources = [p.read_bytes() for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
               if "site-packages" not in p.parts]
    written = 0
    with open(path, "wb") as f:
        while written < n_bytes:
            for text in sources:
                text = text[: n_bytes - written]
                f.write(text)
                written += len(text)
                if written >= n_bytes:
                    break


def in_memory(out: Path, corpus: Path, tokenizer_path: Path | None) -> None:
    """The way before streaming: each file read, decoded and tokenized whole, the token
    arrays joined, and the file written from one buffer."""
    import io

    tokenizer = HFTokenizer(tokenizer_path) if tokenizer_path else ByteTokenizer()
    dtype = np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32
    chunks = [np.asarray(tokenizer.encode(corpus.read_text(encoding="utf-8", errors="replace")), dtype=dtype)]
    tokens = np.concatenate(chunks)
    buf = io.BytesIO()
    np.save(buf, tokens, allow_pickle=False)
    with atomic_path(out) as tmp:
        tmp.write_bytes(buf.getvalue())


def peak_rss() -> int:
    """This process's peak resident memory, in bytes: VmHWM, which starts afresh at exec
    (ru_maxrss would report the parent's peak, inherited across fork and exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc/self/status: this benchmark reads Linux's peak memory")


def child(way: str, corpus: Path, out: Path, tokenizer_path: Path | None) -> None:
    start_rss = psutil.Process().memory_info().rss
    start = time.perf_counter()
    if way == "streamed":
        prepare(out, [corpus], tokenizer_path)
    else:
        in_memory(out, corpus, tokenizer_path)
    seconds = time.perf_counter() - start
    peak = peak_rss()
    n_tokens = int(np.load(out, mmap_mode="r").size)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak / MB, "start_rss_mb": start_rss / MB,
                      "n_tokens": n_tokens, "sha256": hashlib.sha256(out.read_bytes()).hexdigest()}))


def measure(way: str, corpus: Path, out: Path, tokenizer_path: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--child", way, str(corpus), str(out), str(tokenizer_path or "")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{way} preparation of {corpus} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bytes-sizes", default="64,256", help="corpus sizes in MB for the byte tokenizer")
    parser.add_argument("--bpe-sizes", default="16,64", help="corpus sizes in MB for the learned BPE")
    parser.add_argument("--vocab", type=int, default=8192, help="the learned BPE's vocabulary")
    parser.add_argument("--json", type=Path, default=RESULTS / "prepare_cpu.json")
    parser.add_argument("--child", nargs=4, metavar=("WAY", "CORPUS", "OUT", "TOKENIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        way, corpus, out, tokenizer = args.child
        child(way, Path(corpus), Path(out), Path(tokenizer) if tokenizer else None)
        return

    info = machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sizes = [int(s) for s in args.bytes_sizes.split(",")] + [int(s) for s in args.bpe_sizes.split(",")]
        write_corpus(tmp / "sample.txt", 16 * MB)
        learned = train_tokenizer([tmp / "sample.txt"], args.vocab, tmp / "tokenizer.json")
        plan = [("bytes", int(s), None) for s in args.bytes_sizes.split(",")]
        plan += [(f"bpe-{args.vocab}", int(s), learned) for s in args.bpe_sizes.split(",")]
        for size in sorted(set(sizes)):
            write_corpus(tmp / f"corpus-{size}.txt", size * MB)
        for tokenizer, size, path in plan:
            corpus = tmp / f"corpus-{size}.txt"
            results = {}
            for way in ("in-memory", "streamed"):
                results[way] = measure(way, corpus, tmp / f"{way}.npy", path)
                (tmp / f"{way}.npy").unlink()
                meta_path(tmp / f"{way}.npy").unlink(missing_ok=True)
            same = results["in-memory"]["sha256"] == results["streamed"]["sha256"]
            if not same:
                raise SystemExit(f"{tokenizer} on {size} MB: the streamed token file differs from the in-memory one")
            for way, r in results.items():
                rows.append({"tokenizer": tokenizer, "corpus_mb": size, "way": way, "n_tokens": r["n_tokens"],
                             "seconds": round(r["seconds"], 2), "mb_per_s": round(size / r["seconds"], 1),
                             "peak_rss_mb": round(r["peak_rss_mb"]), "start_rss_mb": round(r["start_rss_mb"]),
                             "same_tokens": same})
                print(f"{tokenizer:>9} {size:>5} MB {way:>9}: {r['seconds']:6.1f} s, peak {r['peak_rss_mb']:7.0f} MB",
                      flush=True)

    print(f"\nPreparing one large file, {machine_line(info)}")
    print(f"{'tokenizer':>10} {'corpus':>8} {'way':>10} {'tokens':>12} {'MB/s':>7} {'peak RSS':>10} {'over start':>11}")
    for r in rows:
        print(f"{r['tokenizer']:>10} {r['corpus_mb']:>5} MB {r['way']:>10} {r['n_tokens']:>12,} {r['mb_per_s']:>7.1f} "
              f"{r['peak_rss_mb']:>7} MB {r['peak_rss_mb'] - r['start_rss_mb']:>8} MB")
    print("(both ways wrote byte-identical token files in every row)")
    write_json(args.json, {"benchmark": "prepare", "machine": info, "vocab": args.vocab, "rows": rows})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
