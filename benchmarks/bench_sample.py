"""Sampling rates: the key-value cache against running the context again, and a model
streamed from host memory against the same model held whole on the device.

One model (random weights from its seed, exported as a checkpoint and read back as
`streamer sample` reads one) continues a prompt greedily in three ways, each timed over
the same new tokens after a warm-up:

- `uncached`: every new token runs the model over the whole context again (what
  `streamer sample` did before it kept a cache);
- `resident`: the model whole on the device, with a cache per block;
- `stream`: the weights in host memory (page-locked on CUDA), every unit copied to the
  device for its turn while the one before it computes ([Note: streamed sampling] in
  streamer/sample.py);
- `disk` (asked for with --modes): the weights left in the checkpoint's file, every
  unit read from it for every pass by a reader thread, ahead of its copy ([Note:
  streamed from disk] in streamer/inference.py). The file was just written, so the
  page cache holds it: this measures what reading it costs beside streaming, not the
  disk's rate.

A streamed token is one pass over the model, so on CUDA it takes at least the longer
of the resident pass and the weights' bytes over the link (the copies run beside the
compute); on a CPU, where the "link" is a memory copy in line with the compute, their
sum. The link's rate (pinned host-to-device copies on CUDA, a memory copy on a CPU) is
measured in the same run; the table gives each streamed pass against that bound (1.00:
the bound reached) and the rate at which the weights came in.

    python benchmarks/bench_sample.py --modes uncached,resident,stream,disk --json benchmarks/results/sample_cpu.json
    python benchmarks/bench_sample.py --model gpt3-xl --device cuda --json benchmarks/results/sample_cuda.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, machine_line, write_json  # noqa: E402

from models import GPT, ModelConfig  # noqa: E402
from streamer.inference import load_model, stream_model  # noqa: E402
from streamer.planner import measure_copy_bandwidth  # noqa: E402
from streamer.sample import SampleConfig, generate  # noqa: E402
from streamer.train import save_final  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def uncached(model: GPT, prompt: list[int], new_tokens: int, samples: int) -> list[list[int]]:
    """Greedy, every token from the whole context run again."""
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt] * samples, device=device)
    for _ in range(new_tokens):
        following = model(tokens[:, -model.cfg.block_size:])[:, -1].argmax(-1, keepdim=True)
        tokens = torch.cat([tokens, following], dim=1)
    return tokens[:, len(prompt):].tolist()


def timed_tokens(run, tokens: int, warmup: int, device: torch.device, repeat: int) -> tuple[float, list]:  # noqa: ANN001
    """Median seconds per new token: a run of `warmup + tokens` less one of `warmup`
    (the prompt's pass and the warm-up cancel), and the longer run's continuation."""
    run(warmup)
    times, out = [], None
    for _ in range(repeat):
        sync(device)
        started = time.perf_counter()
        run(warmup)
        sync(device)
        short = time.perf_counter() - started
        started = time.perf_counter()
        out = run(warmup + tokens)
        sync(device)
        times.append((time.perf_counter() - started - short) / tokens)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt3-125m")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto")
    parser.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (bf16 on CUDA)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=8, help="new tokens timed (after the warm-up's)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--samples", default="1,4", help="batch sizes: samples drawn together")
    parser.add_argument("--modes", default="uncached,resident,stream")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from streamer.train import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    modes = args.modes.split(",")
    cfg = ModelConfig.from_name(args.model)
    prompt = [(17 * i + 3) % cfg.vocab_size for i in range(args.prompt_tokens)]
    if args.prompt_tokens + args.warmup + args.tokens > cfg.block_size:
        parser.error(f"--prompt-tokens + --warmup + --tokens must fit {cfg.name}'s context of {cfg.block_size}")
    info = machine()
    h2d, _ = measure_copy_bandwidth(device)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sample-") as folder:
        model = GPT(cfg)
        model.init_weights(0)
        state = {k: v.to(dtype) for k, v in model.state_dict().items()}
        del model
        final = save_final([lambda: state], cfg, Path(folder))
        state.clear()  # the file holds them now
        weight_bytes = cfg.n_params() * torch.finfo(dtype).bits // 8
        held = load_model(final, cfg, device, dtype) if {"uncached", "resident"} & set(modes) else None
        streamed = stream_model(final, cfg, device, dtype) if "stream" in modes else None
        from_disk = stream_model(final, cfg, device, dtype, from_disk=True) if "disk" in modes else None
        for samples in [int(s) for s in args.samples.split(",")]:
            runs = {
                "uncached": lambda n, s=samples: uncached(held, prompt, n, s),
                "resident": lambda n, s=samples: generate(held, prompt, SampleConfig(n, temperature=0), samples=s),
                "stream": lambda n, s=samples: generate(streamed, prompt, SampleConfig(n, temperature=0), samples=s),
                "disk": lambda n, s=samples: generate(from_disk, prompt, SampleConfig(n, temperature=0), samples=s),
            }
            outputs = {}
            for mode in modes:
                seconds, outputs[mode] = timed_tokens(runs[mode], args.tokens, args.warmup, device, args.repeat)
                rows.append({"mode": mode, "samples": samples, "s_per_token": seconds,
                             "tokens_per_s": samples / seconds})
            # Every way gives the same greedy text (float32; bfloat16 may round apart).
            rows[-1]["same_text"] = len({str(o) for o in outputs.values()}) == 1
        for weights in (streamed, from_disk):
            if weights is not None:
                weights.close()

    by = {(r["mode"], r["samples"]): r for r in rows}
    for r in rows:
        resident = by.get(("resident", r["samples"]))
        if "uncached" in modes and resident and r["mode"] == "resident":
            r["vs_uncached"] = by[("uncached", r["samples"])]["s_per_token"] / r["s_per_token"]
        if r["mode"] == "disk":
            r["read_gb_s"] = weight_bytes / r["s_per_token"] / 1e9  # from the page cache: see the docstring
            if ("stream", r["samples"]) in by:
                r["vs_stream"] = by[("stream", r["samples"])]["s_per_token"] / r["s_per_token"]
        if r["mode"] == "stream":
            r["link_gb_s"] = weight_bytes / r["s_per_token"] / 1e9
            if resident:
                # On CUDA the copies run beside the compute; on a CPU they run in line.
                link_s = weight_bytes / h2d
                bound = (max if device.type == "cuda" else sum)((resident["s_per_token"], link_s))
                r["bound_s"] = bound
                r["share_of_bound"] = bound / r["s_per_token"]

    print(f"sampling {cfg.name} ({cfg.n_params() / 1e9:.2f}B, {weight_bytes / 1e9:.2f} GB in "
          f"{str(dtype).removeprefix('torch.')}) on {device.type}: prompt {args.prompt_tokens}, {args.tokens} "
          f"tokens timed; link {h2d / 1e9:.1f} GB/s")
    print(f"{machine_line(info)}")
    print(f"{'mode':>9} {'samples':>7} {'s/token':>9} {'tokens/s':>9} {'vs uncached':>11} {'link GB/s':>9} "
          f"{'of bound':>8} {'read GB/s':>9} {'vs stream':>9}")
    for r in rows:
        def cell(key: str, fmt: str, width: int, r: dict = r) -> str:
            return format(r[key], fmt).rjust(width) if key in r else "-".rjust(width)
        print(f"{r['mode']:>9} {r['samples']:>7} {r['s_per_token']:>9.4f} {r['tokens_per_s']:>9.1f} "
              f"{cell('vs_uncached', '.1f', 11)} {cell('link_gb_s', '.1f', 9)} {cell('share_of_bound', '.2f', 8)} "
              f"{cell('read_gb_s', '.1f', 9)} {cell('vs_stream', '.2f', 9)}")
    same = all(r.get("same_text", True) for r in rows)
    print(f"the same greedy text from every way: {same}")
    write_json(args.json or RESULTS / f"sample_{device.type}.json", {
        "machine": info, "model": cfg.name, "device": device.type, "dtype": str(dtype).removeprefix("torch."),
        "prompt_tokens": args.prompt_tokens, "tokens": args.tokens, "weight_bytes": weight_bytes,
        "link_bytes_per_s": h2d, "rows": rows, "same_text": same,
    })


if __name__ == "__main__":
    main()
