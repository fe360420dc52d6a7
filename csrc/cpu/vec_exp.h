// Building blocks for CPU loops that compilers auto-vectorize: a branch-free exp and bit casts.
//
// std::exp is a library call that blocks vectorization; exp_fast is the classic Cephes
// range-reduction + degree-6 polynomial (about 1 ulp on the range the kernels use), written
// with selects and bit casts only, so each loop over a block becomes SIMD code. The kernels
// are compiled per ISA (see PSFT_TARGET_AVX2 in psft_cpu.cpp), so the same source gives SSE2,
// AVX2+FMA or AVX-512 code.
#pragma once

#include <cstdint>
#include <cstring>

namespace psft {
namespace cpu {

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

// NaN-keeping clamps: a NaN compares false and passes through.
inline float max_keep_nan(float x, float lo) { return x < lo ? lo : x; }
inline float min_keep_nan(float x, float hi) { return x > hi ? hi : x; }

// exp(x) for float32. Inputs below -87.3 give exactly 0 (as expf's underflow would, minus the
// denormals); inputs above 88 saturate at exp(88) (never reached: arguments are max-relative).
inline float exp_fast(float x) {
  constexpr float kLo = -87.33654f;
  constexpr float kHi = 88.0f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2Hi = 0.693359375f;
  constexpr float kLn2Lo = -2.12194440e-4f;
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float xc = min_keep_nan(max_keep_nan(x, kLo), kHi);
  const float t = xc * kLog2e + kRound;
  const float n = t - kRound;
  const int32_t ni = static_cast<int32_t>(float_to_bits(t)) - 0x4B400000;
  const float r = (xc - n * kLn2Hi) - n * kLn2Lo;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const float scale = bits_to_float(static_cast<uint32_t>(ni + 127) << 23);
  return x < kLo ? 0.0f : y * scale;
}

}  // namespace cpu
}  // namespace psft
