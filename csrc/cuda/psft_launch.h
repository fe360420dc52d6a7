// Launchers of the PSFT CUDA kernels: raw pointers, sizes and a cudaStream_t, no torch types.
//
// The kernels (psft_forward.cu, psft_backward.cu, ...) include only CUDA headers and this file, so
// they compile with nvcc alone (the CI compile check); the torch-facing glue that calls these
// launchers is psft_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../psft_math.h"

namespace psft {
namespace cuda {

enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// N rows of V logits. Row r starts at logits + r * row_stride (in elements, row_stride >= V);
// elements within a row are contiguous. `logits` may be any address the allocator returns for
// a view: the kernels must not assume 16-byte alignment of a row start.
struct Rows {
  const void* logits;
  DType dtype;
  int64_t rows;
  int64_t vocab;
  int64_t row_stride;
  const void* targets;  // int64 or int32 ids; ignore_index or in [0, V) (checked before launch)
  bool targets_int32;
};

// Per-token float32 outputs of the forward, each of length `rows` (psft_math.h, TokenStat).
struct ForwardOutputs {
  float* loss;
  float* logp;
  float* entropy;
  float* ratio;
  float* log_ratio;
  float* clipped;
  float* lse;
  float* coef;
  float* correct;
  float* max;
};

// Forward of the PSFT loss. old_logprobs / advantages may be null (old = current log-prob,
// i.e. ratio exactly 1; scalar params.advantage). Ignored rows are written as 0 without reading
// their logits.
cudaError_t launch_psft_forward(const Rows& in, const float* old_logprobs,
                                const float* advantages, const LossParams& params,
                                const ForwardOutputs& out, cudaStream_t stream);

// grad_logits[r, j] = (scale[r] * (p_j - [j == y_r]) + ent_scale[r] * p_j * (log p_j + entropy[r]))
// * inv_temperature with p = exp(z[r, j] * inv_temperature - lse[r]), written densely (row stride
// V) in the logits' dtype; ent_scale may be null (no entropy term). Rows whose coefficients are
// both 0 (ignored, clipped) are written as zeros without reading their logits. grad_logits may
// be in.logits itself (in place) when the rows are contiguous (row_stride == V).
cudaError_t launch_psft_backward(const Rows& in, const float* scale, const float* ent_scale,
                                 const float* lse, const float* entropy, int64_t ignore_index,
                                 float inv_temperature, void* grad_logits, cudaStream_t stream);

// Single pass on Hopper (sm_90): the forward's per-row outputs and the gradient of
// sum_r grad_loss[r] * loss[r] (grad_loss: the upstream gradient the caller expects), reading each
// row of logits once (a thread-block cluster holds the row in shared memory). grad_logits may be
// the logits themselves when the rows are contiguous (row_stride == V).
// Returns cudaErrorNotSupported (launching nothing) where it does not apply: not sm_90+, or a row
// too long for the clusters.
cudaError_t launch_psft_forward_backward(const Rows& in, const float* old_logprobs,
                                         const float* advantages, const LossParams& params,
                                         const float* grad_loss, const ForwardOutputs& out,
                                         void* grad_logits, cudaStream_t stream);
// Whether launch_psft_forward_backward applies to this device, dtype and vocabulary size (no
// launch).
bool psft_forward_backward_supported(int device, DType dtype, int64_t vocab);

// The options' pass over the forward's stats (psft_math.h, token_pass), one thread per token:
// stats is the (kTokenStats, rows) float32 block; old, adv, is_weights, ref_logprobs and
// seq_log_ratio are (rows,) or null.
cudaError_t launch_token_options(int64_t rows, const void* targets, bool targets_int32,
                                 float* stats, const float* old, const float* adv,
                                 const float* is_weights, const float* ref_logprobs,
                                 const float* seq_log_ratio, bool from_logp,
                                 const LossParams& params, cudaStream_t stream);

// grad[r, :] *= factor[r * factor_stride] for the rows of a dense (rows x vocab) gradient, in
// place, skipping the rows whose factor is exactly 1 (read on the device: the host never waits).
// factor_stride 0 is one factor for every row (an expanded scalar, the usual upstream gradient).
cudaError_t launch_scale_rows(void* grad, DType dtype, int64_t rows, int64_t vocab,
                              const float* factor, int64_t factor_stride, cudaStream_t stream);

// first_bad (one int64 on the device) = the smallest row whose target is neither ignore_index nor
// in [0, vocab), or -1 if there is none. Asynchronous: the caller reads it back.
cudaError_t launch_first_bad_target(const void* targets, bool targets_int32, int64_t n,
                                    int64_t vocab, int64_t ignore_index, int64_t* first_bad,
                                    cudaStream_t stream);

}  // namespace cuda
}  // namespace psft
