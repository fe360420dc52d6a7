// Per-token PSFT math shared by the CPU and the CUDA kernels.
//
// Everything here is a small inline function on scalars, callable from host and device code,
// so the CPU tests exercise exactly the arithmetic the GPU runs. No torch, no CUDA runtime:
// this header compiles with a plain C++ compiler (csrc/tests/test_psft_math.cpp) and with nvcc.
//
// Notation (see README "The formula"): z = logits row, tau = temperature, x = z / tau,
// lse = log sum_j exp(x_j), logp = x_y - lse, r = exp(clamp(logp - old_logp, -20, 20)),
// loss = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A), optionally min(loss, -A * c)
// for A < 0 (dual clip), and dloss/dz_j = coef * (softmax(x)_j - [j == y]) / tau.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define PSFT_HD __host__ __device__ __forceinline__
#else
#define PSFT_HD inline
#endif

namespace psft {

// verl clamps the log-ratio to [-20, 20] before exponentiating; outside it the gradient is zero.
constexpr float kLogRatioClamp = 20.0f;

// How a call reduces its per-token losses (psft_ext.LossParams.reduction). Weights other than
// the mean's (verl's sequence modes of loss_agg_mode) come as per-token weights (TokenInput).
enum Reduction : int { kReduceNone, kReduceSum, kReduceMean, kReductions };
constexpr const char* kReductionNames[kReductions] = {"none", "sum", "mean"};
// The ratio's level: per token (PPO, PSFT), or one per sequence (GSPO).
enum ImportanceSampling : int { kTokenLevel, kSequenceLevel, kImportanceSamplings };
constexpr const char* kImportanceSamplingNames[kImportanceSamplings] = {"token", "sequence"};

// Hyper-parameters of one loss call, identical for every token: the C++ mirror of
// psft_ext.LossParams, which validates them and packs them as a list of floats in PackedParam
// order (the ops' `float[] params`; the names above travel as their index); ignore_index travels
// as an int.
struct LossParams {
  float clip_low = 0.2f;
  float clip_high = 0.28f;
  float dual_clip = 0.0f;      // verl's clip_ratio_c (> 1); <= 0 disables the dual clip
  float advantage = 1.0f;      // used when no per-token advantage tensor is given
  float inv_temperature = 1.0f;
  float entropy_coef = 0.0f;   // the loss is pg - entropy_coef * entropy per token
  float kl_coef = 0.0f;        // plus kl_coef * k3(ref_logprobs, logp)
  int reduction = kReduceMean;
  int importance_sampling = kTokenLevel;
  int64_t ignore_index = -100;
};

// The packed list's layout. psft_ext checks at import that its packing names these, in order.
enum PackedParam : int { kClipLow, kClipHigh, kDualClip, kTemperature, kEntropyCoef, kKlCoef,
                         kReductionParam, kImportanceSamplingParam, kAdvantage, kPackedParams };
constexpr const char* kPackedParamNames[kPackedParams] = {
    "clip_low", "clip_high", "dual_clip",           "temperature", "entropy_coef",
    "kl_coef",  "reduction", "importance_sampling", "advantage"};

inline LossParams unpack_params(const double* packed, int64_t ignore_index) {
  LossParams p;
  p.clip_low = static_cast<float>(packed[kClipLow]);
  p.clip_high = static_cast<float>(packed[kClipHigh]);
  p.dual_clip = static_cast<float>(packed[kDualClip]);
  p.inv_temperature = static_cast<float>(1.0 / packed[kTemperature]);
  p.entropy_coef = static_cast<float>(packed[kEntropyCoef]);
  p.kl_coef = static_cast<float>(packed[kKlCoef]);
  p.reduction = static_cast<int>(packed[kReductionParam]);
  p.importance_sampling = static_cast<int>(packed[kImportanceSamplingParam]);
  p.advantage = static_cast<float>(packed[kAdvantage]);
  p.ignore_index = ignore_index;
  return p;
}

// The optional per-token inputs of the loss (the ops' `Tensor?[] token_inputs`, in this order):
// the old policy's log-probs, advantages, rollout importance-sampling weights (verl's rollout
// correction; they scale the policy-gradient term), the reference policy's log-probs (for the KL
// penalty), and, for callers that split a call into chunks of rows (the fused linear loss), each
// token's reduction weight and its sequence's log-ratio, which a chunk cannot form from its own
// rows.
enum TokenInput : int { kOldLogprobs, kAdvantages, kRolloutIsWeights, kRefLogprobs,
                        kTokenWeights, kSeqLogRatio, kTokenInputs };
constexpr const char* kTokenInputNames[kTokenInputs] = {
    "old_logprobs", "advantages", "rollout_is_weights", "ref_logprobs", "token_weights",
    "seq_log_ratio"};

// The forward's per-token float32 outputs: the rows of one (kTokenStats, N) tensor. Ignored tokens
// hold 0 in every row. The gradient of the loss the op returns is, per row,
//   (coef * (p_j - [j == y]) + ent_coef * p_j * (log p_j + entropy)) / tau
// with p = softmax(x): coef and ent_coef carry the reduction's weight (the mean's 1 / denominator)
// and the options' terms, so a backward from these stats needs only the upstream gradient.
// correct is 1 where the target attains the row's maximum (token accuracy); max is that maximum
// (of x = z / tau), which a vocabulary-parallel caller combines over the slices.
enum TokenStat : int { kLoss, kLogp, kEntropy, kRatio, kLogRatio, kClipped, kLse, kCoef,
                       kCorrect, kMax, kEntCoef, kTokenStats };
constexpr const char* kTokenStatNames[kTokenStats] = {
    "loss", "logp", "entropy", "ratio", "log_ratio", "clipped", "lse", "coef", "correct", "max",
    "ent_coef"};

// The metrics of one call (psft_ext.PSFTMetrics): token means over the non-ignored tokens of
// -logp, entropy, clipped (any clip), -log_ratio and ratio; then the shares of tokens whose PPO
// clip is active at the upper bound (A > 0, r > 1 + clip_high) and at the lower one (A < 0,
// r < 1 - clip_low), whose dual clip is active, and whose target is the argmax; then the number
// of those tokens. verl's pg_clipfrac is the sum of the two PPO-clip shares, its
// pg_clipfrac_lower the dual-clip share.
enum Metric : int { kNll, kEntropyMean, kClipFraction, kApproxKl, kRatioMean, kClipFractionHigh,
                    kClipFractionLow, kDualClipFraction, kTokenAccuracy, kNumTokens, kMetrics };
constexpr const char* kMetricNames[kMetrics] = {
    "nll",                "entropy",           "clip_fraction",      "approx_kl",
    "ratio_mean",         "clip_fraction_high", "clip_fraction_low", "dual_clip_fraction",
    "token_accuracy",     "num_tokens"};

// Everything the loss produces for one token, given its log-prob.
struct TokenLoss {
  float loss;       // per-token loss
  float ratio;      // r (after the log-ratio clamp)
  float log_ratio;  // clamp(logp - old_logp, -20, 20); approx_kl is its negative
  float coef;       // A * r on the unclipped branch, else 0:
                    // dloss/dz_j = coef * (p_j - [j == y]) / tau
  float clipped;    // 1 where the clip or the dual clip is active, else 0 (a float: it is averaged)
};

// NaN-propagating clamp (fminf/fmaxf would silently drop a NaN).
PSFT_HD float clamp_keep_nan(float x, float lo, float hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

// The target's log-prob from its scaled logit x_y and the row's lse. A row with a NaN or +inf
// logit has no finite softmax (lse NaN or +inf): its log-prob is NaN, not the -inf that
// x_y - lse gives a finite target, so that the loss, the metrics and the gradient of that row
// are NaN, as autograd through the reference makes them (a non-finite input must not vanish
// from the gradient; GradScaler and clip_grad_norm_(error_if_nonfinite=True) look for it there).
PSFT_HD float target_logp(float x_y, float lse) { return lse < INFINITY ? x_y - lse : NAN; }

// The PPO / PSFT clipped surrogate for one token, with verl's compute_policy_loss_vanilla
// semantics: the clip branch is active when -A*clip(r) > -A*r (strictly), so a ratio exactly on
// a bound counts as unclipped; the dual clip (A < 0 only) caps the loss at -A * dual_clip. A NaN
// log-ratio (a NaN log-prob or old log-prob) makes the coefficient NaN: the row's gradient is
// NaN, never a silent 0.
PSFT_HD TokenLoss token_loss(float logp, float old_logp, float adv, const LossParams& p) {
  TokenLoss t;
  const float d = logp - old_logp;
  t.log_ratio = clamp_keep_nan(d, -kLogRatioClamp, kLogRatioClamp);
  const bool inside_clamp = d >= -kLogRatioClamp && d <= kLogRatioClamp;  // false for NaN
  t.ratio = expf(t.log_ratio);
  const float clipped_ratio = clamp_keep_nan(t.ratio, 1.0f - p.clip_low, 1.0f + p.clip_high);
  const float unclipped_loss = -adv * t.ratio;
  const float clipped_loss = -adv * clipped_ratio;
  const bool clip_active = clipped_loss > unclipped_loss;
  float loss = clip_active ? clipped_loss : unclipped_loss;
  bool dual_active = false;
  if (p.dual_clip > 0.0f && adv < 0.0f) {
    const float cap = -adv * p.dual_clip;
    dual_active = loss > cap;
    loss = dual_active ? cap : loss;
  }
  t.loss = loss;
  t.clipped = (clip_active || dual_active) ? 1.0f : 0.0f;
  t.coef = d != d ? NAN : ((!clip_active && !dual_active && inside_clamp) ? adv * t.ratio : 0.0f);
  return t;
}

// GSPO (verl's compute_policy_loss_gspo): one ratio per sequence, s = exp(min(d, 10)) with d the
// mean over the sequence's tokens of logp - old_logp, clipped per token like PPO's (no dual
// clip). Each token's gradient flows through its own log-prob with the sequence's ratio:
// coef = A * s on the unclipped branch (and while d <= 10), else 0. log_ratio is left to the
// caller (the token's own one).
PSFT_HD TokenLoss sequence_token_loss(float seq_log_ratio, float adv, const LossParams& p) {
  constexpr float kSeqLogRatioMax = 10.0f;
  TokenLoss t;
  const float d = seq_log_ratio;
  t.log_ratio = d;
  t.ratio = expf(d > kSeqLogRatioMax ? kSeqLogRatioMax : d);
  const float clipped_ratio = clamp_keep_nan(t.ratio, 1.0f - p.clip_low, 1.0f + p.clip_high);
  const float unclipped_loss = -adv * t.ratio;
  const float clipped_loss = -adv * clipped_ratio;
  const bool clip_active = clipped_loss > unclipped_loss;
  t.loss = clip_active ? clipped_loss : unclipped_loss;
  t.clipped = clip_active ? 1.0f : 0.0f;
  t.coef = d != d ? NAN : ((!clip_active && d <= kSeqLogRatioMax) ? adv * t.ratio : 0.0f);
  return t;
}

// The options' terms of one token, added to its policy-gradient values t: the rollout
// importance-sampling weight scales them (verl's rollout correction), kl_coef * k3(ref, logp) is
// added (verl's low_var_kl: kl = clamp(ref - logp, -20, 20), k3 = clamp(e^kl - kl - 1, -10, 10),
// whose gradient passes inside both clamps), and entropy_coef * entropy subtracted (the entropy
// bonus). Returns the token's entropy coefficient (the gradient's p (log p + H) term).
PSFT_HD float add_option_terms(TokenLoss& t, float logp, float entropy, float is_weight,
                               bool has_ref, float ref_logp, const LossParams& p) {
  t.loss *= is_weight;
  t.coef *= is_weight;
  if (has_ref && p.kl_coef != 0.0f) {
    const float d = ref_logp - logp;
    const float kl = clamp_keep_nan(d, -kLogRatioClamp, kLogRatioClamp);
    const float r = expf(kl);
    const float k3 = r - kl - 1.0f;
    t.loss += p.kl_coef * clamp_keep_nan(k3, -10.0f, 10.0f);
    const bool inside = d >= -kLogRatioClamp && d <= kLogRatioClamp && k3 <= 10.0f;
    t.coef += d != d ? NAN : (inside ? p.kl_coef * (r - 1.0f) : 0.0f);
  }
  if (p.entropy_coef != 0.0f) t.loss -= p.entropy_coef * entropy;
  return p.entropy_coef;
}

// A token's per-row inputs to the options (psft_ext's token inputs; defaults where absent).
struct OptionInputs {
  float adv = 1.0f;
  float is_weight = 1.0f;
  bool has_ref = false;
  float ref_logp = 0.0f;
  bool has_seq_log_ratio = false;  // GSPO: replace the token's ratio by its sequence's
  float seq_log_ratio = 0.0f;
};

// The options' pass over one valid token whose policy-gradient values t come from token_loss:
// GSPO's sequence-level ratio when given, then add_option_terms. Returns the entropy coefficient.
PSFT_HD float apply_token_options(TokenLoss& t, float logp, float entropy, const OptionInputs& in,
                                  const LossParams& p) {
  if (in.has_seq_log_ratio) {
    const float token_log_ratio = t.log_ratio;
    t = sequence_token_loss(in.seq_log_ratio, in.adv, p);
    t.log_ratio = token_log_ratio;
  }
  return add_option_terms(t, logp, entropy, in.is_weight, in.has_ref, in.ref_logp, p);
}

// One token of the options' pass over the (kTokenStats, n) stats, column r (both devices run
// this). Its policy-gradient values are the forward's, or, with from_logp, formed here from the
// stats' log-prob (for a caller that combined the log-probs itself: the vocabulary-parallel
// loss); then the options' terms. An ignored token's values are all 0.
PSFT_HD void token_pass(float* s, int64_t n, int64_t r, bool ignored, bool from_logp,
                        const float* old_logprobs, const OptionInputs& in, const LossParams& p) {
  if (ignored) {
    if (from_logp) {
      for (int k = 0; k < kTokenStats; ++k) s[k * n + r] = 0.0f;
    } else {
      s[kEntCoef * n + r] = 0.0f;
    }
    return;
  }
  const float logp = s[kLogp * n + r];
  TokenLoss t;
  if (from_logp) {
    t = token_loss(logp, old_logprobs != nullptr ? old_logprobs[r] : logp, in.adv, p);
    s[kLogRatio * n + r] = t.log_ratio;
  } else {
    t = {s[kLoss * n + r], s[kRatio * n + r], s[kLogRatio * n + r], s[kCoef * n + r],
         s[kClipped * n + r]};
  }
  const float ent_coef = apply_token_options(t, logp, s[kEntropy * n + r], in, p);
  s[kLoss * n + r] = t.loss;
  s[kRatio * n + r] = t.ratio;
  s[kClipped * n + r] = t.clipped;
  s[kCoef * n + r] = t.coef;
  s[kEntCoef * n + r] = ent_coef;
}

// Running softmax statistics of a set of scaled logits x, kept relative to their maximum m:
//   s = sum exp(x - m),  w = sum exp(x - m) * (x - m).
// Then lse = m + log(s) and entropy = log(s) - w / s (no cancellation for large logits).
struct SoftmaxStats {
  float m;
  float s;
  float w;
};

PSFT_HD SoftmaxStats softmax_empty() { return {-INFINITY, 0.0f, 0.0f}; }

// Adds exp(x - m) terms for one element whose max-relative value is xm = x - m (m fixed).
PSFT_HD void softmax_accumulate(float xm, float& s, float& w) {
  const float e = expf(xm);
  s += e;
  w += e > 0.0f ? e * xm : 0.0f;  // exp(-inf) * -inf would be NaN; its true contribution is 0
}

// Moves stats to a new (larger or equal) reference maximum.
PSFT_HD SoftmaxStats softmax_rebase(SoftmaxStats a, float m) {
  if (a.m == m) return a;
  const float scale = expf(a.m - m);  // 0 when a is empty (a.m = -inf)
  SoftmaxStats out;
  out.m = m;
  out.s = a.s * scale;
  out.w = scale > 0.0f ? scale * (a.w + (a.m - m) * a.s) : 0.0f;
  return out;
}

// Combines the stats of two disjoint sets of elements (associative up to rounding).
PSFT_HD SoftmaxStats softmax_merge(SoftmaxStats a, SoftmaxStats b) {
  const float m = a.m > b.m ? a.m : b.m;
  if (m == -INFINITY) return a;  // both empty
  const SoftmaxStats ra = softmax_rebase(a, m);
  const SoftmaxStats rb = softmax_rebase(b, m);
  return {m, ra.s + rb.s, ra.w + rb.w};
}

PSFT_HD float softmax_lse(SoftmaxStats st) { return st.m + logf(st.s); }

PSFT_HD float softmax_entropy(SoftmaxStats st) { return logf(st.s) - st.w / st.s; }

// Gradient of one logit: scale * (softmax_j - [j == y]), with scale = g * coef / tau and
// x = z * inv_temperature.
PSFT_HD float logit_grad(float x, float lse, float scale, bool is_target) {
  return scale * (expf(x - lse) - (is_target ? 1.0f : 0.0f));
}

// The same with the entropy's term: scale * (p_j - [j == y]) + ent_scale * p_j * (log p_j + H),
// ent_scale = g_H-side coefficient / tau (dH/dz_j = -p_j (log p_j + H) / tau).
PSFT_HD float logit_grad_entropy(float x, float lse, float scale, float ent_scale, float entropy,
                                 bool is_target) {
  const float log_p = x - lse;
  const float prob = expf(log_p);
  // p log p is 0 where p is 0 (a -inf logit), not 0 * -inf.
  const float ent_term = prob > 0.0f ? ent_scale * prob * (log_p + entropy) : 0.0f;
  return scale * (prob - (is_target ? 1.0f : 0.0f)) + ent_term;
}

// A target id is usable when it lies in [0, V); ignore_index rows are handled before this.
PSFT_HD bool target_in_range(int64_t y, int64_t vocab) { return y >= 0 && y < vocab; }

}  // namespace psft
