// CUDA side of csrc/psft_kernels.h: tensors to the launchers' raw pointers (psft_launch.h), one
// launch on the current stream, and the choice of kernel for the forward with its gradient.
//
// Only c10's CUDA headers are needed (stream and device guard); ATen/cuda/CUDAContext.h would also
// pull in the cuBLAS / cuSPARSE headers, which some CUDA installs lack.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>

#include "../psft_checks.h"
#include "../psft_env.h"
#include "../psft_kernels.h"
#include "psft_launch.h"

namespace psft {
namespace cuda {
namespace {

DType dtype_of(const at::Tensor& t) {
  const at::ScalarType s = t.scalar_type();
  return s == at::kFloat ? DType::kFloat32 : (s == at::kBFloat16 ? DType::kBFloat16
                                                                 : DType::kFloat16);
}

// The kernels address rows as logits + r * row_stride and read each row's elements contiguously.
// A row stride is only meaningful with two rows.
Rows rows_of(const at::Tensor& logits, const at::Tensor& targets, const char* op) {
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(logits.data_ptr()) % logits.element_size() == 0,
                    op, ": logits' data pointer is not aligned to its element size");
  Rows rows;
  rows.logits = logits.data_ptr();
  rows.dtype = dtype_of(logits);
  rows.rows = logits.size(0);
  rows.vocab = logits.size(1);
  rows.row_stride = logits.size(0) > 1 ? logits.stride(0) : logits.size(1);
  rows.targets = targets.data_ptr();
  rows.targets_int32 = targets.scalar_type() == at::kInt;
  return rows;
}

const float* optional_data(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

ForwardOutputs outputs_of(const at::Tensor& stats) {
  float* base = stats.data_ptr<float>();
  const int64_t n = stats.size(1);
  ForwardOutputs out;
  out.loss = base + kLoss * n;
  out.logp = base + kLogp * n;
  out.entropy = base + kEntropy * n;
  out.ratio = base + kRatio * n;
  out.log_ratio = base + kLogRatio * n;
  out.clipped = base + kClipped * n;
  out.lse = base + kLse * n;
  out.coef = base + kCoef * n;
  out.correct = base + kCorrect * n;
  out.max = base + kMax * n;
  return out;
}

void check_launch(cudaError_t err, const char* op) {
  if (err == cudaSuccess) return;
  // Cleared as the thread's last error (when it is not sticky), or the next op's launch check,
  // which reads cudaGetLastError, would report it as its own.
  (void)cudaGetLastError();
  TORCH_CHECK(false, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Which kernels compute the forward together with its gradient:
//   - the Hopper single pass (psft_fused_sm90.cu: a thread-block cluster holds each row on chip,
//     so the logits are read once) on sm_90 GPUs, for every dtype and the vocabulary sizes whose
//     rows fit a cluster's shared memory (psft_forward_backward_supported); it has not run on a
//     GPU yet, so only with PSFT_EXT_SM90_SINGLE_PASS=1;
//   - everywhere else the forward kernel, then the backward kernel (the logits are read twice).
bool use_sm90_single_pass(const at::Tensor& logits, int64_t vocab) {
  return env_flag("PSFT_EXT_SM90_SINGLE_PASS") &&
         psft_forward_backward_supported(logits.get_device(), dtype_of(logits), vocab);
}

void launch_backward(const Rows& rows, const at::Tensor& scale, const at::Tensor& ent_scale,
                     const at::Tensor& lse, const at::Tensor& entropy, const LossParams& params,
                     const at::Tensor& grad, const char* op) {
  if (rows.rows == 0 || rows.vocab == 0) return;
  check_launch(launch_psft_backward(rows, scale.data_ptr<float>(), optional_data(ent_scale),
                                    lse.data_ptr<float>(), entropy.data_ptr<float>(),
                                    params.ignore_index, params.inv_temperature, grad.data_ptr(),
                                    current_stream()),
               op);
}

}  // namespace

void forward(const ForwardArgs& a) {
  const char* op = "psft_fwd";
  const c10::cuda::CUDAGuard device_guard(a.logits.device());
  if (a.logits.size(0) == 0) return;
  const Rows rows = rows_of(a.logits, a.targets, op);
  const ForwardOutputs out = outputs_of(a.stats);
  const float* old = optional_data(a.old);
  const float* adv = optional_data(a.adv);
  if (a.grad.defined() && use_sm90_single_pass(a.logits, rows.vocab)) {
    const cudaError_t err = launch_psft_forward_backward(rows, old, adv, a.params,
                                                         a.weights.data_ptr<float>(), out,
                                                         a.grad.data_ptr(), current_stream());
    // Not supported after all (no cluster of this size can be resident, e.g. under MPS): nothing
    // was launched, the two kernels below run instead.
    if (err != cudaErrorNotSupported) return check_launch(err, op);
    (void)cudaGetLastError();
  }
  check_launch(launch_psft_forward(rows, old, adv, a.params, out, current_stream()), op);
  if (a.grad.defined()) {
    // The pair's backward kernel: the per-row scale is the reduction's weight times coef.
    launch_backward(rows, a.weights * a.stats[kCoef], at::Tensor(), a.stats[kLse],
                    a.stats[kEntropy], a.params, a.grad, op);
  }
}

void backward(const BackwardArgs& a) {
  const char* op = "psft_bwd";
  const c10::cuda::CUDAGuard device_guard(a.logits.device());
  launch_backward(rows_of(a.logits, a.targets, op), a.scale, a.ent_scale, a.lse, a.entropy,
                  a.params, a.grad, op);
}

void token_options(const TokenOptionsArgs& a) {
  const char* op = "psft_fwd";
  const c10::cuda::CUDAGuard device_guard(a.stats.device());
  check_launch(launch_token_options(a.stats.size(1), a.targets.data_ptr(),
                                    a.targets.scalar_type() == at::kInt,
                                    a.stats.data_ptr<float>(), optional_data(a.old),
                                    optional_data(a.adv), optional_data(a.is_weights),
                                    optional_data(a.ref_logprobs),
                                    optional_data(a.seq_log_ratio), a.from_logp, a.params,
                                    current_stream()),
               op);
}

void scale_rows(const at::Tensor& grad, const at::Tensor& factor) {
  const char* op = "scale_rows_";
  const c10::cuda::CUDAGuard device_guard(grad.device());
  if (grad.numel() == 0) return;
  // Read with its stride: an expanded scalar (stride 0) needs no copy.
  check_launch(launch_scale_rows(grad.data_ptr(), dtype_of(grad), grad.size(0), grad.size(1),
                                 factor.data_ptr<float>(), factor.stride(0), current_stream()),
               op);
}

// One kernel finds the first bad row; reading it back is the call's one sync.
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
