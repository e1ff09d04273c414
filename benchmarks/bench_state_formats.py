"""The host state's formats (fp32, compact, compact8) trained on the same work.

float32 (16 bytes per parameter) against compact (about 6: bf16 weights with
stochastic rounding, 8-bit log-coded moments) and compact8 (about 5: compact with the
gradient coded in 8 bits too).

Trains the same model from the same initial weights on the same real-text batches with
each format, streamed from the RAM tier, and reports the loss curves and their largest
gaps from float32's, the loss on held-out text (the data's tail, never trained on: the
same windows for every format and every evaluation, so the comparison is not one step's
batch noise), the state's bytes, the peak resident memory, the host update rate each format
reached in the run, tokens/s and the planner's predicted step time. This is what the
compact formats trade: memory for update compute, at a measured cost in loss.

    python benchmarks/bench_state_formats.py --model gpt3-125m --steps 24 --eval-every 6 \\
        --json benchmarks/results/state_formats_cpu.json
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, machine, machine_line, pyplot, read_metrics, run_child, streamer_train_cmd, write_json  # noqa: E402

from models import ModelConfig  # noqa: E402
from streamer.state import FORMATS  # noqa: E402

STATES = ("fp32", "compact", "compact8")


def run(args: argparse.Namespace, state: str, scratch: Path) -> dict:
    out = scratch / state
    cmd = streamer_train_cmd(model=args.model, mode="stream", offload="ram", state=state, steps=args.steps,
                             batch_size=args.batch_size, seq_len=args.seq_len, warmup=2, lr=args.lr,
                             device="cpu", out=out, eval_every=args.eval_every, eval_tokens=args.eval_tokens)
    run_child(cmd)
    rows = read_metrics(out)
    # The first step has no update; the second calibrates the prediction. A step right
    # after an evaluation has no update either (the evaluation applied it): not timed.
    timed = [r for r, before in zip(rows[2:], rows[1:]) if "eval_loss" not in before]
    owned = ModelConfig.from_name(args.model).n_params()
    return {
        "state": state,
        "bytes_per_param": FORMATS[state].bytes_per_param(),
        "state_gib": FORMATS[state].bytes_per_param() * owned / 2**30,
        "losses": [r["loss"] for r in rows],
        "eval_steps": [r["step"] for r in rows if "eval_loss" in r],
        "eval_losses": [r["eval_loss"] for r in rows if "eval_loss" in r],
        "eval_tokens": next(r["eval_tokens"] for r in rows if "eval_loss" in r),
        "step_s": min(r["step_s"] for r in timed),  # the fastest: contention only adds time
        "predicted_step_s": statistics.median(r["predicted_step_s"] for r in timed),
        # Step by step, prediction against measurement: this machine's rate drifts
        # within a run, so the fastest step and the median prediction are no pair.
        "prediction_error": statistics.median(r["predicted_step_s"] / r["step_s"] - 1 for r in timed),
        "step_times": [r["step_s"] for r in rows],
        "predicted_step_times": [r.get("predicted_step_s") for r in rows],
        "tokens_per_s": rows[0]["tokens"] / min(r["step_s"] for r in timed),
        "update_s": statistics.median(r["update_s"] for r in timed),
        "update_params_per_s": owned / statistics.median(r["update_s"] for r in timed),
        "peak_rss_bytes": max(r["peak_rss_bytes"] for r in rows),
        "predicted_peak_bytes": rows[-1]["predicted_peak_bytes"],
    }


def plot(runs: list[dict], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r, style, color in zip(runs, ("o-", "s--", "^:"), ("C0", "C1", "C2")):
        ax.plot(r["losses"], style, color=color, markersize=3,
                label=f"{r['state']} ({r['bytes_per_param']:.2f} bytes/parameter)")
        ax.plot(r["eval_steps"], r["eval_losses"], "D", color=color, markersize=6, fillstyle="none",
                label=f"{r['state']}, held-out")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt3-125m")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=6e-4)
    parser.add_argument("--eval-every", type=int, default=6, help="steps between held-out evaluations")
    parser.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens per evaluation")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    info = machine()
    scratch = Path(tempfile.mkdtemp(prefix="bench-states-", dir=RESULTS.parent))
    print(f"{args.model}, {args.batch_size} x {args.seq_len} tokens, {args.steps} steps: {machine_line(info)}")
    runs = [run(args, state, scratch) for state in STATES]
    shutil.rmtree(scratch, ignore_errors=True)
    exact = runs[0]
    for r in runs[1:]:  # each compact format against float32, step by step
        gaps = [abs(a - b) for a, b in zip(exact["losses"], r["losses"])]
        # The last tenth of the steps, averaged: one step's loss moves with rounding alone.
        late = max(5, len(gaps) // 10)
        relative = [(b - a) / a for a, b in zip(exact["losses"][-late:], r["losses"][-late:])]
        r.update(loss_gap_max=max(gaps), loss_gap_final=gaps[-1],
                 loss_gap_final_relative=gaps[-1] / exact["losses"][-1],
                 loss_gap_late_steps=late, loss_gap_late_relative=sum(relative) / late,
                 eval_gap_final_relative=(r["eval_losses"][-1] - exact["eval_losses"][-1]) / exact["eval_losses"][-1],
                 eval_gap_max=max(abs(a - b) for a, b in zip(exact["eval_losses"], r["eval_losses"])))
    print(f"{'state':<9}{'B/param':>8}{'state GiB':>10}{'peak GiB':>9}{'pred GiB':>9}{'step s':>8}{'pred s':>8}"
          f"{'pred err':>9}{'tok/s':>7}{'update s':>9}{'M params/s':>11}{'final loss':>11}{'held-out':>9}")
    for r in runs:
        print(f"{r['state']:<9}{r['bytes_per_param']:>8.2f}{r['state_gib']:>10.2f}{r['peak_rss_bytes'] / 2**30:>9.2f}"
              f"{r['predicted_peak_bytes'] / 2**30:>9.2f}{r['step_s']:>8.2f}{r['predicted_step_s']:>8.2f}"
              f"{r['prediction_error']:>+9.0%}"
              f"{r['tokens_per_s']:>7.0f}{r['update_s']:>9.2f}{r['update_params_per_s'] / 1e6:>11.1f}"
              f"{r['losses'][-1]:>11.4f}{r['eval_losses'][-1]:>9.4f}")
    for r in runs[1:]:
        print(f"{r['state']} against fp32, loss gap: largest {r['loss_gap_max']:.4f}, final {r['loss_gap_final']:.4f} "
              f"({r['loss_gap_final_relative']:.2%} of float32's final loss); over the last {r['loss_gap_late_steps']} "
              f"steps {r['loss_gap_late_relative']:+.2%} on average; held-out loss: largest gap "
              f"{r['eval_gap_max']:.4f} over {len(r['eval_losses'])} evaluations of {r['eval_tokens']} tokens, "
              f"final {r['eval_gap_final_relative']:+.2%}")
    stem = args.json.with_suffix("") if args.json else RESULTS / "state_formats_cpu"
    plot(runs, stem.with_suffix(".png"), f"{args.model}, stream (RAM tier); {machine_line(info)}")
    write_json(stem.with_suffix(".json"), {
        "model": args.model, "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps,
        "eval_every": args.eval_every, "eval_tokens": args.eval_tokens,
        "machine": info, "runs": runs,
    })


if __name__ == "__main__":
    main()
