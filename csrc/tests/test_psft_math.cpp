// Unit tests of the shared per-token math (csrc/psft_math.h) and the CPU exp (csrc/cpu/vec_exp.h),
// against double-precision formulas. Built and run by CMake's ctest; needs no torch.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "cpu/vec_exp.h"
#include "psft_math.h"

namespace {

int failures = 0;

void expect(bool ok, const char* what, double got, double want) {
  if (!ok) {
    ++failures;
    std::printf("FAIL %s: got %.9g want %.9g\n", what, got, want);
  }
}

void expect_near(double got, double want, double tol, const char* what) {
  expect(std::fabs(got - want) <= tol * (1.0 + std::fabs(want)), what, got, want);
}

// Double-precision verl-style token loss for comparison.
struct Ref {
  double loss, coef, clipped;
};
Ref reference_token(double logp, double old, double adv, double cl, double ch, double dual) {
  const double d = std::min(20.0, std::max(-20.0, logp - old));
  const double r = std::exp(d);
  const double l1 = -adv * r;
  const double l2 = -adv * std::min(1 + ch, std::max(1 - cl, r));
  const bool clip = l2 > l1;
  double l = clip ? l2 : l1;
  bool dual_on = false;
  if (dual > 0 && adv < 0 && l > -adv * dual) {
    l = -adv * dual;
    dual_on = true;
  }
  const bool inside = std::fabs(logp - old) <= 20.0;
  return {l, (!clip && !dual_on && inside) ? adv * r : 0.0, (clip || dual_on) ? 1.0 : 0.0};
}

void test_token_loss_branches() {
  psft::LossParams p;
  p.clip_low = 0.2f;
  p.clip_high = 0.28f;
  const double advs[] = {1.0, 0.5, -1.0, -2.0, 0.0};
  const double dlogs[] = {-25.0, -1.0, -0.3, -0.1, 0.0, 0.1, 0.2, 0.3, 1.0, 25.0};
  for (float dual : {0.0f, 3.0f}) {
    p.dual_clip = dual;
    for (double adv : advs)
      for (double d : dlogs) {
        const float logp = -2.0f;
        const float old = static_cast<float>(logp - d);
        const psft::TokenLoss t = psft::token_loss(logp, old, static_cast<float>(adv), p);
        const Ref r = reference_token(logp, old, adv, p.clip_low, p.clip_high, dual);
        expect_near(t.loss, r.loss, 1e-5, "token loss");
        expect_near(t.coef, r.coef, 1e-5, "token coef");
        expect(t.clipped == r.clipped, "clipped flag", t.clipped, r.clipped);
      }
  }
  // Ratio exactly 1 (old policy = current) is never clipped and has coef = A.
  const psft::TokenLoss one = psft::token_loss(-3.0f, -3.0f, 1.0f, p);
  expect(one.ratio == 1.0f && one.coef == 1.0f && one.clipped == 0.0f && one.loss == -1.0f,
         "ratio 1", one.coef, 1.0);
  // NaN log-probs propagate instead of being clamped away.
  const psft::TokenLoss nan = psft::token_loss(NAN, -1.0f, 1.0f, p);
  expect(std::isnan(nan.loss) && std::isnan(nan.ratio), "NaN propagates", nan.loss, NAN);
  expect(std::isnan(nan.coef), "a NaN log-ratio makes the coefficient NaN", nan.coef, NAN);
  const psft::TokenLoss nan_old = psft::token_loss(-1.0f, NAN, 1.0f, p);
  expect(std::isnan(nan_old.coef), "a NaN old log-prob too", nan_old.coef, NAN);
  // A row whose lse is NaN or +inf (a NaN or +inf logit) has a NaN log-prob; -inf logits are
  // fine as long as one is finite.
  const float inf_lse = psft::target_logp(1.0f, INFINITY);
  const float nan_lse = psft::target_logp(1.0f, NAN);
  const float masked = psft::target_logp(-INFINITY, 2.0f);
  const float plain = psft::target_logp(1.5f, 2.0f);
  expect(std::isnan(inf_lse), "lse = +inf", inf_lse, NAN);
  expect(std::isnan(nan_lse), "lse = NaN", nan_lse, NAN);
  expect(masked == -INFINITY, "a masked target", masked, -INFINITY);
  expect(plain == -0.5f, "x_y - lse", plain, -0.5);
}

// Softmax stats built element by element, merged in a tree, and rebased must all agree with a
// direct double computation, including -inf logits.
void test_softmax_stats() {
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  for (int n : {1, 2, 7, 100, 5000}) {
    std::vector<float> x(n);
    for (float& v : x) v = normal(rng);
    if (n > 2) x[1] = -INFINITY;
    double mx = -INFINITY;
    for (float v : x) mx = std::max(mx, double(v));
    double s = 0, w = 0;
    for (float v : x) {
      const double e = std::exp(v - mx);
      s += e;
      if (e > 0) w += e * (v - mx);
    }
    const double lse = mx + std::log(s);
    const double entropy = std::log(s) - w / s;
    // Leaves of 3 elements merged left to right, then a second tree order.
    psft::SoftmaxStats acc = psft::softmax_empty();
    for (int i = 0; i < n; i += 3) {
      psft::SoftmaxStats leaf = psft::softmax_empty();
      for (int j = i; j < std::min(n, i + 3); ++j) leaf.m = std::max(leaf.m, x[j]);
      for (int j = i; j < std::min(n, i + 3); ++j) psft::softmax_accumulate(x[j] - leaf.m, leaf.s, leaf.w);
      acc = psft::softmax_merge(acc, leaf);
    }
    expect_near(psft::softmax_lse(acc), lse, 2e-6, "lse");
    expect_near(psft::softmax_entropy(acc), entropy, 2e-5, "entropy");
    const psft::SoftmaxStats merged_empty = psft::softmax_merge(psft::softmax_empty(), acc);
    expect_near(psft::softmax_lse(merged_empty), lse, 2e-6, "merge with empty");
  }
  const psft::SoftmaxStats both_empty = psft::softmax_merge(psft::softmax_empty(), psft::softmax_empty());
  expect(both_empty.s == 0.0f && both_empty.w == 0.0f, "empty merge", both_empty.s, 0.0);
}

void test_logit_grad() {
  // Row of 3 logits, target 1: grad = scale * (softmax - onehot).
  const float z[3] = {0.5f, -1.0f, 2.0f};
  const double lse = std::log(std::exp(0.5) + std::exp(-1.0) + std::exp(2.0));
  for (int j = 0; j < 3; ++j) {
    const double want = 0.7 * (std::exp(z[j] - lse) - (j == 1 ? 1.0 : 0.0));
    expect_near(psft::logit_grad(z[j], static_cast<float>(lse), 0.7f, j == 1), want, 1e-6, "logit grad");
  }
}

void test_exp_fast() {
  double worst = 0;
  for (double x = -87.0; x <= 80.0; x += 0.001) {
    const double got = psft::cpu::exp_fast(static_cast<float>(x));
    const double want = std::exp(double(static_cast<float>(x)));
    worst = std::max(worst, std::fabs(got - want) / want);
  }
  expect(worst < 3e-7, "exp_fast relative error", worst, 3e-7);
  expect(psft::cpu::exp_fast(-INFINITY) == 0.0f, "exp(-inf)", psft::cpu::exp_fast(-INFINITY), 0);
  expect(psft::cpu::exp_fast(-100.0f) == 0.0f, "exp(-100)", psft::cpu::exp_fast(-100.0f), 0);
  expect(std::isnan(psft::cpu::exp_fast(NAN)), "exp(NaN)", psft::cpu::exp_fast(NAN), NAN);
  expect(psft::cpu::exp_fast(0.0f) == 1.0f, "exp(0)", psft::cpu::exp_fast(0.0f), 1.0);
}

}  // namespace

int main() {
  test_token_loss_branches();
  test_softmax_stats();
  test_logit_grad();
  test_exp_fast();
  if (failures) {
    std::printf("%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("psft_math: all checks passed\n");
  return 0;
}
