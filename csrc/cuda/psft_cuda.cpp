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
#include "../psft_env.h"
#include "../psft_op_adapters.h"
#include "psft_launch.h"

namespace psft {
namespace cuda {
namespace {

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
  if (err == cudaSuccess) return;
  // Cleared as the thread's last error (when it is not sticky), or the next op's launch check,
  // which reads cudaGetLastError, would report it as its own.
  (void)cudaGetLastError();
  TORCH_CHECK(false, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

// The forward's eight per-token float32 outputs, in the ops' order.
struct ForwardBuffers {
  at::Tensor loss, logp, entropy, ratio, log_ratio, clipped, lse, coef;

  explicit ForwardBuffers(const at::Tensor& logits) {
    const auto opts = logits.options().dtype(at::kFloat);
    const int64_t n = logits.size(0);
    for (at::Tensor* t : {&loss, &logp, &entropy, &ratio, &log_ratio, &clipped, &lse, &coef}) {
      *t = at::empty({n}, opts);
    }
  }
  ForwardOutputs pointers() {
    ForwardOutputs out;
    out.loss = float_ptr(loss);
    out.logp = float_ptr(logp);
    out.entropy = float_ptr(entropy);
    out.ratio = float_ptr(ratio);
    out.log_ratio = float_ptr(log_ratio);
    out.clipped = float_ptr(clipped);
    out.lse = float_ptr(lse);
    out.coef = float_ptr(coef);
    return out;
  }
  ForwardResult result() const {
    return {loss, logp, entropy, ratio, log_ratio, clipped, lse, coef};
  }
};

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

ForwardResult psft_forward_cuda(const at::Tensor& logits_in, const at::Tensor& targets_in,
                                const std::optional<at::Tensor>& old_in,
                                const std::optional<at::Tensor>& adv_in, double advantage,
                                double clip_low, double clip_high, double dual_clip,
                                int64_t ignore_index, double temperature) {
  const char* op = "psft_forward";
  check_on_cuda(logits_in, op);
  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  const ForwardInputs in(logits_in, targets_in, old_in, adv_in, advantage, clip_low, clip_high,
                         dual_clip, ignore_index, temperature, op);
  ForwardBuffers out(in.logits);
  if (in.n > 0) {
    check_launch(launch_psft_forward(rows_of(in.logits, in.targets, op), optional_float_ptr(in.old),
                                     optional_float_ptr(in.adv), in.params, out.pointers(),
                                     current_stream()),
                 op);
  }
  return out.result();
}

// The gradient of sum_t grad_loss[t] * loss[t] into `grad` (a fresh dense buffer, or the
// contiguous logits themselves: the launcher then reads each element before it overwrites it).
void launch_backward(const at::Tensor& grad_loss_in, const at::Tensor& logits,
                     const at::Tensor& targets, const at::Tensor& lse_in,
                     const at::Tensor& coef_in, int64_t ignore_index, double temperature,
                     at::Tensor& grad, const char* op) {
  // No rows, or rows of no elements (V = 0, which the CPU op accepts too): nothing to write.
  if (logits.numel() == 0) return;
  const at::Tensor grad_loss = grad_loss_in.contiguous(), lse = lse_in.contiguous(),
                   coef = coef_in.contiguous();
  const float inv_temperature = static_cast<float>(1.0 / temperature);
  check_launch(launch_psft_backward(rows_of(logits, targets, op), grad_loss.data_ptr<float>(),
                                    lse.data_ptr<float>(), coef.data_ptr<float>(), ignore_index,
                                    inv_temperature, grad.data_ptr(), current_stream()),
               op);
}

// The Hopper single-pass kernel is opt-in (PSFT_EXT_SM90_SINGLE_PASS=1, read at each call) until
// it has been verified on a GPU; by default the two tested kernels run back to back.
bool sm90_single_pass_enabled() { return env_flag("PSFT_EXT_SM90_SINGLE_PASS"); }

// psft_forward_backward(_): the outputs and the gradient of sum_t grad_loss[t] * loss[t], in one
// pass where the single-pass kernel is enabled and applies (Hopper, rows that fit a cluster's
// shared memory), else the forward kernel and then the backward kernel.
std::tuple<ForwardResult, at::Tensor> forward_backward(
    const at::Tensor& logits_in, const at::Tensor& targets_in,
    const std::optional<at::Tensor>& old_in, const std::optional<at::Tensor>& adv_in,
    double advantage, double clip_low, double clip_high, double dual_clip, int64_t ignore_index,
    double temperature, const at::Tensor& grad_loss_in, bool in_place, const char* op) {
  check_on_cuda(logits_in, op);
  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  const ForwardInputs in(logits_in, targets_in, old_in, adv_in, advantage, clip_low, clip_high,
                         dual_clip, ignore_index, temperature, op);
  check_forward_backward_inputs(logits_in, grad_loss_in, in_place, op);
  ForwardBuffers out(in.logits);
  at::Tensor grad = in_place ? logits_in
                             : at::empty(in.logits.sizes(), in.logits.options().memory_format(
                                                                at::MemoryFormat::Contiguous));
  if (in.n == 0) return {out.result(), grad};
  const at::Tensor grad_loss = grad_loss_in.contiguous();
  const Rows rows = rows_of(in.logits, in.targets, op);
  if (sm90_single_pass_enabled() &&
      psft_forward_backward_supported(logits_in.get_device(), rows.dtype, rows.vocab)) {
    const cudaError_t err = launch_psft_forward_backward(
        rows, optional_float_ptr(in.old), optional_float_ptr(in.adv), in.params,
        grad_loss.data_ptr<float>(), out.pointers(), grad.data_ptr(), current_stream());
    // Not supported after all (no cluster of this size can be resident, e.g. under MPS): nothing
    // was launched, the two kernels below run instead.
    if (err != cudaErrorNotSupported) {
      check_launch(err, op);
      return {out.result(), grad};
    }
    (void)cudaGetLastError();
  }
  check_launch(launch_psft_forward(rows, optional_float_ptr(in.old), optional_float_ptr(in.adv),
                                   in.params, out.pointers(), current_stream()),
               op);
  launch_backward(grad_loss, in.logits, in.targets, out.lse, out.coef, ignore_index, temperature,
                  grad, op);
  return {out.result(), grad};
}

at::Tensor psft_backward_cuda(const at::Tensor& grad_loss, const at::Tensor& logits_in,
                              const at::Tensor& targets_in, const at::Tensor& lse,
                              const at::Tensor& coef, int64_t ignore_index, double temperature) {
  const char* op = "psft_backward";
  check_on_cuda(logits_in, op);
  const c10::cuda::CUDAGuard device_guard(logits_in.device());
  // The targets were range-checked by the forward (the kernel still never reads outside a row).
  check_backward_inputs(grad_loss, logits_in, targets_in, lse, coef, temperature, op);
  const at::Tensor logits = rows_with_unit_stride(logits_in);
  at::Tensor grad =
      at::empty(logits.sizes(), logits.options().memory_format(at::MemoryFormat::Contiguous));
  launch_backward(grad_loss, logits, targets_in.contiguous(), lse, coef, ignore_index,
                  temperature, grad, op);
  return grad;
}

void psft_backward_inplace_cuda(const at::Tensor& grad_loss, at::Tensor& logits,
                                const at::Tensor& targets, const at::Tensor& lse,
                                const at::Tensor& coef, int64_t ignore_index, double temperature) {
  const char* op = "psft_backward_";
  check_on_cuda(logits, op);
  const c10::cuda::CUDAGuard device_guard(logits.device());
  check_backward_inputs(grad_loss, logits, targets, lse, coef, temperature, op);
  TORCH_CHECK_VALUE(logits.is_contiguous(), op,
                    ": logits must be contiguous to receive the gradient in place");
  launch_backward(grad_loss, logits, targets.contiguous(), lse, coef, ignore_index, temperature,
                  logits, op);
}

void scale_rows_cuda(at::Tensor& grad, const at::Tensor& factor_in) {
  const char* op = "scale_rows_";
  check_on_cuda(grad, op);
  const c10::cuda::CUDAGuard device_guard(grad.device());
  check_scale_rows_inputs(grad, factor_in, op);
  if (grad.numel() == 0) return;
  // Read with its stride: an expanded scalar (stride 0) needs no copy.
  check_launch(launch_scale_rows(grad.data_ptr(), dtype_of(grad, op), grad.size(0), grad.size(1),
                                 factor_in.data_ptr<float>(), factor_in.stride(0),
                                 current_stream()),
               op);
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
                                       current_stream()),
                 op);
  }
  return {logp, entropy};
}

}  // namespace

// Declared in psft_checks.h; called by check_logits_and_targets for CUDA targets before any
// kernel reads a row. One kernel finds the first bad row; reading it back is the one sync.
void check_target_range(const at::Tensor& targets, int64_t vocab, int64_t ignore_index,
                        const char* op) {
  const c10::cuda::CUDAGuard device_guard(targets.device());
  const at::Tensor ids = targets.contiguous();
  at::Tensor first_bad = at::empty({1}, ids.options().dtype(at::kLong));
  check_launch(launch_first_bad_target(ids.data_ptr(), ids.scalar_type() == at::kInt, ids.numel(),
                                       vocab, ignore_index, first_bad.data_ptr<int64_t>(),
                                       current_stream()),
               op);
  const int64_t pos = first_bad.item<int64_t>();
  if (pos >= 0) raise_bad_target(ids[pos].item<int64_t>(), pos, vocab, ignore_index, op);
}

}  // namespace cuda
}  // namespace psft

TORCH_LIBRARY_IMPL(psft_ext, CUDA, m) {
  m.impl("psft_forward", &psft::cuda::psft_forward_cuda);
  m.impl("psft_backward", &psft::cuda::psft_backward_cuda);
  m.impl("psft_backward_", &psft::cuda::psft_backward_inplace_cuda);
  m.impl("psft_forward_backward", &psft::forward_backward_op<&psft::cuda::forward_backward>);
  m.impl("psft_forward_backward_",
         &psft::forward_backward_inplace_op<&psft::cuda::forward_backward>);
  m.impl("scale_rows_", &psft::cuda::scale_rows_cuda);
  m.impl("token_logprobs", &psft::cuda::token_logprobs_cuda);
}
