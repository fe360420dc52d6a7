// The ops' implementations, one for every device: check the arguments, lay the tensors out for
// the kernels, run the device's kernels (csrc/psft_kernels.h), reduce.
//
// psft_fwd also does the reduction, the token count and the metrics, so that a loss call is one
// op: on the CPU these are host loops over the targets and the stats, which cost less than the
// tensor ops they replace (each about 5 us of host time); on other devices they are a handful of
// tensor ops (nothing reads back to the host).
//
// Two paths. Without options (entropy / KL terms, rollout weights, GSPO, per-token reduction
// weights) the forward kernel writes the gradient in the same pass as the stats. With options the
// forward kernel writes the stats, the options' pass (apply_token_options) turns them into each
// token's loss and gradient coefficients, and, when a gradient is asked for, the backward kernel
// writes it from those coefficients: the logits are read twice, still without any N x V buffer
// but the gradient.
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

void token_options_kernels(const TokenOptionsArgs& a) {
#ifdef PSFT_WITH_CUDA
  if (a.stats.is_cuda()) return cuda::token_options(a);
#endif
  cpu::token_options(a);
}

// Reads target ids of either index dtype on the host.
int64_t target_at(const Tensor& targets, int64_t i) {
  return targets.scalar_type() == at::kInt ? targets.data_ptr<int32_t>()[i]
                                           : targets.data_ptr<int64_t>()[i];
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

// The non-ignored targets as a float32 0/1 device tensor. Compared in int64, as the kernels
// compare: ne() would cast an ignore_index outside int32's range to int32 for int32 targets.
Tensor valid_mask_tensor(const Tensor& targets, int64_t ignore_index) {
  const bool widen = targets.scalar_type() == at::kInt &&
                     (ignore_index < std::numeric_limits<int32_t>::min() ||
                      ignore_index > std::numeric_limits<int32_t>::max());
  return (widen ? targets.to(at::kLong) : targets).ne(ignore_index);
}

// Sum of a contiguous float32 row on the host, in double.
double sum_cpu(const float* v, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += v[i];
  return s;
}

// The reduction: the denominator of "mean", the token count, the per-token weights of the
// returned loss (given, or uniform), the reduced loss and the metrics; on the host for CPU
// tensors (`host`), else as device tensors.
struct Reducer {
  bool host;
  int reduction;
  int64_t n;
  int64_t count = 0;    // host: non-ignored tokens
  double value = 1.0;   // host, uniform weights: the denominator
  Tensor count_t, den;  // device: 0-d int64 count, 0-d float32 denominator
  Tensor weights;       // the caller's per-token weights (N,) float32, or undefined: uniform

  Reducer(const Tensor& targets, int64_t ignore_index, const LossParams& p,
          const OptTensor& num_items, double num_items_value, const Tensor& token_weights,
          bool need_count)
      : host(targets.is_cpu()), reduction(p.reduction), n(targets.numel()), weights(token_weights) {
    const bool mean = reduction == kReduceMean && !weights.defined();
    const bool from_count = mean && !num_items.has_value() && num_items_value <= 0.0;
    if (need_count || from_count) {
      if (host) {
        count = count_tokens_cpu(targets, ignore_index);
      } else {
        count_t = valid_mask_tensor(targets, ignore_index).sum();
      }
    }
    if (host) {
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

  bool uniform() const { return !weights.defined(); }

  // The uniform weight of every token (1 / denominator, or 1), as an (N,) float32 vector.
  Tensor uniform_weights(const Tensor& like) const {
    const auto f32 = like.options().dtype(at::kFloat);
    if (host) return at::full({n}, 1.0f / static_cast<float>(value), f32);
    return at::reciprocal(den).expand({n}).contiguous();
  }

  // row *= the tokens' weights, in place.
  void weigh(const Tensor& row) const {
    if (!uniform()) {
      row.mul_(weights);
      return;
    }
    if (reduction != kReduceMean) return;
    if (host) {
      const float w = 1.0f / static_cast<float>(value);
      float* c = row.data_ptr<float>();
      for (int64_t i = 0; i < n; ++i) c[i] *= w;
      return;
    }
    row.mul_(at::reciprocal(den));
  }

  // The returned loss: the per-token losses for "none", else sum_t w_t loss_t.
  Tensor reduce(const Tensor& loss_row) const {
    if (reduction == kReduceNone) return loss_row.clone();
    if (!uniform()) {
      if (host) {
        const float* l = loss_row.data_ptr<float>();
        const float* w = weights.data_ptr<float>();
        double s = 0.0;
        for (int64_t i = 0; i < n; ++i) s += w[i] != 0.0f ? static_cast<double>(w[i]) * l[i] : 0.0;
        return at::scalar_tensor(static_cast<float>(s), loss_row.options());
      }
      // Ignored tokens have weight 0 and loss 0; a 0 weight keeps a token out (NaN included).
      return at::where(weights.ne(0), loss_row * weights, at::zeros({}, loss_row.options())).sum();
    }
    if (host) {
      const float sum = static_cast<float>(sum_cpu(loss_row.data_ptr<float>(), loss_row.numel()));
      return at::scalar_tensor(sum / static_cast<float>(value), loss_row.options());
    }
    return loss_row.sum().div_(den);
  }
};

// PSFTMetrics' values (psft_math.h, Metric) from the stats rows and the advantages (the sign
// that tells which clip a clipped token hit). Host loops for CPU tensors, else tensor ops.
Tensor metrics_of(const Tensor& stats, const Tensor& adv, float adv_scalar, const Reducer& r) {
  const int64_t n = stats.size(1);
  if (r.host) {
    const float* s = stats.data_ptr<float>();
    const float* a = adv.defined() ? adv.data_ptr<float>() : nullptr;
    const float* clipped = s + kClipped * n;
    const float* ratio = s + kRatio * n;
    double high = 0.0, low = 0.0, dual = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      if (clipped[i] == 0.0f) continue;
      const float ai = a ? a[i] : adv_scalar;
      if (ratio[i] < 1.0f) {
        low += 1.0;
      } else if (ai > 0.0f) {
        high += 1.0;
      } else {
        dual += 1.0;
      }
    }
    const double c = static_cast<double>(std::max<int64_t>(r.count, 1));
    Tensor m = at::empty({kMetrics}, stats.options());
    float* out = m.data_ptr<float>();
    out[kNll] = static_cast<float>(-sum_cpu(s + kLogp * n, n) / c);
    out[kEntropyMean] = static_cast<float>(sum_cpu(s + kEntropy * n, n) / c);
    out[kClipFraction] = static_cast<float>(sum_cpu(clipped, n) / c);
    out[kApproxKl] = static_cast<float>(-sum_cpu(s + kLogRatio * n, n) / c);
    out[kRatioMean] = static_cast<float>(sum_cpu(ratio, n) / c);
    out[kClipFractionHigh] = static_cast<float>(high / c);
    out[kClipFractionLow] = static_cast<float>(low / c);
    out[kDualClipFraction] = static_cast<float>(dual / c);
    out[kTokenAccuracy] = static_cast<float>(sum_cpu(s + kCorrect * n, n) / c);
    out[kNumTokens] = static_cast<float>(r.count);
    return m;
  }
  static_assert(kNll == 0 && kEntropyMean == 1 && kClipFraction == 2 && kApproxKl == 3 &&
                    kRatioMean == 4 && kClipFractionHigh == 5 && kClipFractionLow == 6 &&
                    kDualClipFraction == 7 && kTokenAccuracy == 8 && kNumTokens == 9,
                "the rows below are listed in Metric order");
  const Tensor clipped = stats[kClipped];
  const Tensor above = stats[kRatio].gt(1.0f);
  const Tensor positive = adv.defined() ? adv.gt(0.0f) : at::full({n}, adv_scalar > 0.0f,
                                                                  above.options());
  const Tensor high = clipped * (above & positive);
  const Tensor low = clipped * stats[kRatio].lt(1.0f);
  const Tensor dual = clipped * (above & positive.logical_not());
  const Tensor c = r.count_t.to(at::kFloat);
  const Tensor rows = at::stack({stats[kLogp], stats[kEntropy], clipped, stats[kLogRatio],
                                 stats[kRatio], high, low, dual, stats[kCorrect]});
  Tensor means = rows.sum(1).div_(c.clamp_min(1));
  means.select(0, kNll).neg_();
  means.select(0, kApproxKl).neg_();
  return at::cat({means, c.reshape({1})});
}

// GSPO's sequence log-ratio of every token: the mean over its sequence's valid tokens of
// logp - old_logp (0 without old log-probs).
Tensor sequence_log_ratio(const Tensor& stats, const Tensor& old, const Tensor& targets,
                          int64_t ignore_index, int64_t seq_len, bool host) {
  const int64_t n = stats.size(1);
  const int64_t seqs = n / seq_len;
  if (host) {
    Tensor out = at::zeros({n}, stats.options());
    float* o = out.data_ptr<float>();
    const float* logp = stats[kLogp].data_ptr<float>();
    const float* old_p = old.defined() ? old.data_ptr<float>() : nullptr;
    for (int64_t s = 0; s < seqs; ++s) {
      double sum = 0.0;
      int64_t k = 0;
      for (int64_t t = 0; t < seq_len; ++t) {
        const int64_t i = s * seq_len + t;
        if (target_at(targets, i) == ignore_index) continue;
        sum += static_cast<double>(logp[i]) - (old_p ? old_p[i] : logp[i]);
        ++k;
      }
      const float d = static_cast<float>(sum / static_cast<double>(std::max<int64_t>(k, 1)));
      for (int64_t t = 0; t < seq_len; ++t) o[s * seq_len + t] = d;
    }
    return out;
  }
  const Tensor valid = valid_mask_tensor(targets, ignore_index).to(at::kFloat);
  const Tensor d = stats[kLogp] - (old.defined() ? old : stats[kLogp]);
  const Tensor masked = at::where(valid.gt(0), d, at::zeros({}, d.options())).view({seqs, seq_len});
  const Tensor per_seq = masked.sum(1) / valid.view({seqs, seq_len}).sum(1).clamp_min(1);
  return per_seq.unsqueeze(1).expand({seqs, seq_len}).reshape({n}).contiguous();
}

// A call's optional per-token inputs, checked against `like` (the logits, or the targets of a
// call without logits) and laid out contiguously (undefined where absent).
struct TokenInputs {
  Tensor t[kTokenInputs];

  TokenInputs(const c10::List<OptTensor>& token_inputs, const Tensor& like, const char* op) {
    TORCH_CHECK_VALUE(token_inputs.size() == kTokenInputs, op, ": token_inputs must list ",
                      str_of(int64_t{kTokenInputs}), " optional tensors, got ",
                      str_of(static_cast<int64_t>(token_inputs.size())));
    for (int k = 0; k < kTokenInputs; ++k) {
      const OptTensor in = token_inputs.get(k);
      check_per_token(in, like, kTokenInputNames[k], op);
      if (in.has_value()) t[k] = in->contiguous();
    }
  }

  const Tensor& operator[](int k) const { return t[k]; }
};

void check_num_items(const OptTensor& num_items, double num_items_value, const Tensor& like,
                     const char* op) {
  if (num_items.has_value()) {
    TORCH_CHECK_VALUE(num_items->numel() == 1, op, ": num_items must hold one value, got shape ",
                      str_of(num_items->sizes()));
    TORCH_CHECK_TYPE(num_items->scalar_type() != at::kBool && !num_items->is_complex(), op,
                     ": num_items must be a real number, got ", str_of(num_items->scalar_type()));
    TORCH_CHECK_VALUE(num_items->device() == like.device() || num_items->is_cpu(), op,
                      ": num_items is on ", str_of(num_items->device()), " but logits are on ",
                      str_of(like.device()));
  }
  TORCH_CHECK_VALUE(num_items_value >= 0.0 && std::isfinite(num_items_value), op,
                    ": num_items_value must be finite and >= 0 (0: the token count), got ",
                    str_of(num_items_value));
}

// Whether a call has options (terms beyond the policy gradient of token_loss, or its ratio per
// sequence), after the checks that tie them to the other arguments.
bool has_options(const TokenInputs& in, const LossParams& p, int64_t n, int64_t seq_len,
                 const char* op) {
  TORCH_CHECK_VALUE(!in[kTokenWeights].defined() || p.reduction != kReduceNone, op,
                    ": token_weights weigh a reduced loss; reduction is 'none'");
  const bool gspo = p.importance_sampling == kSequenceLevel;
  if (gspo && !in[kSeqLogRatio].defined()) {
    TORCH_CHECK_VALUE(seq_len > 0 && n % seq_len == 0, op,
                      ": importance_sampling='sequence' needs the rows as sequences of seq_len "
                      "tokens; got seq_len ", str_of(seq_len), " for ", str_of(n), " rows");
  }
  return in[kRolloutIsWeights].defined() || (in[kRefLogprobs].defined() && p.kl_coef != 0.0f) ||
         p.entropy_coef != 0.0f || gspo;
}

// The token stage over a call's stats: the options' pass (GSPO's sequence ratios first), or with
// from_logp the policy-gradient values formed from the stats' log-probs too; then the reduction's
// weights on the gradient coefficients. Returns the loss.
Tensor token_stage(const Tensor& stats, const Tensor& targets, const TokenInputs& in,
                   const LossParams& p, int64_t ignore_index, int64_t seq_len,
                   const Reducer& reducer, bool options, bool from_logp) {
  const Tensor ent_coef = stats[kEntCoef];
  if (options || from_logp) {
    const bool gspo = p.importance_sampling == kSequenceLevel;
    Tensor seq_log_ratio = in[kSeqLogRatio];
    if (gspo && !seq_log_ratio.defined()) {
      seq_log_ratio = sequence_log_ratio(stats, in[kOldLogprobs], targets, ignore_index, seq_len,
                                         reducer.host);
    }
    TokenOptionsArgs o;
    o.targets = targets;
    o.stats = stats;
    o.old = in[kOldLogprobs];
    o.adv = in[kAdvantages];
    o.is_weights = in[kRolloutIsWeights];
    o.ref_logprobs = p.kl_coef != 0.0f ? in[kRefLogprobs] : Tensor();
    o.seq_log_ratio = gspo ? seq_log_ratio : Tensor();
    o.from_logp = from_logp;
    o.params = p;
    token_options_kernels(o);
  } else {
    ent_coef.zero_();
  }
  reducer.weigh(stats[kCoef]);
  if (p.entropy_coef != 0.0f) reducer.weigh(ent_coef);
  return reducer.reduce(stats[kLoss]);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> psft_fwd(
    const Tensor& logits_in, const Tensor& targets_in, const c10::List<OptTensor>& token_inputs,
    c10::ArrayRef<double> params_in, int64_t ignore_index, int64_t seq_len,
    const OptTensor& num_items, double num_items_value, bool with_metrics, bool with_logprobs,
    const OptTensor& grad) {
  const char* op = "psft_fwd";
  check_logits_and_targets(logits_in, targets_in, ignore_index, op);
  const TokenInputs in(token_inputs, logits_in, op);
  check_num_items(num_items, num_items_value, logits_in, op);
  if (grad.has_value()) check_grad_output(*grad, logits_in, op);

  ForwardArgs a;
  a.params = checked_params(params_in, ignore_index, op);
  const LossParams& p = a.params;
  a.logits = rows_with_unit_stride(logits_in);
  a.targets = targets_in.contiguous();
  const int64_t n = a.logits.size(0);
  a.old = in[kOldLogprobs];
  a.adv = in[kAdvantages];
  const bool options = has_options(in, p, n, seq_len, op);

  a.stats = at::empty({kTokenStats, n}, a.logits.options().dtype(at::kFloat));
  const Reducer reducer(a.targets, ignore_index, p, num_items, num_items_value,
                        in[kTokenWeights], with_metrics || !in[kTokenWeights].defined());
  const bool fast = !options && reducer.uniform();
  if (fast && grad.has_value()) {
    a.grad = *grad;
    a.weights = reducer.uniform_weights(a.stats);
  }
  forward_kernels(a);
  const Tensor loss = token_stage(a.stats, a.targets, in, p, ignore_index, seq_len, reducer,
                                  options, false);
  if (!fast && grad.has_value()) {
    BackwardArgs b;
    b.logits = a.logits;
    b.targets = a.targets;
    b.lse = a.stats[kLse];
    b.entropy = a.stats[kEntropy];
    b.scale = a.stats[kCoef];
    if (p.entropy_coef != 0.0f) b.ent_scale = a.stats[kEntCoef];
    b.params = p;
    b.grad = *grad;
    backward_kernels(b);
  }
  const auto f32 = a.stats.options();
  const Tensor metrics = with_metrics ? metrics_of(a.stats, a.adv, p.advantage, reducer)
                                      : at::empty({0}, f32);
  const Tensor logp = with_logprobs ? a.stats[kLogp].clone() : at::empty({0}, f32);
  const Tensor entropy = with_logprobs ? a.stats[kEntropy].clone() : at::empty({0}, f32);
  return {loss, logp, entropy, metrics, a.stats};
}

std::tuple<Tensor, Tensor, Tensor> psft_tokens(
    const Tensor& stats_in, const Tensor& targets_in, const c10::List<OptTensor>& token_inputs,
    c10::ArrayRef<double> params_in, int64_t ignore_index, int64_t seq_len,
    const OptTensor& num_items, double num_items_value, bool with_metrics) {
  const char* op = "psft_tokens";
  TORCH_CHECK_VALUE(targets_in.dim() == 1, op, ": targets must be 1-D (N,), got shape ",
                    str_of(targets_in.sizes()));
  TORCH_CHECK_TYPE(targets_in.scalar_type() == at::kLong || targets_in.scalar_type() == at::kInt,
                   op, ": targets must be int64 or int32, got ",
                   str_of(targets_in.scalar_type()));
  check_stats(stats_in, targets_in, op);
  const TokenInputs in(token_inputs, targets_in, op);
  check_num_items(num_items, num_items_value, targets_in, op);
  const LossParams p = checked_params(params_in, ignore_index, op);
  const Tensor targets = targets_in.contiguous();
  const int64_t n = targets.size(0);
  has_options(in, p, n, seq_len, op);
  const Tensor stats = stats_in.clone(at::MemoryFormat::Contiguous);
  const Reducer reducer(targets, ignore_index, p, num_items, num_items_value, in[kTokenWeights],
                        with_metrics || !in[kTokenWeights].defined());
  const Tensor loss = token_stage(stats, targets, in, p, ignore_index, seq_len, reducer, true,
                                  true);
  const Tensor metrics = with_metrics ? metrics_of(stats, in[kAdvantages], p.advantage, reducer)
                                      : at::empty({0}, stats.options());
  return {loss, metrics, stats};
}

void psft_bwd(const Tensor& scale, const OptTensor& ent_scale, const Tensor& logits_in,
              const Tensor& targets, const Tensor& stats, c10::ArrayRef<double> params,
              int64_t ignore_index, const Tensor& grad) {
  const char* op = "psft_bwd";
  // The forward checked the targets' range. A target outside [0, V) (not ignore_index) has no
  // one-hot term: the vocabulary-parallel loss's rows whose target is in another slice.
  check_logits_and_targets_layout(logits_in, targets, op);
  check_per_token(scale, logits_in, "scale", op);
  check_per_token(ent_scale, logits_in, "ent_scale", op);
  check_stats(stats, logits_in, op);
  check_grad_output(grad, logits_in, op);
  BackwardArgs a;
  a.params = checked_params(params, ignore_index, op);
  a.logits = rows_with_unit_stride(logits_in);
  a.targets = targets.contiguous();
  a.lse = stats[kLse].contiguous();
  a.entropy = stats[kEntropy].contiguous();
  a.scale = scale.contiguous();
  if (ent_scale.has_value()) a.ent_scale = ent_scale->contiguous();
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
  m.impl("psft_tokens", &psft::psft_tokens);
  m.impl("scale_rows_", &psft::scale_rows_);
}

#ifdef PSFT_WITH_CUDA
TORCH_LIBRARY_IMPL(psft_ext, CUDA, m) {
  m.impl("psft_fwd", &psft::psft_fwd);
  m.impl("psft_bwd", &psft::psft_bwd);
  m.impl("psft_tokens", &psft::psft_tokens);
  m.impl("scale_rows_", &psft::scale_rows_);
}
#endif
