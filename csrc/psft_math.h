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

// Hyper-parameters of one loss call, identical for every token: the C++ mirror of
// psft_ext.LossParams, which validates them and packs them as a list of floats in PackedParam
// order (the ops' `float[] params`); ignore_index travels as an int.
struct LossParams {
  float clip_low = 0.2f;
  float clip_high = 0.28f;
  float dual_clip = 0.0f;      // verl's clip_ratio_c (> 1); <= 0 disables the dual clip
  float advantage = 1.0f;      // used when no per-token advantage tensor is given
  float inv_temperature = 1.0f;
  int64_t ignore_index = -100;
};

// The packed list's layout. psft_ext checks at import that its packing names these, in order.
enum PackedParam : int { kClipLow, kClipHigh, kDualClip, kTemperature, kAdvantage, kPackedParams };
constexpr const char* kPackedParamNames[kPackedParams] = {"clip_low", "clip_high", "dual_clip",
                                                          "temperature", "advantage"};

inline LossParams unpack_params(const double* packed, int64_t ignore_index) {
  LossParams p;
  p.clip_low = static_cast<float>(packed[kClipLow]);
  p.clip_high = static_cast<float>(packed[kClipHigh]);
  p.dual_clip = static_cast<float>(packed[kDualClip]);
  p.inv_temperature = static_cast<float>(1.0 / packed[kTemperature]);
  p.advantage = static_cast<float>(packed[kAdvantage]);
  p.ignore_index = ignore_index;
  return p;
}

// The forward's per-token float32 outputs: the rows of one (kTokenStats, N) tensor. Ignored tokens
// hold 0 in every row. lse and coef are what the backward reads: the gradient of the loss the op
// returns is coef * (softmax(x) - [j == y]) / tau per row, so for reduction "mean" coef already
// carries the 1 / denominator (TokenLoss::coef divided by it).
enum TokenStat : int { kLoss, kLogp, kEntropy, kRatio, kLogRatio, kClipped, kLse, kCoef,
                       kTokenStats };
constexpr const char* kTokenStatNames[kTokenStats] = {"loss",      "logp",    "entropy", "ratio",
                                                      "log_ratio", "clipped", "lse",     "coef"};

// The metrics of one call (psft_ext.PSFTMetrics): token means over the non-ignored tokens of
// -logp, entropy, clipped, -log_ratio and ratio, then the number of those tokens.
enum Metric : int { kNll, kEntropyMean, kClipFraction, kApproxKl, kRatioMean, kNumTokens,
                    kMetrics };
constexpr const char* kMetricNames[kMetrics] = {"nll",       "entropy",    "clip_fraction",
                                                "approx_kl", "ratio_mean", "num_tokens"};

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

// A target id is usable when it lies in [0, V); ignore_index rows are handled before this.
PSFT_HD bool target_in_range(int64_t y, int64_t vocab) { return y >= 0 && y < vocab; }

}  // namespace psft
