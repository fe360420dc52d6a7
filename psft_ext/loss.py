"""The fused PSFT loss and fused token log-probs: argument checks, flattening, reductions, metrics."""

from numbers import Real
from typing import NamedTuple, Optional, Union

import torch

from ._ops import ops

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TARGET_DTYPES = (torch.int64, torch.int32)
REDUCTIONS = ("mean", "sum", "none")


class PSFTMetrics(NamedTuple):
    """Token-mean statistics of one loss call (detached 0-d float32 tensors, non-ignored tokens).

    nll: mean -log p(target). entropy: mean entropy of the (temperature-scaled) distribution.
    clip_fraction: share of tokens whose clip (or dual clip) branch is active, i.e. that get no
    gradient from clipping. approx_kl: mean (old_logp - logp), the log-ratio clamped to [-20, 20]
    as in verl. ratio_mean: mean probability ratio. num_tokens: number of non-ignored tokens.
    """

    nll: torch.Tensor
    entropy: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    num_tokens: torch.Tensor


def _check_logits_targets(logits, targets, fn):
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(f"{fn}: logits and targets must be tensors")
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"{fn}: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{fn}: logits must have a vocabulary dimension, got a 0-d tensor")
    _check_targets(targets, logits.shape[:-1], "logits", fn)
    if targets.device != logits.device:
        raise ValueError(f"{fn}: targets are on {targets.device} but logits are on {logits.device}")
    if logits.shape[-1] == 0 and targets.numel() > 0:
        raise ValueError(f"{fn}: logits have an empty vocabulary dimension")


def _check_targets(targets, leading_shape, where, fn):
    """Targets are int64 / int32 ids with the leading shape of ``where`` (logits or hidden)."""
    if targets.dtype not in TARGET_DTYPES:
        raise TypeError(f"{fn}: targets must be int64 or int32 token ids, got {targets.dtype}")
    if tuple(targets.shape) != tuple(leading_shape):
        raise ValueError(
            f"{fn}: targets must have the leading shape of {where} {tuple(leading_shape)}, "
            f"got {tuple(targets.shape)}"
        )


def _check_finite(name, value, fn, low=None):
    # `value - value == 0` is False exactly for nan and +-inf. Unlike math.isfinite it also
    # traces under torch.compile, where a float argument that changes between calls becomes a
    # SymFloat (math.isfinite on it is a hard error with fullgraph=True).
    if isinstance(value, bool) or not isinstance(value, Real) or not value - value == 0:
        raise ValueError(f"{fn}: {name} must be a finite number, got {value!r}")
    if low is not None and not value > low:
        raise ValueError(f"{fn}: {name} must be > {low}, got {value!r}")


def _per_token(name, value, targets, fn, allow_broadcast, where="logits"):
    """Returns a flat float32 (N,) view/copy of a per-token tensor, detached.

    ``where`` names the input whose device the error messages quote (the logits, or the hidden
    states of the fused linear loss).
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a tensor or None, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {value.dtype}")
    if value.device != targets.device:
        raise ValueError(f"{fn}: {name} is on {value.device} but {where} are on {targets.device}")
    if allow_broadcast:
        try:
            value = value.expand(targets.shape)
        except RuntimeError:
            raise ValueError(
                f"{fn}: {name} of shape {tuple(value.shape)} does not broadcast to the targets' "
                f"shape {tuple(targets.shape)}"
            ) from None
    elif tuple(value.shape) != tuple(targets.shape):
        raise ValueError(
            f"{fn}: {name} must have the targets' shape {tuple(targets.shape)}, "
            f"got {tuple(value.shape)}"
        )
    # Each tensor op here costs microseconds per call: only the ones that change something.
    if value.requires_grad:
        value = value.detach()
    if value.dim() != 1:
        value = value.reshape(-1)
    return value if value.dtype == torch.float32 else value.to(torch.float32)


def _targets_for(targets, ignore_index):
    """int32 targets compared with an ignore_index outside the int32 range would wrap it (torch
    casts the scalar to the tensor's dtype), so such an ignore_index (which no int32 id can equal)
    could mark real targets as ignored: compare in int64 then, as for int64 targets."""
    if targets.dtype == torch.int32 and not -(2**31) <= ignore_index < 2**31:
        return targets.long()
    return targets


# Shared by psft_loss and the fused linear loss (linear.py), so both check, reduce and report alike.

def _check_ignore_index(ignore_index, fn):
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{fn}: ignore_index must be an int, got {ignore_index!r}")


def _check_loss_options(fn, clip_low, clip_high, dual_clip, temperature, reduction, ignore_index):
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high)):
        _check_finite(name, value, fn)
        if value < 0:
            raise ValueError(f"{fn}: {name} must be >= 0, got {value!r}")
    if dual_clip is not None:
        _check_finite("dual_clip", dual_clip, fn, low=1.0)
    _check_finite("temperature", temperature, fn, low=0.0)
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_ignore_index(ignore_index, fn)


def _old_and_advantages(old_logprobs, advantages, targets, fn, where="logits"):
    """Flat float32 old log-probs (or None) and the advantages as (tensor or None, scalar)."""
    old = None if old_logprobs is None else _per_token(
        "old_logprobs", old_logprobs, targets, fn, allow_broadcast=False, where=where)
    if isinstance(advantages, torch.Tensor):
        adv_tensor = _per_token("advantages", advantages, targets, fn, allow_broadcast=True,
                                where=where)
        return old, adv_tensor, 1.0
    _check_finite("advantages", advantages, fn)
    return old, None, float(advantages)


def _num_items_tensor(num_items, fn):
    """A tensor num_items as a 0-d constant: one element of any shape ((), (1,), (1, 1), as a
    count gathered across ranks may come back), detached."""
    if num_items.numel() != 1:
        raise ValueError(f"{fn}: num_items must hold one value, got a tensor of shape "
                         f"{tuple(num_items.shape)}")
    return num_items.detach().reshape(())


def _reduce_in_python(loss, shape, reduction, num_items, num_tokens, fn):
    """The (N,) per-token losses reduced by autograd-tracked tensor ops: "none" (viewed as the
    targets' ``shape``), "sum", or "mean" over num_items (default: the token count)."""
    if reduction == "none":
        return loss.view(shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / _mean_denominator(num_items, num_tokens, loss.device, fn)


def _mean_denominator(num_items, num_tokens, device, fn):
    """The denominator of reduction "mean" where it is divided in Python (the fused linear loss,
    float16 logits): a tensor, or a float for a numeric num_items. psft_loss_reduced forms the
    same denominator in C++."""
    if num_items is None:
        # float32 once, rather than promoted in each division by it
        return num_tokens.clamp(min=1).to(torch.float32)
    if isinstance(num_items, torch.Tensor):
        return _num_items_tensor(num_items, fn).to(device=device, dtype=torch.float32)
    _check_finite("num_items", num_items, fn, low=0.0)
    return float(num_items)


def _metrics(logp, entropy, clipped, log_ratio, ratio, num_tokens):
    """PSFTMetrics from the per-token outputs of the forward (ignored tokens hold zeros)."""
    count = num_tokens.clamp(min=1).to(torch.float32)
    return PSFTMetrics(
        nll=(-logp.sum() / count).detach(),
        entropy=(entropy.sum() / count).detach(),
        clip_fraction=(clipped.sum() / count).detach(),
        approx_kl=(-log_ratio.sum() / count).detach(),
        ratio_mean=(ratio.sum() / count).detach(),
        num_tokens=num_tokens.to(torch.float32).detach(),
    )


def psft_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    old_logprobs: Optional[torch.Tensor] = None,
    *,
    advantages: Union[float, torch.Tensor] = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: Optional[float] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    reduction: str = "mean",
    num_items: Optional[Union[int, float, torch.Tensor]] = None,
    return_metrics: bool = False,
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
        clip_low, clip_high: the trust region ``[1 - clip_low, 1 + clip_high]`` of the ratio.
        dual_clip: verl's ``clip_ratio_c`` (> 1) for negative advantages, or None.
        temperature: logits are divided by it before the softmax.
        reduction: "mean" (sum / num_items), "sum" or "none" (per-token losses, shape of targets).
        num_items: denominator of "mean" (e.g. tokens of the whole optimizer step across
            gradient-accumulation steps and ranks); default: non-ignored targets of this call
            (at least 1, so an all-ignored batch gives 0).
        return_metrics: also return a :class:`PSFTMetrics`.

    Returns:
        The float32 loss, or ``(loss, metrics)``. Only ``logits`` receives a gradient;
        ``old_logprobs`` and ``advantages`` are treated as constants.

    With reduction "mean" or "sum" and logits that require a gradient (in grad mode), the
    gradient is written during this call, in the same pass over the logits, for the upstream
    gradient ``loss.backward()`` gives; the backward only rescales rows when the actual one
    differs, and the logits are not kept for it. Evaluate under ``torch.no_grad()`` to skip that
    work. Reduction "none" runs the forward only and reads the logits again in the backward, and
    so do float16 logits whatever the reduction (a gradient rounded to float16 before a
    GradScaler's scale reaches it would mostly flush to zero).
    """
    fn = "psft_loss"
    _check_logits_targets(logits, targets, fn)
    _check_loss_options(fn, clip_low, clip_high, dual_clip, temperature, reduction, ignore_index)
    targets = _targets_for(targets, ignore_index)

    vocab = logits.shape[-1]
    flat_logits = logits if logits.dim() == 2 else logits.reshape(-1, vocab)
    flat_targets = targets if targets.dim() == 1 else targets.reshape(-1)
    old, adv_tensor, adv_scalar = _old_and_advantages(old_logprobs, advantages, targets, fn)

    args = (flat_logits, flat_targets, old, adv_tensor, adv_scalar, float(clip_low),
            float(clip_high), 0.0 if dual_clip is None else float(dual_clip), ignore_index,
            float(temperature))
    with_grad = torch.is_grad_enabled() and logits.requires_grad
    # float16 logits that need a gradient take the two passes (below), whatever the reduction:
    # the single pass rounds the gradient to float16 in the forward, for the upstream gradient
    # loss.backward() gives (1 / den), before a GradScaler's loss scale reaches it in the
    # backward. Most of a row's (p - y) / den then flushes to zero or to a few-bit subnormal,
    # where the backward kernel, given the actual upstream gradient, rounds the scaled value
    # once, as autograd through the reference does. bfloat16 has float32's range: no such loss.
    if reduction != "none" and not (with_grad and flat_logits.dtype == torch.float16):
        # One op (csrc/psft_reduced.cpp): the count, the denominator, the forward and, when the
        # logits need a gradient, that gradient, written in the same pass over the logits for
        # the upstream gradient loss.backward() gives (the backward only rescales it if the
        # actual one differs; the logits are not kept for it). The metrics come from the same
        # op, as one (6,) tensor in PSFTMetrics' order.
        denominator, denominator_value = _reduction_denominator(reduction, num_items, fn)
        out, metrics, _ = ops.psft_loss_reduced(*args, denominator, denominator_value,
                                                with_grad, bool(return_metrics))
        return (out, PSFTMetrics(*metrics.unbind())) if return_metrics else out

    loss, logp, entropy, ratio, log_ratio, clipped, _, _ = ops.psft_forward(*args)
    need_count = return_metrics or (reduction == "mean" and num_items is None)
    num_tokens = (flat_targets != ignore_index).sum() if need_count else None
    out = _reduce_in_python(loss, targets.shape, reduction, num_items, num_tokens, fn)
    if not return_metrics:
        return out
    return out, _metrics(logp, entropy, clipped, log_ratio, ratio, num_tokens)


def _reduction_denominator(reduction, num_items, fn):
    """psft_loss_reduced's (denominator, denominator_value): a tensor num_items (a constant, no
    gradient), a positive number, 1 for "sum", or (None, 0.0): the count of non-ignored tokens."""
    if reduction == "sum":
        return None, 1.0
    if num_items is None:
        return None, 0.0
    if isinstance(num_items, torch.Tensor):
        return _num_items_tensor(num_items, fn), 0.0
    _check_finite("num_items", num_items, fn, low=0.0)
    return None, float(num_items)


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
    _check_logits_targets(logits, targets, fn)
    _check_finite("temperature", temperature, fn, low=0.0)
    _check_ignore_index(ignore_index, fn)
    targets = _targets_for(targets, ignore_index)
    vocab = logits.shape[-1]
    logp, entropy = ops.token_logprobs(
        logits.detach().reshape(-1, vocab), targets.reshape(-1), ignore_index, float(temperature))
    logp = logp.view(targets.shape)
    if with_entropy:
        return logp, entropy.view(targets.shape)
    return logp
