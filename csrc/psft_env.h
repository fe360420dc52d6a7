// The library's switches read from the environment: each is on when set to exactly "1".
//   PSFT_EXT_SM90_SINGLE_PASS   opt in to the Hopper single-pass kernel (csrc/cuda/psft_cuda.cpp)
//   PSFT_EXT_CPU_BASELINE       the portable CPU loops even where AVX2 exists (csrc/cpu)
//   PSFT_EXT_REDUCED_TENSOR_OPS psft_loss_reduced's tensor-op branch on CPU tensors too
//                               (csrc/psft_reduced.cpp)
// The last two exist so the CPU test suite covers code that this machine would not otherwise run.
#pragma once

#include <cstdlib>
#include <cstring>

namespace psft {

inline bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, "1") == 0;
}

}  // namespace psft
