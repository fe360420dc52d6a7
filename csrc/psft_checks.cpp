#include "psft_checks.h"

#include <ATen/ATen.h>
#include <cmath>

namespace psft {

namespace {

// Ranks, dtypes and devices of logits (N, V) and targets (N,).
void check_logits_and_targets_layout(const at::Tensor& logits, const at::Tensor& targets,
                                     const char* op) {
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D (N, V), got shape ",
                    logits.sizes());
  TORCH_CHECK_TYPE(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kBFloat16 ||
                       logits.scalar_type() == at::kHalf,
                   op, ": logits must be float32, bfloat16 or float16, got ",
                   logits.scalar_type());
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == logits.size(0), op,
                    ": targets must have shape (N,) = (", logits.size(0), ",), got ",
                    targets.sizes());
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt, op,
                   ": targets must be int64 or int32, got ", targets.scalar_type());
  TORCH_CHECK_VALUE(targets.device() == logits.device(), op, ": targets are on ",
                    targets.device(), " but logits are on ", logits.device());
}

}  // namespace

void check_logits_and_targets(const at::Tensor& logits, const at::Tensor& targets,
                              int64_t ignore_index, const char* op) {
  check_logits_and_targets_layout(logits, targets, op);
  const int64_t n = logits.size(0);
  const int64_t vocab = logits.size(1);
  TORCH_CHECK_VALUE(vocab > 0 || n == 0, op, ": logits have an empty vocabulary dimension");
  if (n == 0) return;
  // Compared in int64, as the kernels compare: an int32 tensor against an ignore_index outside
  // the int32 range would otherwise wrap and let a bad id through.
  const at::Tensor ids = targets.to(at::kLong);
  const at::Tensor bad = ids.ne(ignore_index).logical_and_(ids.lt(0).logical_or_(ids.ge(vocab)));
  if (bad.any().item<bool>()) {
    const int64_t pos = bad.nonzero().select(1, 0)[0].item<int64_t>();
    const int64_t id = ids[pos].item<int64_t>();
    TORCH_CHECK_VALUE(false, op, ": target id ", id, " at position ", pos,
                      " is out of range for a vocabulary of ", vocab,
                      " (valid ids are 0..", vocab - 1, ", or ignore_index=", ignore_index, ")");
  }
}

void check_per_token(const std::optional<at::Tensor>& t, const at::Tensor& logits,
                     const char* what, const char* op) {
  if (!t.has_value()) return;
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == logits.size(0), op, ": ", what,
                    " must have shape (N,) = (", logits.size(0), ",), got ", t->sizes());
  TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat, op, ": ", what, " must be float32, got ",
                   t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == logits.device(), op, ": ", what, " is on ", t->device(),
                    " but logits are on ", logits.device());
}

void check_temperature(double temperature, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0.0, op,
                    ": temperature must be a finite positive number, got ", temperature);
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
                    ": clip_low must be finite and >= 0, got ", clip_low);
  TORCH_CHECK_VALUE(std::isfinite(clip_high) && clip_high >= 0.0, op,
                    ": clip_high must be finite and >= 0, got ", clip_high);
  TORCH_CHECK_VALUE(dual_clip == 0.0 || (std::isfinite(dual_clip) && dual_clip > 1.0), op,
                    ": dual_clip must be a finite number > 1 (or 0 to disable), got ", dual_clip);
  TORCH_CHECK_VALUE(std::isfinite(advantage), op, ": advantage must be finite, got ", advantage);
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
