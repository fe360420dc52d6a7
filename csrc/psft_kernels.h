// What the ops (csrc/psft_ops_impl.cpp) ask of a device: its kernels, on tensors that are already
// checked and laid out. Each device implements these three functions (csrc/cpu/psft_cpu.cpp,
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
  at::Tensor stats;    // (kTokenStats, N) float32, contiguous: written
  // Undefined: the forward only. Else the gradient of sum_t weights[t] * loss[t] is written into
  // grad, a dense (N, V) tensor of the logits' dtype that may be the logits themselves.
  at::Tensor grad;
  at::Tensor weights;  // (N,) float32, contiguous
};

struct BackwardArgs {
  at::Tensor logits;     // as ForwardArgs
  at::Tensor targets;    // as ForwardArgs
  at::Tensor lse, coef;  // (N,) float32 contiguous: the forward's stats rows
  at::Tensor grad_loss;  // (N,) float32 contiguous: the upstream gradient of each token's loss
  LossParams params;
  at::Tensor grad;       // dense (N, V), written; may be the logits themselves
};

namespace cpu {
void forward(const ForwardArgs& a);
void backward(const BackwardArgs& a);
// grad[r, :] *= factor[r * stride] for rows whose factor is not exactly 1; grad dense (N, V).
void scale_rows(const at::Tensor& grad, const at::Tensor& factor);
// "avx2" or "baseline": the row loops this process runs.
const char* kernel_isa();
}  // namespace cpu

namespace cuda {
void forward(const ForwardArgs& a);
void backward(const BackwardArgs& a);
void scale_rows(const at::Tensor& grad, const at::Tensor& factor);
// The first target neither ignore_index nor in [0, vocab), found on the device; raises for it.
void check_target_range(const at::Tensor& targets, int64_t vocab, int64_t ignore_index,
                        const char* op);
}  // namespace cuda

}  // namespace psft
