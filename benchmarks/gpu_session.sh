#!/usr/bin/env bash
# Everything the GPU machine must measure but the 20B run, in one call of at most nine minutes
# (a session's device time is 15 minutes in all, start-up included; gpu_20b.sh is the second call):
#   device limits -> GPU tests -> sparse kernels -> overlap (gpt3-xl, RAM tier) -> FSDP2 + CPU offload.
# The GPU machine has torch, CuPy, safetensors, psutil, tqdm, pytest and matplotlib;
# nothing is installed: the repository is put on PYTHONPATH. Results go to
# benchmarks/results/ (and to $OUT when the device tool provides one).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
results="${OUT:-benchmarks/results}"
mkdir -p "$results"
python3 benchmarks/bench_device_limits.py --json "$results/device_limits_cuda.json"
timeout 150 python3 -m pytest -q -m gpu tests/ 2>&1 | tee "$results/gpu_tests.log"
timeout 90 python3 benchmarks/bench_kernels.py --json "$results/kernels_cuda.json"
timeout 150 python3 benchmarks/bench_stream_vs_resident.py --model gpt3-xl --device cuda --seq-len 2048 \
    --sequences 1,8 --steps 3 --json "$results/stream_vs_resident_cuda.json"
timeout 120 python3 benchmarks/bench_stream_vs_sharded.py --model gpt3-xl --device cuda --world 1 \
    --global-batch 8 --seq-len 2048 --steps 3 --json "$results/stream_vs_sharded_cuda.json"
