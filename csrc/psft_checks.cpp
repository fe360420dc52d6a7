#include "psft_checks.h"

#include <ATen/ATen.h>

#include <cinttypes>
#include <cmath>
#include <cstdio>

namespace psft {

std::string str_of(int64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%" PRId64, v);
  return buf;
}

std::string str_of(double v) {
  char buf[32];
  std::snprintf(buf, sizeof(buf), "%g", v);
  return buf;
}

std::string str_of(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + str_of(sizes[i]);
  return s + "]";
}

std::string str_of(at::ScalarType t) { return c10::toString(t); }

std::string str_of(const c10::Device& d) { return d.str(); }

void raise_bad_target(int64_t id, int64_t pos, int64_t vocab, int64_t ignore_index,
                      const char* op) {
  TORCH_CHECK_VALUE(false, op, ": target id ", str_of(id), " at position ", str_of(pos),
                    " is out of range for a vocabulary of ", str_of(vocab), " (valid ids are 0..",
                    str_of(vocab - 1), ", or ignore_index=", str_of(ignore_index), ")");
  __builtin_unreachable();
}

namespace {

// Ranks, dtypes and devices of logits (N, V) and targets (N,).
void check_logits_and_targets_layout(const at::Tensor& logits, const at::Tensor& targets,
                                     const char* op) {
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D (N, V), got shape ",
                    str_of(logits.sizes()));
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                       logits.scalar_type() == at::kHalf,
                   op, ": logits must be float32, bfloat16 or float16, got ",
                   str_of(logits.scalar_type()));
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == logits.size(0), op,
                    ": targets must have shape (N,) = (", str_of(logits.size(0)), ",), got ",
                    str_of(targets.sizes()));
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt, op,
                   ": targets must be int64 or int32, got ", str_of(targets.scalar_type()));
  TORCH_CHECK_VALUE(targets.device() == logits.device(), op, ": targets are on ",
                    str_of(targets.device()), " but logits are on ", str_of(logits.device()));
}

// CPU targets: one scan over the ids, no tensor ops (those cost ~30 us per call, more than the
// whole loss on a small batch). Compared in int64, as the kernels compare.
template <typename Id>
void check_target_range_cpu(const at::Tensor& targets, int64_t vocab, int64_t ignore_index,
                            const char* op) {
  const at::Tensor ids = targets.contiguous();
  const Id* p = ids.data_ptr<Id>();
  const int64_t n = ids.numel();
  for (int64_t i = 0; i < n; ++i) {
    const int64_t id = static_cast<int64_t>(p[i]);
    if (id != ignore_index && (id < 0 || id >= vocab)) {
      raise_bad_target(id, i, vocab, ignore_index, op);
    }
  }
}

}  // namespace

void check_logits_and_targets(const at::Tensor& logits, const at::Tensor& targets,
                              int64_t ignore_index, const char* op) {
  check_logits_and_targets_layout(logits, targets, op);
  const int64_t n = logits.size(0);
  const int64_t vocab = logits.size(1);
  TORCH_CHECK_VALUE(vocab > 0 || n == 0, op, ": logits have an empty vocabulary dimension");
  if (n == 0) return;
  if (targets.is_cpu()) {
    if (targets.scalar_type() == at::kLong) {
      check_target_range_cpu<int64_t>(targets, vocab, ignore_index, op);
    } else {
      check_target_range_cpu<int32_t>(targets, vocab, ignore_index, op);
    }
    return;
  }
#ifdef PSFT_WITH_CUDA
  if (targets.is_cuda()) {
    cuda::check_target_range(targets, vocab, ignore_index, op);
    return;
  }
#endif
  TORCH_CHECK_VALUE(false, op, ": targets on ", str_of(targets.device()), " are not supported");
}

void check_per_token(const std::optional<at::Tensor>& t, const at::Tensor& logits,
                     const char* what, const char* op) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == logits.size(0), op, ": ", what,
                    " must have shape (N,) = (", str_of(logits.size(0)), ",), got ",
                    str_of(t->sizes()));
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": ", what, " must be float32, got ",
                   str_of(t->scalar_type()));
  TORCH_CHECK_VALUE(t->device() == logits.device(), op, ": ", what, " is on ", str_of(t->device()),
                    " but logits are on ", str_of(logits.device()));
}

void check_forward_backward_inputs(const at::Tensor& logits, const at::Tensor& grad_loss,
                                   bool in_place, const char* op) {
  check_per_token(grad_loss, logits, "grad_loss", op);
  TORCH_CHECK_VALUE(!in_place || logits.is_contiguous(), op,
                    ": logits must be contiguous to receive the gradient in place");
}

void check_scale_rows_inputs(const at::Tensor& grad, const at::Tensor& factor, const char* op) {
  TORCH_CHECK_VALUE(grad.dim() == 2, op, ": grad must be 2-D (N, V), got shape ",
                    str_of(grad.sizes()));
  const at::ScalarType t = grad.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf, op,
                   ": grad must be float32, bfloat16 or float16, got ", str_of(t));
  TORCH_CHECK_VALUE(grad.is_contiguous(), op, ": grad must be contiguous");
  check_per_token(factor, grad, "factor", op);
}

ForwardInputs::ForwardInputs(const at::Tensor& logits_in, const at::Tensor& targets_in,
                             const std::optional<at::Tensor>& old_in,
                             const std::optional<at::Tensor>& adv_in, double advantage,
                             double clip_low, double clip_high, double dual_clip,
                             int64_t ignore_index, double temperature, const char* op) {
  check_logits_and_targets(logits_in, targets_in, ignore_index, op);
  check_per_token(old_in, logits_in, "old_logprobs", op);
  check_per_token(adv_in, logits_in, "advantages", op);
  params = make_loss_params(advantage, clip_low, clip_high, dual_clip, ignore_index, temperature);
  logits = rows_with_unit_stride(logits_in);
  targets = targets_in.contiguous();
  old = old_in.has_value() ? old_in->contiguous() : at::Tensor();
  adv = adv_in.has_value() ? adv_in->contiguous() : at::Tensor();
  n = logits.size(0);
  vocab = logits.size(1);
  row_stride = n > 1 ? logits.stride(0) : vocab;
}

void check_temperature(double temperature, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, op,
                    ": temperature must be a finite positive number, got ", str_of(temperature));
}

void check_backward_inputs(const at::Tensor& grad_loss, const at::Tensor& logits,
                           const at::Tensor& targets, const at::Tensor& lse,
                           const at::Tensor& coef, double temperature, const char* op) {
  check_logits_and_targets_layout(logits, targets, op);
  check_per_token(grad_loss, logits, "grad_loss", op);
  check_per_token(lse, logits, "lse", op);
  check_per_token(coef, logits, "coef", op);
  check_temperature(temperature, op);
}

LossParams make_loss_params(double advantage, double clip_low, double clip_high, double dual_clip,
                            int64_t ignore_index, double temperature) {
  const char* op = "psft_forward";
  TORCH_CHECK_VALUE(std::isfinite(clip_low) && clip_low >= 0.0, op,
                    ": clip_low must be finite and >= 0, got ", str_of(clip_low));
  TORCH_CHECK_VALUE(std::isfinite(clip_high) && clip_high >= 0.0, op,
                    ": clip_high must be finite and >= 0, got ", str_of(clip_high));
  TORCH_CHECK_VALUE(dual_clip == 0.0 || (std::isfinite(dual_clip) && dual_clip > 1.0), op,
                    ": dual_clip must be a finite number > 1 (or 0 to disable), got ", str_of(dual_clip));
  TORCH_CHECK_VALUE(std::isfinite(advantage), op, ": advantage must be finite, got ", str_of(advantage));
  check_temperature(temperature, op);
  LossParams p;
  p.clip_low = static_cast<float>(clip_low);
  p.clip_high = static_cast<float>(clip_high);
  p.dual_clip = static_cast<float>(dual_clip);
  p.advantage = static_cast<float>(advantage);
  p.inv_temperature = static_cast<float>(1.0 / temperature);
  p.ignore_index = ignore_index;
  return p;
}

at::Tensor rows_with_unit_stride(const at::Tensor& logits) {
  return (logits.size(1) <= 1 || logits.stride(1) == 1) ? logits : logits.contiguous();
}

}  // namespace psft
