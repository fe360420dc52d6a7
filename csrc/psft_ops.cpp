// Op schemas of the psft_ext library and the Python module stub.
//
// The schemas live here; the CPU kernels register their implementations in
// csrc/cpu/psft_cpu.cpp and the CUDA ones in csrc/cuda/psft_cuda.cpp, the device-generic
// psft_loss_reduced in csrc/psft_reduced.cpp, autograd in csrc/psft_autograd.cpp. Fake (meta) kernels are registered from Python (psft_ext/_ops.py), so the
// ops work under torch.compile.
#include <Python.h>
#include <torch/library.h>

#include <string>

extern "C" {
// `import psft_ext._C` loads this shared library and with it the TORCH_LIBRARY registrations.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace psft {
namespace cpu {
// "avx2" or "baseline": the CPU row loops picked at run time (csrc/cpu/psft_cpu.cpp).
const char* kernel_isa();
}  // namespace cpu
}  // namespace psft

namespace {

#ifndef PSFT_CUDA_ARCHS
#define PSFT_CUDA_ARCHS ""
#endif

// Which kernels this binary holds (and which CPU loops this process runs), as JSON;
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
  info += ", \"compiler\": \"" __VERSION__ "\"}";
  return info;
}

}  // namespace

TORCH_LIBRARY(psft_ext, m) {
  // Fused PSFT forward over rows of logits. Returns per-token float32 vectors of length N:
  // loss, logp, entropy, ratio, log_ratio (clamped), clipped (0/1), and the two values the
  // backward needs, lse and coef. Ignored rows get 0 everywhere.
  m.def(
      "psft_forward(Tensor logits, Tensor targets, Tensor? old_logprobs, Tensor? advantages, "
      "float advantage, float clip_low, float clip_high, float dual_clip, int ignore_index, "
      "float temperature) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradient of sum_t grad_loss[t] * loss[t] with respect to the logits, in the logits' dtype.
  m.def(
      "psft_backward(Tensor grad_loss, Tensor logits, Tensor targets, Tensor lse, Tensor coef, "
      "int ignore_index, float temperature) -> Tensor");
  // The same gradient written over the (contiguous) logits.
  m.def(
      "psft_backward_(Tensor grad_loss, Tensor(a!) logits, Tensor targets, Tensor lse, "
      "Tensor coef, int ignore_index, float temperature) -> ()");
  // Single pass: psft_forward's eight outputs and, from the same read of each row, the gradient
  // of sum_t grad_loss[t] * loss[t] (grad_loss is the upstream gradient the caller expects, e.g.
  // 1 / num_tokens for a mean). The backward then only rescales rows whose actual upstream
  // gradient differs (scale_rows_), and the logits need not be kept for it.
  m.def(
      "psft_forward_backward(Tensor logits, Tensor targets, Tensor? old_logprobs, "
      "Tensor? advantages, float advantage, float clip_low, float clip_high, float dual_clip, "
      "int ignore_index, float temperature, Tensor grad_loss) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same with the gradient written over the (contiguous) logits: no N x V buffer besides the
  // logits (the fused linear loss uses it on each chunk of logits it owns).
  m.def(
      "psft_forward_backward_(Tensor(a!) logits, Tensor targets, Tensor? old_logprobs, "
      "Tensor? advantages, float advantage, float clip_low, float clip_high, float dual_clip, "
      "int ignore_index, float temperature, Tensor grad_loss) -> (Tensor, Tensor, Tensor, Tensor, "
      "Tensor, Tensor, Tensor, Tensor)");
  // The loss reduced to one number in one op (psft_ext.psft_loss's "mean" and "sum"; the steps
  // are in csrc/psft_reduced.cpp): sum_t loss[t] / den with den = denominator (a one-element
  // tensor) if given, else denominator_value if > 0 (1 for a sum), else max(num_tokens, 1).
  // Returns (loss, metrics, grad). metrics (with_metrics; else empty) is float32 (6,): the token
  // means of -logp, entropy, clipped, -log_ratio and ratio, then num_tokens (PSFTMetrics' order).
  // grad (with_grad; else empty) is d loss / d logits, written in the same pass over the logits
  // for an upstream gradient of 1; the backward rescales it when the actual one differs.
  m.def(
      "psft_loss_reduced(Tensor logits, Tensor targets, Tensor? old_logprobs, Tensor? advantages, "
      "float advantage, float clip_low, float clip_high, float dual_clip, int ignore_index, "
      "float temperature, Tensor? denominator, float denominator_value, bool with_grad, "
      "bool with_metrics) -> (Tensor, Tensor, Tensor)");
  // grad[r, :] *= factor[r] in place, for the rows whose factor is not exactly 1 (the others are
  // not touched: the usual loss.backward() costs no pass over the gradient).
  m.def("scale_rows_(Tensor(a!) grad, Tensor factor) -> ()");
  // Log-probs of the targets (0 where ignored) and per-token entropy; no autograd.
  m.def(
      "token_logprobs(Tensor logits, Tensor targets, int ignore_index, float temperature) "
      "-> (Tensor, Tensor)");
  m.def("build_info() -> str", &build_info);
}
