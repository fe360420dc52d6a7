// CPU kernels (csrc/psft_kernels.h): the forward (stats, and the gradient in the same pass when
// asked for), the backward from the forward's stats, and the per-row rescale of a gradient.
//
// One row (token) at a time per thread, rows spread over threads with at::parallel_for. A row is
// read in blocks of kBlock elements converted to float32 (L1-resident), so bf16/fp16 logits are
// read once in their own dtype and accumulated in float32. The forward keeps a running softmax
// (max, sum, entropy term) across blocks, rebased once per block; the backward recomputes
// softmax from the saved lse. Nothing N x V is allocated except the gradient itself.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "../psft_env.h"
#include "../psft_kernels.h"
#include "../psft_math.h"
#include "avx2_rows.h"
#include "dtype_convert.h"
#include "vec_exp.h"

// Each row kernel exists twice on x86-64: AVX2+FMA+F16C intrinsics (avx2_rows.h) and the portable
// loops below (the baseline ISA), picked at run time from the CPU's features, so a build made
// anywhere runs fast on current CPUs and still runs on old ones. (GCC's target_clones("arch=...")
// would dispatch on the CPU model name, which misses e.g. AMD parts that have every AVX2 feature,
// hence the explicit check.)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define PSFT_CPU_AVX2_PATH 1
#define PSFT_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#endif
#define PSFT_ALWAYS_INLINE __attribute__((always_inline)) inline

// The logits dtypes the ops accept (checked before dispatch).
#define PSFT_DISPATCH_LOGITS(TYPE, NAME, ...)                     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                  \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)    \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace psft {
namespace cpu {
namespace {

constexpr int kLanes = 16;    // independent accumulators: one AVX-512 or two AVX2 registers
constexpr int kBlock = 2048;  // elements converted to float32 per step: 8 KiB, stays in L1

// Softmax statistics of x = z * inv_t over one row.
template <typename T>
PSFT_ALWAYS_INLINE SoftmaxStats row_softmax_stats_impl(const T* row, int64_t vocab, float inv_t) {
  SoftmaxStats st = softmax_empty();
  alignas(64) float x[kBlock];
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min<int64_t>(kBlock, vocab - start);
    for (int64_t j = 0; j < n; ++j) x[j] = to_float(row[start + j]) * inv_t;

    float lane_max[kLanes];
    for (int l = 0; l < kLanes; ++l) lane_max[l] = -INFINITY;
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes)
      for (int l = 0; l < kLanes; ++l) lane_max[l] = std::max(lane_max[l], x[j + l]);
    float block_max = -INFINITY;
    for (; j < n; ++j) block_max = std::max(block_max, x[j]);
    for (int l = 0; l < kLanes; ++l) block_max = std::max(block_max, lane_max[l]);

    const float m = std::max(st.m, block_max);
    st = softmax_rebase(st, m);
    // While every element so far is -inf, measure against 0: exp(-inf) = 0 without NaN.
    const float ref = m == -INFINITY ? 0.0f : m;
    float lane_s[kLanes] = {}, lane_w[kLanes] = {};
    j = 0;
    for (; j + kLanes <= n; j += kLanes)
      for (int l = 0; l < kLanes; ++l) {
        // Clamped so exp(-inf) * -inf never forms; NaN passes through to s.
        const float xm = max_keep_nan(x[j + l] - ref, -100.0f);
        const float e = exp_fast(xm);
        lane_s[l] += e;
        lane_w[l] += e * xm;
      }
    for (; j < n; ++j) {
      const float xm = max_keep_nan(x[j] - ref, -100.0f);
      const float e = exp_fast(xm);
      st.s += e;
      st.w += e * xm;
    }
    for (int l = 0; l < kLanes; ++l) {
      st.s += lane_s[l];
      st.w += lane_w[l];
    }
  }
  return st;
}

// grad[j] = scale * (exp(z_j * inv_t - lse) - [j == target]) in T.
template <typename T>
PSFT_ALWAYS_INLINE void row_grad_impl(const T* row, int64_t vocab, float inv_t, float lse,
                                      float scale, int64_t target, T* grad) {
  alignas(64) float x[kBlock];
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min<int64_t>(kBlock, vocab - start);
    for (int64_t j = 0; j < n; ++j)
      x[j] = scale * exp_fast(to_float(row[start + j]) * inv_t - lse);
    if (target >= start && target < start + n) x[target - start] -= scale;
    for (int64_t j = 0; j < n; ++j) grad[start + j] = from_float<T>(x[j]);
  }
}

// The same with the entropy's term (only where a gradient flows into the entropy: the entropy
// bonus, a differentiable entropy): grad[j] += ent_scale * p_j * (log p_j + entropy). Portable
// loops only: these paths are not the default.
template <typename T>
void row_grad_entropy(const T* row, int64_t vocab, float inv_t, float lse, float scale,
                      float ent_scale, float entropy, int64_t target, T* grad) {
  alignas(64) float x[kBlock];
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min<int64_t>(kBlock, vocab - start);
    for (int64_t j = 0; j < n; ++j) {
      const float log_p = to_float(row[start + j]) * inv_t - lse;
      const float prob = exp_fast(log_p);
      // p log p is 0 where p is 0 (a -inf logit), not 0 * -inf.
      x[j] = scale * prob + (prob > 0.0f ? ent_scale * prob * (log_p + entropy) : 0.0f);
    }
    if (target >= start && target < start + n) x[target - start] -= scale;
    for (int64_t j = 0; j < n; ++j) grad[start + j] = from_float<T>(x[j]);
  }
}

#ifdef PSFT_CPU_AVX2_PATH
// The row loops this process runs: AVX2 where the CPU has AVX2, FMA and F16C, unless
// PSFT_EXT_CPU_BASELINE=1 (read once; csrc/psft_env.h) asks for the portable ones.
bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c") && !env_flag("PSFT_EXT_CPU_BASELINE");
  return has;
}

template <typename T>
PSFT_TARGET_AVX2 SoftmaxStats row_softmax_stats_avx2(const T* row, int64_t vocab, float inv_t) {
  return avx2::row_softmax_stats<kBlock>(row, vocab, inv_t);
}

template <typename T>
PSFT_TARGET_AVX2 void row_grad_avx2(const T* row, int64_t vocab, float inv_t, float lse,
                                    float scale, int64_t target, T* grad) {
  avx2::row_grad(row, vocab, inv_t, lse, scale, target, grad);
}
#endif

template <typename T>
SoftmaxStats row_softmax_stats(const T* row, int64_t vocab, float inv_t) {
#ifdef PSFT_CPU_AVX2_PATH
  if (cpu_has_avx2()) return row_softmax_stats_avx2(row, vocab, inv_t);
#endif
  return row_softmax_stats_impl(row, vocab, inv_t);
}

template <typename T>
void row_grad(const T* row, int64_t vocab, float inv_t, float lse, float scale, int64_t target,
              T* grad) {
#ifdef PSFT_CPU_AVX2_PATH
  if (cpu_has_avx2()) return row_grad_avx2(row, vocab, inv_t, lse, scale, target, grad);
#endif
  row_grad_impl(row, vocab, inv_t, lse, scale, target, grad);
}

// A fresh N x V gradient is written once: with 4 KiB pages its first touch costs one page fault
// per 4 KiB, which took most of the backward's time on a 1 GiB gradient. Asking for transparent
// huge pages (where the kernel offers them on request) cuts that 512-fold.
void advise_huge_pages(const at::Tensor& grad, const at::Tensor& logits) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (grad.data_ptr() == logits.data_ptr()) return;  // in place: the logits' pages, touched
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t data = reinterpret_cast<uintptr_t>(grad.data_ptr());
  const uintptr_t begin = (data + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (data + grad.nbytes()) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)grad;
  (void)logits;
#endif
}

// Rows per task: enough elements that the scheduling cost is amortized.
int64_t row_grain(int64_t vocab) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, vocab));
}

// Reads target ids of either index dtype as int64.
struct Targets {
  const void* data;
  bool is_int32;
  int64_t operator[](int64_t i) const {
    return is_int32 ? static_cast<const int32_t*>(data)[i] : static_cast<const int64_t*>(data)[i];
  }
};

Targets targets_of(const at::Tensor& t) {
  return {t.data_ptr(), t.scalar_type() == at::kInt};
}

int64_t row_stride_of(const at::Tensor& logits) {
  return logits.size(0) > 1 ? logits.stride(0) : logits.size(1);
}

const float* optional_data(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

template <typename T>
void zero_row(T* row, int64_t vocab) {
  std::memset(static_cast<void*>(row), 0, sizeof(T) * vocab);
}

// The stats of one non-ignored row r (target y): column r of the (kTokenStats, N) stats.
template <typename T>
void forward_row(const T* row, int64_t vocab, int64_t y, int64_t r, int64_t n,
                 const LossParams& params, const float* old_p, const float* adv_p, float* stats) {
  const SoftmaxStats st = row_softmax_stats(row, vocab, params.inv_temperature);
  const float lse_r = softmax_lse(st);
  const float x_y = to_float(row[y]) * params.inv_temperature;
  const float logp_r = target_logp(x_y, lse_r);
  const TokenLoss t =
      token_loss(logp_r, old_p ? old_p[r] : logp_r, adv_p ? adv_p[r] : params.advantage, params);
  stats[kLoss * n + r] = t.loss;
  stats[kLogp * n + r] = logp_r;
  stats[kEntropy * n + r] = softmax_entropy(st);
  stats[kRatio * n + r] = t.ratio;
  stats[kLogRatio * n + r] = t.log_ratio;
  stats[kClipped * n + r] = t.clipped;
  stats[kLse * n + r] = lse_r;
  stats[kCoef * n + r] = t.coef;
  stats[kCorrect * n + r] = x_y >= st.m ? 1.0f : 0.0f;
  stats[kMax * n + r] = st.m;
}

}  // namespace

// Per row: the stats and, when a gradient is asked for, that row's gradient while the row is
// still in cache (over the row itself when grad is the logits: row_grad reads each block before
// it writes it).
void forward(const ForwardArgs& a) {
  const int64_t n = a.logits.size(0), vocab = a.logits.size(1);
  const int64_t stride = row_stride_of(a.logits);
  const bool with_grad = a.grad.defined();
  if (with_grad) advise_huge_pages(a.grad, a.logits);
  float* stats = a.stats.data_ptr<float>();
  const float* old_p = optional_data(a.old);
  const float* adv_p = optional_data(a.adv);
  const float* w_p = optional_data(a.weights);
  const Targets tg = targets_of(a.targets);
  const LossParams& params = a.params;
  const float inv_t = params.inv_temperature;

  PSFT_DISPATCH_LOGITS(a.logits.scalar_type(), "psft_fwd", [&] {
    const scalar_t* base = a.logits.data_ptr<scalar_t>();
    scalar_t* grad_base = with_grad ? a.grad.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, n, row_grain(vocab), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t y = tg[r];
        scalar_t* grad_row = with_grad ? grad_base + r * vocab : nullptr;
        if (y == params.ignore_index) {
          for (int k = 0; k < kTokenStats; ++k) stats[k * n + r] = 0.0f;
          if (with_grad) zero_row(grad_row, vocab);
          continue;
        }
        const scalar_t* row = base + r * stride;
        forward_row(row, vocab, y, r, n, params, old_p, adv_p, stats);
        if (!with_grad) continue;
        const float scale = w_p[r] * stats[kCoef * n + r] * inv_t;
        if (scale == 0.0f) {  // clipped, or no upstream gradient
          zero_row(grad_row, vocab);
          continue;
        }
        row_grad(row, vocab, inv_t, stats[kLse * n + r], scale, y, grad_row);
      }
    });
  });
}

void backward(const BackwardArgs& a) {
  const int64_t n = a.logits.size(0), vocab = a.logits.size(1);
  const int64_t stride = row_stride_of(a.logits);
  advise_huge_pages(a.grad, a.logits);
  const float inv_t = a.params.inv_temperature;
  const float* scale_p = a.scale.data_ptr<float>();
  const float* ent_p = optional_data(a.ent_scale);
  const float* lse_p = a.lse.data_ptr<float>();
  const float* h_p = a.entropy.data_ptr<float>();
  const Targets tg = targets_of(a.targets);

  PSFT_DISPATCH_LOGITS(a.logits.scalar_type(), "psft_bwd", [&] {
    const scalar_t* base = a.logits.data_ptr<scalar_t>();
    scalar_t* out = a.grad.data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(vocab), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t y = tg[r];
        const float scale = scale_p[r] * inv_t;
        const float ent = ent_p ? ent_p[r] * inv_t : 0.0f;
        scalar_t* grad_row = out + r * vocab;
        // Ignored and clipped rows have no gradient: their logits are not read.
        if (y == a.params.ignore_index || (scale == 0.0f && ent == 0.0f)) {
          zero_row(grad_row, vocab);
          continue;
        }
        const scalar_t* row = base + r * stride;
        if (ent == 0.0f) {
          row_grad(row, vocab, inv_t, lse_p[r], scale, y, grad_row);
        } else {
          row_grad_entropy(row, vocab, inv_t, lse_p[r], scale, ent, h_p[r], y, grad_row);
        }
      }
    });
  });
}

// The options' pass over the stats: one loop over the tokens.
void token_options(const TokenOptionsArgs& a) {
  const int64_t n = a.stats.size(1);
  float* s = a.stats.data_ptr<float>();
  const float* old = optional_data(a.old);
  const float* adv = optional_data(a.adv);
  const float* isw = optional_data(a.is_weights);
  const float* ref = optional_data(a.ref_logprobs);
  const float* seq = optional_data(a.seq_log_ratio);
  const Targets tg = targets_of(a.targets);
  for (int64_t r = 0; r < n; ++r) {
    OptionInputs in;
    in.adv = adv ? adv[r] : a.params.advantage;
    in.is_weight = isw ? isw[r] : 1.0f;
    in.has_ref = ref != nullptr;
    in.ref_logp = ref ? ref[r] : 0.0f;
    in.has_seq_log_ratio = seq != nullptr;
    in.seq_log_ratio = seq ? seq[r] : 0.0f;
    token_pass(s, n, r, tg[r] == a.params.ignore_index, a.from_logp, old, in, a.params);
  }
}

void scale_rows(const at::Tensor& grad, const at::Tensor& factor_in) {
  // Read with its stride: an expanded scalar (stride 0) needs no copy.
  const float* factor = factor_in.data_ptr<float>();
  const int64_t factor_stride = factor_in.stride(0);
  const int64_t n = grad.size(0), vocab = grad.size(1);
  PSFT_DISPATCH_LOGITS(grad.scalar_type(), "scale_rows_", [&] {
    scalar_t* base = grad.data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(vocab), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const float f = factor[r * factor_stride];
        if (f == 1.0f) continue;
        scalar_t* row = base + r * vocab;
        for (int64_t j = 0; j < vocab; ++j) row[j] = from_float<scalar_t>(to_float(row[j]) * f);
      }
    });
  });
}

const char* kernel_isa() {
#ifdef PSFT_CPU_AVX2_PATH
  if (cpu_has_avx2()) return "avx2";
#endif
  return "baseline";
}

}  // namespace cpu
}  // namespace psft
