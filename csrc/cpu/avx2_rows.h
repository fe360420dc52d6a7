// The CPU kernels' two row loops written with AVX2 + FMA + F16C intrinsics: the softmax
// statistics of a row (the forward) and the gradient of a row (the backward).
//
// The portable versions in psft_cpu.cpp rely on the compiler's auto-vectorizer. Built for AVX2 it
// left the max and part of the lane bookkeeping scalar (about 1.5 ns per float32 element on a
// 2-core EPYC VM, against about 0.55 ns here, cache-resident). These follow the same arithmetic:
// the same blocks of kBlock elements rebased once per block, 16 lanes (two 8-wide registers),
// exp_fast's range reduction and polynomial, the same clamps, and the same NaN rules (a NaN logit
// poisons the row's sum; -inf contributes exactly 0). Only the order in which the 16 lanes are
// added at the end of a block differs, so results agree with the portable path to rounding.
//
// Every function carries the target attribute and is only called after cpu_has_avx2().
#pragma once

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../psft_math.h"
#include "dtype_convert.h"
#include "vec_exp.h"

#define PSFT_AVX2_FN __attribute__((target("avx2,fma,f16c"), always_inline)) inline

namespace psft {
namespace cpu {
namespace avx2 {

// exp_fast on 8 lanes. The clamps take the input as the second operand of min/max, which is the
// one returned for a NaN, so NaN stays NaN; inputs below kLo give exactly 0, as in exp_fast.
PSFT_AVX2_FN __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f);
  const __m256 xc = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(lo, x));
  const __m256 round = _mm256_set1_ps(12582912.0f);  // 1.5 * 2^23
  const __m256 t = _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), round);
  const __m256 n = _mm256_sub_ps(t, round);
  const __m256i ni = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(0x4B400000));
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), xc);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(_mm256_mul_ps(y, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256 scale = _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_add_epi32(ni, _mm256_set1_epi32(127)), 23));
  const __m256 below = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  return _mm256_andnot_ps(below, _mm256_mul_ps(y, scale));
}

// 8 logits as float32.
PSFT_AVX2_FN __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
PSFT_AVX2_FN __m256 load8(const c10::BFloat16* p) {
  const __m128i bits = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16));
}
PSFT_AVX2_FN __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// 8 float32 values stored in the logits' dtype, rounded as from_float rounds one.
PSFT_AVX2_FN void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
PSFT_AVX2_FN void store8(c10::BFloat16* p, __m256 v) {
  // Round to nearest even; a NaN becomes the quiet NaN 0x7FC0.
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(
      _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  // Pack the 8 x 32-bit lanes to 16 bits (packus works per 128-bit half: reorder the quarters).
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
}
PSFT_AVX2_FN void store8(c10::Half* p, __m256 v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

PSFT_AVX2_FN float hmax8(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  float m = lanes[0];
  for (int l = 1; l < 8; ++l) m = std::max(m, lanes[l]);
  return m;
}

PSFT_AVX2_FN float hsum8(__m256 v) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, v);
  float s = 0.0f;
  for (int l = 0; l < 8; ++l) s += lanes[l];
  return s;
}

// Softmax statistics of x = z * inv_t over one row (row_softmax_stats_impl's arithmetic).
template <int kBlock, typename T>
PSFT_AVX2_FN SoftmaxStats row_softmax_stats(const T* row, int64_t vocab, float inv_t) {
  SoftmaxStats st = softmax_empty();
  alignas(64) float x[kBlock];
  const __m256 vt = _mm256_set1_ps(inv_t);
  for (int64_t start = 0; start < vocab; start += kBlock) {
    const int64_t n = std::min<int64_t>(kBlock, vocab - start);
    // Pass 1: the block as float32 (L1-resident) and its maximum. max(m, a) keeps m for a NaN
    // lane, like std::max in the portable loop; a NaN still reaches the sum in pass 2.
    __m256 m0 = _mm256_set1_ps(-INFINITY), m1 = m0;
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
      const __m256 a = _mm256_mul_ps(load8(row + start + j), vt);
      const __m256 b = _mm256_mul_ps(load8(row + start + j + 8), vt);
      _mm256_store_ps(x + j, a);
      _mm256_store_ps(x + j + 8, b);
      m0 = _mm256_max_ps(a, m0);
      m1 = _mm256_max_ps(b, m1);
    }
    float block_max = hmax8(_mm256_max_ps(m0, m1));
    for (; j < n; ++j) {
      x[j] = to_float(row[start + j]) * inv_t;
      block_max = std::max(block_max, x[j]);
    }
    const float m = std::max(st.m, block_max);
    st = softmax_rebase(st, m);
    // While every element so far is -inf, measure against 0: exp(-inf) = 0 without NaN.
    const float ref = m == -INFINITY ? 0.0f : m;
    // Pass 2: sum of exp(x - ref) and of exp(x - ref) * (x - ref), the difference clamped at
    // -100 (so exp(-inf) * -inf never forms) with the NaN-keeping operand order.
    const __m256 vref = _mm256_set1_ps(ref), floor = _mm256_set1_ps(-100.0f);
    __m256 s0 = _mm256_setzero_ps(), s1 = s0, w0 = s0, w1 = s0;
    j = 0;
    for (; j + 16 <= n; j += 16) {
      const __m256 a = _mm256_max_ps(floor, _mm256_sub_ps(_mm256_load_ps(x + j), vref));
      const __m256 b = _mm256_max_ps(floor, _mm256_sub_ps(_mm256_load_ps(x + j + 8), vref));
      const __m256 ea = exp8(a), eb = exp8(b);
      s0 = _mm256_add_ps(s0, ea);
      s1 = _mm256_add_ps(s1, eb);
      w0 = _mm256_fmadd_ps(ea, a, w0);
      w1 = _mm256_fmadd_ps(eb, b, w1);
    }
    for (; j < n; ++j) {
      const float xm = max_keep_nan(x[j] - ref, -100.0f);
      const float e = exp_fast(xm);
      st.s += e;
      st.w += e * xm;
    }
    st.s += hsum8(_mm256_add_ps(s0, s1));
    st.w += hsum8(_mm256_add_ps(w0, w1));
  }
  return st;
}

// grad[j] = scale * (exp(z_j * inv_t - lse) - [j == target]) in T (row_grad_impl's arithmetic).
// row may be grad itself (in place): every vector is read before it is written, and the target's
// logit is read before the row is overwritten.
template <typename T>
PSFT_AVX2_FN void row_grad(const T* row, int64_t vocab, float inv_t, float lse, float scale,
                           int64_t target, T* grad) {
  const bool has_target = target >= 0 && target < vocab;
  const float target_value =
      has_target ? scale * exp_fast(to_float(row[target]) * inv_t - lse) - scale : 0.0f;
  const __m256 vt = _mm256_set1_ps(inv_t), vlse = _mm256_set1_ps(lse);
  const __m256 vscale = _mm256_set1_ps(scale);
  int64_t j = 0;
  for (; j + 8 <= vocab; j += 8) {
    // z * inv_t rounded on its own, as in the statistics, not fused into - lse: where lse is
    // x_y exactly (a row whose softmax is all on the target) the target's gradient is exactly 0.
    const __m256 x = _mm256_sub_ps(_mm256_mul_ps(load8(row + j), vt), vlse);
    store8(grad + j, _mm256_mul_ps(vscale, exp8(x)));
  }
  for (; j < vocab; ++j) {
    grad[j] = from_float<T>(scale * exp_fast(to_float(row[j]) * inv_t - lse));
  }
  if (has_target) grad[target] = from_float<T>(target_value);
}

}  // namespace avx2
}  // namespace cpu
}  // namespace psft

#undef PSFT_AVX2_FN

#endif  // x86-64 with GCC or Clang
