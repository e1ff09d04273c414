# Sourced by the GPU scripts (gpu_session.sh, gpu_20b.sh, gpu_gptj.sh): the repository on
# PYTHONPATH (nothing is installed on the GPU machine), the machine's memory for the
# planner, the results folder ($OUT if set, else benchmarks/results), and a function
# that records the machine's facts.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
# The GPU machine is a VM whose RAM grows as it is used: at start the OS reports far less
# available than its 128 GiB, and the planner would refuse gpt3-xl's 21 GB RAM tier and
# put most of a 20B state on disk. Plan with the machine's memory (planner.host_available).
export STREAMER_HOST_MEMORY_GIB="${STREAMER_HOST_MEMORY_GIB:-128}"
results="${OUT:-benchmarks/results}"
mkdir -p "$results"

machine_facts() {  # FILE: date, cores, memory, disk and GPU, as the call found them
    { date -u; nproc; free -g; df -h /tmp .; nvidia-smi; } > "$1" 2>&1
}
