"""Loads the compiled ops and registers their fake (meta) kernels and autograd.

The C++ library (csrc/psft_ops.cpp) defines the ops of the ``psft_ext`` namespace:
``psft_forward`` / ``psft_backward`` (the two-pass pair), ``psft_forward_backward`` (one pass that
also returns the gradient for an expected upstream gradient), its in-place variant
``psft_forward_backward_`` and the backward's ``psft_backward_`` (both write the gradient over
the logits), ``psft_loss_reduced`` (the "mean" / "sum" loss in one op, csrc/psft_reduced.cpp),
``scale_rows_`` and ``token_logprobs``. Registering their fake kernels here,
through ``torch.library``, is what lets ``torch.compile`` trace callers without graph breaks and
lets ``torch.library.opcheck`` verify the ops. The autograd of the three differentiable ops
(``psft_forward``, ``psft_forward_backward``, ``psft_loss_reduced``) is registered in C++
(csrc/psft_autograd.cpp):
torch.library's Python autograd wrapper cost about 150 us per call for these ops.
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


@torch.library.register_fake("psft_ext::psft_loss_reduced")
def _psft_loss_reduced_fake(logits, targets, old_logprobs, advantages, advantage, clip_low,
                            clip_high, dual_clip, ignore_index, temperature, denominator,
                            denominator_value, with_grad, with_metrics):
    loss = logits.new_empty((), dtype=torch.float32)
    metrics = logits.new_empty((6,) if with_metrics else (0,), dtype=torch.float32)
    return loss, metrics, logits.new_empty(logits.shape if with_grad else (0,))


@torch.library.register_fake("psft_ext::scale_rows_")
def _scale_rows_fake(grad, factor):
    return None


@torch.library.register_fake("psft_ext::token_logprobs")
def _token_logprobs_fake(logits, targets, ignore_index, temperature):
    n = logits.shape[0]
    return logits.new_empty((n,), dtype=torch.float32), logits.new_empty((n,), dtype=torch.float32)
