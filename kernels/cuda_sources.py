"""CUDA C sources of the row-sparse kernels and the compact state's kernels, one entry
per compiled module.

Plain strings rather than .cu files so they ship inside the Python package without
package-data configuration. Every source is self-contained (no #include): NVRTC on a
machine without a CUDA toolkit has no include path for cuda_fp16.h / cuda_bf16.h, so
half-precision values travel as raw 16-bit patterns and are converted by the few
instructions below (inline PTX on the device; the host emulation of kernels/emulate.py
compiles the same text with the C++ half type instead). Each kernel is a grid-stride
loop, so any grid size is correct.
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
#if defined(__CUDA_ARCH__)
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
#else  // the host emulation (kernels/emulate.py): the compiler's half type, rounded to nearest even
  static __device__ __forceinline__ float load(unsigned short v) {
    _Float16 h;
    memcpy(&h, &v, 2);
    return (float)h;
  }
  static __device__ __forceinline__ unsigned short store(float f) {
    _Float16 h = (_Float16)f;
    unsigned short v;
    memcpy(&v, &h, 2);
    return v;
  }
#endif
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

# The compact state formats' kernels (streamer.state), each one pass over a chunk where
# the PyTorch ops take dozens (see kernels/compact.py for what they compute and why each
# step is written as it is): the AdamW step, and the coding of a gradient in 8 bits.
# Their parameters are data, so that the CuPy launcher and the host emulation
# (kernels/emulate.py) pass them in the same order.
COMPACT_ADAMW_PARAMS: tuple[tuple[str, str], ...] = (
    ("unsigned short*", "param"),  # bfloat16 bits, updated with stochastic rounding
    ("const unsigned short*", "grad16"),  # a bfloat16 gradient (compact) ...
    ("const unsigned char*", "grad8"),  # ... or a coded one (compact8), as `grad_coded` says
    ("const float*", "grad_scale"),
    ("unsigned char*", "exp_avg"),
    ("float*", "exp_avg_scale"),
    ("unsigned char*", "exp_avg_sq"),  # the second moment's root, coded
    ("float*", "exp_avg_sq_scale"),
    ("const unsigned int*", "bits"),  # 32 random bits per element
    ("const float*", "tables"),  # the values of the gradient's, first and second moment's codes
    ("int64", "n"),
    ("int64", "decay_numel"),
    ("int", "grad_coded"),
    ("float", "decay_factor"),  # lr x weight decay
    ("float", "beta1"),
    ("float", "one_minus_beta1"),
    ("float", "beta2"),
    ("float", "one_minus_beta2"),
    ("float", "eps"),
    ("float", "grad_divisor"),
    ("float", "step_size"),  # lr / bias correction 1
    ("float", "bias_correction2_sqrt"),
    ("float", "m_octaves"),
    ("float", "m_levels_per_octave"),
    ("float", "m_top"),
    ("float", "r_octaves"),
    ("float", "r_levels_per_octave"),
    ("float", "r_top"),
)
CODE_GRADIENT_PARAMS: tuple[tuple[str, str], ...] = (
    ("const float*", "grad"),
    ("unsigned char*", "codes"),
    ("float*", "scales"),
    ("int64", "n"),
    ("float", "octaves"),
    ("float", "levels_per_octave"),
    ("float", "top"),
)

# One warp per block of 256 elements (one scale): lane l holds elements l, l + 32, ...,
# l + 224, so every load and store of the warp is one contiguous run, whatever the
# buffers' alignment. The block's largest magnitudes come from five shuffles, not
# shared memory, so warps never wait for each other. The decoding, rounding and coding
# are the PyTorch ops' float operations in their order; AdamW is torch's formula in
# float32 throughout (torch's kernel mixes in double scalars: its double divisions
# would cost this kernel more than its memory traffic, for a last bit that only moves
# a stored value where it straddles a rounding boundary).
COMPACT = r"""
typedef long long int64;
#define BLOCK 256

__device__ __forceinline__ float bf16_load(unsigned short v) { return __uint_as_float(((unsigned int)v) << 16); }

// The larger of two magnitudes, NaN if either is: torch's amax propagates NaN.
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }

__device__ __forceinline__ float warp_max(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v = max_nan(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// x's code on its block's log scale (streamer.state.encode): the position rounded down
// after adding `offset` (0.5 for the nearest code; (noise + 0.5) / 256 to round up with
// probability equal to the fraction); signed codes add 128 for a negative value; an
// unsigned (root) code is never zero for a nonzero value.
__device__ __forceinline__ float stochastic_offset(unsigned int noise) { return ((float)noise + 0.5f) / 256.0f; }

__device__ __forceinline__ unsigned char code_of(float x, float log2_max, float octaves, float levels_per_octave,
                                                 float top, float offset, int is_signed) {
  if (x == 0.0f) return 0;
  float position = log2f(fabsf(x)) - log2_max;
  position = position + octaves;
  position = position * levels_per_octave;
  position = position + offset;
  position = floorf(position) + 1.0f;
  if (position != position) return 0;  // an infinite value or scale: no code stands for it
  position = position < 0.0f ? 0.0f : (position > top ? top : position);
  if (is_signed) {
    if ((__float_as_uint(x) >> 31) && position > 0.0f) position += 128.0f;
  } else if (position < 1.0f) {
    position = 1.0f;
  }
  return (unsigned char)position;
}

extern "C" __global__ void compact_adamw(PARAMS) {
  __shared__ float table[3 * 256];
  for (int t = threadIdx.x; t < 3 * 256; t += blockDim.x) table[t] = tables[t];
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64 warps = ((int64)gridDim.x * blockDim.x) >> 5;
  const int64 blocks = (n + BLOCK - 1) / BLOCK;
  for (int64 b = ((int64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; b < blocks; b += warps) {
    float p[8], m[8], r[8];
    float m_max = 0.0f, r_max = 0.0f;
    const float g_scale = grad_coded ? grad_scale[b] : 1.0f;
    const float m_scale = exp_avg_scale[b], r_scale = exp_avg_sq_scale[b];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64 i = b * BLOCK + j * 32 + lane;
      p[j] = m[j] = r[j] = 0.0f;
      if (i >= n) continue;
      float param_j = bf16_load(param[i]);
      float g = grad_coded ? table[grad8[i]] * g_scale : bf16_load(grad16[i]);
      float m_j = table[256 + exp_avg[i]] * m_scale;
      float root = table[512 + exp_avg_sq[i]] * r_scale;
      float v_j = root * root;
      // AdamW as torch's fused kernel: the clip factor divides, the decay is decoupled.
      if (grad_divisor != 1.0f) g = g / grad_divisor;
      if (i < decay_numel) param_j = param_j - decay_factor * param_j;
      m_j = beta1 * m_j + one_minus_beta1 * g;
      v_j = beta2 * v_j + one_minus_beta2 * g * g;
      const float denom = sqrtf(v_j) / bias_correction2_sqrt + eps;
      param_j = param_j - step_size * m_j / denom;
      p[j] = param_j;
      m[j] = m_j;
      r[j] = sqrtf(v_j);
      m_max = max_nan(m_max, fabsf(m_j));
      r_max = max_nan(r_max, r[j]);
    }
    // Every lane has read this block's scales before the shuffles; lane 0 writes them after.
    m_max = warp_max(m_max);
    r_max = warp_max(r_max);
    if (lane == 0) {
      exp_avg_scale[b] = m_max;
      exp_avg_sq_scale[b] = r_max;
    }
    const float m_log2 = log2f(m_max), r_log2 = log2f(r_max);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64 i = b * BLOCK + j * 32 + lane;
      if (i >= n) continue;
      const unsigned int noise = bits[i];
      // Stochastic rounding to bfloat16: the high 16 random bits added below the kept bits.
      param[i] = (unsigned short)((__float_as_uint(p[j]) + (noise >> 16)) >> 16);
      exp_avg[i] = code_of(m[j], m_log2, m_octaves, m_levels_per_octave, m_top, stochastic_offset(noise & 255u), 1);
      exp_avg_sq[i] = code_of(r[j], r_log2, r_octaves, r_levels_per_octave, r_top,
                              stochastic_offset((noise >> 8) & 255u), 0);
    }
  }
}

// A float32 gradient coded as compact8 keeps it (streamer.state.StateFormat.store_grad):
// signed codes on its block's log scale, rounded to the nearest, and the block's largest
// magnitude as its scale.
extern "C" __global__ void code_gradient(GRADIENT_PARAMS) {
  const int lane = threadIdx.x & 31;
  const int64 warps = ((int64)gridDim.x * blockDim.x) >> 5;
  const int64 blocks = (n + BLOCK - 1) / BLOCK;
  for (int64 b = ((int64)blockIdx.x * blockDim.x + threadIdx.x) >> 5; b < blocks; b += warps) {
    float g[8];
    float largest = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64 i = b * BLOCK + j * 32 + lane;
      g[j] = i < n ? grad[i] : 0.0f;
      largest = max_nan(largest, fabsf(g[j]));
    }
    largest = warp_max(largest);
    if (lane == 0) scales[b] = largest;
    const float log2_max = log2f(largest);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const int64 i = b * BLOCK + j * 32 + lane;
      if (i < n) codes[i] = code_of(g[j], log2_max, octaves, levels_per_octave, top, 0.5f, 1);
    }
  }
}
"""


def _signature(params: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(f"{kind} __restrict__ {name}" if kind.endswith("*") else f"{kind} {name}" for kind, name in params)


COMPACT = COMPACT.replace("GRADIENT_PARAMS", _signature(CODE_GRADIENT_PARAMS)).replace(
    "PARAMS", _signature(COMPACT_ADAMW_PARAMS))

SOURCES: dict[str, str] = {
    **{
        name: VALUE_TYPES + body
        for name, body in {
            "row_nonzero_flags": ROW_NONZERO_FLAGS,
            "hash_owner": HASH_OWNER,
            "scatter_add_rows": SCATTER_ADD_ROWS,
            "segment_sum_rows": SEGMENT_SUM_ROWS,
        }.items()
    },
    # Self-contained (no inline PTX) so that kernels/emulate.py also compiles it for the host.
    "compact": COMPACT,
}

# Compiler options beyond the architecture. The AdamW step is compiled without
# contracting a multiply and an add into one rounding: the PyTorch ops it replaces
# round after each operation, and a code's boundary is where the two would differ.
OPTIONS: dict[str, tuple[str, ...]] = {"compact": ("--fmad=false",)}

# The extern "C" entry points each module must export (checked after compilation).
KERNEL_NAMES: dict[str, tuple[str, ...]] = {
    "row_nonzero_flags": ("row_nonzero_flags_b32", "row_nonzero_flags_b16"),
    "hash_owner": ("hash_owner",),
    "scatter_add_rows": ("scatter_add_rows_f32",),
    "segment_sum_rows": ("segment_sum_rows_f32", "segment_sum_rows_bf16", "segment_sum_rows_f16"),
    "compact": ("compact_adamw", "code_gradient"),
}
