"""CUDA C sources of the row-sparse kernels, one entry per compiled module.

Plain strings rather than .cu files so they ship inside the Python package without
package-data configuration. Every source is self-contained (no #include): NVRTC on a
machine without a CUDA toolkit has no include path for cuda_fp16.h / cuda_bf16.h, so
half-precision values travel as raw 16-bit patterns and are converted by the few
instructions below. Each kernel is a grid-stride loop, so any grid size is correct.
"""

from __future__ import annotations

from kernels.hashing import GOLDEN_GAMMA, MIX_MULTIPLIER_1, MIX_MULTIPLIER_2, MIX_SHIFTS

# Value types: load() widens a stored element to float, store() rounds a float back.
# Arithmetic is always float32, which is how half-precision sums stay accurate.
VALUE_TYPES = r"""
typedef long long int64;
typedef unsigned long long uint64;

struct Float32 {
  typedef float storage;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float f) { return f; }
};

struct BFloat16 {
  typedef unsigned short storage;
  static __device__ __forceinline__ float load(unsigned short v) {
    return __uint_as_float(((unsigned int)v) << 16);  // bf16 is the top half of a float32
  }
  static __device__ __forceinline__ unsigned short store(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x0040u);  // stay NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even, as torch's float->bf16 cast does
    return (unsigned short)(u >> 16);
  }
};

struct Float16 {
  typedef unsigned short storage;
  static __device__ __forceinline__ float load(unsigned short v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v));
    return f;
  }
  static __device__ __forceinline__ unsigned short store(float f) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
  }
};

#define GRID_STRIDE_LOOP(i, n)                                              \
  for (int64 i = blockIdx.x * (int64)blockDim.x + threadIdx.x; i < (n); \
       i += (int64)gridDim.x * blockDim.x)
"""

# One block per row; the block votes with __syncthreads_or. The test is on the bits
# with the sign masked off, so -0.0 is zero and NaN is non-zero, like torch's `!= 0`.
ROW_NONZERO_FLAGS = r"""
template <typename Bits>
__device__ void row_nonzero_flags(const Bits* rows, int64 num_rows, int64 hidden,
                                  Bits magnitude_mask, unsigned char* flags) {
  for (int64 row = blockIdx.x; row < num_rows; row += gridDim.x) {
    const Bits* values = rows + row * hidden;
    int nonzero = 0;
    for (int64 col = threadIdx.x; col < hidden && !nonzero; col += blockDim.x)
      nonzero = (values[col] & magnitude_mask) != 0;
    nonzero = __syncthreads_or(nonzero);
    if (threadIdx.x == 0) flags[row] = (unsigned char)nonzero;
  }
}

extern "C" __global__ void row_nonzero_flags_b32(const unsigned int* rows, int64 num_rows,
                                                 int64 hidden, unsigned char* flags) {
  row_nonzero_flags<unsigned int>(rows, num_rows, hidden, 0x7fffffffu, flags);
}

extern "C" __global__ void row_nonzero_flags_b16(const unsigned short* rows, int64 num_rows,
                                                 int64 hidden, unsigned char* flags) {
  row_nonzero_flags<unsigned short>(rows, num_rows, hidden, (unsigned short)0x7fffu, flags);
}
"""

# splitmix64 finaliser; constants come from kernels/hashing.py, the CPU implementation.
HASH_OWNER = rf"""
extern "C" __global__ void hash_owner(const int64* indices, int64 n, uint64 seed_offset,
                                      uint64 world_size, int64* owners) {{
  GRID_STRIDE_LOOP(i, n) {{
    uint64 z = ((uint64)indices[i] ^ seed_offset) + {GOLDEN_GAMMA:#x}ULL;
    z = (z ^ (z >> {MIX_SHIFTS[0]})) * {MIX_MULTIPLIER_1:#x}ULL;
    z = (z ^ (z >> {MIX_SHIFTS[1]})) * {MIX_MULTIPLIER_2:#x}ULL;
    z ^= z >> {MIX_SHIFTS[2]};
    owners[i] = (int64)(z % world_size);
  }}
}}
"""

# float32 only: hardware float atomics make duplicates safe without sorting. Half types
# go through segment_sum_rows with accumulate=1 instead (one float32 sum, one rounding).
SCATTER_ADD_ROWS = r"""
extern "C" __global__ void scatter_add_rows_f32(float* dense, const int64* indices,
                                                const float* values, int64 n, int64 hidden) {
  GRID_STRIDE_LOOP(element, n * hidden) {
    int64 row = element / hidden;
    int64 col = element - row * hidden;
    atomicAdd(dense + indices[row] * hidden + col, values[element]);
  }
}
"""

# Rows were stably sorted by index: segment s covers order[starts[s] .. starts[s+1]).
# One thread per (segment, column) sums its column in float32 in input order, then
# writes out[out_rows[s]] (accumulate=0) or adds to it (accumulate=1). out_rows are
# unique, so no two threads write the same element and no atomics are needed.
SEGMENT_SUM_ROWS = r"""
template <typename T>
__device__ void segment_sum_rows(const typename T::storage* values, const int64* order,
                                 const int64* segment_starts, int64 num_segments, int64 hidden,
                                 const int64* out_rows, int accumulate,
                                 typename T::storage* out) {
  GRID_STRIDE_LOOP(element, num_segments * hidden) {
    int64 segment = element / hidden;
    int64 col = element - segment * hidden;
    float sum = 0.0f;
    for (int64 k = segment_starts[segment]; k < segment_starts[segment + 1]; ++k)
      sum += T::load(values[order[k] * hidden + col]);
    int64 target = out_rows[segment] * hidden + col;
    if (accumulate) sum = T::load(out[target]) + sum;
    out[target] = T::store(sum);
  }
}

#define SEGMENT_SUM_ROWS(suffix, T)                                                          \
  extern "C" __global__ void segment_sum_rows_##suffix(                                      \
      const T::storage* values, const int64* order, const int64* segment_starts,             \
      int64 num_segments, int64 hidden, const int64* out_rows, int accumulate,               \
      T::storage* out) {                                                                     \
    segment_sum_rows<T>(values, order, segment_starts, num_segments, hidden, out_rows,       \
                        accumulate, out);                                                    \
  }

SEGMENT_SUM_ROWS(f32, Float32)
SEGMENT_SUM_ROWS(bf16, BFloat16)
SEGMENT_SUM_ROWS(f16, Float16)
"""

SOURCES: dict[str, str] = {
    name: VALUE_TYPES + body
    for name, body in {
        "row_nonzero_flags": ROW_NONZERO_FLAGS,
        "hash_owner": HASH_OWNER,
        "scatter_add_rows": SCATTER_ADD_ROWS,
        "segment_sum_rows": SEGMENT_SUM_ROWS,
    }.items()
}

# The extern "C" entry points each module must export (checked after compilation).
KERNEL_NAMES: dict[str, tuple[str, ...]] = {
    "row_nonzero_flags": ("row_nonzero_flags_b32", "row_nonzero_flags_b16"),
    "hash_owner": ("hash_owner",),
    "scatter_add_rows": ("scatter_add_rows_f32",),
    "segment_sum_rows": ("segment_sum_rows_f32", "segment_sum_rows_bf16", "segment_sum_rows_f16"),
}
