// Element conversions between the logits' dtypes and float32, written with integer bit operations
// so that loops over them vectorize (c10's own bfloat16 rounding calls out of line on some builds).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "vec_exp.h"

namespace psft {
namespace cpu {

// dtype <-> float for one element, written so that loops over them vectorize.
inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return bits_to_float(static_cast<uint32_t>(v.x) << 16); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

template <typename T>
inline T from_float(float v);
template <>
inline float from_float<float>(float v) {
  return v;
}
template <>
inline c10::BFloat16 from_float<c10::BFloat16>(float v) {
  // Round to nearest even, NaN stays a quiet NaN (same rule as c10::BFloat16(float)).
  const uint32_t u = float_to_bits(v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = (v != v) ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}
template <>
inline c10::Half from_float<c10::Half>(float v) {
  return c10::Half(v);
}

}  // namespace cpu
}  // namespace psft
