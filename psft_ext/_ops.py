"""Loads the compiled ops and registers their fake (meta) kernels and autograd.

The C++ library (csrc/psft_ops.cpp) defines the ops of the ``psft_ext`` namespace:
``psft_forward`` / ``psft_backward`` (the two-pass pair), ``psft_forward_backward`` (one pass that
also returns the gradient for an expected upstream gradient), its in-place variant
``psft_forward_backward_`` and the backward's ``psft_backward_`` (both write the gradient over
the logits), ``scale_rows_`` and ``token_logprobs``. Registering fake kernels and autograd
here, through ``torch.library``, is what lets ``torch.compile`` trace callers without graph breaks
and lets ``torch.library.opcheck`` verify the ops.
"""

import torch

try:
    from . import _C  # noqa: F401  (loading the shared library registers the ops)
except ImportError as exc:  # pragma: no cover - only hit on a broken install
    raise ImportError(
        "psft_ext._C is not built. Install the package with "
        "`pip install --no-build-isolation -e .` against the torch you use."
    ) from exc

ops = torch.ops.psft_ext


@torch.library.register_fake("psft_ext::psft_forward")
def _psft_forward_fake(logits, targets, old_logprobs, advantages, advantage, clip_low, clip_high,
                       dual_clip, ignore_index, temperature):
    n = logits.shape[0]
    return tuple(logits.new_empty((n,), dtype=torch.float32) for _ in range(8))


@torch.library.register_fake("psft_ext::psft_backward")
def _psft_backward_fake(grad_loss, logits, targets, lse, coef, ignore_index, temperature):
    return logits.new_empty(logits.shape)


@torch.library.register_fake("psft_ext::psft_backward_")
def _psft_backward_inplace_fake(grad_loss, logits, targets, lse, coef, ignore_index, temperature):
    return None


@torch.library.register_fake("psft_ext::psft_forward_backward")
def _psft_forward_backward_fake(logits, targets, old_logprobs, advantages, advantage, clip_low,
                                clip_high, dual_clip, ignore_index, temperature, grad_loss):
    n = logits.shape[0]
    outs = tuple(logits.new_empty((n,), dtype=torch.float32) for _ in range(8))
    return outs + (logits.new_empty(logits.shape),)


@torch.library.register_fake("psft_ext::psft_forward_backward_")
def _psft_forward_backward_inplace_fake(logits, targets, old_logprobs, advantages, advantage,
                                        clip_low, clip_high, dual_clip, ignore_index, temperature,
                                        grad_loss):
    n = logits.shape[0]
    return tuple(logits.new_empty((n,), dtype=torch.float32) for _ in range(8))


@torch.library.register_fake("psft_ext::scale_rows_")
def _scale_rows_fake(grad, factor):
    return None


@torch.library.register_fake("psft_ext::token_logprobs")
def _token_logprobs_fake(logits, targets, ignore_index, temperature):
    n = logits.shape[0]
    return logits.new_empty((n,), dtype=torch.float32), logits.new_empty((n,), dtype=torch.float32)


def _psft_forward_setup_context(ctx, inputs, output):
    logits, targets = inputs[0], inputs[1]
    ctx.ignore_index = inputs[8]
    ctx.temperature = inputs[9]
    _, logp, entropy, ratio, log_ratio, clipped, lse, coef = output
    ctx.mark_non_differentiable(logp, entropy, ratio, log_ratio, clipped, lse, coef)
    ctx.save_for_backward(logits, targets, lse, coef)


def _psft_forward_backward(ctx, grad_loss, *unused_grads):
    # Only the per-token loss is differentiable; old log-probs and advantages are constants of
    # the step (as in verl), so they get no gradient.
    logits, targets, lse, coef = ctx.saved_tensors
    grad_logits = ops.psft_backward(grad_loss.float(), logits, targets, lse, coef,
                                    ctx.ignore_index, ctx.temperature)
    return (grad_logits,) + (None,) * 9


torch.library.register_autograd(
    "psft_ext::psft_forward", _psft_forward_backward, setup_context=_psft_forward_setup_context
)


def _single_pass_setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[1:])
    # The gradient of the loss for the upstream gradient the caller expected; the logits
    # themselves are not kept.
    ctx.save_for_backward(output[8], inputs[10])


def _single_pass_backward(ctx, grad_loss, *unused_grads):
    # The gradient was formed in the forward for an upstream gradient `expected`; rows whose
    # actual one differs are rescaled in place (for the usual loss.backward() every factor is
    # exactly 1 and nothing is touched). scale_rows_ is an op declared as mutating, so AOT
    # autograd functionalizes it rather than meet an in-place update of a saved tensor; a second
    # backward through the graph (retain_graph=True) fails autograd's saved-tensor version check
    # instead of rescaling twice.
    if grad_loss is None:
        return (None,) * 11
    grad_logits, expected = ctx.saved_tensors
    ops.scale_rows_(grad_logits, grad_loss.float() / expected)
    # An op defined in C++ does not bump the version counter of the tensor it mutates; the
    # saved-tensor check of a second backward relies on it.
    torch.autograd.graph.increment_version(grad_logits)
    return (grad_logits,) + (None,) * 10


torch.library.register_autograd(
    "psft_ext::psft_forward_backward", _single_pass_backward,
    setup_context=_single_pass_setup_context,
)
