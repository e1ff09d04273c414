"""What attention within documents costs: `train --document-mask` against causal attention.

The same model, data, windows and steps are trained twice in processes of their own,
once attending across the documents of a window (the fused causal kernel: flash
attention on a GPU) and once within each document ([Note: documents in a window] in
models/gpt.py: a boolean mask per window, which takes attention onto the kernel that
reads one, and position embeddings counted from each document's start). The first step
of each is warm-up; the fastest timed step is reported, with the median. The data is
real text (the standard library's sources as bytes), each paragraph made a document
by a separator after it, as `streamer prepare --separator` would end them; the table
gives the documents' mean length, since a window of many short documents is where the
mask changes the most (it is dense, so its cost does not depend on that).

    python benchmarks/bench_document_mask.py --json benchmarks/results/document_mask_cpu.json
    python benchmarks/bench_document_mask.py --model gpt3-xl --device cuda --seq-len 2048 --batch-size 4 \\
        --json benchmarks/results/document_mask_cuda.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import sysconfig
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, machine_line, read_metrics, run_child, streamer_train_cmd, write_json  # noqa: E402

from streamer.data import meta_path, prepare  # noqa: E402

SEPARATOR = 0  # a byte that source text never holds


def documents(path: Path) -> dict:
    """The standard library's sources as bytes, a separator after each blank line."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    prepare(path, sorted(stdlib.glob("*.py"))[:80])
    text = np.load(path)
    ends = np.flatnonzero((text[:-1] == ord("\n")) & (text[1:] == ord("\n"))) + 2
    np.save(path, np.insert(text, ends, SEPARATOR).astype(np.uint16))
    meta = json.loads(meta_path(path).read_text())
    meta.update(separator=SEPARATOR, n_documents=len(ends) + 1, n_tokens=int(len(text) + len(ends)))
    meta_path(path).write_text(json.dumps(meta))
    return {"tokens": meta["n_tokens"], "documents": meta["n_documents"],
            "mean_document_tokens": meta["n_tokens"] / meta["n_documents"]}


def run(args: argparse.Namespace, data: Path, scratch: Path, masked: bool, mode: str) -> dict:
    out = scratch / f"{mode}-{'masked' if masked else 'causal'}"
    flags = {"offload": "ram"} if mode == "stream" else {}
    cmd = streamer_train_cmd(model=args.model, mode=mode, steps=args.steps, batch_size=args.batch_size,
                             seq_len=args.seq_len, device=args.device, data=data, out=out, warmup=1, **flags,
                             **({"document_mask": True} if masked else {}))
    run_child(cmd)
    rows = read_metrics(out)[1:]
    step_s = min(r["step_s"] for r in rows)
    return {"mode": mode, "attention": "within documents" if masked else "causal", "step_s": step_s,
            "step_s_median": statistics.median(r["step_s"] for r in rows), "tokens_per_s": rows[0]["tokens"] / step_s,
            "peak_device_bytes": max(r.get("peak_device_bytes", 0) for r in rows),
            "loss": [r["loss"] for r in rows]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt3-125m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5, help="the first is warm-up")
    parser.add_argument("--modes", default="resident,stream", help="resident, stream (from the RAM tier)")
    parser.add_argument("--json", type=Path, default=RESULTS / "document_mask_cpu.json")
    args = parser.parse_args()
    info = machine()
    print(f"# {machine_line(info)}")
    with tempfile.TemporaryDirectory(prefix="document-mask-") as tmp:
        scratch = Path(tmp)
        data = scratch / "documents.npy"
        corpus = documents(data)
        print(f"{args.model} on {args.device}, {args.batch_size} x {args.seq_len} tokens a step; documents of "
              f"{corpus['mean_document_tokens']:.0f} tokens on average ({corpus['documents']:,} of them)")
        rows = [run(args, data, scratch, masked, mode) for mode in args.modes.split(",") for masked in (False, True)]
    print(f"\n{'mode':<10}{'attention':<18}{'step s':>9}{'median':>9}{'tokens/s':>10}{'vs causal':>11}")
    for row in rows:
        causal = next(r for r in rows if r["mode"] == row["mode"] and r["attention"] == "causal")
        row["vs_causal"] = row["tokens_per_s"] / causal["tokens_per_s"]
        print(f"{row['mode']:<10}{row['attention']:<18}{row['step_s']:>9.3f}{row['step_s_median']:>9.3f}"
              f"{row['tokens_per_s']:>10.0f}{row['vs_causal']:>11.3f}")
    write_json(args.json, {"benchmark": "document_mask", "machine": info, "corpus": corpus,
                           "config": {k: v for k, v in vars(args).items() if k != "json"}, "rows": rows})
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
