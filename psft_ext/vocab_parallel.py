"""Vocabulary-parallel losses: the logits (or the LM head's rows) split over the ranks of a process
group by vocabulary, as tensor parallelism splits an LM head (``ColwiseParallel``).

Rank r holds the contiguous slice ``[offset_r, offset_r + V_r)`` of the vocabulary, slices in rank
order (sizes may differ; a rank may hold none); targets are global ids, the same on every rank.
A call:

1. exchanges a few integers per rank (rows, slice size, a checksum of the targets, the targets'
   range), so that a layout the ranks disagree on raises the same error on every rank instead of
   hanging in a collective;
2. reduces each rank's slice to five float32 numbers per row with the fused forward (its lse, its
   entropy, the target's scaled logit where the target is local, its maximum, whether the target
   is that maximum) and gathers them (one all-gather of 5 N floats per rank);
3. combines them into the row's log-prob, entropy and log-sum-exp over the whole vocabulary
   (``lse = logsumexp_r lse_r``; with ``pi_r = exp(lse_r - lse)``, ``H = sum_r pi_r (H_r -
   log pi_r)``), identically on every rank, and forms the loss, the options and the metrics from
   them with the same token stage as the single-device loss (``psft_tokens``);
4. writes the gradient of the rank's own slice from the combined statistics (``psft_bwd``; rows
   whose target lies in another slice have no one-hot term there): in the backward, or for the
   fused linear form of a loss alone in the forward (see LinearFunction). The fused linear form
   recomputes its chunks for it and sums the hidden states' gradient over the group.

Nothing of size tokens x vocabulary crosses the network. The backward needs no collective but the
fused linear form's sum of the hidden states' gradient.
"""

from typing import NamedTuple, Optional

import torch
import torch.distributed as dist

from ._ops import PACKED_PARAMS, REDUCTIONS, TOKEN_STATS, ops
from .token_inputs import no_token_inputs

_STATS = len(TOKEN_STATS)
_ROW = {name: TOKEN_STATS[name] for name in ("logp", "entropy", "lse", "coef", "ent_coef",
                                              "correct", "max")}


class VocabSlices(NamedTuple):
    """This rank's slice of the vocabulary and the group's layout."""

    group: object
    rank: int
    world: int
    offset: int        # first global id of this rank's slice
    local_vocab: int   # V_r
    vocab: int         # sum of the slices


def collective_device(group, like):
    """Where the group's collectives take their tensors: the CUDA device for NCCL, else CPU."""
    backend = dist.get_backend(group)
    if "nccl" in str(backend).lower():
        return like.device if like.is_cuda else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(tensor, group):
    """(world, *tensor.shape): every rank's ``tensor`` (same shape and dtype on every rank)."""
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


def exchange_layout(group, targets, local_vocab, ignore_index, fn) -> VocabSlices:
    """The group's slices, after checking on every rank that the ranks agree on the rows and the
    targets and that every target is ignore_index or a global id in [0, V): the same
    ValueError on every rank otherwise (each rank decides from the same gathered numbers)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{fn}: process_group needs torch.distributed to be initialized")
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    device = collective_device(group, targets)
    t = targets.long()
    valid = t != ignore_index
    n = t.numel()
    weights = torch.arange(n, device=t.device) % 7919 + 1
    checksum = (t * weights).sum() if n else torch.zeros((), dtype=torch.int64, device=t.device)
    big = torch.iinfo(torch.int64).max
    low = torch.where(valid, t, big).min() if n else torch.tensor(big, device=t.device)
    high = torch.where(valid, t, -1).max() if n else torch.tensor(-1, device=t.device)
    meta = torch.stack([torch.tensor(n, device=t.device), torch.tensor(local_vocab,
                                                                        device=t.device),
                        checksum, low, high]).to(device=device, dtype=torch.int64)
    rows, sizes, sums, lows, highs = _all_gather(meta, group).t().tolist()
    if len(set(rows)) != 1:
        raise ValueError(f"{fn}: the ranks of the process group disagree on the number of rows "
                         f"(tokens): {rows} by rank; each rank must pass the same tokens")
    if len(set(sums)) != 1:
        raise ValueError(f"{fn}: the ranks of the process group hold different targets; "
                         f"targets are global token ids, the same on every rank (an LM head "
                         f"that FSDP shards over data-parallel ranks is not vocabulary-parallel: "
                         f"compute the loss where FSDP has gathered its weight)")
    if any(size < 0 for size in sizes):
        raise ValueError(f"{fn}: vocabulary slices of negative size: {sizes}")
    vocab = sum(sizes)
    if highs[0] >= vocab or (lows[0] < 0 and lows[0] != big):
        bad = valid & ((t < 0) | (t >= vocab))
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(f"{fn}: target id {int(t.view(-1)[pos])} at position {pos} is out of "
                         f"range for the vocabulary of {vocab} split over the process group "
                         f"(slices {sizes} in rank order; valid ids are 0..{vocab - 1}, or "
                         f"ignore_index={ignore_index})")
    return VocabSlices(group, rank, world, sum(sizes[:rank]), local_vocab, vocab)


def local_targets(targets, slices, ignore_index, for_backward):
    """The targets as this slice's column indices. Rows whose target is in another slice: column
    0 for the forward (its log-prob there is not used), a column outside the slice for the
    backward (no one-hot term). Ignored rows stay ignore_index."""
    t = targets.long()
    valid = t != ignore_index
    local = t - slices.offset
    owned = valid & (local >= 0) & (local < slices.local_vocab)
    outside = -1 if ignore_index != -1 else -2
    other = torch.full_like(local, outside if for_backward else 0)
    return torch.where(owned, local, torch.where(valid, other, t)), owned


def _local_params(params_list):
    """The packed params of a bare forward over the slice: reduction "none", no options (the
    options act on the combined values)."""
    out = list(params_list)
    for name in ("entropy_coef", "kl_coef", "importance_sampling"):
        out[PACKED_PARAMS.index(name)] = 0.0
    out[PACKED_PARAMS.index("reduction")] = float(REDUCTIONS.index("none"))
    return out


def combine(local_stats, owned, slices):
    """The rows' statistics over the whole vocabulary from every slice's (see the module's
    docstring), as a (kTokenStats, N) stats tensor for psft_tokens: logp, entropy, lse,
    correct and max filled in, identically on every rank."""
    n = owned.shape[0]
    device = collective_device(slices.group, local_stats)
    if slices.local_vocab == 0:
        neg_inf = torch.full((n,), float("-inf"), device=owned.device)
        zeros = torch.zeros(n, device=owned.device)
        packed = torch.stack([neg_inf, zeros, zeros, neg_inf, zeros])
    else:
        s = local_stats
        lse_l = s[_ROW["lse"]]
        packed = torch.stack([
            lse_l, s[_ROW["entropy"]],
            torch.where(owned, s[_ROW["logp"]] + lse_l, 0.0),  # the target's scaled logit
            s[_ROW["max"]], torch.where(owned, s[_ROW["correct"]], 0.0)])
    gathered = _all_gather(packed.to(device=device, dtype=torch.float32), slices.group)
    gathered = gathered.to(owned.device)
    lse_r, ent_r, x_y_r, max_r, correct_r = gathered.unbind(1)
    lse = torch.logsumexp(lse_r, dim=0)
    log_pi = lse_r - lse
    pi = torch.exp(log_pi)
    entropy = torch.where(pi > 0, pi * (ent_r - log_pi), 0.0).sum(0)
    x_y = x_y_r.sum(0)
    # As the single-device kernels: no finite softmax (a NaN or +inf logit) -> a NaN log-prob.
    logp = torch.where(lse < float("inf"), x_y - lse, float("nan"))
    row_max = max_r.max(0).values
    # The target is the whole row's maximum iff it is its slice's and that slice's maximum is
    # the row's: exact, with no comparison of recomputed values.
    correct = (correct_r * (max_r == row_max)).sum(0)
    stats = torch.zeros((_STATS, n), dtype=torch.float32, device=owned.device)
    stats[_ROW["logp"]] = logp
    stats[_ROW["entropy"]] = entropy
    stats[_ROW["lse"]] = lse
    stats[_ROW["correct"]] = correct
    stats[_ROW["max"]] = row_max
    return stats


def row_coefficients(stats, reduction_none, g_loss, g_logp, g_entropy, entropy_term):
    """psft_bwd's (scale, ent_scale) from the upstream gradients of the loss, the log-probs and
    the entropies (any may be None), as csrc/psft_autograd.cpp forms them."""
    n = stats.shape[1]
    scale = ent_scale = None
    if g_loss is not None:
        g = g_loss.float()
        if not reduction_none:
            g = g.expand(n)
        scale = stats[_ROW["coef"]] * g
        if entropy_term:
            ent_scale = stats[_ROW["ent_coef"]] * g
    if g_logp is not None:
        scale = -g_logp.float() if scale is None else scale - g_logp.float()
    if g_entropy is not None:
        ent_scale = -g_entropy.float() if ent_scale is None else ent_scale - g_entropy.float()
    if scale is None:
        scale = torch.zeros(n, device=stats.device)
    return scale.contiguous(), None if ent_scale is None else ent_scale.contiguous()


class _Call(NamedTuple):
    targets: torch.Tensor      # flat global ids
    token_inputs: list
    params: list               # packed, with the scalar advantage
    ignore_index: int
    seq_len: int
    num_items: Optional[torch.Tensor]
    num_items_value: float
    with_metrics: bool


def _token_stage(stats_in, call):
    return ops.psft_tokens(stats_in, call.targets, call.token_inputs, call.params,
                           call.ignore_index, call.seq_len, call.num_items, call.num_items_value,
                           call.with_metrics)


def _outputs(ctx, loss, metrics, stats):
    logp = stats[_ROW["logp"]].clone()
    entropy = stats[_ROW["entropy"]].clone()
    ctx.mark_non_differentiable(metrics)
    return loss, logp, entropy, metrics


def _is_none(call):
    return int(call.params[PACKED_PARAMS.index("reduction")]) == REDUCTIONS.index("none")


def _entropy_term(call):
    return call.params[PACKED_PARAMS.index("entropy_coef")] != 0.0


class LogitsFunction(torch.autograd.Function):
    """(loss, logp, entropy, metrics) of this rank's (N, V_r) logits slice."""

    @staticmethod
    def forward(ctx, logits, call: _Call, slices: VocabSlices):
        fwd_targets, owned = local_targets(call.targets, slices, call.ignore_index, False)
        local = None
        if slices.local_vocab > 0:
            _, _, _, _, local = ops.psft_fwd(logits.detach(), fwd_targets, no_token_inputs(),
                                             _local_params(call.params), call.ignore_index, 0,
                                             None, 0.0, False, False, None)
        stats_in = combine(local, owned, slices)
        loss, metrics, stats = _token_stage(stats_in, call)
        ctx.save_for_backward(logits, stats)
        ctx.call, ctx.slices = call, slices
        return _outputs(ctx, loss, metrics, stats)

    @staticmethod
    def backward(ctx, g_loss, g_logp, g_entropy, _):
        logits, stats = ctx.saved_tensors
        call, slices = ctx.call, ctx.slices
        scale, ent_scale = row_coefficients(stats, _is_none(call), g_loss, g_logp, g_entropy,
                                            _entropy_term(call))
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        if slices.local_vocab > 0:
            bwd_targets, _ = local_targets(call.targets, slices, call.ignore_index, True)
            ops.psft_bwd(scale, ent_scale, logits, bwd_targets, stats, call.params,
                         call.ignore_index, grad)
        return grad, None, None


class LinearFunction(torch.autograd.Function):
    """(loss, logp, entropy, metrics) of the logits hidden @ weight_r.T + bias_r of this rank's
    LM-head rows, chunk by chunk (linear_fwd / linear_bwd); the hidden states' gradient is summed
    over the group.

    With ``eager`` (a scalar loss, the only output the caller differentiates) the gradients for
    an upstream gradient of 1 are computed in the forward, once the combined statistics are
    known, and the backward only scales them: it needs the LM head's weight no more, which an
    FSDP unit of its own has released by then (TP x FSDP). Otherwise the backward recomputes the
    chunks. The matmuls are the same four either way."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, call: _Call, slices: VocabSlices, chunk_size,
                compute_dtype, accumulate_float32, eager):
        fwd_targets, owned = local_targets(call.targets, slices, call.ignore_index, False)
        local = None
        if slices.local_vocab > 0:
            local = ops.linear_fwd(hidden.detach(), weight.detach(),
                                   None if bias is None else bias.detach(), fwd_targets,
                                   no_token_inputs(), _local_params(call.params),
                                   call.ignore_index, 0, None, 0.0, False, False, chunk_size,
                                   compute_dtype, accumulate_float32, False, False, False)[4]
        stats_in = combine(local, owned, slices)
        loss, metrics, stats = _token_stage(stats_in, call)
        ctx.call, ctx.slices = call, slices
        ctx.linear = (chunk_size, compute_dtype, accumulate_float32)
        ctx.eager = eager and not _is_none(call) and any(ctx.needs_input_grad[:3])
        ctx.set_materialize_grads(False)  # None: an output the caller does not differentiate
        if ctx.eager:
            ones = torch.ones((), dtype=torch.float32, device=stats.device)
            ctx.grads = _linear_grads(ctx, hidden.detach(), weight.detach(),
                                      None if bias is None else bias.detach(), stats,
                                      *row_coefficients(stats, False, ones, None, None,
                                                        _entropy_term(call)))
        else:
            ctx.save_for_backward(hidden, weight, bias, stats)
        return _outputs(ctx, loss, metrics, stats)

    @staticmethod
    def backward(ctx, g_loss, g_logp, g_entropy, _):
        call, slices = ctx.call, ctx.slices
        needs = ctx.needs_input_grad
        if ctx.eager:
            if g_logp is not None or g_entropy is not None:
                raise RuntimeError("psft_ext: the vocabulary-parallel loss's gradients were "
                                   "computed for the loss alone")
            g = torch.zeros(()) if g_loss is None else g_loss
            gh, gw, gb = (None if t is None else t * g.to(t.device, t.dtype) for t in ctx.grads)
            ctx.grads = None
        else:
            hidden, weight, bias, stats = ctx.saved_tensors
            gh, gw, gb = _linear_grads(ctx, hidden, weight, bias, stats,
                                       *row_coefficients(stats, _is_none(call), g_loss, g_logp,
                                                         g_entropy, _entropy_term(call)))
        if needs[0]:
            # Each rank's slice contributes its part of d loss / d hidden.
            device = collective_device(slices.group, gh)
            summed = gh.to(device)
            dist.all_reduce(summed, group=slices.group)
            gh = summed.to(gh.device)
        return (gh if needs[0] else None, gw if needs[1] else None,
                gb if needs[2] else None, None, None, None, None, None, None)


def _linear_grads(ctx, hidden, weight, bias, stats, scale, ent_scale):
    """(d hidden of this slice, d weight_r, d bias_r) for psft_bwd's row coefficients."""
    call, slices, needs = ctx.call, ctx.slices, ctx.needs_input_grad
    if slices.local_vocab == 0:
        return (torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device),
                torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device),
                None if bias is None else torch.zeros_like(bias))
    bwd_targets, _ = local_targets(call.targets, slices, call.ignore_index, True)
    return ops.linear_bwd(scale, ent_scale, hidden, weight, bias, bwd_targets, stats,
                          call.params, call.ignore_index, *ctx.linear, True, needs[1],
                          bias is not None and needs[2])


def prepare(group, targets, local_vocab, inputs, params, with_metrics, fn):
    """(the per-call constants, the group's slices) of a call of the functions above, after the
    layout check (exchange_layout); ``targets`` are the flat global ids."""
    slices = exchange_layout(group, targets, local_vocab, params.ignore_index, fn)
    call = _Call(targets, inputs.token_inputs, list(params.op_args(inputs.advantage)),
                 params.ignore_index, inputs.seq_len, inputs.num_items, inputs.num_items_value,
                 bool(with_metrics))
    return call, slices


def _dtensor_class():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def local_shard(t, dim, process_group, what, fn):
    """(the local tensor, the process group) of ``t``: a DTensor sharded on ``dim`` over a 1-D
    mesh gives its local shard and the mesh's group; a plain tensor is this rank's slice of the
    ``process_group`` given (None: not vocabulary-parallel)."""
    dtensor = _dtensor_class()
    if dtensor is None or not isinstance(t, dtensor):
        return t, process_group
    from torch.distributed.tensor import Shard
    mesh, placements = t.device_mesh, t.placements
    dim = dim % t.ndim
    sharded = (mesh.ndim == 1 and len(placements) == 1 and isinstance(placements[0], Shard)
               and placements[0].dim % t.ndim == dim)
    if not sharded:
        raise ValueError(f"{fn}: a DTensor {what} must be sharded on dimension {dim} over a 1-D "
                         f"device mesh (the vocabulary, as ColwiseParallel on the LM head gives), "
                         f"got placements {placements} on a {mesh.ndim}-D mesh")
    group = mesh.get_group()
    if process_group is not None and process_group is not group:
        raise ValueError(f"{fn}: process_group differs from the {what} DTensor's mesh group")
    return t.to_local(), group


def replicated(t):
    """A DTensor that is the same on every rank (Replicate) as its local tensor; others as is."""
    dtensor = _dtensor_class()
    if dtensor is None or not isinstance(t, dtensor):
        return t
    from torch.distributed.tensor import Replicate
    if not all(isinstance(p, Replicate) for p in t.placements):
        t = t.redistribute(t.device_mesh, [Replicate()] * t.device_mesh.ndim)
    return t.to_local()
