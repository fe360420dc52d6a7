// The psft_ext op library: its schemas, build_info, and the Python module stub.
//
// Six ops: the loss over logits (psft_fwd, with its backward psft_bwd and the in-place rescale
// scale_rows_), the fused linear loss (linear_fwd, linear_bwd), and the token stage alone
// (psft_tokens, for the vocabulary-parallel loss). The logits ops' kernels are in
// csrc/psft_ops_impl.cpp, the linear ops' chunk loops in Python (psft_ext/linear/ops.py), which
// also registers their fake kernels (the logits ops': psft_ext/_ops.py). psft_fwd and linear_fwd
// are differentiable (csrc/psft_autograd.cpp).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "psft_kernels.h"
#include "psft_math.h"

extern "C" {
// `import psft_ext._C` loads this shared library and with it the TORCH_LIBRARY registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {

#ifndef PSFT_CUDA_ARCHS
#define PSFT_CUDA_ARCHS ""
#endif

std::string json_names(const char* const* names, int count) {
  std::string s = "[";
  for (int i = 0; i < count; ++i) s += std::string(i ? ", " : "") + "\"" + names[i] + "\"";
  return s + "]";
}

// Which kernels this binary holds, which CPU loops this process runs, and the layouts the Python
// side relies on (the packed parameters, the stats rows, the metrics), as JSON;
// psft_ext.build_info() adds the Python-side facts.
std::string build_info() {
  std::string info = "{\"cpu\": true, \"cpu_kernels\": \"";
  info += psft::cpu::kernel_isa();
  info += "\", \"cuda\": ";
#ifdef PSFT_WITH_CUDA
  info += "true, \"cuda_archs\": \"" PSFT_CUDA_ARCHS "\"";
#else
  info += "false, \"cuda_archs\": \"\"";
#endif
  info += ", \"compiler\": \"" __VERSION__ "\"";
  info += ", \"packed_params\": " + json_names(psft::kPackedParamNames, psft::kPackedParams);
  info += ", \"token_stats\": " + json_names(psft::kTokenStatNames, psft::kTokenStats);
  info += ", \"metrics\": " + json_names(psft::kMetricNames, psft::kMetrics);
  info += ", \"token_inputs\": " + json_names(psft::kTokenInputNames, psft::kTokenInputs);
  info += ", \"reductions\": " + json_names(psft::kReductionNames, psft::kReductions);
  info += ", \"importance_sampling\": " +
          json_names(psft::kImportanceSamplingNames, psft::kImportanceSamplings) + "}";
  return info;
}

}  // namespace

TORCH_LIBRARY(psft_ext, m) {
  // The loss over N rows of logits. token_inputs: the optional per-token tensors (psft_math.h,
  // TokenInput: old log-probs, advantages, rollout weights, reference log-probs, token weights,
  // sequence log-ratios); params: the packed options (psft_ext.LossParams.op_args); seq_len: the
  // tokens per sequence, for the sequence options (0: none). Returns (loss, logp, entropy,
  // metrics, stats):
  //   loss: the per-token losses (N,) for reduction "none"; else their weighted sum, the weights
  //     of the reduction (for "mean", over num_items, a one-element tensor, else num_items_value
  //     if > 0, else this call's tokens or sequences);
  //   logp, entropy: with_logprobs ? the per-token log-probs and entropies (N,) : empty;
  //   metrics: with_metrics ? float32 in psft_ext.PSFTMetrics' order : empty;
  //   stats: float32 (kTokenStats, N), the per-token outputs (psft_math.h, TokenStat).
  // With grad (dense (N, V), the logits' dtype; may be the logits themselves), the gradient of
  // the returned loss (of the sum of the losses for "none") is written into it.
  m.def(
      "psft_fwd(Tensor logits, Tensor targets, Tensor?[] token_inputs, float[] params, "
      "int ignore_index, int seq_len, Tensor? num_items, float num_items_value, bool with_metrics, "
      "bool with_logprobs, Tensor(a!)? grad) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // grad = (scale * (p - onehot) + ent_scale * p * (log p + entropy)) / tau per row, from the
  // forward's stats (lse, entropy); ent_scale may be absent. grad: dense (N, V), the logits' dtype;
  // may be the logits themselves. A target outside [0, V) has no one-hot term (the row's target is
  // in another rank's vocabulary slice).
  m.def(
      "psft_bwd(Tensor scale, Tensor? ent_scale, Tensor logits, Tensor targets, Tensor stats, "
      "float[] params, int ignore_index, Tensor(a!) grad) -> ()");
  // The token stage of psft_fwd on per-token stats the caller formed (the vocabulary-parallel
  // loss, from the slices' combined statistics): stats (kTokenStats, N) float32 with the rows
  // logp, entropy, lse, correct and max filled in; the others are formed here (the policy
  // gradient, the options, the reduction's weights), as psft_fwd forms them. Returns (loss,
  // metrics, stats) as psft_fwd.
  m.def(
      "psft_tokens(Tensor stats, Tensor targets, Tensor?[] token_inputs, float[] params, "
      "int ignore_index, int seq_len, Tensor? num_items, float num_items_value, "
      "bool with_metrics) -> (Tensor, Tensor, Tensor)");
  // grad[r, :] *= factor[r] in place, for the rows whose factor is not exactly 1 (the others are
  // not touched: scaling by the usual upstream gradient of 1 costs no pass over the gradient).
  m.def("scale_rows_(Tensor(a!) grad, Tensor factor) -> ()");
  // psft_fwd over the logits hidden @ weight.T + bias, formed chunk_size rows at a time (0: chosen
  // from the shapes and the free memory) in compute_dtype, never all at once. Returns psft_fwd's
  // outputs, then (grad_hidden, grad_weight, grad_bias): the gradients of the returned loss for
  // the inputs whose need_* is set (outside autograd; autograd sets them itself), empty tensors
  // for the others. accumulate_float32: grad_weight of a 2-byte weight is accumulated across
  // chunks in float32 (else in its own dtype).
  m.def(
      "linear_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor targets, "
      "Tensor?[] token_inputs, float[] params, int ignore_index, int seq_len, Tensor? num_items, "
      "float num_items_value, bool with_metrics, bool with_logprobs, int chunk_size, "
      "ScalarType compute_dtype, bool accumulate_float32, bool need_hidden, bool need_weight, "
      "bool need_bias) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The gradients (hidden, weight, bias; empty where not needed) of psft_bwd's row coefficients
  // over the logits hidden @ weight.T + bias, from linear_fwd's stats, recomputing the chunks.
  m.def(
      "linear_bwd(Tensor scale, Tensor? ent_scale, Tensor hidden, Tensor weight, Tensor? bias, "
      "Tensor targets, Tensor stats, float[] params, int ignore_index, int chunk_size, "
      "ScalarType compute_dtype, bool accumulate_float32, bool need_hidden, bool need_weight, "
      "bool need_bias) -> (Tensor, Tensor, Tensor)");
  m.def("build_info() -> str", &build_info);
}
