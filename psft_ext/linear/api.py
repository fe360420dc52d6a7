"""The fused linear loss's public functions: argument checks, then the ops (ops.py)."""

from typing import Optional, Union

import torch
from torch import Tensor

from .._ops import ops
from ..arguments import LOGITS_DTYPES, as_rows, check_targets, flat_targets
from .. import vocab_parallel
from ..loss import shaped_result, logprobs_of
from ..params import LossParams, loss_params
from ..token_inputs import loss_inputs, no_token_inputs
from . import ops as _registrations  # noqa: F401  (the linear ops' implementations)


def check_linear_inputs(hidden, weight, bias, targets, fn, sliced=False):
    """Checks the shapes, dtypes and devices; returns the dtype of the matmuls (the autocast
    dtype inside an autocast region of hidden's device type, else the inputs' dtype).
    ``sliced``: the weight is a rank's rows of a vocabulary-parallel call, which may be none."""
    for name, value in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a tensor, got {type(value).__name__}")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{fn}: bias must be a tensor or None, got {type(bias).__name__}")
    if hidden.dim() < 1:
        raise ValueError(f"{fn}: hidden must have a hidden dimension, got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"{fn}: weight must be 2-D (V, H), got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{fn}: weight {tuple(weight.shape)} does not match hidden's last dimension "
            f"{hidden.shape[-1]} (weight is (V, H), as model.get_output_embeddings().weight)")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"{fn}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    floats = [("hidden", hidden), ("weight", weight)]
    if bias is not None:
        floats.append(("bias", bias))
    for name, value in floats:
        if value.dtype not in LOGITS_DTYPES:
            raise TypeError(f"{fn}: {name} must be float32, bfloat16 or float16, got {value.dtype}")
    check_targets(targets, hidden.shape[:-1], "hidden", fn)
    for name, value in floats[1:] + [("targets", targets)]:
        if value.device != hidden.device:
            raise ValueError(f"{fn}: {name} is on {value.device} but hidden is on {hidden.device}")
    if weight.shape[0] == 0 and targets.numel() > 0 and not sliced:
        raise ValueError(f"{fn}: weight has an empty vocabulary dimension")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    for name, value in floats[1:]:
        if value.dtype != hidden.dtype:
            raise TypeError(
                f"{fn}: {name} is {value.dtype} but hidden is {hidden.dtype} (outside autocast "
                f"they must match, as for hidden @ weight.T)")
    return hidden.dtype


def check_chunk_size(chunk_size, fn):
    """0 stands for "choose from the shapes and free memory" in the ops."""
    if chunk_size is None:
        return 0
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def sharded_head(hidden, weight, bias, targets, process_group, fn):
    """The local (hidden, weight rows, bias rows, targets) and the group of a vocabulary-parallel
    call (group None otherwise): a DTensor weight sharded on its rows brings its group."""
    weight, group = vocab_parallel.local_shard(weight, 0, process_group, "weight", fn)
    if bias is not None:
        bias, bias_group = vocab_parallel.local_shard(bias, 0, group, "bias", fn)
        group = group if group is not None else bias_group
    return (vocab_parallel.replicated(hidden), weight, bias, vocab_parallel.replicated(targets),
            group)


def linear_loss(hidden, weight, targets, old_logprobs, params: LossParams, *, bias=None,
                chunk_size=None, accumulate_float32=True, advantages=1.0, num_items=None,
                return_metrics=False, rollout_is_weights=None, ref_logprobs=None,
                process_group=None, fn="linear_psft_loss"):
    """:func:`linear_psft_loss` with its options as a :class:`LossParams` (``fn`` names the caller
    in error messages)."""
    hidden, weight, bias, targets, group = sharded_head(hidden, weight, bias, targets,
                                                        process_group, fn)
    old_logprobs, advantages, rollout_is_weights, ref_logprobs = (
        vocab_parallel.replicated(t) for t in (old_logprobs, advantages, rollout_is_weights,
                                               ref_logprobs))
    compute_dtype = check_linear_inputs(hidden, weight, bias, targets, fn,
                                        sliced=group is not None)
    chunk = check_chunk_size(chunk_size, fn)
    inputs = loss_inputs(params, targets, fn, old_logprobs=old_logprobs, advantages=advantages,
                         rollout_is_weights=rollout_is_weights, ref_logprobs=ref_logprobs,
                         num_items=num_items, device=hidden.device, where="hidden")
    if group is not None:
        loss, _, _, metrics = _vocab_parallel(hidden, weight, bias, targets, inputs, params,
                                              group, return_metrics, chunk, compute_dtype,
                                              accumulate_float32, fn, True)
        return shaped_result(loss, metrics, targets, params, return_metrics)
    loss, _, _, metrics, *_ = ops.linear_fwd(
        as_rows(hidden), weight, bias, flat_targets(targets, params.ignore_index),
        inputs.token_inputs, params.op_args(inputs.advantage), params.ignore_index,
        inputs.seq_len, inputs.num_items, inputs.num_items_value, bool(return_metrics), False,
        chunk, compute_dtype, bool(accumulate_float32), False, False, False)
    return shaped_result(loss, metrics, targets, params, return_metrics)


def _vocab_parallel(hidden, weight, bias, targets, inputs, params, group, with_metrics, chunk,
                    compute_dtype, accumulate_float32, fn, loss_only):
    call, slices = vocab_parallel.prepare(group, flat_targets(targets, params.ignore_index),
                                          weight.shape[0], inputs, params, with_metrics, fn)
    return vocab_parallel.LinearFunction.apply(as_rows(hidden), weight, bias, call, slices, chunk,
                                               compute_dtype, bool(accumulate_float32),
                                               loss_only and torch.is_grad_enabled())


def linear_psft_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    old_logprobs: Optional[Tensor] = None,
    *,
    bias: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    accumulate_float32: bool = True,
    advantages: Union[float, Tensor] = 1.0,
    num_items: Optional[Union[int, float, Tensor]] = None,
    return_metrics: bool = False,
    rollout_is_weights: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    process_group=None,
    **options,
):
    """PSFT loss of the LM head's logits ``hidden @ weight.T + bias`` without materializing them.

    Same results, metrics and gradients (for hidden, weight and bias) as
    ``psft_loss(hidden @ weight.T + bias, targets, old_logprobs, ...)``; see
    :func:`psft_ext.psft_loss` for the loss, ``advantages``, ``num_items``, ``return_metrics``,
    ``rollout_is_weights``, ``ref_logprobs`` and the options (:class:`psft_ext.LossParams`'
    fields as keywords). With ``importance_sampling="sequence"`` a chunk holds whole sequences
    when one fits in it, else the log-probs take a first pass over the chunks.
    ``process_group``: a vocabulary-parallel LM head, each rank's ``weight`` (and ``bias``) its
    contiguous rows of the vocabulary in rank order, ``hidden`` and ``targets`` the same on every
    rank (a DTensor weight sharded on its rows, as ``ColwiseParallel`` makes it, brings its own
    group); the gradient of ``hidden`` is summed over the group, each rank's weight gradient is
    its rows'. The backward recomputes the chunks (four matmuls in all instead of three).

    Args:
        hidden: (..., H) float32 / bfloat16 / float16, the last hidden states.
        weight: (V, H), the LM head, as ``model.get_output_embeddings().weight`` (may be tied to
            the input embeddings; autograd adds both gradients).
        targets: (...) int64 / int32 token ids.
        bias: optional (V,) bias of the LM head.
        chunk_size: rows of logits formed at a time; None chooses from the shapes and the free
            memory (:func:`psft_ext.linear.auto_chunk_rows`). Peak memory beyond the inputs and
            their gradients: one chunk of logits (the kernels write its gradient over it), plus,
            for a bfloat16 / float16 weight split into several chunks, grad_weight's float32
            accumulator.
        accumulate_float32: for a bfloat16 / float16 weight and several chunks, accumulate
            grad_weight across chunks in float32 (default: one rounding at the end, 2 V H
            bytes more memory) or, with False, in the weight's dtype (one rounding per chunk,
            no extra memory). No effect on float32 weights or a single chunk.

    With reduction "mean" or "sum" and an input that requires a gradient (in grad mode), the
    gradients are computed during this call (the only time a chunk's logits exist) and the
    backward just scales them: evaluate under ``torch.no_grad()`` to skip that work. With
    reduction "none", and for float16 compute whatever the reduction, the backward recomputes
    the logits chunk by chunk (four matmuls of the size of ``hidden @ weight.T`` in all instead
    of three). In bfloat16 / float16 the logits are ``F.linear``'s (the bias added before the
    one rounding).
    """
    fn = "linear_psft_loss"
    return linear_loss(hidden, weight, targets, old_logprobs, loss_params(fn, options), bias=bias,
                       chunk_size=chunk_size, accumulate_float32=accumulate_float32,
                       advantages=advantages, num_items=num_items,
                       return_metrics=return_metrics, rollout_is_weights=rollout_is_weights,
                       ref_logprobs=ref_logprobs, process_group=process_group, fn=fn)


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    chunk_size: Optional[int] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    with_entropy: bool = False,
    process_group=None,
):
    """``token_logprobs(hidden @ weight.T + bias, targets, ...)`` without materializing the logits.

    float32 log-probs of the targets (0 where ignored), of targets' shape; with
    ``with_entropy=True`` also the per-token entropy. Both are differentiable with respect to
    hidden, weight and bias: the backward recomputes the logits chunk by chunk (no N x V memory
    at any point), so a policy loss written in PyTorch on them needs no logits at all.
    ``process_group``: a vocabulary-parallel LM head, as in :func:`linear_psft_loss`.
    """
    fn = "linear_token_logprobs"
    hidden, weight, bias, targets, group = sharded_head(hidden, weight, bias, targets,
                                                        process_group, fn)
    compute_dtype = check_linear_inputs(hidden, weight, bias, targets, fn,
                                        sliced=group is not None)
    params = loss_params(fn, dict(ignore_index=ignore_index, temperature=temperature,
                                  reduction="none"))
    chunk = check_chunk_size(chunk_size, fn)
    if group is not None:
        inputs = loss_inputs(params, targets, fn, device=hidden.device, where="hidden")
        _, logp, entropy, _ = _vocab_parallel(hidden, weight, bias, targets, inputs, params,
                                              group, False, chunk, compute_dtype, True, fn,
                                              False)
        return logprobs_of(logp, entropy, targets.shape, with_entropy)
    _, logp, entropy, *_ = ops.linear_fwd(
        as_rows(hidden), weight, bias, flat_targets(targets, ignore_index), no_token_inputs(),
        params.op_args(), ignore_index, 0, None, 0.0, False, True, chunk, compute_dtype, True,
        False, False, False)
    return logprobs_of(logp, entropy, targets.shape, with_entropy)
