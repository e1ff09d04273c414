"""Run a CUDA kernel's own source on the host: a C++ compiler and a thread per CUDA thread.

A machine without a GPU can compile the kernels (kernels/nvrtc.py) but not run them.
For a kernel whose source needs nothing but what the prelude below defines (thread
and block indices, `__syncthreads` and `__syncthreads_or`, `__shfl_xor_sync`,
`atomicAdd` on floats, the bit casts), this compiles the very same text as C++ and
launches it block by block, each block's threads as OS threads meeting at real
barriers. Its indexing, its ragged ends, its reductions and its arithmetic are then
checked against the PyTorch reference on the CPU, where CI runs; on a GPU the same
checks run against the compiled kernel. (Inline PTX has a host twin under
`#if defined(__CUDA_ARCH__)`, as the half-precision conversions in
kernels/cuda_sources.py do.)

What it cannot show: speed, memory coalescing, the order of atomic additions, and the
GPU's own math library (the host's `log2f` may differ from CUDA's in the last bit,
which the checks allow for).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

# Just enough of CUDA's execution model, with C++20 barriers. Blocks run one at a time,
# so a function-local static array is each block's shared memory.
PRELUDE = r"""
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <vector>
#include <math.h>
#include <string.h>

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

struct Dim3 { unsigned int x = 0, y = 0, z = 0; };
static thread_local Dim3 threadIdx, blockIdx;
static Dim3 blockDim, gridDim;
static std::barrier<>* block_barrier;
static std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
static std::vector<float> warp_slots;

static std::vector<int> vote_slots;

inline void __syncthreads() { block_barrier->arrive_and_wait(); }

// Every thread of the block leaves its vote, all meet, each reads them all, all meet again.
inline int __syncthreads_or(int predicate) {
  vote_slots[threadIdx.x] = predicate != 0;
  block_barrier->arrive_and_wait();
  int any = 0;
  for (unsigned int t = 0; t < blockDim.x; ++t) any |= vote_slots[t];
  block_barrier->arrive_and_wait();
  return any;
}

inline float atomicAdd(float* address, float value) { return std::atomic_ref<float>(*address).fetch_add(value); }

// Every lane of the warp leaves its value, all meet, each reads its partner's, all meet
// again before the slots are reused.
inline float __shfl_xor_sync(unsigned int, float value, int lane_mask) {
  const unsigned int t = threadIdx.x, warp = t / 32;
  warp_slots[t] = value;
  warp_barriers[warp]->arrive_and_wait();
  const float partner = warp_slots[(t & ~31u) | ((t & 31u) ^ (unsigned int)lane_mask)];
  warp_barriers[warp]->arrive_and_wait();
  return partner;
}

inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }

static void run_grid(unsigned int grid, unsigned int block, const std::function<void()>& kernel) {
  blockDim.x = block;
  gridDim.x = grid;
  warp_slots.assign(block, 0.0f);
  vote_slots.assign(block, 0);
  for (unsigned int b = 0; b < grid; ++b) {
    std::barrier<> barrier(block);
    block_barrier = &barrier;
    warp_barriers.clear();
    for (unsigned int w = 0; w < block / 32; ++w) warp_barriers.push_back(std::make_unique<std::barrier<>>(32));
    std::vector<std::thread> threads;
    for (unsigned int t = 0; t < block; ++t)
      threads.emplace_back([&kernel, b, t] { blockIdx.x = b; threadIdx.x = t; kernel(); });
    for (std::thread& thread : threads) thread.join();
  }
}
"""

CTYPES = {"int64": ctypes.c_longlong, "uint64": ctypes.c_ulonglong, "int": ctypes.c_int, "double": ctypes.c_double,
          "float": ctypes.c_float}


class HostCompilerError(RuntimeError):
    """No C++20 compiler, or the source did not compile for the host."""


def _launcher(kernel: str, params: tuple[tuple[str, str], ...]) -> str:
    signature = "".join(f", {kind} {name}" for kind, name in params)
    names = ", ".join(name for _, name in params)
    return (f'\nextern "C" void launch_{kernel}(unsigned int grid, unsigned int block{signature}) {{\n'
            f"  run_grid(grid, block, [=] {{ {kernel}({names}); }});\n}}\n")


@functools.cache
def _library(source: str, kernel: str, params: tuple[tuple[str, str], ...]) -> ctypes.CDLL:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        raise HostCompilerError("no C++ compiler (g++ or clang++) to build the host emulation")
    text = PRELUDE + source + _launcher(kernel, params)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "streamer-emulate"
    folder.mkdir(exist_ok=True)
    library = folder / f"{kernel}-{digest}.so"
    if not library.exists():
        cpp = folder / f"{kernel}-{digest}.{os.getpid()}.cpp"
        cpp.write_text(text)
        partial = library.with_suffix(f".{os.getpid()}.so")
        # No fast-math and no contraction: the GPU build is compiled with --fmad=false too.
        command = [compiler, "-std=c++20", "-O1", "-ffp-contract=off", "-fPIC", "-shared", "-pthread",
                   str(cpp), "-o", str(partial)]
        try:
            done = subprocess.run(command, capture_output=True, text=True)
        except OSError as error:  # the compiler named by $CXX is not there
            raise HostCompilerError(f"{compiler} cannot run: {error}") from error
        finally:
            cpp.unlink()
        if done.returncode != 0:
            raise HostCompilerError(f"{kernel} does not compile for the host:\n{done.stderr[-4000:]}")
        partial.replace(library)  # whole or not at all: parallel test workers share the folder
    return ctypes.CDLL(str(library))


def launch(source: str, kernel: str, params: tuple[tuple[str, str], ...], grid: int, block: int,
           args: dict[str, object]) -> None:
    """Run `kernel` from `source` on the host over `grid` blocks of `block` threads (a
    multiple of 32), with `args` by parameter name: CPU tensors for pointers (contiguous,
    any dtype of the right width), Python numbers for scalars."""
    if block % 32:
        raise ValueError(f"block must be whole warps, got {block} threads")
    function = getattr(_library(source, kernel, params), f"launch_{kernel}")
    values = [ctypes.c_uint(grid), ctypes.c_uint(block)]
    for kind, name in params:
        value = args[name]
        if kind.endswith("*"):
            assert isinstance(value, torch.Tensor) and value.device.type == "cpu" and value.is_contiguous(), name
            values.append(ctypes.c_void_p(value.data_ptr()))
        else:  # a float parameter takes a Python float rounded to float32, as CuPy's launch does
            values.append(CTYPES[kind](value))
    function(*values)
