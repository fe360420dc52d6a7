// Autograd of the two differentiable ops, psft_fwd (the loss over logits) and linear_fwd (the
// fused linear loss, whose chunk loops are Python: psft_ext/linear/ops.py), registered for every
// device under the Autograd key. Only the loss is differentiable, with respect to the logits (or
// hidden, weight, bias); old log-probs and advantages are constants of the step, as in verl.
//
// The differentiable outputs are the loss and, with with_logprobs, the per-token log-probs and
// entropies (token_logprobs' gradient: verl's fused log-probs and entropy). Which backward a
// call gets is decided here, once for both ops:
//   - reduction "mean" / "sum" without with_logprobs (the usual training call): the single pass. The forward writes the
//     gradient for the upstream gradient loss.backward() gives (1), and the backward only scales
//     it in place by the actual one (scale_rows_ leaves rows whose factor is exactly 1 alone, so
//     the usual backward touches nothing); the logits are not kept.
//   - reduction "none", with_logprobs, and float16 logits / compute whatever the reduction: the
//     forward keeps its per-token stats and the backward reads the logits again (psft_bwd; the
//     fused linear loss recomputes each chunk's logits) with the actual upstream gradients. For
//     float16 the single pass would round the gradient to float16 in the forward, for the mean's
//     1 / num_items, before a GradScaler's loss scale reached it in the backward: most of a row's
//     (p - y) / den would flush to zero or to a few-bit subnormal. bfloat16 has float32's range:
//     no such loss.
//
// Why C++ (torch::autograd::Function) rather than torch.autograd.Function in Python: measured with
// benchmarks/bench_overhead.py on this project's 2-core CPU machine, a Python Function around the
// same op cost about 25 us more per training step's loss call (the forward's apply and the
// backward's Python frame), a third of the call at small shapes. torch.compile traces these like
// any autograd kernel: the forward calls the op below autograd, which reaches the CPU / CUDA
// kernels or, while tracing, the fake kernels (psft_ext/_ops.py, psft_ext/linear/ops.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "psft_checks.h"
#include "psft_math.h"

namespace psft {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Tensor = at::Tensor;
using OptTensor = std::optional<at::Tensor>;
using Inputs = c10::List<OptTensor>;
using FwdOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;
using LinearOutputs = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;
using Grads = std::tuple<Tensor, Tensor, Tensor>;

// ---------------------------------------------------------------------------------------------
// The ops, called through the dispatcher below autograd: the CPU / CUDA kernels, the Python
// implementations of the linear ops, or the fake kernels while tracing.

FwdOutputs call_psft_fwd(const Tensor& logits, const Tensor& targets, const Inputs& inputs,
                         c10::ArrayRef<double> params, int64_t ignore_index, int64_t seq_len,
                         const OptTensor& num_items, double num_items_value, bool with_metrics,
                         bool with_logprobs, const OptTensor& grad) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("psft_ext::psft_fwd", "")
          .typed<FwdOutputs(const Tensor&, const Tensor&, const Inputs&, c10::ArrayRef<double>,
                            int64_t, int64_t, const OptTensor&, double, bool, bool,
                            const OptTensor&)>();
  return op.call(logits, targets, inputs, params, ignore_index, seq_len, num_items,
                 num_items_value, with_metrics, with_logprobs, grad);
}

void call_psft_bwd(const Tensor& scale, const OptTensor& ent_scale, const Tensor& logits,
                   const Tensor& targets, const Tensor& stats, c10::ArrayRef<double> params,
                   int64_t ignore_index, const Tensor& grad) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("psft_ext::psft_bwd", "")
          .typed<void(const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
                      const Tensor&, c10::ArrayRef<double>, int64_t, const Tensor&)>();
  op.call(scale, ent_scale, logits, targets, stats, params, ignore_index, grad);
}

void call_scale_rows_(const Tensor& grad, const Tensor& factor) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("psft_ext::scale_rows_", "")
                             .typed<void(const Tensor&, const Tensor&)>();
  op.call(grad, factor);
}

LinearOutputs call_linear_fwd(const Tensor& hidden, const Tensor& weight, const OptTensor& bias,
                              const Tensor& targets, const Inputs& inputs,
                              c10::ArrayRef<double> params, int64_t ignore_index,
                              int64_t seq_len, const OptTensor& num_items,
                              double num_items_value, bool with_metrics, bool with_logprobs,
                              int64_t chunk_size, at::ScalarType compute_dtype,
                              bool accumulate_float32, bool need_hidden, bool need_weight,
                              bool need_bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("psft_ext::linear_fwd", "")
          .typed<LinearOutputs(const Tensor&, const Tensor&, const OptTensor&, const Tensor&,
                               const Inputs&, c10::ArrayRef<double>, int64_t, int64_t,
                               const OptTensor&, double, bool, bool, int64_t, at::ScalarType,
                               bool, bool, bool, bool)>();
  return op.call(hidden, weight, bias, targets, inputs, params, ignore_index, seq_len,
                 num_items, num_items_value, with_metrics, with_logprobs, chunk_size,
                 compute_dtype, accumulate_float32, need_hidden, need_weight, need_bias);
}

Grads call_linear_bwd(const Tensor& scale, const OptTensor& ent_scale, const Tensor& hidden,
                      const Tensor& weight, const OptTensor& bias, const Tensor& targets,
                      const Tensor& stats, c10::ArrayRef<double> params, int64_t ignore_index,
                      int64_t chunk_size, at::ScalarType compute_dtype, bool accumulate_float32,
                      bool need_hidden, bool need_weight, bool need_bias) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("psft_ext::linear_bwd", "")
          .typed<Grads(const Tensor&, const OptTensor&, const Tensor&, const Tensor&,
                       const OptTensor&, const Tensor&, const Tensor&, c10::ArrayRef<double>,
                       int64_t, int64_t, at::ScalarType, bool, bool, bool, bool)>();
  return op.call(scale, ent_scale, hidden, weight, bias, targets, stats, params, ignore_index,
                 chunk_size, compute_dtype, accumulate_float32, need_hidden, need_weight,
                 need_bias);
}

// ---------------------------------------------------------------------------------------------

int reduction_of(c10::ArrayRef<double> params) {
  TORCH_CHECK_VALUE(params.size() == kPackedParams, "psft_ext: params must hold ",
                    str_of(int64_t{kPackedParams}), " numbers, got ",
                    str_of(static_cast<int64_t>(params.size())));
  return static_cast<int>(params[kReductionParam]);
}

// with_logprobs asks for differentiable log-probs and entropies, which only the two passes give.
bool single_pass(int reduction, at::ScalarType compute_dtype, bool with_logprobs) {
  return reduction != kReduceNone && compute_dtype != at::kHalf && !with_logprobs;
}

// The backward's checks. The gradient is not itself differentiable (the kernels form it
// directly): a double backward would otherwise silently get no second-order term. A single
// pass's gradient is scaled in place and handed to autograd: a second backward through the same
// graph (retain_graph=True) would scale it again.
void check_backward(AutogradContext* ctx, bool single) {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "psft_ext: the fused loss has no second derivative here: backward(create_graph=True) "
              "through it is not supported");
  if (!single) return;
  TORCH_CHECK(ctx->saved_data.count("done") == 0,
              "psft_ext: this loss's gradient, computed in its forward, was already handed to an "
              "earlier backward; a second backward through the same graph (retain_graph=True) is "
              "not supported: compute the loss again, or sum what you backpropagate into one call");
  ctx->saved_data["done"] = true;
}

// A gradient written in the forward, scaled in place by the upstream scalar. The op does not
// bump the version counter of what it mutates: bumped here, so that autograd knows of the change
// (check_backward refuses a second backward through the graph before it gets here).
Tensor scaled(Tensor grad, const Tensor& upstream) {
  // Rows of the gradient's last dimension (a 1-D gradient is one row).
  const Tensor rows = grad.dim() == 2 ? grad
                      : grad.dim() > 2 ? grad.view_symint({-1, grad.sym_size(-1)})
                                       : grad.view_symint({1, grad.sym_size(0)});
  // The upstream scalar expanded to the rows (a SymInt under torch.compile with dynamic shapes);
  // scale_rows_ reads it with stride 0, no copy.
  call_scale_rows_(rows, upstream.to(at::kFloat).expand_symint({rows.sym_size(0)}));
  torch::autograd::impl::bump_version(grad);
  return grad;
}

// The two-pass backward's row coefficients (psft_bwd's scale and ent_scale) from the upstream
// gradients of the loss (per token for "none", else a scalar), of the log-probs and of the
// entropies (any may be undefined) and the forward's stats: the loss's gradient is
// coef * (p - onehot) + ent_coef * p (log p + H), log p's is -(p - onehot) and H's
// -p (log p + H) (over tau, which the kernels apply).
std::pair<Tensor, OptTensor> row_coefficients(const variable_list& grads, const Tensor& stats,
                                              bool entropy_term) {
  const Tensor& g_loss = grads[0];
  const Tensor& g_logp = grads[1];
  const Tensor& g_entropy = grads[2];
  Tensor scale, ent_scale;
  if (g_loss.defined()) {
    const Tensor g = g_loss.to(at::kFloat);
    scale = stats[kCoef] * g;
    if (entropy_term) ent_scale = stats[kEntCoef] * g;
  }
  if (g_logp.defined()) {
    scale = scale.defined() ? scale - g_logp.to(at::kFloat) : -g_logp.to(at::kFloat);
  }
  if (g_entropy.defined()) {
    const Tensor g = g_entropy.to(at::kFloat);
    ent_scale = ent_scale.defined() ? ent_scale - g : -g;
  }
  if (!scale.defined()) scale = at::zeros_like(stats[kCoef]);
  return {scale.contiguous(),
          ent_scale.defined() ? OptTensor(ent_scale.contiguous()) : std::nullopt};
}

struct LossFunction : public torch::autograd::Function<LossFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& logits, const Tensor& targets,
                               const Inputs& inputs, c10::ArrayRef<double> params,
                               int64_t ignore_index, int64_t seq_len, const OptTensor& num_items,
                               double num_items_value, bool with_metrics, bool with_logprobs,
                               bool in_place) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int reduction = reduction_of(params);
    const bool single = single_pass(reduction, logits.scalar_type(), with_logprobs);
    TORCH_CHECK_VALUE(!in_place || single,
                      "psft_ext: inplace=True writes the gradient over the logits in the forward, "
                      "which reduction 'none', float16 logits and with_logprobs do not do");
    Tensor grad;
    if (in_place) {
      grad = logits;
    } else if (single) {
      grad = at::empty_symint(logits.sym_sizes(),
                              logits.options().memory_format(at::MemoryFormat::Contiguous));
    }
    auto [loss, logp, entropy, metrics, stats] = call_psft_fwd(
        logits, targets, inputs, params, ignore_index, seq_len, num_items, num_items_value,
        with_metrics, with_logprobs, single ? OptTensor(grad) : std::nullopt);
    if (in_place) torch::autograd::impl::bump_version(logits);
    if (single) {
      ctx->save_for_backward({grad});
      ctx->mark_non_differentiable({logp, entropy, metrics, stats});
    } else {
      ctx->save_for_backward({logits, targets, stats});
      ctx->saved_data["params"] = params.vec();
      ctx->saved_data["ignore_index"] = ignore_index;
      ctx->mark_non_differentiable(with_logprobs ? variable_list{metrics, stats}
                                                 : variable_list{logp, entropy, metrics, stats});
    }
    ctx->saved_data["single"] = single;
    ctx->set_materialize_grads(false);
    return {loss, logp, entropy, metrics, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(11);
    if (!grads[0].defined() && !grads[1].defined() && !grads[2].defined()) return result;
    const bool single = ctx->saved_data["single"].toBool();
    check_backward(ctx, single);
    const variable_list saved = ctx->get_saved_variables();
    if (single) {
      if (grads[0].defined()) result[0] = scaled(saved[0], grads[0]);
      return result;
    }
    const Tensor& logits = saved[0];
    const std::vector<double> params = ctx->saved_data["params"].toDoubleVector();
    const Tensor& stats = saved[2];
    const bool none = reduction_of(params) == kReduceNone;
    Tensor g_loss = grads[0];
    if (g_loss.defined() && !none) g_loss = g_loss.expand_symint({logits.sym_size(0)});
    const auto [scale, ent_scale] = row_coefficients(
        {g_loss, grads[1], grads[2]}, stats, params[kEntropyCoef] != 0.0);
    Tensor grad = at::empty_symint(logits.sym_sizes(),
                                   logits.options().memory_format(at::MemoryFormat::Contiguous));
    call_psft_bwd(scale, ent_scale, logits, saved[1], stats, params,
                  ctx->saved_data["ignore_index"].toInt(), grad);
    result[0] = grad;
    return result;
  }
};

FwdOutputs psft_fwd_autograd(const Tensor& logits, const Tensor& targets, const Inputs& inputs,
                             c10::ArrayRef<double> params, int64_t ignore_index, int64_t seq_len,
                             const OptTensor& num_items, double num_items_value,
                             bool with_metrics, bool with_logprobs, const OptTensor& grad) {
  if (!(at::GradMode::is_enabled() && logits.requires_grad())) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_psft_fwd(logits, targets, inputs, params, ignore_index, seq_len, num_items,
                         num_items_value, with_metrics, with_logprobs, grad);
  }
  // With a gradient for autograd to hand out, `grad` may only be the logits themselves: the
  // gradient then overwrites them (inplace=True), which a leaf's own data must not be.
  const bool in_place = grad.has_value();
  TORCH_CHECK_VALUE(!in_place || grad->is_same(logits), "psft_fwd: `grad` is for logits that "
                    "need no autograd, or is the logits themselves (inplace=True)");
  TORCH_CHECK_VALUE(!in_place || !logits.is_leaf(),
                    "psft_ext: inplace=True overwrites the logits with their gradient; a leaf's "
                    "data cannot be: pass the output of the model's LM head");
  const variable_list out =
      LossFunction::apply(logits, targets, inputs, params, ignore_index, seq_len, num_items,
                          num_items_value, with_metrics, with_logprobs, in_place);
  return {out[0], out[1], out[2], out[3], out[4]};
}

struct LinearFunction : public torch::autograd::Function<LinearFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& hidden, const Tensor& weight,
                               const OptTensor& bias, const Tensor& targets,
                               const Inputs& inputs, c10::ArrayRef<double> params,
                               int64_t ignore_index, int64_t seq_len, const OptTensor& num_items,
                               double num_items_value, bool with_metrics, bool with_logprobs,
                               int64_t chunk_size, at::ScalarType compute_dtype,
                               bool accumulate_float32) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const bool needs[3] = {hidden.requires_grad(), weight.requires_grad(),
                           bias.has_value() && bias->requires_grad()};
    const bool single = single_pass(reduction_of(params), compute_dtype, with_logprobs);
    auto [loss, logp, entropy, metrics, stats, gh, gw, gb] = call_linear_fwd(
        hidden, weight, bias, targets, inputs, params, ignore_index, seq_len, num_items,
        num_items_value, with_metrics, with_logprobs, chunk_size, compute_dtype,
        accumulate_float32, single && needs[0], single && needs[1], single && needs[2]);
    if (single) {
      ctx->save_for_backward({gh, gw, gb});
      ctx->mark_non_differentiable({logp, entropy, metrics, stats});
    } else {
      ctx->save_for_backward({hidden, weight, bias.value_or(Tensor()), targets, stats});
      ctx->saved_data["params"] = params.vec();
      ctx->saved_data["ignore_index"] = ignore_index;
      ctx->saved_data["chunk_size"] = chunk_size;
      ctx->saved_data["compute_dtype"] = compute_dtype;
      ctx->saved_data["accumulate_float32"] = accumulate_float32;
      ctx->mark_non_differentiable(with_logprobs ? variable_list{metrics, stats}
                                                 : variable_list{logp, entropy, metrics, stats});
    }
    ctx->saved_data["single"] = single;
    ctx->saved_data["needs"] = c10::List<bool>({needs[0], needs[1], needs[2]});
    ctx->set_materialize_grads(false);
    return {loss, logp, entropy, metrics, stats};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list result(18);
    if (!grads[0].defined() && !grads[1].defined() && !grads[2].defined()) return result;
    const bool single = ctx->saved_data["single"].toBool();
    check_backward(ctx, single);
    const variable_list saved = ctx->get_saved_variables();
    const c10::List<bool> needs = ctx->saved_data["needs"].toBoolList();
    Tensor gh, gw, gb;
    if (single) {
      if (!grads[0].defined()) return result;
      if (needs[0]) gh = scaled(saved[0], grads[0]);
      if (needs[1]) gw = scaled(saved[1], grads[0]);
      if (needs[2]) gb = scaled(saved[2], grads[0]);
    } else {
      const Tensor& hidden = saved[0];
      const OptTensor bias = saved[2].defined() ? OptTensor(saved[2]) : std::nullopt;
      const std::vector<double> params = ctx->saved_data["params"].toDoubleVector();
      const bool none = reduction_of(params) == kReduceNone;
      Tensor g_loss = grads[0];
      if (g_loss.defined() && !none) g_loss = g_loss.expand_symint({hidden.sym_size(0)});
      const auto [scale, ent_scale] = row_coefficients(
          {g_loss, grads[1], grads[2]}, saved[4], params[kEntropyCoef] != 0.0);
      std::tie(gh, gw, gb) = call_linear_bwd(
          scale, ent_scale, hidden, saved[1], bias, saved[3], saved[4], params,
          ctx->saved_data["ignore_index"].toInt(), ctx->saved_data["chunk_size"].toInt(),
          ctx->saved_data["compute_dtype"].toScalarType(),
          ctx->saved_data["accumulate_float32"].toBool(), needs[0], needs[1], needs[2]);
    }
    if (needs[0]) result[0] = gh;
    if (needs[1]) result[1] = gw;
    if (needs[2]) result[2] = gb;
    return result;
  }
};

LinearOutputs linear_fwd_autograd(const Tensor& hidden, const Tensor& weight,
                                  const OptTensor& bias, const Tensor& targets,
                                  const Inputs& inputs, c10::ArrayRef<double> params,
                                  int64_t ignore_index, int64_t seq_len,
                                  const OptTensor& num_items, double num_items_value,
                                  bool with_metrics, bool with_logprobs, int64_t chunk_size,
                                  at::ScalarType compute_dtype, bool accumulate_float32,
                                  bool need_hidden, bool need_weight, bool need_bias) {
  const bool any = hidden.requires_grad() || weight.requires_grad() ||
                   (bias.has_value() && bias->requires_grad());
  if (!(at::GradMode::is_enabled() && any)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return call_linear_fwd(hidden, weight, bias, targets, inputs, params, ignore_index, seq_len,
                           num_items, num_items_value, with_metrics, with_logprobs, chunk_size,
                           compute_dtype, accumulate_float32, need_hidden, need_weight,
                           need_bias);
  }
  const variable_list out = LinearFunction::apply(
      hidden, weight, bias, targets, inputs, params, ignore_index, seq_len, num_items,
      num_items_value, with_metrics, with_logprobs, chunk_size, compute_dtype,
      accumulate_float32);
  // The gradients are autograd's to hand out: empty here, as in a call that asks for none.
  return {out[0],
          out[1],
          out[2],
          out[3],
          out[4],
          at::empty({0}, hidden.options()),
          at::empty({0}, weight.options()),
          at::empty({0}, bias.value_or(weight).options())};
}

}  // namespace
}  // namespace psft

TORCH_LIBRARY_IMPL(psft_ext, Autograd, m) {
  m.impl("psft_fwd", &psft::psft_fwd_autograd);
  m.impl("linear_fwd", &psft::linear_fwd_autograd);
}
