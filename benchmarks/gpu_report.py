"""The GPU targets, read off the result files the GPU scripts write, as one dated report.

`gpu_session.sh`'s stages each leave JSON (and the 20B run's metrics) in one folder
(from a remote runner, packed as `gpu_results.tar`: unpack it there first); this
script reads whatever of them is there and writes a markdown report naming the
device: every target with what was measured, the goal, and whether it was met. A
target whose file is missing, or whose file was not measured on a GPU, says so
instead of a number; the stages' times (`stages.log`) close the report.

    python benchmarks/gpu_report.py --results benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from models import ModelConfig  # noqa: E402

GB = 1e9


@dataclass(frozen=True)
class Row:
    target: str
    goal: str
    measured: str  # the figure, or why there is none
    met: bool | None  # None: not measured
    source: str


def _gpu_json(folder: Path, name: str) -> tuple[dict | None, str]:
    """The file's payload if it holds a GPU measurement; else None and why not."""
    path = folder / name
    if not path.exists():
        return None, f"not run ({name} missing)"
    payload = json.loads(path.read_text())
    if payload.get("device") != "cuda" or "gpu" not in payload.get("machine", {}):
        return None, f"not measured on a GPU ({name} says device {payload.get('device')!r})"
    return payload, ""


def limits_rows(folder: Path) -> tuple[list[Row], dict | None]:
    data, why = _gpu_json(folder, "device_limits_cuda.json")
    if data is None:
        return [Row("device limits", "measured first", why, None, "device_limits_cuda.json")], None
    lim = data["limits"]
    text = (f"bf16 matmul {lim['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s; pinned h2d {lim['h2d_bytes_per_s'] / GB:.1f}, "
            f"d2h {lim['d2h_bytes_per_s'] / GB:.1f}, both at once {lim.get('bidirectional_bytes_per_s', 0) / GB:.1f} "
            f"GB/s; HBM copy {lim['device_copy_bytes_per_s'] / GB:.0f} GB/s")
    return [Row("device limits", "measured first", text, True, "device_limits_cuda.json")], lim


def overlap_rows(folder: Path, limits: dict | None) -> list[Row]:
    data, why = _gpu_json(folder, "stream_vs_resident_cuda.json")
    source = "stream_vs_resident_cuda.json"
    if data is None:
        return [Row("1. overlap: gpt3-xl, RAM tier", ">= 0.95 of resident tokens/s", why, None, source),
                Row("1. link while streaming", ">= 85% of pinned h2d", why, None, source)]
    ratio = data["ratio_stream_over_resident"]
    how = f"state {data.get('state', 'fp32')}, {data.get('held_units', 0)} units held on the device"
    rows = [Row("1. overlap: gpt3-xl, RAM tier", ">= 0.95 of resident tokens/s",
                f"{ratio:.3f} at {data['recommended_tokens_per_step']:,} tokens/step (recommended; {how})",
                ratio >= 0.95, source)]
    copy = data.get("h2d_copy_gbps_at_recommended")
    if copy is None or limits is None:
        rows.append(Row("1. link while streaming", ">= 85% of pinned h2d",
                        "no copy timing" if copy is None else "no device limits to compare with", None, source))
    else:
        share = copy * GB / limits["h2d_bytes_per_s"]
        rows.append(Row("1. link while streaming", ">= 85% of pinned h2d",
                        f"{copy:.1f} GB/s while copying = {share:.0%} of {limits['h2d_bytes_per_s'] / GB:.1f}",
                        share >= 0.85, source))
    return rows


def neox_rows(folder: Path) -> tuple[list[Row], list[float]]:
    """The 20B run: peak device memory, loss over the steps, model FLOP/s; and the
    step-time prediction errors of its calibrated steps."""
    source = "train_neox20b_cuda.jsonl"
    path = folder / source
    goals = [("2. 20B: peak device memory", "<= 40 GB"), ("2. 20B: loss falls on real text", ">= 10 steps, falling"),
             ("2. 20B: model FLOP/s", ">= 300 TFLOP/s (6 x params x tokens + attention)")]
    if not path.exists():
        return [Row(t, g, f"not run ({source} missing)", None, source) for t, g in goals], []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows or not rows[0].get("peak_device_bytes"):
        return [Row(t, g, "no device memory in the metrics: not a GPU run", None, source) for t, g in goals], []
    peak = max(r["peak_device_bytes"] for r in rows)
    # What the caching allocator held besides (freed blocks kept for reuse), said beside it.
    reserved = max(r.get("peak_reserved_bytes", 0) for r in rows)
    memory = f"{peak / GB:.1f} GB allocated" + (f" ({reserved / GB:.1f} GB reserved)" if reserved else "")
    first, last = rows[0]["loss"], rows[-1]["loss"]
    per_token = ModelConfig.from_name("gpt-neox-20b").flops_per_token(2048)
    timed = rows[1:] or rows  # the first step also pays first-touch and allocation
    rate = statistics.median(r["tokens"] / r["step_s"] for r in timed) * per_token
    errors = [r["predicted_step_s"] / r["step_s"] - 1 for r in timed if r.get("prediction") == "calibrated"]
    return [
        Row(*goals[0], memory, peak <= 40e9, source),
        Row(*goals[1], f"{first:.2f} -> {last:.2f} over {len(rows)} steps", len(rows) >= 10 and last < first, source),
        Row(*goals[2], f"{rate / 1e12:.0f} TFLOP/s (median step after the first; {per_token / 1e9:.1f} GFLOP/token)",
            rate >= 300e12, source),
    ], errors


def sharded_rows(folder: Path) -> tuple[list[Row], list[float]]:
    rows, errors = [], []
    for model, name in (("gpt3-xl", "stream_vs_sharded_cuda.json"), ("gpt-j-6b", "stream_vs_sharded_gptj_cuda.json")):
        target, goal = f"3. stream vs FSDP2 + CPU offload: {model}", ">= 2x tokens/s"
        data, why = _gpu_json(folder, name)
        if data is None:
            rows.append(Row(target, goal, why, None, name))
            continue
        ratio = data["stream_over_sharded_tokens_per_s"]
        others = "".join(f"; AdamW on {u}: {r:.2f}x" for u, r in data.get("stream_over_sharded_by_update", {}).items()
                         if u != data["stream"].get("update_on", "host"))
        rows.append(Row(target, goal, f"{ratio:.2f}x ({data['stream']['tokens_per_s']:.0f} vs "
                        f"{data['sharded']['tokens_per_s']:.0f} tokens/s, the streamer's AdamW on "
                        f"{data['stream'].get('update_on', 'host')}{others}; losses agree: {data['losses_agree']})",
                        ratio >= 2.0, name))
        runs = [*data.get("streams", {"host": data["stream"]}).values(), data["sharded"]]
        errors += [r["prediction_error"] for r in runs if r.get("prediction_error") is not None]
    return rows, errors


def kernel_rows(folder: Path) -> list[Row]:
    source = "kernels_cuda.json"
    data, why = _gpu_json(folder, source)
    goals = [("4. kernels match the PyTorch reference", "every kernel, every case"),
             ("4. kernels: share of HBM bandwidth", ">= 50% at vocab 50432, hidden 6144, 1-5% rows")]
    if data is None:
        return [Row(t, g, why, None, source) for t, g in goals]
    # The compact AdamW kernel's rows (absent from results older than it): the kernel
    # alone counts towards the share; its check is against the PyTorch ops.
    updates = data.get("updates", [])
    worst = min([*data["rows"], *(r for r in updates if r["kernel"].endswith(" kernel"))],
                key=lambda r: r["share_of_copy"])
    largest = max(r["max_abs_diff"] for r in data["rows"])
    update_problems = sorted({p for r in updates for p in r["differences"]}) + \
        ([f"it failed to run ({data['update_error']})"] if "update_error" in data else [])
    update = ""
    if updates or update_problems:
        update = "; the AdamW kernel " + ("differs: " + "; ".join(update_problems) if update_problems
                                          else "matches the ops")
    where = (f"{worst['dtype']}, {worst['density']:.0%} rows" if "dtype" in worst
             else f"{worst['state']}, {worst['numel']} elements")
    return [
        Row(*goals[0], f"checked: {data['checked_against_reference']}; largest |difference| {largest:.2e}{update}",
            bool(data["checked_against_reference"]) and not update_problems, source),
        Row(*goals[1], f"lowest {worst['share_of_copy']:.0%} ({worst['kernel']}, {where})",
            worst["share_of_copy"] >= 0.5, source),
    ]


def planner_row(folder: Path, extra_errors: list[float]) -> Row:
    errors = list(extra_errors)
    data, _ = _gpu_json(folder, "stream_vs_resident_cuda.json")
    if data is not None:
        errors += [r["prediction_error"] for p in data["points"] for r in p["runs"]]
    if not errors:
        return Row("5. planner: step time predicted", "within 15% for every configuration", "nothing measured yet",
                   None, "all of the above")
    worst = max(errors, key=abs)
    return Row("5. planner: step time predicted", "within 15% for every configuration",
               f"largest error {worst:+.0%} over {len(errors)} runs", abs(worst) <= 0.15, "all of the above")


def report(folder: Path) -> tuple[str, list[Row]]:
    limit_rows, limits = limits_rows(folder)
    neox, neox_errors = neox_rows(folder)
    sharded, sharded_errors = sharded_rows(folder)
    rows = [*limit_rows, *overlap_rows(folder, limits), *neox, *sharded, *kernel_rows(folder),
            planner_row(folder, neox_errors + sharded_errors)]
    device = "no GPU result yet"
    for name in ("device_limits_cuda.json", "stream_vs_resident_cuda.json", "kernels_cuda.json"):
        data, _ = _gpu_json(folder, name)
        if data is not None:
            m = data["machine"]
            device = f"{m['gpu']}, host {m['cpu']} ({m['cores']} cores), torch {m['torch']}, measured {m['date']}"
            break
    mark = {True: "met", False: "**not met**", None: "not measured"}
    lines = [f"# GPU results, {time.strftime('%Y-%m-%d', time.gmtime())}", "", f"Device: {device}.", "",
             "| target | goal | measured | | from |", "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r.target} | {r.goal} | {r.measured} | {mark[r.met]} | `{r.source}` |" for r in rows]
    run_info = folder / "train_neox20b_cuda_run.json"
    if run_info.exists() and "startup" in (info := json.loads(run_info.read_text())):
        parts = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s"
                          for k, v in info["startup"].items() if k != "total_s")
        state = info.get("train", {}).get("state", "?")
        lines += ["", f"The 20B run (state {state}): start-up took {info['startup']['total_s']:.0f} s ({parts})."]
        if plan := info.get("plan"):  # the plan it started from, before its first step calibrated it
            tiers = (f"{plan['ram_units']} of {plan['n_units']} units in RAM" if plan["offload"] == "split"
                     else f"all {plan['n_units']} units {'in RAM' if plan['offload'] == 'ram' else 'on disk'}")
            lines[-1] += (f" Its plan: {tiers}, prefetch depth {plan['prefetch_depth']}, "
                          f"{plan.get('held_units', 0)} units held on the device, "
                          f"{plan['n_units'] - 2 - plan['kept_graphs']} blocks recomputed, predicted step "
                          f"{plan['predicted_step_s']:.1f} s and {plan['device_bytes'] / 2**30:.1f} GiB of device "
                          "memory.")
        if info.get("page_locked") is False and info.get("plan", {}).get("offload") in ("ram", "split"):
            lines[-1] += " **The RAM tier was not page-locked** (the driver refused): its copies were staged."
    tests = folder / "gpu_tests.log"
    if tests.exists() and (summary := [ln for ln in tests.read_text().splitlines() if " in " in ln and "passed" in ln]):
        lines += ["", f"GPU tests (`gpu_tests.log`): {summary[-1].strip('= ')}."]
    sampled, _ = _gpu_json(folder, "sample_cuda.json")
    if sampled is not None:  # no target of its own: what streamed sampling makes of the link
        parts = [f"{r['samples']} sample(s) {r['tokens_per_s']:.1f} tokens/s streamed, {r['link_gb_s']:.1f} GB/s of "
                 f"weights ({r['share_of_bound']:.2f} of the bound)" for r in sampled["rows"]
                 if r["mode"] == "stream" and "share_of_bound" in r]
        parts += [f"{r['samples']} sample(s) from disk (the page cache) {r['tokens_per_s']:.1f} tokens/s, "
                  f"{r['vs_stream']:.2f} of streaming's rate" for r in sampled["rows"]
                  if r["mode"] == "disk" and "vs_stream" in r]
        lines += ["", f"Sampling {sampled['model']} (`sample_cuda.json`, pinned link "
                  f"{sampled['link_bytes_per_s'] / GB:.1f} GB/s): {'; '.join(parts) or 'no streamed row'}."]
    stages = folder / "stages.log"
    if stages.exists():  # what each stage took: the next session's budget is planned from it
        lines += ["", "Stages (`stages.log`):", "", "```", *stages.read_text().splitlines(), "```"]
    return "\n".join(lines) + "\n", rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results")
    parser.add_argument("--out", type=Path, default=None, help="default: RESULTS/gpu_report_DATE.md")
    args = parser.parse_args()
    if not args.results.is_dir():
        parser.error(f"--results {args.results} is not a folder: give the folder the GPU scripts wrote")
    text, _ = report(args.results)
    out = args.out or args.results / f"gpu_report_{time.strftime('%Y-%m-%d', time.gmtime())}.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(out)
    print(text, end="")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
