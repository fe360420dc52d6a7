// The options' pass over the forward's stats (entropy bonus, KL penalty, rollout weights, GSPO's
// sequence ratio): one thread per token applies psft_math.h's apply_token_options, the same
// function the CPU runs, to the stats the forward kernel wrote.
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
  const float* adv;
  const float* is_weights;
  const float* ref_logprobs;
  const float* seq_log_ratio;
  LossParams params;
};

__global__ void __launch_bounds__(kOptionThreads) token_options_kernel(const OptionArgs a) {
  const int64_t n = a.rows;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kOptionThreads;
  for (int64_t r = static_cast<int64_t>(blockIdx.x) * kOptionThreads + threadIdx.x; r < n;
       r += step) {
    float* s = a.stats;
    if (load_target(a.targets, a.targets_int32, r) == a.params.ignore_index) {
      s[kEntCoef * n + r] = 0.0f;
      continue;
    }
    TokenLoss t{s[kLoss * n + r], s[kRatio * n + r], s[kLogRatio * n + r], s[kCoef * n + r],
                s[kClipped * n + r]};
    OptionInputs in;
    in.adv = a.adv != nullptr ? a.adv[r] : a.params.advantage;
    in.is_weight = a.is_weights != nullptr ? a.is_weights[r] : 1.0f;
    in.has_ref = a.ref_logprobs != nullptr;
    in.ref_logp = in.has_ref ? a.ref_logprobs[r] : 0.0f;
    in.has_seq_log_ratio = a.seq_log_ratio != nullptr;
    in.seq_log_ratio = in.has_seq_log_ratio ? a.seq_log_ratio[r] : 0.0f;
    const float ent = apply_token_options(t, s[kLogp * n + r], s[kEntropy * n + r], in, a.params);
    s[kLoss * n + r] = t.loss;
    s[kRatio * n + r] = t.ratio;
    s[kClipped * n + r] = t.clipped;
    s[kCoef * n + r] = t.coef;
    s[kEntCoef * n + r] = ent;
  }
}

}  // namespace

cudaError_t launch_token_options(int64_t rows, const void* targets, bool targets_int32,
                                 float* stats, const float* adv, const float* is_weights,
                                 const float* ref_logprobs, const float* seq_log_ratio,
                                 const LossParams& params, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (rows < 0 || targets == nullptr || stats == nullptr) return cudaErrorInvalidValue;
  const int64_t blocks_needed = (rows + kOptionThreads - 1) / kOptionThreads;
  const int64_t blocks = blocks_needed < kOptionMaxBlocks ? blocks_needed : kOptionMaxBlocks;
  const OptionArgs args{rows, targets, targets_int32, stats, adv, is_weights, ref_logprobs,
                        seq_log_ratio, params};
  token_options_kernel<<<static_cast<unsigned int>(blocks), kOptionThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace psft
