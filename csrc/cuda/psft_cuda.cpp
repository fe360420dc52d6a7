// CUDA implementations of the psft_ext ops: the same checks, layouts and outputs as the CPU ones
// (csrc/cpu/psft_cpu.cpp), then one kernel launch on the current stream.
//
// Only c10's CUDA headers are needed (stream and device guard); ATen/cuda/CUDAContext.h would also
// pull in the cuBLAS / cuSPARSE headers, which some CUDA installs lack.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../psft_checks.h"
#include "psft_launch.h"

namespace psft {
namespace cuda {
namespace {

using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor, at::Tensor>;

void check_on_cuda(const at::Tensor& logits, const char* op) {
  TORCH_CHECK_VALUE(logits.is_cuda(), op, ": logits are on ", str_of(logits.device()),
                    " but another argument is on a CUDA device");
}

DType dtype_of(const at::Tensor& logits, const char* op) {
  const at::ScalarType t = logits.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, op,
                   ": logits must be float32, bfloat16 or float16, got ", str_of(t));
  return t == at::kFloat ? DType::kFloat32 : (t == at::kBFloat16 ? DType::kBFloat16
                                                                  : DType::kFloat16);
}

// The kernels address rows as logits + r * row_stride and read each row's elements contiguously
// (rows_with_unit_stride guarantees the latter). A row stride is only meaningful with two rows.
Rows rows_of(const at::Tensor& logits, const at::Tensor& targets, const char* op) {
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(logits.data_ptr()) % logits.element_size() == 0,
                    op, ": logits' data pointer is not aligned to its element size");
  Rows rows;
  rows.logits = logits.data_ptr();
  rows.dtype = dtype_of(logits, op);
  rows.rows = logits.size(0);
  rows.vocab = logits.size(1);
  rows.row_stride = logits.size(0) > 1 ? logits.stride(0) : logits.size(1);
  rows.targets = targets.data_ptr();
  rows.targets_int32 = targets.scalar_type() == at::kInt;
  return rows;
}

float* float_ptr(at::Tensor& t) { return t.data_ptr<float>(); }

const float* optional_float_ptr(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

ForwardResult psft_forward_cuda(const at::Tensor& logits_in, const at::Tensor& targets_in,
                                const std::optional<at::Tensor>& old_in,
                                const std::optional<at::Tensor>& adv_in, double advantage,
                                double clip_low, double clip_high, double dual_clip,
                                int64_t ignore_index, double temperature) {
  const char* op = "psft_forward";
  check_on_cuda(logits_in, op);
  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  check_logits_and_targets(logits_in, targets_in, ignore_index, op);
  check_per_token(old_in, logits_in, "old_logprobs", op);
  check_per_token(adv_in, logits_in, "advantages", op);
  const LossParams params =
      make_loss_params(advantage, clip_low, clip_high, dual_clip, ignore_index, temperature);

  const at::Tensor logits = rows_with_unit_stride(logits_in);
  const at::Tensor targets = targets_in.contiguous();
  const at::Tensor old = old_in.has_value() ? old_in->contiguous() : at::Tensor();
  const at::Tensor adv = adv_in.has_value() ? adv_in->contiguous() : at::Tensor();
  const int64_t n = logits.size(0);
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({n}, opts), logp = at::empty({n}, opts),
             entropy = at::empty({n}, opts), ratio = at::empty({n}, opts),
             log_ratio = at::empty({n}, opts), clipped = at::empty({n}, opts),
             lse = at::empty({n}, opts), coef = at::empty({n}, opts);
  if (n > 0) {
    ForwardOutputs out;
    out.loss = float_ptr(loss);
    out.logp = float_ptr(logp);
    out.entropy = float_ptr(entropy);
    out.ratio = float_ptr(ratio);
    out.log_ratio = float_ptr(log_ratio);
    out.clipped = float_ptr(clipped);
    out.lse = float_ptr(lse);
    out.coef = float_ptr(coef);
    check_launch(launch_psft_forward(rows_of(logits, targets, op), optional_float_ptr(old),
                                     optional_float_ptr(adv), params, out,
                                     c10::cuda::getCurrentCUDAStream().stream()),
                 op);
  }
  return {loss, logp, entropy, ratio, log_ratio, clipped, lse, coef};
}

at::Tensor psft_backward_cuda(const at::Tensor& grad_loss_in, const at::Tensor& logits_in,
                              const at::Tensor& targets_in, const at::Tensor& lse_in,
                              const at::Tensor& coef_in, int64_t ignore_index,
                              double temperature) {
  const char* op = "psft_backward";
  check_on_cuda(logits_in, op);
  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  // The targets were range-checked by the forward (the kernel still never reads outside a row).
  check_backward_inputs(grad_loss_in, logits_in, targets_in, lse_in, coef_in, temperature, op);

  const at::Tensor logits = rows_with_unit_stride(logits_in);
  const at::Tensor targets = targets_in.contiguous(), grad_loss = grad_loss_in.contiguous(),
                   lse = lse_in.contiguous(), coef = coef_in.contiguous();
  const int64_t n = logits.size(0), vocab = logits.size(1);
  at::Tensor grad =
      at::empty({n, vocab}, logits.options().memory_format(at::MemoryFormat::Contiguous));
  if (n > 0) {
    const float inv_temperature = static_cast<float>(1.0 / temperature);
    check_launch(launch_psft_backward(rows_of(logits, targets, op),
                                      grad_loss.data_ptr<float>(), lse.data_ptr<float>(),
                                      coef.data_ptr<float>(), ignore_index, inv_temperature,
                                      grad.data_ptr(), c10::cuda::getCurrentCUDAStream().stream()),
                 op);
  }
  return grad;
}

std::tuple<at::Tensor, at::Tensor> token_logprobs_cuda(const at::Tensor& logits_in,
                                                       const at::Tensor& targets_in,
                                                       int64_t ignore_index, double temperature) {
  const char* op = "token_logprobs";
  check_on_cuda(logits_in, op);
  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  check_logits_and_targets(logits_in, targets_in, ignore_index, op);
  check_temperature(temperature, op);
  const at::Tensor logits = rows_with_unit_stride(logits_in);
  const at::Tensor targets = targets_in.contiguous();
  const int64_t n = logits.size(0);
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({n}, opts), entropy = at::empty({n}, opts);
  if (n > 0) {
    const float inv_temperature = static_cast<float>(1.0 / temperature);
    check_launch(launch_token_logprobs(rows_of(logits, targets, op), ignore_index,
                                       inv_temperature, float_ptr(logp), float_ptr(entropy),
                                       c10::cuda::getCurrentCUDAStream().stream()),
                 op);
  }
  return {logp, entropy};
}

}  // namespace
}  // namespace cuda
}  // namespace psft

TORCH_LIBRARY_IMPL(psft_ext, CUDA, m) {
  m.impl("psft_forward", &psft::cuda::psft_forward_cuda);
  m.impl("psft_backward", &psft::cuda::psft_backward_cuda);
  m.impl("token_logprobs", &psft::cuda::token_logprobs_cuda);
}
