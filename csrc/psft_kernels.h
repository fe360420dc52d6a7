// What the ops (csrc/psft_ops_impl.cpp) ask of a device: its kernels, on tensors that are already
// checked and laid out. Each device implements these functions (csrc/cpu/psft_cpu.cpp,
// csrc/cuda/psft_cuda.cpp); nothing here validates.
#pragma once

#include <ATen/core/Tensor.h>

#include "psft_math.h"

namespace psft {

struct ForwardArgs {
  at::Tensor logits;   // (N, V), elements of a row contiguous, any row stride
  at::Tensor targets;  // (N,) int64 / int32, contiguous, each ignore_index or in [0, V)
  at::Tensor old;      // (N,) float32 contiguous, or undefined (old policy = current one)
  at::Tensor adv;      // (N,) float32 contiguous, or undefined (params.advantage for every row)
  LossParams params;
  // (kTokenStats, N) float32, contiguous: the kernel writes every row but ent_coef.
  at::Tensor stats;
  // Undefined: the forward only. Else the gradient of sum_t weights[t] * loss[t] (the
  // policy-gradient loss of token_loss, no options) is written into grad, a dense (N, V) tensor
  // of the logits' dtype that may be the logits themselves.
  at::Tensor grad;
  at::Tensor weights;  // (N,) float32, contiguous
};

// grad[r, j] = (scale[r] * (p_j - [j == y]) + ent_scale[r] * p_j * (log p_j + entropy[r])) / tau,
// p = softmax(z[r] / tau) from the forward's lse.
struct BackwardArgs {
  at::Tensor logits;        // as ForwardArgs
  at::Tensor targets;       // as ForwardArgs
  at::Tensor lse, entropy;  // (N,) float32 contiguous: the forward's stats rows
  at::Tensor scale;         // (N,) float32 contiguous
  at::Tensor ent_scale;     // (N,) float32 contiguous, or undefined (no entropy term)
  LossParams params;
  at::Tensor grad;          // dense (N, V), written; may be the logits themselves
};

// The options' pass over the forward's stats (psft_math.h, token_pass): rewrites the loss, ratio,
// clipped and coef rows of the valid tokens and writes the ent_coef row. With from_logp the
// policy-gradient values are formed from the stats' logp row (and old) first, and ignored tokens'
// values are zeroed.
struct TokenOptionsArgs {
  at::Tensor targets;  // as ForwardArgs
  at::Tensor stats;    // (kTokenStats, N) float32, contiguous
  // (N,) float32 contiguous, or undefined:
  at::Tensor old, adv, is_weights, ref_logprobs, seq_log_ratio;
  bool from_logp = false;
  LossParams params;
};

namespace cpu {
void forward(const ForwardArgs& a);
void backward(const BackwardArgs& a);
void token_options(const TokenOptionsArgs& a);
// grad[r, :] *= factor[r * stride] for rows whose factor is not exactly 1; grad dense (N, V).
void scale_rows(const at::Tensor& grad, const at::Tensor& factor);
// "avx2" or "baseline": the row loops this process runs.
const char* kernel_isa();
}  // namespace cpu

namespace cuda {
void forward(const ForwardArgs& a);
void backward(const BackwardArgs& a);
void token_options(const TokenOptionsArgs& a);
void scale_rows(const at::Tensor& grad, const at::Tensor& factor);
// The first target neither ignore_index nor in [0, vocab), found on the device; raises for it.
void check_target_range(const at::Tensor& targets, int64_t vocab, int64_t ignore_index,
                        const char* op);
}  // namespace cuda

}  // namespace psft
