// Calls of the psft_ext ops from C++ through the dispatcher, so they reach whatever kernel the
// dispatch keys select (autograd below it, CPU / CUDA, or the Python fakes while tracing). Used by
// the autograd Functions (psft_autograd.cpp) and by psft_loss_reduced (psft_reduced.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <tuple>

#include "psft_op_adapters.h"  // ForwardResult, ForwardBackwardResult

namespace psft {
namespace op_calls {

using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
// psft_loss_reduced's outputs: loss, metrics, grad.
using ReducedResult = std::tuple<Tensor, Tensor, Tensor>;

// The loss ops' arguments after logits and targets.
struct LossArgs {
  OptTensor old_logprobs, advantages;
  double advantage, clip_low, clip_high, dual_clip;
  int64_t ignore_index;
  double temperature;
};

inline ForwardResult psft_forward(const Tensor& logits, const Tensor& targets, const LossArgs& a) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("psft_ext::psft_forward", "")
                             .typed<ForwardResult(const Tensor&, const Tensor&, const OptTensor&,
                                                  const OptTensor&, double, double, double,
                                                  double, int64_t, double)>();
  return op.call(logits, targets, a.old_logprobs, a.advantages, a.advantage, a.clip_low,
                 a.clip_high, a.dual_clip, a.ignore_index, a.temperature);
}

inline ForwardBackwardResult psft_forward_backward(const Tensor& logits, const Tensor& targets,
                                                   const LossArgs& a, const Tensor& grad_loss) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("psft_ext::psft_forward_backward", "")
          .typed<ForwardBackwardResult(const Tensor&, const Tensor&, const OptTensor&,
                                       const OptTensor&, double, double, double, double,
                                       int64_t, double, const Tensor&)>();
  return op.call(logits, targets, a.old_logprobs, a.advantages, a.advantage, a.clip_low,
                 a.clip_high, a.dual_clip, a.ignore_index, a.temperature, grad_loss);
}

inline Tensor psft_backward(const Tensor& grad_loss, const Tensor& logits, const Tensor& targets,
                            const Tensor& lse, const Tensor& coef, int64_t ignore_index,
                            double temperature) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("psft_ext::psft_backward", "")
                             .typed<Tensor(const Tensor&, const Tensor&, const Tensor&,
                                           const Tensor&, const Tensor&, int64_t, double)>();
  return op.call(grad_loss, logits, targets, lse, coef, ignore_index, temperature);
}

inline ReducedResult psft_loss_reduced(const Tensor& logits, const Tensor& targets,
                                       const LossArgs& a, const OptTensor& denominator,
                                       double denominator_value, bool with_grad,
                                       bool with_metrics) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("psft_ext::psft_loss_reduced", "")
          .typed<ReducedResult(const Tensor&, const Tensor&, const OptTensor&, const OptTensor&,
                               double, double, double, double, int64_t, double,
                               const OptTensor&, double, bool, bool)>();
  return op.call(logits, targets, a.old_logprobs, a.advantages, a.advantage, a.clip_low,
                 a.clip_high, a.dual_clip, a.ignore_index, a.temperature, denominator,
                 denominator_value, with_grad, with_metrics);
}

inline void scale_rows_(Tensor& grad, const Tensor& factor) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("psft_ext::scale_rows_", "")
                             .typed<void(Tensor&, const Tensor&)>();
  op.call(grad, factor);
}

}  // namespace op_calls
}  // namespace psft
