"""The fused linear loss's two custom ops and their autograd.

``linear_fwd`` walks the N rows in chunks: each chunk's logits are formed with one matmul, run
through ``psft_fwd`` (which writes their gradient over them when gradients are asked for: one
chunk of logits alive at a time) and turned into ``grad_hidden[chunk] = g @ weight`` and
``grad_weight += g.T @ hidden[chunk]``. ``linear_bwd`` recomputes each chunk's logits and runs
``psft_bwd`` on them. Both ops are defined with the others (csrc/psft_ops.cpp), and so is
linear_fwd's autograd (csrc/psft_autograd.cpp); their implementations and fake kernels are
registered here, so ``torch.compile`` traces a caller without graph breaks and without unrolling
the chunk loops.

Which of them a call runs is decided by linear_fwd's autograd (csrc/psft_autograd.cpp): for
"mean" and "sum" the forward computes the gradients of the reduced loss itself (the only time a
chunk's logits exist) and the backward scales them; for "none" and float16 compute the backward
runs linear_bwd.

Nothing is computed for inputs that do not require a gradient, nor under ``torch.no_grad()``.
Under ``torch.autocast`` the chunk logits and matmuls run in the autocast dtype, as ``F.linear``
would; the gradients come back in the inputs' dtypes.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .._ops import METRIC_NAMES, TOKEN_STATS, ops
from .accumulate import GradAccumulator, Operands, chunk_logits
from .chunks import chunk_bounds, chunk_rows


def _no_autocast(device):
    # The matmuls must run in the dtype chosen by the caller (the autocast dtype is passed in
    # explicitly), not be recast by an autocast region the op was called from.
    return torch.autocast(device_type=device.type, enabled=False)


class _MetricSums:
    """Metrics over several chunks from each chunk's (token means, count): the means weighted by
    the counts, divided once at the end."""

    def __init__(self, device):
        self.sums = torch.zeros(len(METRIC_NAMES), dtype=torch.float32, device=device)

    def add(self, metrics):
        weighted = metrics.clone()
        weighted[:-1] *= metrics[-1]
        self.sums += weighted

    def result(self):
        out = self.sums.clone()
        out[:-1] /= self.sums[-1].clamp(min=1)
        return out


@torch.library.impl("psft_ext::linear_fwd", "CompositeExplicitAutograd")
def linear_fwd(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
    old_logprobs: Optional[Tensor], advantages: Optional[Tensor], num_items: Optional[Tensor],
    params: List[float], ignore_index: int, reduction: str, num_items_value: float,
    with_metrics: bool, chunk_size: int, compute_dtype: torch.dtype, accumulate_float32: bool,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """linear_fwd (schema: csrc/psft_ops.cpp). Rows of chunks whose targets are all ignored hold
    zeros in the stats, and their matmuls are skipped."""
    with _no_autocast(hidden.device):
        n = hidden.shape[0]
        device = hidden.device
        stats = torch.zeros((len(TOKEN_STATS), n), dtype=torch.float32, device=device)
        valid = targets != ignore_index
        _check_target_range(targets, valid, weight.shape[0], ignore_index)
        if reduction == "mean" and num_items is None and num_items_value <= 0:
            # Every chunk's loss and gradient divided by the count of the whole call.
            num_items = valid.sum().clamp(min=1).to(torch.float32)
        rows = chunk_rows(hidden, weight, chunk_size, compute_dtype, need_weight,
                          accumulate_float32)
        bounds = chunk_bounds(n, rows, valid)
        grads = GradAccumulator(hidden, weight, bias, compute_dtype, need_hidden, need_weight,
                                need_bias, len(bounds), accumulate_float32)
        operands = Operands(hidden, weight, bias, compute_dtype)
        loss = torch.zeros((), dtype=torch.float32, device=device)
        metric_sums = _MetricSums(device) if with_metrics else None
        for start, end in bounds:
            h = operands.hidden_rows(start, end)
            logits = chunk_logits(h, operands.weight, operands.bias)
            chunk_loss, chunk_metrics, chunk_stats = ops.psft_fwd(
                logits, targets[start:end], _rows_of(old_logprobs, start, end),
                _rows_of(advantages, start, end), params, ignore_index, reduction, num_items,
                num_items_value, with_metrics, logits if grads.needed else None)
            if grads.needed:
                grads.add(logits, h, operands.weight, start, end)
            # Dropped now, not when the next chunk rebinds the name: the next chunk's logits
            # would otherwise be allocated while this one is still alive.
            del logits
            stats[:, start:end] = chunk_stats
            if reduction != "none":
                loss += chunk_loss
            if metric_sums is not None:
                metric_sums.add(chunk_metrics)
        if reduction == "none":
            loss = stats[TOKEN_STATS["loss"]].clone()
        metrics = (metric_sums.result() if metric_sums is not None
                   else torch.empty(0, dtype=torch.float32, device=device))
        return (loss, metrics, stats, *grads.results(hidden, weight, bias))


def _check_target_range(targets, valid, vocab, ignore_index):
    """Every target ignore_index or in [0, V), checked for the whole call (each chunk's own check
    would report a position inside its chunk)."""
    bad = valid & ((targets < 0) | (targets >= vocab))
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(f"fused linear loss: target id {int(targets[pos])} at position {pos} is "
                         f"out of range for a vocabulary of {vocab} (valid ids are "
                         f"0..{vocab - 1}, or ignore_index={ignore_index})")


def _rows_of(t, start, end):
    return None if t is None else t[start:end]


def _grads_fake(hidden, weight, bias, need_hidden, need_weight, need_bias):
    gh = hidden.new_empty(hidden.shape if need_hidden else (0,))
    gw = weight.new_empty(weight.shape if need_weight else (0,))
    b = weight if bias is None else bias
    gb = b.new_empty((weight.shape[0],) if need_bias else (0,))
    return gh, gw, gb


@torch.library.register_fake("psft_ext::linear_fwd")
def _linear_fwd_fake(hidden, weight, bias, targets, old_logprobs, advantages, num_items, params,
                     ignore_index, reduction, num_items_value, with_metrics, chunk_size,
                     compute_dtype, accumulate_float32, need_hidden, need_weight, need_bias):
    n = hidden.shape[0]
    f32 = dict(dtype=torch.float32)
    loss = hidden.new_empty((n,) if reduction == "none" else (), **f32)
    metrics = hidden.new_empty((len(METRIC_NAMES) if with_metrics else 0,), **f32)
    stats = hidden.new_empty((len(TOKEN_STATS), n), **f32)
    return (loss, metrics, stats,
            *_grads_fake(hidden, weight, bias, need_hidden, need_weight, need_bias))


@torch.library.impl("psft_ext::linear_bwd", "CompositeExplicitAutograd")
def linear_bwd(
    grad_loss: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
    stats: Tensor, params: List[float], ignore_index: int, chunk_size: int,
    compute_dtype: torch.dtype, accumulate_float32: bool, need_hidden: bool, need_weight: bool,
    need_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """linear_bwd (schema: csrc/psft_ops.cpp): only the chunks with a row of non-zero
    ``grad_loss * coef`` are recomputed."""
    with _no_autocast(hidden.device):
        n = hidden.shape[0]
        grad_loss = grad_loss.to(torch.float32).contiguous()
        rows = chunk_rows(hidden, weight, chunk_size, compute_dtype, need_weight,
                          accumulate_float32)
        bounds = chunk_bounds(n, rows, (grad_loss * stats[TOKEN_STATS["coef"]]) != 0)
        grads = GradAccumulator(hidden, weight, bias, compute_dtype, need_hidden, need_weight,
                                need_bias, len(bounds), accumulate_float32)
        operands = Operands(hidden, weight, bias, compute_dtype)
        for start, end in bounds:
            h = operands.hidden_rows(start, end)
            logits = chunk_logits(h, operands.weight, operands.bias)
            ops.psft_bwd(grad_loss[start:end], logits, targets[start:end], stats[:, start:end],
                         params, ignore_index, logits)  # the gradient over the logits
            grads.add(logits, h, operands.weight, start, end)
            del logits  # before the next chunk's logits exist (see linear_fwd)
        return grads.results(hidden, weight, bias)


@torch.library.register_fake("psft_ext::linear_bwd")
def _linear_bwd_fake(grad_loss, hidden, weight, bias, targets, stats, params, ignore_index,
                     chunk_size, compute_dtype, accumulate_float32, need_hidden, need_weight,
                     need_bias):
    return _grads_fake(hidden, weight, bias, need_hidden, need_weight, need_bias)
