// The range check of the target ids on the device: the first row whose target is neither
// ignore_index nor in [0, V), found by one small kernel so that the glue raises a clear Python
// error with a single 8-byte read-back (instead of a chain of elementwise ops and a reduction)
// before any kernel reads a row at a bad id.
#include "psft_common.cuh"
#include "psft_launch.h"

namespace psft {
namespace cuda {
namespace {

constexpr int kTargetThreads = 256;
constexpr int64_t kTargetMaxBlocks = 1024;

// atomicMin on the row index as unsigned: the initial all-ones word (-1 as int64) is larger than
// any row, and the minimum does not depend on the order of the atomics.
template <bool kInt32>
__global__ void __launch_bounds__(kTargetThreads)
    first_bad_target_kernel(const void* targets, int64_t n, int64_t vocab, int64_t ignore_index,
                            unsigned long long* first_bad) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * kTargetThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kTargetThreads + threadIdx.x; i < n;
       i += step) {
    const int64_t id = load_target<kInt32>(targets, i);
    if (id != ignore_index && !target_in_range(id, vocab)) {
      atomicMin(first_bad, static_cast<unsigned long long>(i));
    }
  }
}

}  // namespace

cudaError_t launch_first_bad_target(const void* targets, bool targets_int32, int64_t n,
                                    int64_t vocab, int64_t ignore_index, int64_t* first_bad,
                                    cudaStream_t stream) {
  if (n < 0 || first_bad == nullptr || (n > 0 && targets == nullptr)) {
    return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaMemsetAsync(first_bad, 0xff, sizeof(int64_t), stream);
  if (err != cudaSuccess || n == 0) return err;
  const int64_t blocks_needed = (n + kTargetThreads - 1) / kTargetThreads;
  const unsigned int blocks = static_cast<unsigned int>(
      blocks_needed < kTargetMaxBlocks ? blocks_needed : kTargetMaxBlocks);
  auto* out = reinterpret_cast<unsigned long long*>(first_bad);
  if (targets_int32) {
    first_bad_target_kernel<true>
        <<<blocks, kTargetThreads, 0, stream>>>(targets, n, vocab, ignore_index, out);
  } else {
    first_bad_target_kernel<false>
        <<<blocks, kTargetThreads, 0, stream>>>(targets, n, vocab, ignore_index, out);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace psft
