#include "psft_checks.h"

#include <ATen/ATen.h>

#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <limits>

#include "psft_kernels.h"

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

bool is_logits_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
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
    if (id != ignore_index && !target_in_range(id, vocab)) {
      raise_bad_target(id, i, vocab, ignore_index, op);
    }
  }
}

}  // namespace

void check_logits_and_targets_layout(const at::Tensor& logits, const at::Tensor& targets,
                                     const char* op) {
  TORCH_CHECK_VALUE(logits.dim() == 2, op, ": logits must be 2-D (N, V), got shape ",
                    str_of(logits.sizes()));
  TORCH_CHECK_TYPE(is_logits_dtype(logits.scalar_type()), op,
                   ": logits must be float32, bfloat16 or float16, got ",
                   str_of(logits.scalar_type()));
  TORCH_CHECK_VALUE(targets.dim() == 1 && targets.size(0) == logits.size(0), op,
                    ": targets must have shape (N,) = (", str_of(logits.size(0)), ",), got ",
                    str_of(targets.sizes()));
  TORCH_CHECK_TYPE(targets.scalar_type() == at::kLong || targets.scalar_type() == at::kInt, op,
                   ": targets must be int64 or int32, got ", str_of(targets.scalar_type()));
  TORCH_CHECK_VALUE(targets.device() == logits.device(), op, ": targets are on ",
                    str_of(targets.device()), " but logits are on ", str_of(logits.device()));
}

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

void check_per_token(const at::Tensor& t, const at::Tensor& logits, const char* what,
                     const char* op) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == logits.size(0), op, ": ", what,
                    " must have shape (N,) = (", str_of(logits.size(0)), ",), got ",
                    str_of(t.sizes()));
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat, op, ": ", what, " must be float32, got ",
                   str_of(t.scalar_type()));
  TORCH_CHECK_VALUE(t.device() == logits.device(), op, ": ", what, " is on ",
                    str_of(t.device()), " but logits are on ", str_of(logits.device()));
}

void check_per_token(const std::optional<at::Tensor>& t, const at::Tensor& logits,
                     const char* what, const char* op) {
  if (t.has_value()) check_per_token(*t, logits, what, op);
}

LossParams checked_params(c10::ArrayRef<double> packed, int64_t ignore_index, const char* op) {
  if (packed.size() != kPackedParams) {
    std::string names;
    for (int i = 0; i < kPackedParams; ++i) {
      names += std::string(i ? ", " : "") + kPackedParamNames[i];
    }
    TORCH_CHECK_VALUE(false, op, ": params must hold ", str_of(int64_t{kPackedParams}),
                      " numbers (", names, "), got ", str_of(static_cast<int64_t>(packed.size())));
  }
  for (int i = 0; i < kPackedParams; ++i) {
    TORCH_CHECK_VALUE(std::isfinite(packed[i]), op, ": ", kPackedParamNames[i],
                      " must be finite, got ", str_of(packed[i]));
  }
  TORCH_CHECK_VALUE(packed[kClipLow] >= 0.0 && packed[kClipLow] < 1.0, op,
                    ": clip_low must be in [0, 1), got ", str_of(packed[kClipLow]));
  TORCH_CHECK_VALUE(packed[kClipHigh] >= 0.0, op, ": clip_high must be finite and >= 0, got ",
                    str_of(packed[kClipHigh]));
  TORCH_CHECK_VALUE(packed[kDualClip] == 0.0 || packed[kDualClip] > 1.0, op,
                    ": dual_clip must be a finite number > 1 (or 0 to disable), got ",
                    str_of(packed[kDualClip]));
  TORCH_CHECK_VALUE(packed[kTemperature] > 0.0 &&
                        1.0 / packed[kTemperature] <= std::numeric_limits<float>::max(),
                    op, ": temperature must be a finite number with a finite float32 inverse, got ",
                    str_of(packed[kTemperature]));
  TORCH_CHECK_VALUE(packed[kKlCoef] >= 0.0, op, ": kl_coef must be >= 0, got ",
                    str_of(packed[kKlCoef]));
  const struct {
    PackedParam index;
    int count;
  } codes[] = {{kReductionParam, kReductions}, {kImportanceSamplingParam, kImportanceSamplings}};
  for (const auto& code : codes) {
    const double v = packed[code.index];
    TORCH_CHECK_VALUE(v == static_cast<double>(static_cast<int>(v)) && v >= 0.0 &&
                          v < code.count,
                      op, ": ", kPackedParamNames[code.index], " must be a code in [0, ",
                      str_of(int64_t{code.count}), "), got ", str_of(v));
  }
  return unpack_params(packed.data(), ignore_index);
}

void check_grad_output(const at::Tensor& grad, const at::Tensor& logits, const char* op) {
  TORCH_CHECK_VALUE(grad.sizes() == logits.sizes(), op, ": grad must have the logits' shape ",
                    str_of(logits.sizes()), ", got ", str_of(grad.sizes()));
  TORCH_CHECK_TYPE(grad.scalar_type() == logits.scalar_type(), op,
                   ": grad must have the logits' dtype ", str_of(logits.scalar_type()), ", got ",
                   str_of(grad.scalar_type()));
  TORCH_CHECK_VALUE(grad.device() == logits.device(), op, ": grad is on ", str_of(grad.device()),
                    " but logits are on ", str_of(logits.device()));
  TORCH_CHECK_VALUE(grad.is_contiguous(), op, ": grad must be contiguous");
}

void check_stats(const at::Tensor& stats, const at::Tensor& logits, const char* op) {
  TORCH_CHECK_VALUE(stats.dim() == 2 && stats.size(0) == kTokenStats &&
                        stats.size(1) == logits.size(0),
                    op, ": stats must have shape (", str_of(int64_t{kTokenStats}), ", N) = (",
                    str_of(int64_t{kTokenStats}), ", ", str_of(logits.size(0)), "), got ",
                    str_of(stats.sizes()));
  TORCH_CHECK_TYPE(stats.scalar_type() == at::kFloat, op, ": stats must be float32, got ",
                   str_of(stats.scalar_type()));
  TORCH_CHECK_VALUE(stats.device() == logits.device(), op, ": stats is on ",
                    str_of(stats.device()), " but logits are on ", str_of(logits.device()));
}

void check_scale_rows_inputs(const at::Tensor& grad, const at::Tensor& factor, const char* op) {
  TORCH_CHECK_VALUE(grad.dim() == 2, op, ": grad must be 2-D (N, V), got shape ",
                    str_of(grad.sizes()));
  TORCH_CHECK_TYPE(is_logits_dtype(grad.scalar_type()), op,
                   ": grad must be float32, bfloat16 or float16, got ",
                   str_of(grad.scalar_type()));
  TORCH_CHECK_VALUE(grad.is_contiguous(), op, ": grad must be contiguous");
  check_per_token(factor, grad, "factor", op);
}

at::Tensor rows_with_unit_stride(const at::Tensor& logits) {
  return (logits.size(1) <= 1 || logits.stride(1) == 1) ? logits : logits.contiguous();
}

}  // namespace psft
