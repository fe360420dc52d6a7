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
chunk's logits exist) and the backward scales them; for "none" (the loss, or the log-probs and
entropies) and float16 compute the backward runs linear_bwd.

Nothing is computed for inputs that do not require a gradient, nor under ``torch.no_grad()``.
Under ``torch.autocast`` the chunk logits and matmuls run in the autocast dtype, as ``F.linear``
would; the gradients come back in the inputs' dtypes.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .._ops import (METRIC_NAMES, PACKED_PARAMS, REDUCTIONS, TOKEN_INPUTS, TOKEN_STATS,
                    forward_fakes, ops)
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
    token_inputs: List[Optional[Tensor]], params: List[float], ignore_index: int, seq_len: int,
    num_items: Optional[Tensor], num_items_value: float, with_metrics: bool, with_logprobs: bool,
    chunk_size: int, compute_dtype: torch.dtype, accumulate_float32: bool, need_hidden: bool,
    need_weight: bool, need_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """linear_fwd (schema: csrc/psft_ops.cpp). Rows of chunks whose targets are all ignored hold
    zeros in the stats, and their matmuls are skipped.

    GSPO (importance_sampling "sequence") needs each sequence's log-ratio before any of its
    tokens' losses: chunks of whole sequences when a sequence fits in a chunk, else a first pass
    over the chunks for the log-probs (one more matmul per chunk)."""
    with _no_autocast(hidden.device):
        n = hidden.shape[0]
        device = hidden.device
        stats = torch.zeros((len(TOKEN_STATS), n), dtype=torch.float32, device=device)
        valid = targets != ignore_index
        _check_target_range(targets, valid, weight.shape[0], ignore_index)
        if len(token_inputs) != len(TOKEN_INPUTS):
            raise ValueError(f"linear_fwd: token_inputs must list {len(TOKEN_INPUTS)} optional "
                             f"tensors, got {len(token_inputs)}")
        inputs = dict(zip(TOKEN_INPUTS, token_inputs))
        reduction = REDUCTIONS[int(params[PACKED_PARAMS.index("reduction")])]
        if (reduction == "mean" and num_items is None and num_items_value <= 0
                and inputs["token_weights"] is None):
            # Every chunk's loss and gradient divided by the count of the whole call.
            num_items = valid.sum().clamp(min=1).to(torch.float32)
        rows = chunk_rows(hidden, weight, chunk_size, compute_dtype, need_weight,
                          accumulate_float32)
        operands = Operands(hidden, weight, bias, compute_dtype)
        chunk_seq_len = 0
        if seq_len > 0 and inputs["seq_log_ratio"] is None:
            if rows >= seq_len:
                rows -= rows % seq_len
                chunk_seq_len = seq_len
            else:
                logp = _chunked_logprobs(operands, targets, valid, rows, params, ignore_index)
                inputs["seq_log_ratio"] = sequence_log_ratio(logp, inputs["old_logprobs"], valid,
                                                             seq_len)
        bounds = chunk_bounds(n, rows, valid)
        grads = GradAccumulator(hidden, weight, bias, compute_dtype, need_hidden, need_weight,
                                need_bias, len(bounds), accumulate_float32)
        loss = torch.zeros((), dtype=torch.float32, device=device)
        metric_sums = _MetricSums(device) if with_metrics else None
        for start, end in bounds:
            h = operands.hidden_rows(start, end)
            logits = chunk_logits(h, operands.weight, operands.bias)
            chunk_loss, _, _, chunk_metrics, chunk_stats = ops.psft_fwd(
                logits, targets[start:end], [_rows_of(t, start, end) for t in inputs.values()],
                params, ignore_index, chunk_seq_len, num_items, num_items_value, with_metrics,
                False, logits if grads.needed else None)
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
        def empty():  # one tensor per output: outputs must not alias
            return torch.empty(0, dtype=torch.float32, device=device)

        metrics = metric_sums.result() if metric_sums is not None else empty()
        logp, entropy = ((stats[TOKEN_STATS["logp"]].clone(), stats[TOKEN_STATS["entropy"]].clone())
                         if with_logprobs else (empty(), empty()))
        return (loss, logp, entropy, metrics, stats, *grads.results(hidden, weight, bias))


def _chunked_logprobs(operands, targets, valid, rows, params, ignore_index):
    """The log-probs of every row (0 where ignored), chunk by chunk, without gradients."""
    logp = torch.zeros(targets.shape[0], dtype=torch.float32, device=targets.device)
    logprob_params = list(params)
    logprob_params[PACKED_PARAMS.index("reduction")] = float(REDUCTIONS.index("none"))
    logprob_params[PACKED_PARAMS.index("importance_sampling")] = 0.0
    for start, end in chunk_bounds(targets.shape[0], rows, valid):
        logits = chunk_logits(operands.hidden_rows(start, end), operands.weight, operands.bias)
        _, logp[start:end], _, _, _ = ops.psft_fwd(
            logits, targets[start:end], [None] * len(TOKEN_INPUTS), logprob_params, ignore_index,
            0, None, 0.0, False, True, None)
        del logits
    return logp


def sequence_log_ratio(logp, old_logprobs, valid, seq_len):
    """GSPO's sequence log-ratio for every token: the mean of logp - old_logp over its sequence's
    non-ignored tokens (psft_fwd's own, for a call that holds whole sequences)."""
    diff = logp - (logp if old_logprobs is None else old_logprobs)
    mask = valid.view(-1, seq_len)
    diff = torch.where(mask, diff.view(-1, seq_len), torch.zeros((), device=logp.device))
    per_seq = diff.sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1)
    return per_seq.expand(-1, seq_len).reshape(-1).contiguous()


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
def _linear_fwd_fake(hidden, weight, bias, targets, token_inputs, params, ignore_index, seq_len,
                     num_items, num_items_value, with_metrics, with_logprobs, chunk_size,
                     compute_dtype, accumulate_float32, need_hidden, need_weight, need_bias):
    return (*forward_fakes(hidden, hidden.shape[0], params, with_metrics, with_logprobs),
            *_grads_fake(hidden, weight, bias, need_hidden, need_weight, need_bias))


@torch.library.impl("psft_ext::linear_bwd", "CompositeExplicitAutograd")
def linear_bwd(
    scale: Tensor, ent_scale: Optional[Tensor], hidden: Tensor, weight: Tensor,
    bias: Optional[Tensor], targets: Tensor, stats: Tensor, params: List[float],
    ignore_index: int, chunk_size: int, compute_dtype: torch.dtype, accumulate_float32: bool,
    need_hidden: bool, need_weight: bool, need_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """linear_bwd (schema: csrc/psft_ops.cpp): only the chunks with a row of non-zero ``scale``
    or ``ent_scale`` are recomputed."""
    with _no_autocast(hidden.device):
        n = hidden.shape[0]
        scale = scale.to(torch.float32).contiguous()
        active = scale != 0
        if ent_scale is not None:
            ent_scale = ent_scale.to(torch.float32).contiguous()
            active = active | (ent_scale != 0)
        rows = chunk_rows(hidden, weight, chunk_size, compute_dtype, need_weight,
                          accumulate_float32)
        bounds = chunk_bounds(n, rows, active)
        grads = GradAccumulator(hidden, weight, bias, compute_dtype, need_hidden, need_weight,
                                need_bias, len(bounds), accumulate_float32)
        operands = Operands(hidden, weight, bias, compute_dtype)
        for start, end in bounds:
            h = operands.hidden_rows(start, end)
            logits = chunk_logits(h, operands.weight, operands.bias)
            ops.psft_bwd(scale[start:end], _rows_of(ent_scale, start, end), logits,
                         targets[start:end], stats[:, start:end], params, ignore_index,
                         logits)  # the gradient over the logits
            grads.add(logits, h, operands.weight, start, end)
            del logits  # before the next chunk's logits exist (see linear_fwd)
        return grads.results(hidden, weight, bias)


@torch.library.register_fake("psft_ext::linear_bwd")
def _linear_bwd_fake(scale, ent_scale, hidden, weight, bias, targets, stats, params,
                     ignore_index, chunk_size, compute_dtype, accumulate_float32, need_hidden,
                     need_weight, need_bias):
    return _grads_fake(hidden, weight, bias, need_hidden, need_weight, need_bias)
