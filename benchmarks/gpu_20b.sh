#!/usr/bin/env bash
# GPT-NeoX 20B on one GPU, in about 6 minutes (gpu_session.sh measures the rest).
# The state is compact8 (bf16 weights with stochastic rounding, 8-bit moments and an
# 8-bit gradient: about 5 bytes per parameter, 97 GiB), which a 128 GiB host holds in
# RAM: no unit goes to disk, so the step does not wait on the machine's disk. (The
# compact state, 6 bytes per parameter, 115 GiB, fits neither RAM nor the 64 GiB disk
# alone: the planner splits it 40 units in RAM, 6 on disk, and on the h200 profile
# predicts 18.3 s per step against compact8's 13.5 s; STATE=compact runs that plan.)
# AdamW and the 8-bit coding run on the GPU (--update-on device) because host cores code
# them ~70x slower than float32 AdamW. The RAM tier is page-locked, so state, weights
# and gradients cross the link by DMA, and gradients leave the GPU already coded.
# 24 sequences of 2048 per step, one per micro-batch: on the h200 profile the planner's
# step at 49,152 tokens is 13.5 s, ~468 TFLOP/s of model FLOPs (6 x parameters x tokens
# plus attention), with 34.6 GiB of device memory (every block recomputed; the boundary
# activations are most of it).
# The machine is a VM whose RAM grows as it is used, so the OS reports far less than its
# 128 GiB at start: the planner is told the machine's memory (STREAMER_HOST_MEMORY_GIB).
# First the plan, then 10 steps on real text under a 40 GB device-memory limit
# (37 GiB), at the published 20B run's peak learning rate (about 1e-4; the CLI's
# default, 3e-3, is for the tiny models); metrics and the run's start-up go to the
# results folder.
source "$(dirname "$0")/gpu_env.sh"
run="${RUN_DIR:-/tmp/neox20b}"
state="${STATE:-compact8}"
machine_facts "$results/machine_20b.txt"
flags=(--model gpt-neox-20b --state "$state" --seq-len 2048)
python3 -m streamer plan "${flags[@]}" --measure --disk /tmp --tokens-per-step 49152 --micro-tokens 2048 \
    --update-on device --max-memory 37 \
    | tee "$results/plan_neox20b_cuda.txt"
rm -rf "$run"
timeout 480 python3 -m streamer train "${flags[@]}" --mode stream --update-on device --max-memory 37 \
    --batch-size 1 --grad-accum 24 --steps 10 --warmup 2 --lr 1e-4 --out "$run" --no-progress 2>&1 \
    | tail -20 | tee "$results/train_neox20b_cuda.log"
cp "$run/metrics.jsonl" "$results/train_neox20b_cuda.jsonl" 2>/dev/null || true
cp "$run/run.json" "$results/train_neox20b_cuda_run.json" 2>/dev/null || true  # with the start-up's parts
