// The online softmax of the forward kernels, in base 2: per-thread running statistics of a set of
// logits (ThreadStats), their update for a group of logits (accumulate) and their hand-over to
// psft_math.h's natural-unit SoftmaxStats (to_natural) for the merge across threads.
// Shared by psft_forward.cu and psft_fused_sm90.cu, so both read a row with the same arithmetic.
#pragma once

#include "psft_common.cuh"

namespace psft {
namespace cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^x on the special-function unit. Results below 2^-126 flush to 0; they are negligible next to
// the running sum, which holds the row maximum's term (about 1).
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// One thread's softmax statistics. The reference is the running maximum of the *raw* logits,
// z_ref; with c2 = log2(e) / tau,
//   s = sum 2^((z - z_ref) * c2) = sum exp(x - x_ref),  w2 = sum 2^(...) * (z - z_ref) * c2.
//
// The hot loop works in base 2 because expf costs about eight instructions per element and ex2
// one. Measuring against z_ref in raw units keeps the row maximum's term exactly 1 (so a
// one-element row gives lse == x and logp == 0 exactly, as on the CPU) and gives each argument
// an error relative to its own size, not to the size of the logits. to_natural hands the stats
// to psft_math.h in natural units, with reference x_ref = z_ref * inv_temperature rounded as the
// CPU rounds x, for the merge across threads and the final lse / entropy.
struct ThreadStats {
  float z_ref = -INFINITY;
  float s = 0.0f;
  float w2 = 0.0f;
};

__device__ __forceinline__ SoftmaxStats to_natural(const ThreadStats& st, float inv_temperature) {
  return {__fmul_rn(st.z_ref, inv_temperature), st.s, st.w2 * kLn2};
}

// Adds kN logits, with softmax_rebase / softmax_accumulate semantics: the running stats move to a
// new maximum once per group, -inf logits contribute nothing (never NaN), NaN logits poison s.
template <int kN>
__device__ __forceinline__ void accumulate(ThreadStats& st, const float (&z)[kN], float c2) {
  float z_max = z[0];
#pragma unroll
  for (int k = 1; k < kN; ++k) z_max = fmaxf(z_max, z[k]);
  if (z_max > st.z_ref) {
    const float delta2 = (st.z_ref - z_max) * c2;
    const float scale = exp2_ftz(delta2);  // 0 while the stats are empty (z_ref = -inf)
    st.w2 = scale > 0.0f ? scale * fmaf(delta2, st.s, st.w2) : 0.0f;
    st.s *= scale;
    st.z_ref = z_max;
  }
  // While every logit so far is -inf (z_ref = -inf), -inf - z_ref would be NaN: measure against
  // -FLT_MAX instead, which maps -inf to 2^-inf = 0 and leaves a NaN logit NaN.
  const float reference = fmaxf(st.z_ref, -3.402823466e38f);
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    const float arg = (z[k] - reference) * c2;
    const float e = exp2_ftz(arg);
    st.s += e;
    if (e > 0.0f) st.w2 = fmaf(e, arg, st.w2);
  }
}

__device__ __forceinline__ void accumulate_one(ThreadStats& st, float z, float c2) {
  const float single[1] = {z};
  accumulate(st, single, c2);
}

}  // namespace cuda
}  // namespace psft
