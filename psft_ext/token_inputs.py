"""The per-token inputs of a loss call as the ops take them (``Tensor?[] token_inputs``, in the
order psft_math.h's TokenInput gives, read from the library as ``TOKEN_INPUTS``), with the checks
that tie them to the options: the reference log-probs go with ``kl_coef``, the sequence options
with targets of shape (..., T), and a sequence ``loss_agg_mode`` becomes each token's weight."""

from typing import NamedTuple, Optional

import torch

from ._ops import TOKEN_INPUTS
from .arguments import num_items_arg, old_and_advantages, per_token


class LossInputs(NamedTuple):
    token_inputs: list       # the ops' token_inputs
    advantage: float         # the scalar advantage where no tensor is given
    seq_len: int             # tokens per sequence for the sequence options, else 0
    num_items: Optional[torch.Tensor]
    num_items_value: float


def no_token_inputs():
    """token_inputs of a call without any (log-probs and entropies only)."""
    return [None] * len(TOKEN_INPUTS)


def loss_inputs(params, targets, fn, *, old_logprobs=None, advantages=1.0,
                rollout_is_weights=None, ref_logprobs=None, num_items=None, device=None,
                where="logits"):
    """Checks a call's per-token arguments against its ``params`` and lays them out for the ops.
    ``device``: the loss's device (the logits' or hidden's)."""
    old, adv, adv_scalar = old_and_advantages(old_logprobs, advantages, targets, fn, where)
    values = dict(old_logprobs=old, advantages=adv)
    if rollout_is_weights is not None:
        values["rollout_is_weights"] = per_token("rollout_is_weights", rollout_is_weights,
                                                 targets, fn, allow_broadcast=True, where=where)
    # Two plain tests: under torch.compile kl_coef may be a SymFloat, whose comparison is a
    # SymBool that `if` can guard but `!=` between booleans cannot trace.
    if (params.kl_coef != 0) if ref_logprobs is None else (params.kl_coef == 0):
        raise ValueError(f"{fn}: ref_logprobs and kl_coef > 0 go together (the KL penalty to the "
                         f"reference policy), got kl_coef={params.kl_coef!r} and "
                         f"{'no' if ref_logprobs is None else 'a'} ref_logprobs tensor")
    if ref_logprobs is not None:
        values["ref_logprobs"] = per_token("ref_logprobs", ref_logprobs, targets, fn,
                                           allow_broadcast=False, where=where)
    seq_len = 0
    if params.sequence_level:
        if targets.dim() < 2:
            option = (f"loss_agg_mode={params.loss_agg_mode!r}"
                      if params.loss_agg_mode != "token-mean" else "importance_sampling='sequence'")
            raise ValueError(f"{fn}: {option} reads sequences, the rows of the targets' last "
                             f"dimension: targets must be (..., T), got shape "
                             f"{tuple(targets.shape)}")
        seq_len = targets.shape[-1]
    num_items_t, num_items_value = num_items_arg(num_items, params.reduction, device, fn)
    if params.loss_agg_mode != "token-mean":
        values["token_weights"] = sequence_weights(targets, params, num_items_t, num_items_value)
        num_items_t, num_items_value = None, 0.0
    inputs = [values.get(name) for name in TOKEN_INPUTS]
    return LossInputs(inputs, adv_scalar, seq_len if params.importance_sampling == "sequence"
                      else 0, num_items_t, num_items_value)


def sequence_weights(targets, params, num_items=None, num_items_value=0.0):
    """Each token's weight in verl's sequence aggregations (``agg_loss``), flat float32 (N,):
    the mean over the sequences that have a non-ignored token (``num_items``: their number over
    the whole step, default this call's) of each sequence's token mean ("seq-mean-token-mean"),
    token sum ("seq-mean-token-sum") or token sum over T ("seq-mean-token-sum-norm", T the
    targets' last dimension, verl's default loss_scale_factor). Ignored tokens weigh 0."""
    seq_len = targets.shape[-1]
    valid = (targets.long() != params.ignore_index).reshape(-1, seq_len).to(torch.float32)
    counts = valid.sum(1, keepdim=True)
    if num_items is not None:
        denominator = num_items.to(device=valid.device, dtype=torch.float32)
    elif num_items_value > 0:
        denominator = num_items_value
    else:
        denominator = (counts > 0).sum().clamp(min=1).to(torch.float32)
    mode = params.loss_agg_mode
    if mode == "seq-mean-token-mean":
        weights = valid / counts.clamp(min=1)
    elif mode == "seq-mean-token-sum":
        weights = valid
    else:
        weights = valid / seq_len
    return (weights / denominator).reshape(-1)
