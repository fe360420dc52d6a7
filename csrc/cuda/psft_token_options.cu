// The options' pass over the forward's stats (entropy bonus, KL penalty, rollout weights, GSPO's
// sequence ratio): one thread per token applies psft_math.h's token_pass, the same function the
// CPU runs, to the stats the forward kernel wrote (or, from_logp, to log-probs combined by the
// caller).
#include "psft_common.cuh"
#include "psft_launch.h"

namespace psft {
namespace cuda {
namespace {

constexpr int kOptionThreads = 256;
constexpr int64_t kOptionMaxBlocks = 4096;

struct OptionArgs {
  int64_t rows;
  const void* targets;
  bool targets_int32;
  float* stats;  // (kTokenStats, rows)
  const float* old;
  const float* adv;
  const float* is_weights;
  const float* ref_logprobs;
  const float* seq_log_ratio;
  bool from_logp;
  LossParams params;
};

__global__ void __launch_bounds__(kOptionThreads) token_options_kernel(const OptionArgs a) {
  const int64_t n = a.rows;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kOptionThreads;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kOptionThreads + threadIdx.x; r < n;
       r += step) {
    OptionInputs in;
    in.adv = a.adv != nullptr ? a.adv[r] : a.params.advantage;
    in.is_weight = a.is_weights != nullptr ? a.is_weights[r] : 1.0f;
    in.has_ref = a.ref_logprobs != nullptr;
    in.ref_logp = in.has_ref ? a.ref_logprobs[r] : 0.0f;
    in.has_seq_log_ratio = a.seq_log_ratio != nullptr;
    in.seq_log_ratio = in.has_seq_log_ratio ? a.seq_log_ratio[r] : 0.0f;
    const bool ignored = load_target(a.targets, a.targets_int32, r) == a.params.ignore_index;
    token_pass(a.stats, n, r, ignored, a.from_logp, a.old, in, a.params);
  }
}

}  // namespace

cudaError_t launch_token_options(int64_t rows, const void* targets, bool targets_int32,
                                 float* stats, const float* old, const float* adv,
                                 const float* is_weights, const float* ref_logprobs,
                                 const float* seq_log_ratio, bool from_logp,
                                 const LossParams& params, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows < 0 || targets == nullptr || stats == nullptr) return cudaErrorInvalidValue;
  const int64_t blocks_needed = (rows + kOptionThreads - 1) / kOptionThreads;
  const int64_t blocks = blocks_needed < kOptionMaxBlocks ? blocks_needed : kOptionMaxBlocks;
  const OptionArgs args{rows,       targets,      targets_int32, stats,     old,
                        adv,        is_weights,   ref_logprobs,  seq_log_ratio, from_logp,
                        params};
  token_options_kernel<<<static_cast<unsigned int>(blocks), kOptionThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace psft
