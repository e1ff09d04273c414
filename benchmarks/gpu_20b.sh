#!/usr/bin/env bash
# GPT-NeoX 20B on one GPU, in about 8 minutes (gpu_session.sh measures the rest).
# The compact state (about 6 bytes per parameter, 115 GiB) fits neither a 128 GiB host's
# RAM nor its 64 GiB disk alone, so the planner splits it (the leading units in RAM, the
# rest on disk); AdamW and the 8-bit moments' coding run on the GPU (--update-on device)
# because host cores code them ~70x slower than float32 AdamW. The RAM part is
# page-locked, so state, weights and gradients cross the link by DMA. 24 sequences of
# 2048 per step, one per micro-batch: with the h200 profile's disk (3 GB/s read, 2 GB/s
# write) the planner's step at 49,152 tokens is 18.3 s, ~344 TFLOP/s of model FLOPs
# (6 x parameters x tokens plus attention), with 34.6 GiB of device memory (every block
# recomputed; the boundary activations are most of it). The disk units' updates run on
# their own lane from the end of each backward; their I/O bounds the forward, so the
# measured disk rates decide.
# The machine is a VM whose RAM grows as it is used, so the OS reports far less than its
# 128 GiB at start: the planner is told the machine's memory (STREAMER_HOST_MEMORY_GIB),
# which puts 40 of the 46 units in RAM.
# First the plan, then 10 steps on real text under a 40 GB device-memory limit
# (37 GiB), at the published 20B run's peak learning rate (about 1e-4; the CLI's
# default, 3e-3, is for the tiny models); metrics go to the results folder.
source "$(dirname "$0")/gpu_env.sh"
run="${RUN_DIR:-/tmp/neox20b}"
machine_facts "$results/machine_20b.txt"
flags=(--model gpt-neox-20b --state compact --seq-len 2048)
python3 -m streamer plan "${flags[@]}" --measure --disk /tmp --tokens-per-step 49152 --micro-tokens 2048 \
    --update-on device --max-memory 37 \
    | tee "$results/plan_neox20b_cuda.txt"
rm -rf "$run"
timeout 480 python3 -m streamer train "${flags[@]}" --mode stream --update-on device --max-memory 37 \
    --batch-size 1 --grad-accum 24 --steps 10 --warmup 2 --lr 1e-4 --out "$run" --no-progress 2>&1 \
    | tail -20 | tee "$results/train_neox20b_cuda.log"
cp "$run/metrics.jsonl" "$results/train_neox20b_cuda.jsonl" 2>/dev/null || true
cp "$run/run.json" "$results/train_neox20b_cuda_run.json" 2>/dev/null || true  # with the start-up's parts
