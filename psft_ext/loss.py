"""The fused PSFT loss over logits, and fused token log-probs and entropies.

A call is one op, ``psft_fwd``: the token count, the denominator, the forward, the options, the
reduction and the metrics, and, when the logits need a gradient, the choice of backward
(csrc/psft_autograd.cpp).
"""

from typing import Optional, Union

import torch

from . import vocab_parallel
from ._ops import ops
from .arguments import as_rows, check_logits_targets, flat_targets
from .metrics import PSFTMetrics
from .params import LossParams, loss_params
from .token_inputs import loss_inputs, no_token_inputs


def logits_loss(logits, targets, old_logprobs, params: LossParams, advantages=1.0,
                num_items=None, return_metrics=False, fn="psft_loss", *,
                rollout_is_weights=None, ref_logprobs=None, inplace=False, process_group=None):
    """:func:`psft_loss` with its options as a :class:`LossParams` (``fn`` names the caller in
    error messages)."""
    logits, group = vocab_parallel.local_shard(logits, -1, process_group, "logits", fn)
    targets, old_logprobs, advantages, rollout_is_weights, ref_logprobs = (
        vocab_parallel.replicated(t) for t in (targets, old_logprobs, advantages,
                                               rollout_is_weights, ref_logprobs))
    check_logits_targets(logits, targets, fn, sliced=group is not None)
    if not isinstance(inplace, bool):
        raise TypeError(f"{fn}: inplace must be a bool, got {inplace!r}")
    inputs = loss_inputs(params, targets, fn, old_logprobs=old_logprobs, advantages=advantages,
                         rollout_is_weights=rollout_is_weights, ref_logprobs=ref_logprobs,
                         num_items=num_items, device=logits.device)
    if group is not None:
        if inplace:
            raise ValueError(f"{fn}: inplace=True is not available with a vocabulary-parallel "
                             f"loss (its backward reads the logits)")
        loss, _, _, metrics = _vocab_parallel(as_rows(logits), targets, inputs, params, group,
                                              return_metrics, fn)
        return shaped_result(loss, metrics, targets, params, return_metrics)
    rows = as_rows(logits)
    grad = None
    if inplace and torch.is_grad_enabled() and logits.requires_grad:
        if not rows.is_contiguous():
            rows = rows.contiguous()  # the gradient can only overwrite a dense copy
        grad = rows
    loss, _, _, metrics, _ = ops.psft_fwd(
        rows, flat_targets(targets, params.ignore_index), inputs.token_inputs,
        params.op_args(inputs.advantage), params.ignore_index, inputs.seq_len, inputs.num_items,
        inputs.num_items_value, bool(return_metrics), False, grad)
    return shaped_result(loss, metrics, targets, params, return_metrics)


def shaped_result(loss, metrics, targets, params, return_metrics):
    if params.reduction == "none":
        loss = loss.view(targets.shape)
    if not return_metrics:
        return loss
    return loss, PSFTMetrics(*metrics.unbind())


def _vocab_parallel(rows, targets, inputs, params, group, with_metrics, fn):
    call, slices = vocab_parallel.prepare(group, flat_targets(targets, params.ignore_index),
                                          rows.shape[1], inputs, params, with_metrics, fn)
    return vocab_parallel.LogitsFunction.apply(rows, call, slices)


def psft_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: Optional[torch.Tensor] = None,
    *,
    advantages: Union[float, torch.Tensor] = 1.0,
    num_items: Optional[Union[int, float, torch.Tensor]] = None,
    return_metrics: bool = False,
    rollout_is_weights: Optional[torch.Tensor] = None,
    ref_logprobs: Optional[torch.Tensor] = None,
    inplace: bool = False,
    process_group=None,
    **options,
):
    """Fused PSFT / PPO clipped token loss over logits.

    Per token: ``r = exp(clamp(logp - old_logp, -20, 20))``,
    ``loss = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)`` (then ``min(loss, -A * c)``
    for ``A < 0`` when ``dual_clip=c``), 0 for ignored targets. ``old_logprobs=None`` means the old
    policy is the current one (ratio exactly 1): with ``advantages=1`` that is plain SFT. The
    options add, per token, verl's rollout correction (``loss * rollout_is_weights``), a k3 KL
    penalty (``+ kl_coef * k3(ref_logprobs, logp)``) and an entropy bonus
    (``- entropy_coef * entropy``), and change the ratio's level (``importance_sampling``) and
    the aggregation (``loss_agg_mode``): docs/formula.md.

    Args:
        logits: (..., V) float32 / bfloat16 / float16 on CPU or CUDA.
        targets: (...) int64 / int32 token ids; ``ignore_index`` marks tokens without a loss.
            The sequence options read (..., T) targets as sequences of T tokens.
        old_logprobs: (...) log-probs of the targets under the old policy (float32), or None.
        advantages: float, or tensor broadcastable to ``targets``. PSFT uses 1.
        num_items: denominator of "mean" (e.g. tokens of the whole optimizer step across
            gradient-accumulation steps and ranks): a number or a one-element tensor; default:
            non-ignored targets of this call (at least 1, so an all-ignored batch gives 0). For
            a sequence ``loss_agg_mode``, the number of sequences (default: this call's
            sequences with a non-ignored token).
        return_metrics: also return a :class:`PSFTMetrics`.
        rollout_is_weights: per-token weights broadcastable to ``targets`` scaling each
            token's policy-gradient term (the rollout engine's mismatch correction), or None.
        ref_logprobs: (...) the reference policy's log-probs, with ``kl_coef > 0``.
        process_group: vocabulary-parallel logits: each rank's ``logits`` are its contiguous
            slice of the vocabulary (slices in rank order, sizes may differ), ``targets`` global
            ids, the same on every rank; the loss and the metrics come out the same on every
            rank, each rank's gradient is its slice's (docs/scaling.md). A DTensor sharded on
            the last dimension brings its own group.
        inplace: the gradient overwrites the logits (reduction "mean" / "sum", non-float16
            logits that are not a leaf): no memory for it, for loops that do not read the
            logits after the loss. Autograd raises at the backward if another operation saved
            the logits for its own backward.
        **options: the loss's options, :class:`LossParams`' fields: ``clip_low=0.2``,
            ``clip_high=0.28``, ``dual_clip=None`` (or ``delta``), ``ignore_index=-100``,
            ``temperature=1.0``, ``reduction="mean"`` ("mean", "sum", or "none": per-token
            losses of targets' shape), ``entropy_coef=0``, ``kl_coef=0``,
            ``loss_agg_mode="token-mean"``, ``importance_sampling="token"``.

    Returns:
        The float32 loss, or ``(loss, metrics)``. Only ``logits`` receives a gradient; the other
        tensors are constants.

    With reduction "mean" or "sum" and logits that require a gradient (in grad mode), the
    gradient is written during this call and the logits are not kept for the backward: evaluate
    under ``torch.no_grad()`` to skip that work. Reduction "none", and float16 logits whatever
    the reduction, read the logits again in the backward.
    """
    return logits_loss(logits, targets, old_logprobs, loss_params("psft_loss", options),
                       advantages, num_items, return_metrics, rollout_is_weights=rollout_is_weights,
                       ref_logprobs=ref_logprobs, inplace=inplace, process_group=process_group)


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    with_entropy: bool = False,
    process_group=None,
):
    """Fused float32 log-probs of the targets (0 where ignored), without any N x V memory.

    With ``with_entropy=True`` returns ``(logprobs, entropy)``, both of targets' shape. Both are
    differentiable with respect to the logits (one pass over the logits in the backward, which
    writes only their gradient): any policy loss written in PyTorch on them runs without
    log-softmax buffers. Under ``torch.no_grad()`` (the old policy) nothing is kept.
    ``process_group``: vocabulary-parallel logits, as in :func:`psft_loss`.
    """
    fn = "token_logprobs"
    logits, group = vocab_parallel.local_shard(logits, -1, process_group, "logits", fn)
    targets = vocab_parallel.replicated(targets)
    check_logits_targets(logits, targets, fn, sliced=group is not None)
    params = loss_params(fn, dict(ignore_index=ignore_index, temperature=temperature,
                                  reduction="none"))
    if group is not None:
        inputs = loss_inputs(params, targets, fn, device=logits.device)
        _, logp, entropy, _ = _vocab_parallel(as_rows(logits), targets, inputs, params, group,
                                              False, fn)
        return logprobs_of(logp, entropy, targets.shape, with_entropy)
    _, logp, entropy, _, _ = ops.psft_fwd(
        as_rows(logits), flat_targets(targets, ignore_index), no_token_inputs(), params.op_args(),
        ignore_index, 0, None, 0.0, False, True, None)
    return logprobs_of(logp, entropy, targets.shape, with_entropy)


def logprobs_of(logp, entropy, shape, with_entropy):
    """The op's flat log-probs (and entropies) in ``shape``."""
    if with_entropy:
        return logp.view(shape), entropy.view(shape)
    return logp.view(shape)

