// psft_loss_reduced: the PSFT loss reduced to one number ("mean" or "sum") in a single op, on
// every device.
//
// psft_ext.psft_loss used to reduce in Python around psft_forward_backward: count the tokens,
// form the mean's denominator and the expected upstream gradient 1 / den, sum the per-token
// losses, divide; and autograd then ran three nodes (division, sum, the op) per backward. At
// small shapes those dozen tensor ops and nodes cost more host time than the kernels themselves,
// and on a GPU that host time is exposed at the call's one sync (the target range check). Here
// the same steps run in C++ (on the CPU without tensor ops: the count and the sum are plain
// loops), and csrc/psft_autograd.cpp gives the op one backward node.
//
// The op calls psft_forward / psft_forward_backward through the dispatcher, so it runs whatever
// kernels the device registered (csrc/cpu, csrc/cuda); its fake kernel is in psft_ext/_ops.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

#include "psft_checks.h"
#include "psft_env.h"
#include "psft_op_calls.h"

namespace psft {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using op_calls::ReducedResult;

// The metrics, in PSFTMetrics' order: token means of -logp, entropy, clipped and -log_ratio
// (approx_kl) and ratio, then the token count.
constexpr int kMetrics = 6;

// The host loops apply to CPU tensors. PSFT_EXT_REDUCED_TENSOR_OPS=1 (read at each call) turns
// them off, so that the CPU test suite also runs the tensor-op branch every other device takes
// (tests/test_loss_reduced.py runs its tests both ways).
bool use_host_loops(const Tensor& logits, const Tensor& targets) {
  return logits.device().is_cpu() && targets.device().is_cpu() &&
         !env_flag("PSFT_EXT_REDUCED_TENSOR_OPS");
}

// Non-ignored targets on the host: a loop over the ids, no tensor op.
int64_t count_tokens_cpu(const Tensor& targets_in, int64_t ignore_index) {
  const Tensor targets = targets_in.contiguous();
  const int64_t n = targets.numel();
  int64_t count = 0;
  if (targets.scalar_type() == at::kInt) {
    const int32_t* t = targets.data_ptr<int32_t>();
    for (int64_t i = 0; i < n; ++i) count += t[i] != ignore_index;
  } else {
    const int64_t* t = targets.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) count += t[i] != ignore_index;
  }
  return count;
}

// Sum of per-token values on the host, accumulated in double (ignored rows hold 0).
double sum_cpu(const Tensor& values) {
  const float* v = values.data_ptr<float>();
  double s = 0.0;
  for (int64_t i = 0, n = values.numel(); i < n; ++i) s += v[i];
  return s;
}

// The metrics from the per-token outputs: on the host for CPU tensors, else a handful of tensor
// ops (one stacked sum instead of one reduction per metric).
Tensor metrics_of(const Tensor& logp, const Tensor& entropy, const Tensor& clipped,
                  const Tensor& log_ratio, const Tensor& ratio, const Tensor& num_tokens,
                  bool host_loops, int64_t count_cpu) {
  if (host_loops) {
    const double count = static_cast<double>(std::max<int64_t>(count_cpu, 1));
    Tensor m = at::empty({kMetrics}, logp.options());
    float* out = m.data_ptr<float>();
    out[0] = static_cast<float>(-sum_cpu(logp) / count);
    out[1] = static_cast<float>(sum_cpu(entropy) / count);
    out[2] = static_cast<float>(sum_cpu(clipped) / count);
    out[3] = static_cast<float>(-sum_cpu(log_ratio) / count);
    out[4] = static_cast<float>(sum_cpu(ratio) / count);
    out[5] = static_cast<float>(count_cpu);
    return m;
  }
  const Tensor count = num_tokens.to(at::kFloat);
  Tensor sums = at::stack({logp, entropy, clipped, log_ratio, ratio}).sum(1);
  sums.div_(count.clamp_min(1));
  sums.select(0, 0).neg_();
  sums.select(0, 3).neg_();
  return at::cat({sums, count.reshape({1})});
}

// The denominator as a float32 0-d tensor on the targets' device: the caller's tensor, a fixed
// value (> 0; 1 for a sum), or, for denominator_value == 0, max(num_tokens, 1).
Tensor denominator_tensor(const OptTensor& denominator, double denominator_value,
                          const Tensor& num_tokens) {
  // reshape({}): a one-element (1,) or (1, 1) denominator, which the host branch reads with
  // item(), must divide the 0-d sum and expand to (N,) as a 0-d tensor does.
  if (denominator.has_value()) {
    return denominator->reshape({}).to(num_tokens.device(), at::kFloat);
  }
  if (denominator_value > 0.0) {
    return at::scalar_tensor(denominator_value, num_tokens.options().dtype(at::kFloat));
  }
  return num_tokens.clamp_min(1).to(at::kFloat);
}

void check_denominator(const OptTensor& denominator, double denominator_value, const char* op) {
  if (denominator.has_value()) {
    TORCH_CHECK_VALUE(denominator->numel() == 1, op,
                      ": denominator must hold one value, got shape ",
                      str_of(denominator->sizes()));
    TORCH_CHECK_TYPE(!denominator->is_complex(), op, ": denominator must be a real number");
  }
  TORCH_CHECK_VALUE(denominator_value >= 0.0 && denominator_value - denominator_value == 0.0, op,
                    ": denominator_value must be finite and >= 0 (0: the token count), got ",
                    str_of(denominator_value));
}

ReducedResult psft_loss_reduced(const Tensor& logits, const Tensor& targets, const OptTensor& old,
                                const OptTensor& adv, double advantage, double clip_low,
                                double clip_high, double dual_clip, int64_t ignore_index,
                                double temperature, const OptTensor& denominator,
                                double denominator_value, bool with_grad, bool with_metrics) {
  const char* op = "psft_loss_reduced";
  check_denominator(denominator, denominator_value, op);
  // The count reads the targets before psft_forward(_backward) checks them in full.
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt, op,
                   ": targets must be int64 or int32 token ids, got ",
                   str_of(targets.scalar_type()));
  TORCH_CHECK_VALUE(targets.dim() == 1, op, ": targets must be 1-D (N,), got shape ",
                    str_of(targets.sizes()));
  const int64_t n = targets.size(0);
  const bool host_loops = use_host_loops(logits, targets);
  const auto f32 = logits.options().dtype(at::kFloat);

  Tensor num_tokens, den;  // device tensors (not on the CPU)
  int64_t count_cpu = 0;
  float den_cpu = 1.0f;
  if (host_loops) {
    // Everything on the host: the count, the denominator, 1 / den.
    count_cpu = count_tokens_cpu(targets, ignore_index);
    if (denominator.has_value()) {
      den_cpu = denominator->item<float>();
    } else if (denominator_value > 0.0) {
      den_cpu = static_cast<float>(denominator_value);
    } else {
      den_cpu = static_cast<float>(std::max<int64_t>(count_cpu, 1));
    }
  } else {
    // Compared in int64, as the kernels and the host loop compare: ne() would cast an
    // ignore_index outside int32's range to int32 for int32 targets (2^32 would match id 0).
    const bool widen = targets.scalar_type() == at::kInt &&
                       (ignore_index < std::numeric_limits<int32_t>::min() ||
                        ignore_index > std::numeric_limits<int32_t>::max());
    num_tokens = (widen ? targets.to(at::kLong) : targets).ne(ignore_index).sum();
    den = denominator_tensor(denominator, denominator_value, num_tokens);
  }

  const op_calls::LossArgs args{old,       adv,       advantage,    clip_low,
                                clip_high, dual_clip, ignore_index, temperature};
  Tensor loss, logp, entropy, ratio, log_ratio, clipped, lse, coef, grad;
  if (with_grad) {
    // The upstream gradient loss.backward() gives every token: 1 / den, as float32 (what
    // autograd would compute through sum / den); the backward rescales if it differs.
    const Tensor expected = host_loops ? at::full({n}, 1.0f / den_cpu, f32)
                                   : at::reciprocal(den).expand({n}).contiguous();
    std::tie(loss, logp, entropy, ratio, log_ratio, clipped, lse, coef, grad) =
        op_calls::psft_forward_backward(logits, targets, args, expected);
  } else {
    std::tie(loss, logp, entropy, ratio, log_ratio, clipped, lse, coef) =
        op_calls::psft_forward(logits, targets, args);
    grad = at::empty({0}, logits.options());
  }
  const Tensor reduced =
      host_loops ? at::scalar_tensor(static_cast<float>(sum_cpu(loss)) / den_cpu, f32)
             : loss.sum().div_(den);
  const Tensor metrics = with_metrics ? metrics_of(logp, entropy, clipped, log_ratio, ratio,
                                                   num_tokens, host_loops, count_cpu)
                                      : at::empty({0}, f32);
  return {reduced, metrics, grad};
}

}  // namespace
}  // namespace psft

TORCH_LIBRARY_IMPL(psft_ext, CPU, m) {
  m.impl("psft_loss_reduced", &psft::psft_loss_reduced);
}

#ifdef PSFT_WITH_CUDA
TORCH_LIBRARY_IMPL(psft_ext, CUDA, m) {
  m.impl("psft_loss_reduced", &psft::psft_loss_reduced);
}
#endif
