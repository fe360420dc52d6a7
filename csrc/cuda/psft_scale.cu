// In-place scaling of the rows of a dense gradient by per-row factors: the single-pass forward +
// backward writes the gradient for the upstream gradient it expects; this kernel applies the
// ratio actual / expected afterwards. The factors are read on the device, so the host never
// waits, and a row whose factor is exactly 1 (every row, for loss.backward() of the loss itself)
// is skipped without touching its memory.
#include "psft_common.cuh"
#include "psft_launch.h"

namespace psft {
namespace cuda {
namespace {

constexpr int kScaleThreads = 256;
constexpr int kScaleUnroll = 4;  // 16-byte vectors loaded per thread before any is stored
constexpr int kScaleBlocksPerSm = 8;

template <typename T>
__device__ __forceinline__ void scale_element(T* p, float scale) {
  using Bits = typename ElementBits<T>::type;
  const float v = bits_to_float(*reinterpret_cast<const Bits*>(p), static_cast<T*>(nullptr));
  store_element(p, v * scale);
}

// One block per row at a time (grid stride over rows); the block's threads stride over the row
// as a scalar head, 16-byte vectors on the row's own alignment, and a scalar tail.
template <typename T>
__global__ void __launch_bounds__(kScaleThreads)
    scale_rows_kernel(T* __restrict__ grad, int64_t rows, int64_t vocab,
                      const float* __restrict__ factor, int64_t factor_stride) {
  constexpr int kElems = Vec<T>::kElems;
  const int tid = static_cast<int>(threadIdx.x);
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const float scale = __ldg(factor + row * factor_stride);
    if (scale == 1.0f) continue;  // a NaN factor is not 1 and propagates
    T* out = grad + row * vocab;
    const RowSplit split = split_row<T>(out, vocab);
    if (tid < split.head) scale_element(out + tid, scale);
    T* body = out + split.head;
    // Plain (coherent) loads: this kernel writes these addresses.
    for (int64_t first = tid; first < split.vectors; first += kScaleUnroll * kScaleThreads) {
      uint4 raw[kScaleUnroll];
#pragma unroll
      for (int u = 0; u < kScaleUnroll; ++u) {
        const int64_t v = first + static_cast<int64_t>(u) * kScaleThreads;
        if (v < split.vectors) raw[u] = *reinterpret_cast<const uint4*>(body + v * kElems);
      }
#pragma unroll
      for (int u = 0; u < kScaleUnroll; ++u) {
        const int64_t v = first + static_cast<int64_t>(u) * kScaleThreads;
        if (v < split.vectors) {
          float z[kElems];
          unpack_vec<T>(raw[u], z);
#pragma unroll
          for (int k = 0; k < kElems; ++k) z[k] *= scale;
          store_vec(body + v * kElems, z);
        }
      }
    }
    if (tid < split.tail) scale_element(body + split.vectors * kElems + tid, scale);
  }
}

}  // namespace

cudaError_t launch_scale_rows(void* grad, DType dtype, int64_t rows, int64_t vocab,
                              const float* factor, int64_t factor_stride, cudaStream_t stream) {
  const bool empty = rows == 0 || vocab == 0;
  if (rows < 0 || vocab < 0 || (!empty && (grad == nullptr || factor == nullptr))) {
    return cudaErrorInvalidValue;
  }
  if (empty) return cudaSuccess;
  int device = 0, sms = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  const int64_t cap = static_cast<int64_t>(sms > 0 ? sms : 1) * kScaleBlocksPerSm;
  const unsigned int blocks = static_cast<unsigned int>(rows < cap ? rows : cap);
  return PSFT_DTYPE_SWITCH(dtype, T, [&] {
    scale_rows_kernel<T><<<blocks, kScaleThreads, 0, stream>>>(static_cast<T*>(grad), rows, vocab,
                                                               factor, factor_stride);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace psft
