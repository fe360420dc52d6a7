// Input validation shared by the CPU and CUDA implementations of the ops.
//
// Every op checks its arguments here before any kernel runs, so a bad call raises a Python
// ValueError / TypeError that names the problem instead of crashing or reading out of bounds.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "psft_math.h"

namespace psft {

// Message pieces as strings. Error messages are built from strings only: numbers are formatted
// with snprintf, never through an iostream in this library. On one GPU machine (its g++ 13
// headers, an older libstdc++ at run time) the iostream number formatting that g++ inlines into
// the extension crashed inside the TORCH_CHECK that was reporting a bad target id.
std::string str_of(int64_t v);
std::string str_of(double v);
std::string str_of(at::IntArrayRef sizes);
std::string str_of(at::ScalarType t);
std::string str_of(const c10::Device& d);

// Checks logits (N, V) and targets (N,): ranks, dtypes, devices, and that every target is either
// ignore_index or in [0, V). This last check reads the targets: a scan on the CPU; on a GPU one
// small kernel and an 8-byte read-back (a sync), cuda::check_target_range.
void check_logits_and_targets(const at::Tensor& logits, const at::Tensor& targets,
                              int64_t ignore_index, const char* op);

// Raises the ValueError for the target id `id` at row `pos`, outside [0, vocab).
[[noreturn]] void raise_bad_target(int64_t id, int64_t pos, int64_t vocab, int64_t ignore_index,
                                   const char* op);

namespace cuda {
// The range check of CUDA targets (csrc/cuda/psft_cuda.cpp, CUDA builds only).
void check_target_range(const at::Tensor& targets, int64_t vocab, int64_t ignore_index,
                        const char* op);
}  // namespace cuda

// Checks an optional per-token float32 tensor (old_logprobs, advantages) against N and device.
void check_per_token(const std::optional<at::Tensor>& t, const at::Tensor& logits,
                     const char* what, const char* op);

// Checks the scalar hyper-parameters and packs them.
LossParams make_loss_params(double advantage, double clip_low, double clip_high, double dual_clip,
                            int64_t ignore_index, double temperature);

void check_temperature(double temperature, const char* op);

// Checks the backward's arguments: logits (N, V) of a supported dtype, targets (N,) int64/int32
// on the same device (their range was checked by the forward), and float32 (N,) grad_loss, lse
// and coef.
void check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& logits,
                           const at::Tensor& targets, const at::Tensor& lse,
                           const at::Tensor& coef, double temperature, const char* op);

// The forward_backward ops' own arguments: grad_loss float32 (N,) on the logits' device and, for
// the in-place variant, logits the gradient can overwrite element for element (contiguous,
// not requiring grad is the caller's business).
void check_forward_backward_inputs(const at::Tensor& logits, const at::Tensor& grad_loss,
                                   bool in_place, const char* op);

// Checks scale_rows_'s arguments: a contiguous (N, V) gradient of a logits dtype and a float32
// (N,) factor on its device.
void check_scale_rows_inputs(const at::Tensor& grad, const at::Tensor& factor, const char* op);

// The forward's inputs, checked (logits and targets, old_logprobs, advantages, the
// hyper-parameters) and laid out for the kernels: rows with a unit element stride, contiguous
// per-token tensors (undefined where absent).
struct ForwardInputs {
  at::Tensor logits, targets, old, adv;
  LossParams params;
  int64_t n, vocab, row_stride;  // row_stride: elements between row starts (V for one row)

  ForwardInputs(const at::Tensor& logits_in, const at::Tensor& targets_in,
                const std::optional<at::Tensor>& old_in, const std::optional<at::Tensor>& adv_in,
                double advantage, double clip_low, double clip_high, double dual_clip,
                int64_t ignore_index, double temperature, const char* op);
};

// Logits the kernels can read: the last dimension must be dense (stride 1); rows may be strided.
at::Tensor rows_with_unit_stride(const at::Tensor& logits);

}  // namespace psft
