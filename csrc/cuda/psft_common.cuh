// Device-side building blocks of the PSFT kernels: dtype conversion, 16-byte row access that is
// correct for any row start and any V, deterministic reductions, the launch-shape policy and a
// static switch that turns the runtime dtype into a C++ type.
//
// Only CUDA headers and the shared per-token math, so the kernels compile with nvcc alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../psft_math.h"

namespace psft {
namespace cuda {

// ---------------------------------------------------------------------------------------------
// Dtype dispatch, in the style of flash-attention's static_switch.h:
//   return PSFT_DTYPE_SWITCH(dtype, T, [&] { return launch<T>(...); });
// The lambda must return cudaError_t; an unknown dtype yields cudaErrorInvalidValue rather than
// running a kernel on misinterpreted memory.
#define PSFT_DTYPE_SWITCH(DTYPE, TYPE_NAME, ...)              \
  [&]() -> cudaError_t {                                      \
    switch (DTYPE) {                                          \
      case ::psft::cuda::DType::kFloat32: {                   \
        using TYPE_NAME = float;                              \
        return __VA_ARGS__();                                 \
      }                                                       \
      case ::psft::cuda::DType::kBFloat16: {                  \
        using TYPE_NAME = __nv_bfloat16;                      \
        return __VA_ARGS__();                                 \
      }                                                       \
      case ::psft::cuda::DType::kFloat16: {                   \
        using TYPE_NAME = __half;                             \
        return __VA_ARGS__();                                 \
      }                                                       \
      default:                                                \
        return cudaErrorInvalidValue;                         \
    }                                                         \
  }()

// ---------------------------------------------------------------------------------------------
// Element conversion. 16-bit types travel as raw bits (unsigned short / uint32 pairs) so that no
// code depends on which __ldg overloads a CUDA version provides, and so a bf16 -> float is a
// single shift.

template <typename To, typename From>
__device__ __forceinline__ To bit_cast_to(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast_to needs equal sizes");
  To to;
  __builtin_memcpy(&to, &from, sizeof(To));
  return to;
}

template <typename T>
struct ElementBits;
template <>
struct ElementBits<float> {
  using type = float;
};
template <>
struct ElementBits<__nv_bfloat16> {
  using type = unsigned short;
};
template <>
struct ElementBits<__half> {
  using type = unsigned short;
};

__device__ __forceinline__ float bits_to_float(float v, float*) { return v; }
__device__ __forceinline__ float bits_to_float(unsigned short v, __nv_bfloat16*) {
  return __uint_as_float(static_cast<unsigned int>(v) << 16);
}
__device__ __forceinline__ float bits_to_float(unsigned short v, __half*) {
  return __half2float(__ushort_as_half(v));
}

__device__ __forceinline__ float float_to_bits(float v, float*) { return v; }
__device__ __forceinline__ unsigned short float_to_bits(float v, __nv_bfloat16*) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(v));
}
__device__ __forceinline__ unsigned short float_to_bits(float v, __half*) {
  return __half_as_ushort(__float2half_rn(v));
}

// One element at p, read through the non-coherent cache (the logits are read-only here).
template <typename T>
__device__ __forceinline__ float load_element(const T* p) {
  using Bits = typename ElementBits<T>::type;
  return bits_to_float(__ldg(reinterpret_cast<const Bits*>(p)), static_cast<T*>(nullptr));
}

template <typename T>
__device__ __forceinline__ void store_element(T* p, float v) {
  using Bits = typename ElementBits<T>::type;
  *reinterpret_cast<Bits*>(p) = float_to_bits(v, static_cast<T*>(nullptr));
}

// ---------------------------------------------------------------------------------------------
// 16-byte vectors: Vec<T>::kElems elements of T in one uint4, unpacked to / packed from float32.

template <typename T>
struct Vec {
  static constexpr int kElems = 16 / static_cast<int>(sizeof(T));
  static_assert(sizeof(T) == 4 || sizeof(T) == 2, "only 32- and 16-bit elements");
};

__device__ __forceinline__ void unpack_words(const uint4& raw, unsigned int (&w)[4]) {
  w[0] = raw.x;
  w[1] = raw.y;
  w[2] = raw.z;
  w[3] = raw.w;
}

__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[4], float*) {
  out[0] = __uint_as_float(raw.x);
  out[1] = __uint_as_float(raw.y);
  out[2] = __uint_as_float(raw.z);
  out[3] = __uint_as_float(raw.w);
}

// Little-endian: element 2k of the vector is the low half of word k.
__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[8], __nv_bfloat16*) {
  unsigned int w[4];
  unpack_words(raw, w);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    out[2 * k] = __uint_as_float(w[k] << 16);
    out[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
  }
}

__device__ __forceinline__ void unpack(const uint4& raw, float (&out)[8], __half*) {
  unsigned int w[4];
  unpack_words(raw, w);
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const float2 f = __half22float2(bit_cast_to<__half2>(w[k]));
    out[2 * k] = f.x;
    out[2 * k + 1] = f.y;
  }
}

__device__ __forceinline__ uint4 pack(const float (&in)[4], float*) {
  return make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]),
                    __float_as_uint(in[3]));
}

// __floats2*_rn round to nearest even (one pack instruction per pair on sm_80+); .x is the low
// half, i.e. the element at the lower address.
__device__ __forceinline__ uint4 pack(const float (&in)[8], __nv_bfloat16*) {
  unsigned int w[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    w[k] = bit_cast_to<unsigned int>(__floats2bfloat162_rn(in[2 * k], in[2 * k + 1]));
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

__device__ __forceinline__ uint4 pack(const float (&in)[8], __half*) {
  unsigned int w[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    w[k] = bit_cast_to<unsigned int>(__floats2half2_rn(in[2 * k], in[2 * k + 1]));
  }
  return make_uint4(w[0], w[1], w[2], w[3]);
}

// Raw and unpacked stay separate so a caller can issue several loads before converting any.
template <typename T>
__device__ __forceinline__ uint4 load_raw_vec(const T* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

template <typename T>
__device__ __forceinline__ void unpack_vec(const uint4& raw, float (&out)[Vec<T>::kElems]) {
  unpack(raw, out, static_cast<T*>(nullptr));
}

// An explicit 16-byte store: written as a uint4 assignment, NVVM splits it into 2 or 4 narrower
// stores inside the kernels' loops.
__device__ __forceinline__ void store_raw_vec(void* p, const uint4& v) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y), "r"(v.z),
               "r"(v.w)
               : "memory");
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[Vec<T>::kElems]) {
  store_raw_vec(p, pack(in, static_cast<T*>(nullptr)));
}

// ---------------------------------------------------------------------------------------------
// How a row of `vocab` elements starting at `row` splits into a scalar head (up to the first
// 16-byte boundary), whole 16-byte vectors, and a scalar tail. Rows of strided or offset views
// start anywhere (element-aligned), and V need not be a multiple of the vector width, so both
// scalar parts exist in general; head + kElems * vectors + tail covers the row exactly once.
struct RowSplit {
  int head;         // elements [0, head) are scalars; head < Vec::kElems
  int64_t vectors;  // elements [head, head + vectors * kElems) are 16-byte aligned vectors
  int tail;         // the last `tail` elements are scalars; tail < Vec::kElems
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const void* row, int64_t vocab) {
  constexpr int kElems = Vec<T>::kElems;
  const unsigned int misalign = static_cast<unsigned int>(reinterpret_cast<uintptr_t>(row)) & 15u;
  const int64_t to_boundary = static_cast<int64_t>(((16u - misalign) & 15u) / sizeof(T));
  RowSplit s;
  s.head = static_cast<int>(to_boundary < vocab ? to_boundary : vocab);
  const int64_t rest = vocab - s.head;
  s.vectors = rest / kElems;
  s.tail = static_cast<int>(rest - s.vectors * kElems);
  return s;
}

// Writes `value` to all `vocab` elements of a row with 16-byte stores, shared by the kThreads
// threads of a row group (this one is `lane`). Used for rows whose gradient is known without
// reading their logits.
template <typename T, int kThreads>
__device__ __forceinline__ void fill_row(T* row, int64_t vocab, float value, int lane) {
  constexpr int kElems = Vec<T>::kElems;
  const RowSplit split = split_row<T>(row, vocab);
  if (lane < split.head) store_element(row + lane, value);
  float pattern[kElems];
#pragma unroll
  for (int k = 0; k < kElems; ++k) pattern[k] = value;
  T* body = row + split.head;
  for (int64_t v = lane; v < split.vectors; v += kThreads) store_vec(body + v * kElems, pattern);
  if (lane < split.tail) store_element(body + split.vectors * kElems + lane, value);
}

// ---------------------------------------------------------------------------------------------
// Reductions. Every thread gets the result; the combination order is a fixed butterfly (and,
// across warps, a fixed slot per warp), so results are bitwise identical from run to run. No
// atomics.

constexpr int kWarpSize = 32;

__device__ __forceinline__ float shfl_xor(float v, int mask) {
  return __shfl_xor_sync(0xffffffffu, v, mask);
}

__device__ __forceinline__ SoftmaxStats shfl_xor(const SoftmaxStats& v, int mask) {
  return {shfl_xor(v.m, mask), shfl_xor(v.s, mask), shfl_xor(v.w, mask)};
}

struct SumOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
  static __device__ __forceinline__ float identity() { return 0.0f; }
};

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
  static __device__ __forceinline__ float identity() { return -INFINITY; }
};

struct MergeStatsOp {
  __device__ __forceinline__ SoftmaxStats operator()(const SoftmaxStats& a,
                                                     const SoftmaxStats& b) const {
    return softmax_merge(a, b);
  }
  static __device__ __forceinline__ SoftmaxStats identity() { return softmax_empty(); }
};

// Reduces over aligned groups of kWidth lanes (kWidth a power of two <= 32); all 32 lanes of the
// warp must call it.
template <int kWidth, typename V, typename Op>
__device__ __forceinline__ V warp_allreduce(V v, Op op) {
  static_assert(kWidth >= 1 && kWidth <= kWarpSize && (kWidth & (kWidth - 1)) == 0,
                "kWidth must be a power of two <= 32");
#pragma unroll
  for (int offset = kWidth / 2; offset > 0; offset /= 2) v = op(v, shfl_xor(v, offset));
  return v;
}

// Reduces over the whole block of kThreads threads (one row group). `slots` is shared memory for
// kThreads / 32 values. Starts with a barrier so a previous call's readers are done with `slots`
// before they are overwritten: a grid-stride loop may call this once per row.
template <int kThreads, typename V, typename Op>
__device__ __forceinline__ V block_allreduce(V v, Op op, V* slots) {
  static_assert(kThreads % kWarpSize == 0, "kThreads must be a multiple of 32");
  constexpr int kWarps = kThreads / kWarpSize;
  static_assert((kWarps & (kWarps - 1)) == 0, "kThreads / 32 must be a power of two");
  v = warp_allreduce<kWarpSize>(v, op);
  if constexpr (kWarps > 1) {
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    __syncthreads();
    if (lane == 0) slots[warp] = v;
    __syncthreads();
    v = lane < kWarps ? slots[lane] : Op::identity();
    v = warp_allreduce<kWarps>(v, op);
  }
  return v;
}

// Reduces over the threads of one row group: a slice of a warp, a warp, or the whole block.
template <int kThreadsPerRow, typename V, typename Op>
__device__ __forceinline__ V row_allreduce(V v, Op op, V* slots) {
  if constexpr (kThreadsPerRow <= kWarpSize) {
    return warp_allreduce<kThreadsPerRow>(v, op);
  } else {
    return block_allreduce<kThreadsPerRow>(v, op, slots);
  }
}

// ---------------------------------------------------------------------------------------------
// Launch shape, shared by the forward and the backward. It depends on the row length only (not
// on N), so a row's result does not depend on which other rows are in the batch.
//   <= 4 KB per row:  a warp per row, 8 rows per 256-thread block (at most 8 vectors per lane;
//                     the forward reads these rows element-wise, see scan_short_row);
//   <= 32 KB per row: a 128-thread block per row (at most 16 vectors per thread);
//   longer rows:      a 512-thread block per row, two blocks per SM.
// The grid covers all rows (one block per row or per 8 rows), so the hardware scheduler balances
// them over the SMs; only past gridDim.x's limit do blocks loop over several rows.
// Usage: return PSFT_LAUNCH_SHAPE_SWITCH(vocab, sizeof(T), kThreads, kRows, [&] { ... });
// binds kThreads (threads per row) and kRows (rows per block) as compile-time constants.
#define PSFT_LAUNCH_SHAPE_SWITCH(VOCAB, ELEMENT_BYTES, THREADS_PER_ROW, ROWS_PER_BLOCK, ...) \
  [&]() -> cudaError_t {                                                                   \
    const int64_t row_vectors_ = ((VOCAB) * static_cast<int64_t>(ELEMENT_BYTES) + 15) / 16; \
    if (row_vectors_ <= 256) {                                                             \
      constexpr static int THREADS_PER_ROW = 32;                                           \
      constexpr static int ROWS_PER_BLOCK = 8;                                             \
      return __VA_ARGS__();                                                                \
    } else if (row_vectors_ <= 2048) {                                                     \
      constexpr static int THREADS_PER_ROW = 128;                                          \
      constexpr static int ROWS_PER_BLOCK = 1;                                             \
      return __VA_ARGS__();                                                                \
    } else {                                                                               \
      constexpr static int THREADS_PER_ROW = 512;                                          \
      constexpr static int ROWS_PER_BLOCK = 1;                                             \
      return __VA_ARGS__();                                                                \
    }                                                                                      \
  }()

// Register budget of every kernel (__launch_bounds__): 64 registers, so 1024 threads per SM stay
// resident; at 4 vectors per thread that is 64 KB of loads in flight per SM, several times what
// covering the HBM latency at full bandwidth takes.
constexpr int kResidentThreadsPerSm = 1024;

// Grid for `rows` rows; kernels loop over rows with a grid stride, so capping at gridDim.x's
// limit is always correct.
inline unsigned int grid_for_rows(int64_t rows, int rows_per_block) {
  constexpr int64_t kMaxGrid = 2147483647;
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  return static_cast<unsigned int>(blocks < kMaxGrid ? blocks : kMaxGrid);
}

template <bool kInt32>
__device__ __forceinline__ int64_t load_target(const void* targets, int64_t row) {
  if constexpr (kInt32) {
    return __ldg(static_cast<const int*>(targets) + row);
  } else {
    return __ldg(static_cast<const long long*>(targets) + row);
  }
}

__device__ __forceinline__ int64_t load_target(const void* targets, bool int32, int64_t row) {
  return int32 ? load_target<true>(targets, row) : load_target<false>(targets, row);
}

}  // namespace cuda
}  // namespace psft
