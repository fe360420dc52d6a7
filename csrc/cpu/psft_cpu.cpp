// CPU kernels of the psft_ext ops: forward (loss + metrics), backward, single-pass
// forward + backward, token log-probs.
//
// One row (token) at a time per thread, rows spread over threads with at::parallel_for. A row is
// read in blocks of kBlock elements converted to float32 (L1-resident), so bf16/fp16 logits are
// read once in their own dtype and accumulated in float32. The forward keeps a running softmax
// (max, sum, entropy term) across blocks, rebased once per block; the backward recomputes
// softmax from the saved lse. Nothing N x V is allocated except the gradient itself.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "../psft_checks.h"
#include "../psft_env.h"
#include "../psft_op_adapters.h"
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

#ifdef PSFT_CPU_AVX2_PATH
// PSFT_EXT_CPU_BASELINE=1 (read once) keeps the portable loops even where AVX2 is available, so
// the tests can run both (tests/test_cpu_kernels.py).
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

// The gradient is a fresh N x V buffer written once: with 4 KiB pages its first touch costs one
// page fault per 4 KiB, which took most of the backward's time on a 1 GiB gradient. Asking for
// transparent huge pages (where the kernel offers them on request) cuts that 512-fold.
void advise_huge_pages(void* data, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(data) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(data) + bytes) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)data;
  (void)bytes;
#endif
}

// Rows per task: enough elements that the scheduling cost is amortized.
int64_t row_grain(int64_t vocab) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, vocab)); }

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

// The forward's eight per-token float32 outputs, in the ops' order.
struct ForwardOutputs {
  enum { kLoss, kLogp, kEntropy, kRatio, kLogRatio, kClipped, kLse, kCoef, kCount };
  at::Tensor tensors[kCount];
  float* ptr[kCount];

  ForwardOutputs(int64_t n, const at::TensorOptions& opts) {
    for (int i = 0; i < kCount; ++i) {
      tensors[i] = at::empty({n}, opts.dtype(at::kFloat));
      ptr[i] = tensors[i].data_ptr<float>();
    }
  }
  void write_zeros(int64_t r) {
    for (float* o : ptr) o[r] = 0.0f;
  }
  ForwardResult result() const {
    return {tensors[0], tensors[1], tensors[2], tensors[3],
            tensors[4], tensors[5], tensors[6], tensors[7]};
  }
};

// Loss and metrics of one non-ignored row (target y): writes row r of the eight outputs.
template <typename T>
void forward_row(const T* row, int64_t vocab, int64_t y, int64_t r, const LossParams& params,
                 const float* old_p, const float* adv_p, float* const* outs) {
  const SoftmaxStats st = row_softmax_stats(row, vocab, params.inv_temperature);
  const float lse_r = softmax_lse(st);
  const float logp_r = to_float(row[y]) * params.inv_temperature - lse_r;
  const TokenLoss t =
      token_loss(logp_r, old_p ? old_p[r] : logp_r, adv_p ? adv_p[r] : params.advantage, params);
  outs[ForwardOutputs::kLoss][r] = t.loss;
  outs[ForwardOutputs::kLogp][r] = logp_r;
  outs[ForwardOutputs::kEntropy][r] = softmax_entropy(st);
  outs[ForwardOutputs::kRatio][r] = t.ratio;
  outs[ForwardOutputs::kLogRatio][r] = t.log_ratio;
  outs[ForwardOutputs::kClipped][r] = t.clipped;
  outs[ForwardOutputs::kLse][r] = lse_r;
  outs[ForwardOutputs::kCoef][r] = t.coef;
}

const float* optional_data(const at::Tensor& t) {
  return t.defined() ? t.data_ptr<float>() : nullptr;
}

ForwardResult psft_forward_cpu(const at::Tensor& logits_in, const at::Tensor& targets_in,
                               const std::optional<at::Tensor>& old_in,
                               const std::optional<at::Tensor>& adv_in, double advantage,
                               double clip_low, double clip_high, double dual_clip,
                               int64_t ignore_index, double temperature) {
  const ForwardInputs in(logits_in, targets_in, old_in, adv_in, advantage, clip_low, clip_high,
                         dual_clip, ignore_index, temperature, "psft_forward");
  ForwardOutputs out(in.n, in.logits.options());
  const float* old_p = optional_data(in.old);
  const float* adv_p = optional_data(in.adv);
  const Targets tg = targets_of(in.targets);

  PSFT_DISPATCH_LOGITS(in.logits.scalar_type(), "psft_forward", [&] {
    const scalar_t* base = in.logits.data_ptr<scalar_t>();
    at::parallel_for(0, in.n, row_grain(in.vocab), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t y = tg[r];
        if (y == ignore_index) {
          out.write_zeros(r);
          continue;
        }
        forward_row(base + r * in.row_stride, in.vocab, y, r, in.params, old_p, adv_p, out.ptr);
      }
    });
  });
  return out.result();
}

// psft_forward_backward(_): per row, the forward and then, while the row is still in cache, its
// gradient (over the row itself when in_place). Returns the outputs and the gradient.
std::tuple<ForwardResult, at::Tensor> forward_backward(
    const at::Tensor& logits_in, const at::Tensor& targets_in,
    const std::optional<at::Tensor>& old_in, const std::optional<at::Tensor>& adv_in,
    double advantage, double clip_low, double clip_high, double dual_clip, int64_t ignore_index,
    double temperature, const at::Tensor& grad_loss_in, bool in_place, const char* op) {
  const ForwardInputs in(logits_in, targets_in, old_in, adv_in, advantage, clip_low, clip_high,
                         dual_clip, ignore_index, temperature, op);
  check_forward_backward_inputs(logits_in, grad_loss_in, in_place, op);
  ForwardOutputs out(in.n, in.logits.options());
  at::Tensor grad = in_place ? logits_in
                             : at::empty({in.n, in.vocab}, in.logits.options().memory_format(
                                                               at::MemoryFormat::Contiguous));
  if (!in_place) advise_huge_pages(grad.data_ptr(), grad.nbytes());
  const at::Tensor grad_loss = grad_loss_in.contiguous();
  const float* g_p = grad_loss.data_ptr<float>();
  const float* old_p = optional_data(in.old);
  const float* adv_p = optional_data(in.adv);
  const Targets tg = targets_of(in.targets);
  const float inv_t = in.params.inv_temperature;

  PSFT_DISPATCH_LOGITS(in.logits.scalar_type(), "psft_forward_backward", [&] {
    const scalar_t* base = in.logits.data_ptr<scalar_t>();
    scalar_t* grad_base = grad.data_ptr<scalar_t>();
    at::parallel_for(0, in.n, row_grain(in.vocab), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t y = tg[r];
        scalar_t* grad_row = grad_base + r * in.vocab;
        if (y == ignore_index) {
          out.write_zeros(r);
          std::memset(static_cast<void*>(grad_row), 0, sizeof(scalar_t) * in.vocab);
          continue;
        }
        const scalar_t* row = base + r * in.row_stride;
        forward_row(row, in.vocab, y, r, in.params, old_p, adv_p, out.ptr);
        const float scale = g_p[r] * out.ptr[ForwardOutputs::kCoef][r] * inv_t;
        if (scale == 0.0f) {  // clipped, or no upstream gradient
          std::memset(static_cast<void*>(grad_row), 0, sizeof(scalar_t) * in.vocab);
          continue;
        }
        // In place, row == grad_row: row_grad reads each block before it writes it.
        row_grad(row, in.vocab, inv_t, out.ptr[ForwardOutputs::kLse][r], scale, y, grad_row);
      }
    });
  });
  return {out.result(), grad};
}

void scale_rows_cpu(at::Tensor& grad, const at::Tensor& factor_in) {
  check_scale_rows_inputs(grad, factor_in, "scale_rows_");
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

// The backward into `grad` (a fresh buffer, or the logits themselves).
void backward_into(at::Tensor& grad, const at::Tensor& grad_loss_in, const at::Tensor& logits_in,
                   const at::Tensor& targets_in, const at::Tensor& lse_in,
                   const at::Tensor& coef_in, int64_t ignore_index, double temperature) {
  const at::Tensor logits = rows_with_unit_stride(logits_in);
  const at::Tensor targets = targets_in.contiguous(), g = grad_loss_in.contiguous(),
                   lse = lse_in.contiguous(), coef = coef_in.contiguous();
  const int64_t n = logits.size(0), vocab = logits.size(1), stride = row_stride_of(logits);
  const float inv_t = static_cast<float>(1.0 / temperature);
  const float* g_p = g.data_ptr<float>();
  const float* lse_p = lse.data_ptr<float>();
  const float* coef_p = coef.data_ptr<float>();
  const Targets tg = targets_of(targets);

  PSFT_DISPATCH_LOGITS(logits.scalar_type(), "psft_backward", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    scalar_t* out = grad.data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(vocab), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t y = tg[r];
        const float scale = g_p[r] * coef_p[r] * inv_t;
        scalar_t* grad_row = out + r * vocab;
        // Ignored and clipped rows have no gradient: skip reading their logits.
        if (y == ignore_index || scale == 0.0f) {
          std::memset(static_cast<void*>(grad_row), 0, sizeof(scalar_t) * vocab);
          continue;
        }
        // In place (grad_row == the row): row_grad reads each block before it writes it.
        row_grad(base + r * stride, vocab, inv_t, lse_p[r], scale, y, grad_row);
      }
    });
  });
}

at::Tensor psft_backward_cpu(const at::Tensor& grad_loss, const at::Tensor& logits,
                             const at::Tensor& targets, const at::Tensor& lse,
                             const at::Tensor& coef, int64_t ignore_index, double temperature) {
  check_backward_inputs(grad_loss, logits, targets, lse, coef, temperature, "psft_backward");
  at::Tensor grad = at::empty(logits.sizes(),
                              logits.options().memory_format(at::MemoryFormat::Contiguous));
  advise_huge_pages(grad.data_ptr(), grad.nbytes());
  backward_into(grad, grad_loss, logits, targets, lse, coef, ignore_index, temperature);
  return grad;
}

void psft_backward_inplace_cpu(const at::Tensor& grad_loss, at::Tensor& logits,
                               const at::Tensor& targets, const at::Tensor& lse,
                               const at::Tensor& coef, int64_t ignore_index, double temperature) {
  const char* op = "psft_backward_";
  check_backward_inputs(grad_loss, logits, targets, lse, coef, temperature, op);
  TORCH_CHECK_VALUE(logits.is_contiguous(), op,
                    ": logits must be contiguous to receive the gradient in place");
  backward_into(logits, grad_loss, logits, targets, lse, coef, ignore_index, temperature);
}

std::tuple<at::Tensor, at::Tensor> token_logprobs_cpu(const at::Tensor& logits_in,
                                                      const at::Tensor& targets_in,
                                                      int64_t ignore_index, double temperature) {
  const char* op = "token_logprobs";
  check_logits_and_targets(logits_in, targets_in, ignore_index, op);
  check_temperature(temperature, op);
  const at::Tensor logits = rows_with_unit_stride(logits_in);
  const at::Tensor targets = targets_in.contiguous();
  const int64_t n = logits.size(0), vocab = logits.size(1), stride = row_stride_of(logits);
  const auto opts = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({n}, opts), entropy = at::empty({n}, opts);
  float* logp_p = logp.data_ptr<float>();
  float* ent_p = entropy.data_ptr<float>();
  const float inv_t = static_cast<float>(1.0 / temperature);
  const Targets tg = targets_of(targets);

  PSFT_DISPATCH_LOGITS(logits.scalar_type(),
                                  "token_logprobs", [&] {
    const scalar_t* base = logits.data_ptr<scalar_t>();
    at::parallel_for(0, n, row_grain(vocab), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t y = tg[r];
        if (y == ignore_index) {
          logp_p[r] = 0.0f;
          ent_p[r] = 0.0f;
          continue;
        }
        const scalar_t* row = base + r * stride;
        const SoftmaxStats st = row_softmax_stats(row, vocab, inv_t);
        logp_p[r] = to_float(row[y]) * inv_t - softmax_lse(st);
        ent_p[r] = softmax_entropy(st);
      }
    });
  });
  return {logp, entropy};
}

}  // namespace

// Declared in psft_ops.cpp (build_info): which row loops this process runs.
const char* kernel_isa() {
#ifdef PSFT_CPU_AVX2_PATH
  if (cpu_has_avx2()) return "avx2";
#endif
  return "baseline";
}

}  // namespace cpu
}  // namespace psft

TORCH_LIBRARY_IMPL(psft_ext, CPU, m) {
  m.impl("psft_forward", &psft::cpu::psft_forward_cpu);
  m.impl("psft_backward", &psft::cpu::psft_backward_cpu);
  m.impl("psft_backward_", &psft::cpu::psft_backward_inplace_cpu);
  m.impl("psft_forward_backward", &psft::forward_backward_op<&psft::cpu::forward_backward>);
  m.impl("psft_forward_backward_",
         &psft::forward_backward_inplace_op<&psft::cpu::forward_backward>);
  m.impl("scale_rows_", &psft::cpu::scale_rows_cpu);
  m.impl("token_logprobs", &psft::cpu::token_logprobs_cpu);
}
