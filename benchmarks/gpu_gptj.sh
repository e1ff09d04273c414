#!/usr/bin/env bash
# Streaming against FSDP2 with CPUOffloadPolicy for gpt-j-6b on one GPU (the issue's
# second model for that comparison; gpu_session.sh runs gpt3-xl), in about 5 minutes.
# Same model, initial weights, batch (8 x 2048), data, schedule and steps on both
# sides; each side's fp32 state is host-resident (the streamer's RAM tier holds
# 97 GB, page-locked). Only glibc's default allocator: host memory is not the question
# here, and the fixed-threshold runs would double the call.
source "$(dirname "$0")/gpu_env.sh"
machine_facts "$results/machine_gptj.txt"
timeout 420 python3 benchmarks/bench_stream_vs_sharded.py --model gpt-j-6b --device cuda --world 1 \
    --global-batch 8 --seq-len 2048 --steps 3 --no-fixed-threshold \
    --json "$results/stream_vs_sharded_gptj_cuda.json" 2>&1 | tee "$results/stream_vs_sharded_gptj_cuda.log"
