#!/usr/bin/env bash
# Everything the GPU machine must measure but the 20B run and the gpt-j-6b comparison
# (gpu_20b.sh, gpu_gptj.sh), in at most nine and a half minutes:
#   device limits -> GPU tests -> sparse kernels -> overlap (gpt3-xl, RAM tier) -> FSDP2 + CPU offload.
# The GPU machine has torch, CuPy, safetensors, psutil, tqdm, pytest and matplotlib;
# gpu_env.sh sets up the rest.
source "$(dirname "$0")/gpu_env.sh"
# The machine's facts head the test log (seven result files in all).
machine_facts "$results/gpu_tests.log"
timeout 60 python3 benchmarks/bench_device_limits.py --json "$results/device_limits_cuda.json"
timeout 150 python3 -m pytest -q -m gpu tests/ 2>&1 | tee -a "$results/gpu_tests.log"
timeout 75 python3 benchmarks/bench_kernels.py --json "$results/kernels_cuda.json"
# Resident and the RAM tier (the overlap target) at 8 sequences and the planner's
# recommended tokens; the disk tier would not fit the call.
timeout 170 python3 benchmarks/bench_stream_vs_resident.py --model gpt3-xl --device cuda --seq-len 2048 \
    --sequences 8 --modes resident,ram --steps 3 --json "$results/stream_vs_resident_cuda.json"
timeout 120 python3 benchmarks/bench_stream_vs_sharded.py --model gpt3-xl --device cuda --world 1 \
    --global-batch 8 --seq-len 2048 --steps 3 --no-fixed-threshold --json "$results/stream_vs_sharded_cuda.json"
