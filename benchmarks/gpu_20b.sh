#!/usr/bin/env bash
# GPT-NeoX 20B on one GPU (a separate device call from gpu_session.sh: about 8 minutes).
# The compact state (about 6 bytes per parameter, 115 GiB) fits neither a 128 GiB host's
# RAM nor its 64 GiB disk alone, so the planner splits it (the leading units in RAM, the
# rest on disk); AdamW and the 8-bit moments' coding run on the GPU (--update-on device)
# because host cores code them ~70x slower than float32 AdamW. The RAM part is
# page-locked, so state, weights and gradients cross the link by DMA. 18 sequences of
# 2048 per step, one per micro-batch: with the h200 profile's disk (3 GB/s read, 2 GB/s
# write) the planner's step at 36,864 tokens is 17.4 s, ~270 TFLOP/s of model FLOPs
# (6 x parameters x tokens plus attention), with 35.8 GiB of device memory; the disk
# part's update I/O in the forward bounds it, so the measured disk rates decide.
# First the plan, then 10 steps on real text under a 40 GB device-memory limit
# (37 GiB); metrics go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
results="${OUT:-benchmarks/results}"
run="${RUN_DIR:-/tmp/neox20b}"
mkdir -p "$results"
flags=(--model gpt-neox-20b --state compact --seq-len 2048)
python3 -m streamer plan "${flags[@]}" --measure --disk /tmp --tokens-per-step 36864 --micro-tokens 2048 \
    --update-on device --max-memory 37 \
    | tee "$results/plan_neox20b_cuda.txt"
rm -rf "$run"
timeout 480 python3 -m streamer train "${flags[@]}" --mode stream --update-on device --max-memory 37 \
    --batch-size 1 --grad-accum 18 --steps 10 --warmup 2 --out "$run" --no-progress 2>&1 \
    | tail -20 | tee "$results/train_neox20b_cuda.log"
cp "$run/metrics.jsonl" "$results/train_neox20b_cuda.jsonl" 2>/dev/null || true
