"""Checks and normal forms of the loss functions' tensor arguments, shared by the logits and the
fused linear losses. Each check raises a TypeError / ValueError that names the function ``fn``."""

from typing import Optional, Tuple

import torch

from .params import check_finite

LOGITS_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TARGET_DTYPES = (torch.int64, torch.int32)


def check_logits_targets(logits, targets, fn, sliced=False):
    """``sliced``: the logits are a rank's slice of a vocabulary-parallel call, which may be
    empty."""
    if not isinstance(logits, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(f"{fn}: logits and targets must be tensors")
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError(f"{fn}: logits must be float32, bfloat16 or float16, got {logits.dtype}")
    if logits.dim() < 1:
        raise ValueError(f"{fn}: logits must have a vocabulary dimension, got a 0-d tensor")
    check_targets(targets, logits.shape[:-1], "logits", fn)
    if targets.device != logits.device:
        raise ValueError(f"{fn}: targets are on {targets.device} but logits are on {logits.device}")
    if logits.shape[-1] == 0 and targets.numel() > 0 and not sliced:
        raise ValueError(f"{fn}: logits have an empty vocabulary dimension")


def check_targets(targets, leading_shape, where, fn):
    """Targets are int64 / int32 ids with the leading shape of ``where`` (logits or hidden)."""
    if targets.dtype not in TARGET_DTYPES:
        raise TypeError(f"{fn}: targets must be int64 or int32 token ids, got {targets.dtype}")
    if tuple(targets.shape) != tuple(leading_shape):
        raise ValueError(
            f"{fn}: targets must have the leading shape of {where} {tuple(leading_shape)}, "
            f"got {tuple(targets.shape)}"
        )


def as_rows(x):
    """``x`` (..., D) as the (N, D) rows the ops take, N the product of the leading dimensions
    (explicit, so that D = 0 reshapes too)."""
    if x.dim() == 2:
        return x
    n = 1
    for size in x.shape[:-1]:
        n *= size
    return x.reshape(n, x.shape[-1])


def flat_targets(targets, ignore_index):
    """The targets as the (N,) ids the ops take. int32 targets compared with an ignore_index
    outside the int32 range would wrap it (torch casts the scalar to the tensor's dtype), so such
    an ignore_index (which no int32 id can equal) could mark real targets as ignored: compared in
    int64 then, as int64 targets are."""
    if targets.dtype == torch.int32 and not -(2**31) <= ignore_index < 2**31:
        targets = targets.long()
    return targets if targets.dim() == 1 else targets.reshape(-1)


def per_token(name, value, targets, fn, allow_broadcast, where="logits"):
    """A flat float32 (N,) view or copy of a per-token tensor, detached. ``where`` names the
    input whose device the error messages quote (the logits, or the fused linear loss's hidden
    states)."""
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


def old_and_advantages(old_logprobs, advantages, targets, fn, where="logits"):
    """(old log-probs, per-token advantages, scalar advantage): flat float32 tensors or None,
    and the number the kernels use where no per-token advantage is given."""
    old = None if old_logprobs is None else per_token(
        "old_logprobs", old_logprobs, targets, fn, allow_broadcast=False, where=where)
    if isinstance(advantages, torch.Tensor):
        return old, per_token("advantages", advantages, targets, fn, allow_broadcast=True,
                              where=where), 1.0
    check_finite(f"{fn}: advantages", advantages)
    return old, None, float(advantages)


def num_items_arg(num_items, reduction, device, fn) -> Tuple[Optional[torch.Tensor], float]:
    """The ops' (num_items, num_items_value): a tensor num_items as a detached 0-d constant (one
    element of any shape: (), (1,), (1, 1), as a count gathered across ranks may come back), a
    number as the value, or (None, 0.0): the token count. Only "mean" reads it.

    A tensor must be real (not bool), on the loss's ``device`` or the CPU, and, where reading it
    costs no sync (on the CPU), finite and > 0 like a number; on a GPU a non-positive or NaN
    value makes the loss and the gradient NaN instead (the op checks it there)."""
    if reduction != "mean" or num_items is None:
        return None, 0.0
    if isinstance(num_items, torch.Tensor):
        if num_items.numel() != 1:
            raise ValueError(f"{fn}: num_items must hold one value, got a tensor of shape "
                             f"{tuple(num_items.shape)}")
        if num_items.dtype == torch.bool or num_items.is_complex():
            raise TypeError(f"{fn}: num_items must be a real number, got a {num_items.dtype} "
                            f"tensor")
        if num_items.device != device and num_items.device.type != "cpu":
            raise ValueError(f"{fn}: num_items is on {num_items.device} but the loss is on "
                             f"{device} (a one-element tensor there or on the CPU)")
        if num_items.device.type == "cpu":
            check_finite(f"{fn}: num_items", num_items.item(), low=0.0)
        return num_items.detach().reshape(()), 0.0
    check_finite(f"{fn}: num_items", num_items, low=0.0)
    return None, float(num_items)
