// The schemas of psft_forward_backward and its in-place variant, adapted to one device's
// implementation. Each device (csrc/cpu/psft_cpu.cpp, csrc/cuda/psft_cuda.cpp) writes a single
// function that computes the eight outputs and the gradient (into a new buffer, or over the
// logits when in_place) and registers these two adapters of it.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <tuple>

namespace psft {

// psft_forward's outputs: loss, logp, entropy, ratio, log_ratio, clipped, lse, coef.
using ForwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                 at::Tensor, at::Tensor, at::Tensor>;
// psft_forward_backward's: the same and the gradient.
using ForwardBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                         at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                                         at::Tensor>;

using ForwardBackwardImpl = std::tuple<ForwardResult, at::Tensor> (*)(
    const at::Tensor& logits, const at::Tensor& targets, const std::optional<at::Tensor>& old,
    const std::optional<at::Tensor>& adv, double advantage, double clip_low, double clip_high,
    double dual_clip, int64_t ignore_index, double temperature, const at::Tensor& grad_loss,
    bool in_place, const char* op);

template <ForwardBackwardImpl impl>
ForwardBackwardResult forward_backward_op(
    const at::Tensor& logits, const at::Tensor& targets, const std::optional<at::Tensor>& old,
    const std::optional<at::Tensor>& adv, double advantage, double clip_low, double clip_high,
    double dual_clip, int64_t ignore_index, double temperature, const at::Tensor& grad_loss) {
  auto [outs, grad] = impl(logits, targets, old, adv, advantage, clip_low, clip_high, dual_clip,
                           ignore_index, temperature, grad_loss, false, "psft_forward_backward");
  return std::tuple_cat(outs, std::make_tuple(grad));
}

template <ForwardBackwardImpl impl>
ForwardResult forward_backward_inplace_op(
    at::Tensor& logits, const at::Tensor& targets, const std::optional<at::Tensor>& old,
    const std::optional<at::Tensor>& adv, double advantage, double clip_low, double clip_high,
    double dual_clip, int64_t ignore_index, double temperature, const at::Tensor& grad_loss) {
  return std::get<0>(impl(logits, targets, old, adv, advantage, clip_low, clip_high, dual_clip,
                          ignore_index, temperature, grad_loss, true, "psft_forward_backward_"));
}

}  // namespace psft
