// PSFT backward: grad[r, j] = (scale_r * (p_j - [j == y_r]) + ent_scale_r * p_j * (log p_j + H_r))
// / tau with p = softmax(z_r / tau), in the logits' dtype: one read of each row with a nonzero
// coefficient and one write of every row of the dense gradient.
#include "psft_common.cuh"
#include "psft_launch.h"

namespace psft {
namespace cuda {
namespace {

struct BackwardArgs {
  Rows in;
  const float* scale;
  const float* ent_scale;  // may be null: no entropy term
  const float* lse;
  const float* entropy;
  int64_t ignore_index;
  float inv_temperature;
  void* grad;
};

// Per-row constants of the gradient.
struct RowGrad {
  float lse;
  float scale;
  float ent_scale;  // 0: no entropy term
  float entropy;
  float inv_temperature;
  int64_t target;  // column index of the target in this row
};

// x = z / tau rounded on its own (__fmul_rn is never fused into x - lse), as the forward and the
// CPU form it: where the forward found lse == x_y exactly (a row with one finite logit), the
// gradient is then exactly 0. kEntropy: the entropy's term too (a kernel of its own: both paths
// in one kernel spill at the 16-bit kernels' 64-register budget).
template <bool kEntropy>
__device__ __forceinline__ float element_grad(float z, const RowGrad& g, bool is_target) {
  const float x = __fmul_rn(z, g.inv_temperature);
  if constexpr (kEntropy) {
    return logit_grad_entropy(x, g.lse, g.scale, g.ent_scale, g.entropy, is_target);
  } else {
    return logit_grad(x, g.lse, g.scale, is_target);
  }
}

// Loads of the input row. Through the read-only data cache (__ldg) unless the gradient is written
// over the logits (kInPlace): that cache may only serve memory the kernel does not write.
template <typename T, bool kInPlace>
__device__ __forceinline__ float read_element(const T* p) {
  if constexpr (kInPlace) {
    using Bits = typename ElementBits<T>::type;
    return bits_to_float(*reinterpret_cast<const Bits*>(p), static_cast<T*>(nullptr));
  } else {
    return load_element(p);
  }
}

template <typename T, bool kInPlace>
__device__ __forceinline__ uint4 read_vec(const T* p) {
  if constexpr (kInPlace) {
    return *reinterpret_cast<const uint4*>(p);
  } else {
    return load_raw_vec(p);
  }
}

// The gradient row is vectorised on the *output's* 16-byte boundaries, so every store is a full
// 16-byte store. The input row may sit at a different offset from its boundary (strided or
// offset views): then it is read element by element (kVectorLoads = false). Those loads are
// still coalesced, and the path only serves views that are not dense rows.
template <typename T, int kThreadsPerRow, bool kEntropy, bool kVectorLoads, bool kInPlace = false>
__device__ __forceinline__ void write_grad_row(const T* in_row, T* out_row, int64_t vocab,
                                               const RowGrad& g, int lane) {
  constexpr int kElems = Vec<T>::kElems;
  // Vectors loaded before any is converted. The element-wise path holds kElems registers per
  // vector; with more than one in flight the kernel, which inlines both paths, spills at its
  // 64-register budget. The entropy's term holds two more values per element: half as many.
  constexpr int kUnroll = kVectorLoads ? (kEntropy ? 2 : 4) : 1;
  const RowSplit split = split_row<T>(out_row, vocab);

  if (lane < split.head) {
    store_element(out_row + lane,
                  element_grad<kEntropy>(read_element<T, kInPlace>(in_row + lane), g,
                                         lane == g.target));
  }

  const T* in_body = in_row + split.head;
  T* out_body = out_row + split.head;
  const int64_t target_in_body = g.target - split.head;  // negative when the target is in the head
  for (int64_t first = lane; first < split.vectors; first += kUnroll * kThreadsPerRow) {
    uint4 raw[kUnroll];
    float z[kUnroll][kElems];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = first + static_cast<int64_t>(u) * kThreadsPerRow;
      if (v < split.vectors) {
        if constexpr (kVectorLoads) {
          raw[u] = read_vec<T, kInPlace>(in_body + v * kElems);
        } else {
#pragma unroll
          for (int k = 0; k < kElems; ++k) z[u][k] = load_element(in_body + v * kElems + k);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = first + static_cast<int64_t>(u) * kThreadsPerRow;
      if (v < split.vectors) {
        if constexpr (kVectorLoads) unpack_vec<T>(raw[u], z[u]);
        // Position of the target inside this vector, or -1: one 64-bit compare per vector, then
        // 32-bit compares against the unrolled element index.
        const int64_t offset = target_in_body - v * kElems;
        const int target_slot =
            (offset >= 0 && offset < kElems) ? static_cast<int>(offset) : -1;
        float out[kElems];
#pragma unroll
        for (int k = 0; k < kElems; ++k) {
          out[k] = element_grad<kEntropy>(z[u][k], g, k == target_slot);
        }
        store_vec(out_body + v * kElems, out);
      }
    }
  }

  if (lane < split.tail) {
    const int64_t j = split.head + split.vectors * kElems + lane;
    store_element(out_row + j,
                  element_grad<kEntropy>(read_element<T, kInPlace>(in_row + j), g,
                                         j == g.target));
  }
}

// kInPlace: the gradient is written over the (contiguous) logits; each element is read by the
// thread that then overwrites it, before it does. kEntropy: ent_scale is given.
template <typename T, int kThreadsPerRow, int kRowsPerBlock, bool kInPlace, bool kEntropy>
__global__ void __launch_bounds__(kThreadsPerRow* kRowsPerBlock,
                                  kResidentThreadsPerSm / (kThreadsPerRow * kRowsPerBlock))
    psft_backward_kernel(const BackwardArgs a) {
  static_assert(kThreadsPerRow % kWarpSize == 0, "row groups are whole warps");
  const int lane = static_cast<int>(threadIdx.x) % kThreadsPerRow;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock +
                            static_cast<int64_t>(threadIdx.x) / kThreadsPerRow;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  const int64_t vocab = a.in.vocab;
  const T* logits = static_cast<const T*>(a.in.logits);
  T* grad = static_cast<T*>(a.grad);

  for (int64_t row = first_row; row < a.in.rows; row += row_step) {
    T* out_row = grad + row * vocab;
    const int64_t target = load_target(a.in.targets, a.in.targets_int32, row);
    if (target == a.ignore_index) {
      fill_row<T, kThreadsPerRow>(out_row, vocab, 0.0f, lane);
      continue;
    }
    // A target outside [0, V) has no one-hot term in this row (the vocabulary-parallel loss: the
    // target lives in another rank's slice); the row is only compared with it, never indexed.
    RowGrad g;
    g.scale = a.scale[row] * a.inv_temperature;
    g.ent_scale = kEntropy ? a.ent_scale[row] * a.inv_temperature : 0.0f;
    // Clipped rows (coef = 0) and rows without upstream gradient: no need to read the logits.
    // A NaN scale is not 0 and propagates into the row.
    if (g.scale == 0.0f && g.ent_scale == 0.0f) {
      fill_row<T, kThreadsPerRow>(out_row, vocab, 0.0f, lane);
      continue;
    }
    g.entropy = a.entropy[row];
    g.lse = a.lse[row];
    g.inv_temperature = a.inv_temperature;
    g.target = target;
    const T* in_row = logits + row * a.in.row_stride;
    if constexpr (kInPlace) {
      write_grad_row<T, kThreadsPerRow, kEntropy, true, true>(in_row, out_row, vocab, g, lane);
      continue;
    }
    const bool same_phase = ((reinterpret_cast<uintptr_t>(in_row) ^
                              reinterpret_cast<uintptr_t>(out_row)) & 15u) == 0;
    if (same_phase) {
      write_grad_row<T, kThreadsPerRow, kEntropy, true>(in_row, out_row, vocab, g, lane);
    } else {
      write_grad_row<T, kThreadsPerRow, kEntropy, false>(in_row, out_row, vocab, g, lane);
    }
  }
}

}  // namespace

cudaError_t launch_psft_backward(const Rows& in, const float* scale, const float* ent_scale,
                                 const float* lse, const float* entropy, int64_t ignore_index,
                                 float inv_temperature, void* grad_logits, cudaStream_t stream) {
  if (in.rows == 0) return cudaSuccess;
  if (in.rows < 0 || in.vocab <= 0 || in.logits == nullptr || in.targets == nullptr ||
      scale == nullptr || lse == nullptr || entropy == nullptr || grad_logits == nullptr) {
    return cudaErrorInvalidValue;
  }
  const bool in_place = grad_logits == in.logits;
  if (in_place && in.rows > 1 && in.row_stride != in.vocab) return cudaErrorInvalidValue;
  const BackwardArgs args{in,           scale,           ent_scale,  lse, entropy,
                          ignore_index, inv_temperature, grad_logits};
  return PSFT_DTYPE_SWITCH(in.dtype, T, [&] {
    return PSFT_LAUNCH_SHAPE_SWITCH(in.vocab, sizeof(T), kThreadsPerRow, kRowsPerBlock, [&] {
      const dim3 grid = grid_for_rows(in.rows, kRowsPerBlock);
      const int threads = kThreadsPerRow * kRowsPerBlock;
      const auto launch = [&](auto kernel) { kernel<<<grid, threads, 0, stream>>>(args); };
      if (ent_scale != nullptr) {
        if (in_place) {
          launch(psft_backward_kernel<T, kThreadsPerRow, kRowsPerBlock, true, true>);
        } else {
          launch(psft_backward_kernel<T, kThreadsPerRow, kRowsPerBlock, false, true>);
        }
      } else if (in_place) {
        launch(psft_backward_kernel<T, kThreadsPerRow, kRowsPerBlock, true, false>);
      } else {
        launch(psft_backward_kernel<T, kThreadsPerRow, kRowsPerBlock, false, false>);
      }
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace psft
