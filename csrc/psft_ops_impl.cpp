// The ops' implementations, one for every device: check the arguments, lay the tensors out for
// the kernels, run the device's kernels (csrc/psft_kernels.h), reduce.
//
// psft_fwd also does the reduction ("mean" / "sum"), the token count and the metrics, so that a
// loss call is one op: on the CPU these are host loops over the targets and the stats, which
// cost less than the tensor ops they replace (each about 5 us of host time); on other devices
// they are a handful of tensor ops (nothing reads back to the host).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "psft_checks.h"
#include "psft_kernels.h"

namespace psft {
namespace {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

enum class Reduction { kNone, kSum, kMean };

Reduction parse_reduction(c10::string_view r, const char* op) {
  if (r == "mean") return Reduction::kMean;
  if (r == "sum") return Reduction::kSum;
  if (r == "none") return Reduction::kNone;
  TORCH_CHECK_VALUE(false, op, ": reduction must be one of ('mean', 'sum', 'none'), got '",
                    std::string(r), "'");
  __builtin_unreachable();
}

void forward_kernels(const ForwardArgs& a) {
#ifdef PSFT_WITH_CUDA
  if (a.logits.is_cuda()) return cuda::forward(a);
#endif
  cpu::forward(a);
}

void backward_kernels(const BackwardArgs& a) {
#ifdef PSFT_WITH_CUDA
  if (a.logits.is_cuda()) return cuda::backward(a);
#endif
  cpu::backward(a);
}

// Non-ignored targets, counted on the host (CPU targets only).
int64_t count_tokens_cpu(const Tensor& targets, int64_t ignore_index) {
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

// Non-ignored targets as a 0-d int64 device tensor. Compared in int64, as the kernels compare:
// ne() would cast an ignore_index outside int32's range to int32 for int32 targets.
Tensor count_tokens_tensor(const Tensor& targets, int64_t ignore_index) {
  const bool widen = targets.scalar_type() == at::kInt &&
                     (ignore_index < std::numeric_limits<int32_t>::min() ||
                      ignore_index > std::numeric_limits<int32_t>::max());
  return (widen ? targets.to(at::kLong) : targets).ne(ignore_index).sum();
}

// Sum of a contiguous float32 row on the host, in double.
double sum_cpu(const float* v, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += v[i];
  return s;
}

// The reduction's denominator and the token count: on the host for CPU tensors (`host`), else
// as device tensors.
struct Denominator {
  bool host;
  int64_t count = 0;    // host
  double value = 1.0;   // host: the denominator
  Tensor count_t, den;  // device: 0-d int64 count, 0-d float32 denominator

  Denominator(const Tensor& targets, int64_t ignore_index, Reduction reduction,
              const OptTensor& num_items, double num_items_value, bool need_count)
      : host(targets.is_cpu()) {
    const bool mean = reduction == Reduction::kMean;
    const bool from_count = mean && !num_items.has_value() && num_items_value <= 0.0;
    if (host) {
      if (need_count || from_count) count = count_tokens_cpu(targets, ignore_index);
      if (!mean) {
        value = 1.0;
      } else if (num_items.has_value()) {
        value = num_items->item<double>();
        TORCH_CHECK_VALUE(value > 0.0 && std::isfinite(value),
                          "psft_fwd: num_items must be a finite number > 0, got ", str_of(value));
      } else if (num_items_value > 0.0) {
        value = num_items_value;
      } else {
        value = static_cast<double>(std::max<int64_t>(count, 1));
      }
      return;
    }
    const auto f32 = targets.options().dtype(at::kFloat);
    if (need_count || from_count) count_t = count_tokens_tensor(targets, ignore_index);
    if (!mean) {
      den = at::ones({}, f32);
    } else if (num_items.has_value()) {
      // A non-positive or NaN num_items: NaN, not a sign-flipped or infinite step (reading the
      // value to raise would cost a sync here).
      den = num_items->reshape({}).to(targets.device(), at::kFloat);
      den = at::where(den > 0, den, at::full({}, NAN, den.options()));
    } else if (num_items_value > 0.0) {
      den = at::scalar_tensor(num_items_value, f32);
    } else {
      den = count_t.clamp_min(1).to(at::kFloat);
    }
  }

  // The upstream gradient of every token's loss that loss.backward() gives: 1 / den as float32
  // (what autograd computes through sum / den).
  Tensor weights(int64_t n, const Tensor& like) const {
    const auto f32 = like.options().dtype(at::kFloat);
    if (host) return at::full({n}, 1.0f / static_cast<float>(value), f32);
    return at::reciprocal(den).expand({n}).contiguous();
  }

  // coef[t] / den in place: the stats' coef then gives the gradient of the returned mean, so a
  // backward from the stats needs only the upstream gradient (psft_math.h, TokenStat).
  void divide(const Tensor& coef_row) const {
    if (host) {
      const float w = 1.0f / static_cast<float>(value);
      float* c = coef_row.data_ptr<float>();
      for (int64_t i = 0, n = coef_row.numel(); i < n; ++i) c[i] *= w;
      return;
    }
    coef_row.mul_(at::reciprocal(den));
  }

  Tensor reduce(const Tensor& loss_row) const {
    if (host) {
      const float sum = static_cast<float>(sum_cpu(loss_row.data_ptr<float>(), loss_row.numel()));
      return at::scalar_tensor(sum / static_cast<float>(value), loss_row.options());
    }
    return loss_row.sum().div_(den);
  }

  // PSFTMetrics' values (psft_math.h, Metric) from the stats rows.
  Tensor metrics(const Tensor& stats) const {
    const int64_t n = stats.size(1);
    if (host) {
      const double c = static_cast<double>(std::max<int64_t>(count, 1));
      Tensor m = at::empty({kMetrics}, stats.options());
      float* out = m.data_ptr<float>();
      const float* s = stats.data_ptr<float>();
      out[kNll] = static_cast<float>(-sum_cpu(s + kLogp * n, n) / c);
      out[kEntropyMean] = static_cast<float>(sum_cpu(s + kEntropy * n, n) / c);
      out[kClipFraction] = static_cast<float>(sum_cpu(s + kClipped * n, n) / c);
      out[kApproxKl] = static_cast<float>(-sum_cpu(s + kLogRatio * n, n) / c);
      out[kRatioMean] = static_cast<float>(sum_cpu(s + kRatio * n, n) / c);
      out[kNumTokens] = static_cast<float>(count);
      return m;
    }
    static_assert(kNll == 0 && kEntropyMean == 1 && kClipFraction == 2 && kApproxKl == 3 &&
                      kRatioMean == 4 && kNumTokens == 5,
                  "the rows below are listed in Metric order");
    const Tensor c = count_t.to(at::kFloat);
    const Tensor rows = at::stack({stats[kLogp], stats[kEntropy], stats[kClipped],
                                   stats[kLogRatio], stats[kRatio]});
    Tensor means = rows.sum(1).div_(c.clamp_min(1));
    means.select(0, kNll).neg_();
    means.select(0, kApproxKl).neg_();
    return at::cat({means, c.reshape({1})});
  }
};

std::tuple<Tensor, Tensor, Tensor> psft_fwd(const Tensor& logits_in, const Tensor& targets_in,
                                            const OptTensor& old, const OptTensor& adv,
                                            c10::ArrayRef<double> params, int64_t ignore_index,
                                            c10::string_view reduction_name,
                                            const OptTensor& num_items, double num_items_value,
                                            bool with_metrics, const OptTensor& grad) {
  const char* op = "psft_fwd";
  const Reduction reduction = parse_reduction(reduction_name, op);
  check_logits_and_targets(logits_in, targets_in, ignore_index, op);
  check_per_token(old, logits_in, "old_logprobs", op);
  check_per_token(adv, logits_in, "advantages", op);
  if (num_items.has_value()) {
    TORCH_CHECK_VALUE(num_items->numel() == 1, op, ": num_items must hold one value, got shape ",
                      str_of(num_items->sizes()));
    TORCH_CHECK_TYPE(num_items->scalar_type() != at::kBool && !num_items->is_complex(), op,
                     ": num_items must be a real number, got ", str_of(num_items->scalar_type()));
    TORCH_CHECK_VALUE(num_items->device() == logits_in.device() || num_items->is_cpu(), op,
                      ": num_items is on ", str_of(num_items->device()), " but logits are on ",
                      str_of(logits_in.device()));
  }
  TORCH_CHECK_VALUE(num_items_value >= 0.0 && std::isfinite(num_items_value), op,
                    ": num_items_value must be finite and >= 0 (0: the token count), got ",
                    str_of(num_items_value));
  if (grad.has_value()) check_grad_output(*grad, logits_in, op);

  ForwardArgs a;
  a.params = checked_params(params, ignore_index, op);
  a.logits = rows_with_unit_stride(logits_in);
  a.targets = targets_in.contiguous();
  if (old.has_value()) a.old = old->contiguous();
  if (adv.has_value()) a.adv = adv->contiguous();
  const int64_t n = a.logits.size(0);
  a.stats = at::empty({kTokenStats, n}, a.logits.options().dtype(at::kFloat));

  const Denominator den(a.targets, ignore_index, reduction, num_items, num_items_value,
                        with_metrics);
  if (grad.has_value()) {
    a.grad = *grad;
    a.weights = reduction == Reduction::kNone
                    ? at::ones({n}, a.stats.options())
                    : den.weights(n, a.stats);
  }
  forward_kernels(a);
  if (reduction == Reduction::kMean) den.divide(a.stats[kCoef]);

  const Tensor loss_row = a.stats[kLoss];
  const Tensor loss = reduction == Reduction::kNone ? loss_row.clone() : den.reduce(loss_row);
  const Tensor metrics = with_metrics ? den.metrics(a.stats) : at::empty({0}, a.stats.options());
  return {loss, metrics, a.stats};
}

void psft_bwd(const Tensor& grad_loss, const Tensor& logits_in, const Tensor& targets,
              const Tensor& stats, c10::ArrayRef<double> params, int64_t ignore_index,
              const Tensor& grad) {
  const char* op = "psft_bwd";
  // The forward checked the targets' range; the kernels never read outside a row anyway.
  check_logits_and_targets_layout(logits_in, targets, op);
  check_per_token(grad_loss, logits_in, "grad_loss", op);
  check_stats(stats, logits_in, op);
  check_grad_output(grad, logits_in, op);
  BackwardArgs a;
  a.params = checked_params(params, ignore_index, op);
  a.logits = rows_with_unit_stride(logits_in);
  a.targets = targets.contiguous();
  a.lse = stats[kLse].contiguous();
  a.coef = stats[kCoef].contiguous();
  a.grad_loss = grad_loss.contiguous();
  a.grad = grad;
  backward_kernels(a);
}

void scale_rows_(const Tensor& grad, const Tensor& factor) {
  check_scale_rows_inputs(grad, factor, "scale_rows_");
#ifdef PSFT_WITH_CUDA
  if (grad.is_cuda()) return cuda::scale_rows(grad, factor);
#endif
  cpu::scale_rows(grad, factor);
}

}  // namespace
}  // namespace psft

TORCH_LIBRARY_IMPL(psft_ext, CPU, m) {
  m.impl("psft_fwd", &psft::psft_fwd);
  m.impl("psft_bwd", &psft::psft_bwd);
  m.impl("scale_rows_", &psft::scale_rows_);
}

#ifdef PSFT_WITH_CUDA
TORCH_LIBRARY_IMPL(psft_ext, CUDA, m) {
  m.impl("psft_fwd", &psft::psft_fwd);
  m.impl("psft_bwd", &psft::psft_bwd);
  m.impl("scale_rows_", &psft::scale_rows_);
}
#endif
