// PSFT forward: one read of each row of logits, an online softmax, and the per-token epilogue
// (psft::token_loss) on one thread per row.
#include "psft_common.cuh"
#include "psft_launch.h"
#include "psft_softmax.cuh"

namespace psft {
namespace cuda {
namespace {

// Vectors each thread loads before it consumes any: enough bytes in flight per SM to cover the
// HBM latency at 1024 resident threads.
constexpr int kUnroll = 4;

// Rows of at most 4 KB (a warp each) are read element-wise and lane-strided: element j goes to
// lane j % 32 in a fixed order whatever the row's address, so the row's result does not depend on
// its alignment (a strided view and a contiguous copy agree bitwise). Each warp-wide load still
// covers 64-128 contiguous bytes, and such short rows are bound by per-row latency rather than by
// the width of the loads. Padding with -inf adds exactly nothing to the stats.
template <typename T>
__device__ __forceinline__ ThreadStats scan_short_row(const T* row, int64_t vocab, float c2,
                                                      int lane) {
  constexpr int kGroup = 8;
  ThreadStats st;
  for (int64_t first = lane; first < vocab; first += kGroup * kWarpSize) {
    float z[kGroup];
#pragma unroll
    for (int k = 0; k < kGroup; ++k) {
      const int64_t j = first + static_cast<int64_t>(k) * kWarpSize;
      z[k] = j < vocab ? load_element(row + j) : -INFINITY;
    }
    accumulate(st, z, c2);
  }
  return st;
}

// Longer rows: this thread's share as a scalar head, kUnroll 16-byte vectors at a time, and a
// scalar tail. Which elements a thread sees depends on the row's offset from a 16-byte boundary,
// so results for differently aligned copies of a row may differ in the last bits.
template <typename T, int kThreadsPerRow>
__device__ __forceinline__ ThreadStats scan_long_row(const T* row, int64_t vocab, float c2,
                                                     int lane) {
  constexpr int kElems = Vec<T>::kElems;
  ThreadStats st;
  const RowSplit split = split_row<T>(row, vocab);
  if (lane < split.head) accumulate_one(st, load_element(row + lane), c2);
  const T* body = row + split.head;
  for (int64_t first = lane; first < split.vectors; first += kUnroll * kThreadsPerRow) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = first + static_cast<int64_t>(u) * kThreadsPerRow;
      if (v < split.vectors) raw[u] = load_raw_vec(body + v * kElems);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (first + static_cast<int64_t>(u) * kThreadsPerRow < split.vectors) {
        float z[kElems];
        unpack_vec<T>(raw[u], z);
        accumulate(st, z, c2);
      }
    }
  }
  if (lane < split.tail) {
    accumulate_one(st, load_element(body + split.vectors * kElems + lane), c2);
  }
  return st;
}

struct RowResult {
  float loss, logp, entropy, ratio, log_ratio, clipped, lse, coef, correct, max;
};

__device__ __forceinline__ RowResult uniform_result(float value) {
  return {value, value, value, value, value, value, value, value, value, value};
}

__device__ __forceinline__ void write_result(const ForwardOutputs& out, int64_t row,
                                             const RowResult& r) {
  out.logp[row] = r.logp;
  out.entropy[row] = r.entropy;
  out.loss[row] = r.loss;
  out.ratio[row] = r.ratio;
  out.log_ratio[row] = r.log_ratio;
  out.clipped[row] = r.clipped;
  out.lse[row] = r.lse;
  out.coef[row] = r.coef;
  out.correct[row] = r.correct;
  out.max[row] = r.max;
}

// Rows are assigned to row groups of kThreadsPerRow threads with a grid stride; a group larger
// than a warp is the whole block, so its barriers see uniform control flow.
template <typename T, int kThreadsPerRow, int kRowsPerBlock>
__global__ void __launch_bounds__(kThreadsPerRow* kRowsPerBlock,
                                  kResidentThreadsPerSm / (kThreadsPerRow * kRowsPerBlock))
    psft_forward_kernel(const Rows in, const float* __restrict__ old_logprobs,
                        const float* __restrict__ advantages, const LossParams params,
                        const ForwardOutputs out) {
  static_assert(kThreadsPerRow % kWarpSize == 0, "row groups are whole warps");
  static_assert(kThreadsPerRow <= kWarpSize || kRowsPerBlock == 1,
                "a multi-warp row group must be the whole block");
  __shared__ SoftmaxStats slots[kThreadsPerRow / kWarpSize];

  const int lane = static_cast<int>(threadIdx.x) % kThreadsPerRow;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock +
                            static_cast<int64_t>(threadIdx.x) / kThreadsPerRow;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
  const float c2 = params.inv_temperature * kLog2e;
  const T* logits = static_cast<const T*>(in.logits);

  for (int64_t row = first_row; row < in.rows; row += row_step) {
    const int64_t target = load_target(in.targets, in.targets_int32, row);
    if (target == params.ignore_index) {
      if (lane == 0) write_result(out, row, uniform_result(0.0f));
      continue;
    }
    // Rejected before launch; never read outside the row if one slips through.
    if (!target_in_range(target, in.vocab)) {
      if (lane == 0) write_result(out, row, uniform_result(NAN));
      continue;
    }
    const T* row_logits = logits + row * in.row_stride;
    // Issued before the scan so their latency hides behind it (not in the serial epilogue).
    const float z_target = lane == 0 ? load_element(row_logits + target) : 0.0f;
    float old_logp_in = 0.0f, advantage = params.advantage;
    if (lane == 0) {
      if (old_logprobs != nullptr) old_logp_in = __ldg(old_logprobs + row);
      if (advantages != nullptr) advantage = __ldg(advantages + row);
    }
    ThreadStats mine;
    if constexpr (kThreadsPerRow == kWarpSize) {
      mine = scan_short_row<T>(row_logits, in.vocab, c2, lane);
    } else {
      mine = scan_long_row<T, kThreadsPerRow>(row_logits, in.vocab, c2, lane);
    }
    const SoftmaxStats st =
        row_allreduce<kThreadsPerRow>(to_natural(mine, params.inv_temperature), MergeStatsOp(),
                                      slots);
    if (lane != 0) continue;

    RowResult r;
    r.lse = softmax_lse(st);
    // x_y rounded on its own, not fused into x_y - lse: the same x as in the stats, so a row
    // whose only finite logit is the target gets logp == 0 exactly.
    r.logp = target_logp(__fmul_rn(z_target, params.inv_temperature), r.lse);
    r.entropy = softmax_entropy(st);
    const float old_logp = old_logprobs != nullptr ? old_logp_in : r.logp;
    const TokenLoss t = token_loss(r.logp, old_logp, advantage, params);
    r.loss = t.loss;
    r.ratio = t.ratio;
    r.log_ratio = t.log_ratio;
    r.clipped = t.clipped;
    r.coef = t.coef;
    // The target attains the row's maximum: the same x = z / tau rounding on both sides.
    r.correct = __fmul_rn(z_target, params.inv_temperature) >= st.m ? 1.0f : 0.0f;
    r.max = st.m;
    write_result(out, row, r);
  }
}

}  // namespace

cudaError_t launch_psft_forward(const Rows& in, const float* old_logprobs,
                                const float* advantages, const LossParams& params,
                                const ForwardOutputs& out, cudaStream_t stream) {
  if (in.rows == 0) return cudaSuccess;
  if (in.rows < 0 || in.vocab <= 0 || in.logits == nullptr || in.targets == nullptr ||
      out.loss == nullptr || out.logp == nullptr || out.entropy == nullptr ||
      out.ratio == nullptr || out.log_ratio == nullptr || out.clipped == nullptr ||
      out.lse == nullptr || out.coef == nullptr || out.correct == nullptr ||
      out.max == nullptr) {
    return cudaErrorInvalidValue;
  }
  return PSFT_DTYPE_SWITCH(in.dtype, T, [&] {
    return PSFT_LAUNCH_SHAPE_SWITCH(in.vocab, sizeof(T), kThreadsPerRow, kRowsPerBlock, [&] {
      psft_forward_kernel<T, kThreadsPerRow, kRowsPerBlock>
          <<<grid_for_rows(in.rows, kRowsPerBlock), kThreadsPerRow * kRowsPerBlock, 0, stream>>>(
              in, old_logprobs, advantages, params, out);
      return cudaGetLastError();
    });
  });
}

}  // namespace cuda
}  // namespace psft
