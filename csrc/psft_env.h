// The library's two environment switches, each on when set to exactly "1":
//   PSFT_EXT_CPU_BASELINE      the portable CPU row loops even where the AVX2 ones would run
//                              (like torch's ATEN_CPU_CAPABILITY=default: rules the AVX2 path in
//                              or out when a result looks wrong); read once (csrc/cpu)
//   PSFT_EXT_SM90_SINGLE_PASS  opts in to the Hopper single-pass kernel, not yet verified on a
//                              GPU; read by the CUDA kernel choice (csrc/cuda/psft_cuda.cpp)
#pragma once

#include <cstdlib>
#include <cstring>

namespace psft {

inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "1") == 0;
}

}  // namespace psft
