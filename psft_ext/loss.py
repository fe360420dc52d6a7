"""The fused PSFT loss over logits, and fused token log-probs.

A call is one op, ``psft_fwd``: the token count, the denominator, the forward, the reduction and
the metrics, and, when the logits need a gradient, the choice of backward (csrc/psft_autograd.cpp).
"""

from typing import Optional, Union

import torch

from ._ops import TOKEN_STATS, ops
from .arguments import (as_rows, check_logits_targets, flat_targets, num_items_arg,
                        old_and_advantages)
from .metrics import PSFTMetrics
from .params import LossParams, loss_params


def logits_loss(logits, targets, old_logprobs, params: LossParams, advantages=1.0,
                num_items=None, return_metrics=False, fn="psft_loss"):
    """:func:`psft_loss` with its options as a :class:`LossParams` (``fn`` names the caller in
    error messages)."""
    check_logits_targets(logits, targets, fn)
    ignore_index, reduction = params.ignore_index, params.reduction
    old, adv, adv_scalar = old_and_advantages(old_logprobs, advantages, targets, fn)
    num_items_t, num_items_value = num_items_arg(num_items, reduction, logits.device, fn)
    loss, metrics, _ = ops.psft_fwd(
        as_rows(logits),
        flat_targets(targets, ignore_index), old, adv, params.op_args(adv_scalar),
        ignore_index, reduction, num_items_t, num_items_value, bool(return_metrics), None)
    if reduction == "none":
        loss = loss.view(targets.shape)
    if not return_metrics:
        return loss
    return loss, PSFTMetrics(*metrics.unbind())


def psft_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: Optional[torch.Tensor] = None,
    *,
    advantages: Union[float, torch.Tensor] = 1.0,
    num_items: Optional[Union[int, float, torch.Tensor]] = None,
    return_metrics: bool = False,
    **options,
):
    """Fused PSFT / PPO clipped token loss over logits.

    Per token: ``r = exp(clamp(logp - old_logp, -20, 20))``,
    ``loss = -min(r * A, clip(r, 1 - clip_low, 1 + clip_high) * A)`` (then ``min(loss, -A * c)``
    for ``A < 0`` when ``dual_clip=c``), 0 for ignored targets. ``old_logprobs=None`` means the old
    policy is the current one (ratio exactly 1): with ``advantages=1`` that is plain SFT.

    Args:
        logits: (..., V) float32 / bfloat16 / float16 on CPU or CUDA.
        targets: (...) int64 / int32 token ids; ``ignore_index`` marks tokens without a loss.
        old_logprobs: (...) log-probs of the targets under the old policy (float32), or None.
        advantages: float, or tensor broadcastable to ``targets``. PSFT uses 1.
        num_items: denominator of "mean" (e.g. tokens of the whole optimizer step across
            gradient-accumulation steps and ranks): a number or a one-element tensor; default:
            non-ignored targets of this call (at least 1, so an all-ignored batch gives 0).
        return_metrics: also return a :class:`PSFTMetrics`.
        **options: the loss's options, :class:`LossParams`' fields: ``clip_low=0.2``,
            ``clip_high=0.28``, ``dual_clip=None``, ``ignore_index=-100``, ``temperature=1.0``,
            ``reduction="mean"`` ("mean", "sum", or "none": per-token losses of targets' shape).

    Returns:
        The float32 loss, or ``(loss, metrics)``. Only ``logits`` receives a gradient;
        ``old_logprobs`` and ``advantages`` are constants.

    With reduction "mean" or "sum" and logits that require a gradient (in grad mode), the
    gradient is written during this call, in the same pass over the logits, and the logits are
    not kept for the backward: evaluate under ``torch.no_grad()`` to skip that work. Reduction
    "none", and float16 logits whatever the reduction, read the logits again in the backward.
    """
    return logits_loss(logits, targets, old_logprobs, loss_params("psft_loss", options),
                       advantages, num_items, return_metrics)


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    with_entropy: bool = False,
):
    """Fused float32 log-probs of the targets (0 where ignored), without any N x V memory.

    Meant for the old policy's log-probs: it runs without autograd (the result never requires
    grad). With ``with_entropy=True`` returns ``(logprobs, entropy)``, both of targets' shape.
    """
    fn = "token_logprobs"
    check_logits_targets(logits, targets, fn)
    params = loss_params(fn, dict(ignore_index=ignore_index, temperature=temperature))
    _, _, stats = ops.psft_fwd(as_rows(logits.detach()),
                               flat_targets(targets, ignore_index), None, None,
                               params.op_args(), ignore_index, "none", None, 0.0, False,
                               None)
    return stats_of(stats, targets.shape, with_entropy)


def stats_of(stats, shape, with_entropy):
    """The log-probs (and entropies) of ``shape`` from a ``psft_fwd`` stats tensor, as tensors of
    their own (not views that would keep all the stats alive)."""
    logp = stats[TOKEN_STATS["logp"]].clone().view(shape)
    if with_entropy:
        return logp, stats[TOKEN_STATS["entropy"]].clone().view(shape)
    return logp
