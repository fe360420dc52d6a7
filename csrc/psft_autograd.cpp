// Autograd of the three differentiable ops, psft_forward, psft_forward_backward and
// psft_loss_reduced, registered for every device under the Autograd key.
//
// Why in C++ and not with torch.library.register_autograd (the fakes stay in Python, _ops.py):
// torch.library's Python autograd wrapper costs about 150 us per call for these 11-argument ops
// (it re-reads the schema's argument list for each argument to fill defaults, then redispatches
// from Python), and the backward another ~100 us. For a loss whose kernels take about a
// millisecond on a GPU that was a fifth of the time. A torch::autograd::Function costs a few
// microseconds, and torch.compile traces it like any other autograd kernel (the forward calls the
// op below autograd, which reaches the CPU / CUDA kernels or, while tracing, the Python fakes).
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "psft_op_calls.h"

namespace psft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;

using op_calls::LossArgs;
using op_calls::ReducedResult;

// The single-pass functions' backward: the gradient saved in the forward, scaled in place by
// per-row factors (scale_rows_ skips the rows whose factor is exactly 1, i.e. every row for the
// usual loss.backward()). An op's kernel does not bump the version counter of the tensor it
// mutates; bumped here, a second backward through the graph (retain_graph=True) fails the
// saved-tensor version check instead of rescaling the gradient twice.
Tensor rescaled_gradient(Tensor grad_logits, const Tensor& factor) {
  op_calls::scale_rows_(grad_logits, factor);
  torch::autograd::impl::bump_version(grad_logits);
  return grad_logits;
}

variable_list to_list(const ForwardResult& o) {
  return {std::get<0>(o), std::get<1>(o), std::get<2>(o), std::get<3>(o),
          std::get<4>(o), std::get<5>(o), std::get<6>(o), std::get<7>(o)};
}

// psft_forward: only the per-token loss is differentiable; old log-probs and advantages are
// constants of the step (as in verl). The backward reads the logits again.
struct ForwardFunction : public torch::autograd::Function<ForwardFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& targets,
                               const OptTensor& old_logprobs, const OptTensor& advantages,
                               double advantage, double clip_low, double clip_high,
                               double dual_clip, int64_t ignore_index, double temperature) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const LossArgs args{old_logprobs, advantages, advantage, clip_low,
                        clip_high,    dual_clip,  ignore_index, temperature};
    variable_list out = to_list(op_calls::psft_forward(logits, targets, args));
    ctx->mark_non_differentiable(variable_list(out.begin() + 1, out.end()));
    ctx->save_for_backward({logits, targets, out[6], out[7]});  // lse, coef
    ctx->saved_data["ignore_index"] = ignore_index;
    ctx->saved_data["temperature"] = temperature;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list saved = ctx->get_saved_variables();
    const Tensor grad_logits =
        op_calls::psft_backward(grads[0].to(at::kFloat), saved[0], saved[1], saved[2], saved[3],
                      ctx->saved_data["ignore_index"].toInt(),
                      ctx->saved_data["temperature"].toDouble());
    variable_list result(10);
    result[0] = grad_logits;
    return result;
  }
};

// psft_forward_backward: the gradient was formed in the forward for the upstream gradient
// `grad_loss` the caller expected; rows whose actual one differs are rescaled in place (for the
// usual loss.backward() every factor is exactly 1 and nothing is touched). The logits are not
// kept. scale_rows_ is an op declared as mutating, so AOT autograd functionalizes it rather than
// meet an in-place update of a saved tensor.
struct ForwardBackwardFunction : public torch::autograd::Function<ForwardBackwardFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& targets,
                               const OptTensor& old_logprobs, const OptTensor& advantages,
                               double advantage, double clip_low, double clip_high,
                               double dual_clip, int64_t ignore_index, double temperature,
                               const Tensor& grad_loss) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const LossArgs args{old_logprobs, advantages, advantage, clip_low,
                        clip_high,    dual_clip,  ignore_index, temperature};
    const ForwardBackwardResult o = op_calls::psft_forward_backward(logits, targets, args, grad_loss);
    variable_list out = {std::get<0>(o), std::get<1>(o), std::get<2>(o),
                         std::get<3>(o), std::get<4>(o), std::get<5>(o),
                         std::get<6>(o), std::get<7>(o), std::get<8>(o)};
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable(variable_list(out.begin() + 1, out.end()));
    ctx->save_for_backward({out[8], grad_loss});
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(11);
    if (!grads[0].defined()) return result;
    const variable_list saved = ctx->get_saved_variables();
    result[0] = rescaled_gradient(saved[0], grads[0].to(at::kFloat) / saved[1]);
    return result;
  }
};

// psft_loss_reduced: one node for the whole reduced loss. The gradient was written in the forward
// for an upstream gradient of 1; the backward scales it by the actual one (scale_rows_ skips the
// rows when that is exactly 1, as for loss.backward()). Without with_grad there is no gradient to
// hand back, and a backward through the loss is an error rather than a silent zero.
struct ReducedLossFunction : public torch::autograd::Function<ReducedLossFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& targets,
                               const OptTensor& old_logprobs, const OptTensor& advantages,
                               double advantage, double clip_low, double clip_high,
                               double dual_clip, int64_t ignore_index, double temperature,
                               const OptTensor& denominator, double denominator_value,
                               bool with_grad, bool with_metrics) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const LossArgs args{old_logprobs, advantages, advantage, clip_low,
                        clip_high,    dual_clip,  ignore_index, temperature};
    const ReducedResult o = op_calls::psft_loss_reduced(logits, targets, args, denominator,
                                                        denominator_value, with_grad,
                                                        with_metrics);
    variable_list out = {std::get<0>(o), std::get<1>(o), std::get<2>(o)};
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({out[1], out[2]});
    ctx->save_for_backward({out[2]});
    ctx->saved_data["with_grad"] = with_grad;
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(14);
    if (!grads[0].defined()) return result;
    TORCH_CHECK(ctx->saved_data["with_grad"].toBool(),
                "psft_loss_reduced: backward through a loss computed with with_grad=False "
                "(call it with with_grad=True when the logits need a gradient)");
    const Tensor grad_logits = ctx->get_saved_variables()[0];
    // The upstream scalar expanded to the gradient's rows (a SymInt: under torch.compile with
    // dynamic shapes it is symbolic); scale_rows_ reads it with stride 0, no copy.
    result[0] = rescaled_gradient(
        grad_logits, grads[0].to(at::kFloat).expand_symint({grad_logits.sym_size(0)}));
    return result;
  }
};

ForwardResult psft_forward_autograd(const Tensor& logits, const Tensor& targets,
                                     const OptTensor& old_logprobs, const OptTensor& advantages,
                                     double advantage, double clip_low, double clip_high,
                                     double dual_clip, int64_t ignore_index, double temperature) {
  const variable_list o =
      ForwardFunction::apply(logits, targets, old_logprobs, advantages, advantage, clip_low,
                             clip_high, dual_clip, ignore_index, temperature);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]};
}

ForwardBackwardResult psft_forward_backward_autograd(
    const Tensor& logits, const Tensor& targets, const OptTensor& old_logprobs,
    const OptTensor& advantages, double advantage, double clip_low, double clip_high,
    double dual_clip, int64_t ignore_index, double temperature, const Tensor& grad_loss) {
  const variable_list o =
      ForwardBackwardFunction::apply(logits, targets, old_logprobs, advantages, advantage,
                                     clip_low, clip_high, dual_clip, ignore_index, temperature,
                                     grad_loss);
  return {o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7], o[8]};
}

ReducedResult psft_loss_reduced_autograd(
    const Tensor& logits, const Tensor& targets, const OptTensor& old_logprobs,
    const OptTensor& advantages, double advantage, double clip_low, double clip_high,
    double dual_clip, int64_t ignore_index, double temperature, const OptTensor& denominator,
    double denominator_value, bool with_grad, bool with_metrics) {
  const variable_list o = ReducedLossFunction::apply(
      logits, targets, old_logprobs, advantages, advantage, clip_low, clip_high, dual_clip,
      ignore_index, temperature, denominator, denominator_value, with_grad, with_metrics);
  return {o[0], o[1], o[2]};
}

}  // namespace
}  // namespace psft

TORCH_LIBRARY_IMPL(psft_ext, Autograd, m) {
  m.impl("psft_loss_reduced", &psft::psft_loss_reduced_autograd);
  m.impl("psft_forward", &psft::psft_forward_autograd);
  m.impl("psft_forward_backward", &psft::psft_forward_backward_autograd);
}
