"""Plain PyTorch PSFT loss: the ground truth for the tests and the baseline for the benchmarks.

Same signatures and semantics as :func:`psft_ext.psft_loss` and :func:`psft_ext.token_logprobs`,
written the straightforward way (full log-softmax over the vocabulary, autograd for the gradient).
The clipped surrogate follows verl's ``compute_policy_loss_vanilla``, the PSFT authors' code path:
log-ratio clamped to [-20, 20], ``-min(r A, clip(r) A)``, dual clip for A < 0, token-mean. Branches
are selected with ``torch.where`` on "the clip is active" (strictly), which gives verl's values and,
away from exact ties, its gradients; at a tie the unclipped branch is taken, as in the fused
kernels. Float64 logits are computed in float64 (the tests' ground truth); others in float32. The
options follow verl 0.9: rollout correction weights scale the policy-gradient term, ``kl_coef``
adds the "low_var_kl" (k3) penalty, ``entropy_coef`` subtracts the entropy,
``importance_sampling="sequence"`` is ``compute_policy_loss_gspo``, ``loss_agg_mode`` is
``agg_loss``.
"""

from typing import Optional, Union

import torch

from .metrics import PSFTMetrics


def _compute_dtype(logits):
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def token_logprobs(logits, targets, *, ignore_index=-100, temperature=1.0, with_entropy=False):
    x = logits.to(_compute_dtype(logits)) / temperature
    logp_all = torch.log_softmax(x, dim=-1)
    valid = _valid(targets, ignore_index)
    safe_targets = torch.where(valid, targets.long(), 0)
    logp = logp_all.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not with_entropy:
        return logp
    # p log p is 0 where p is 0 (a -inf logit), not 0 * -inf.
    p = logp_all.exp()
    entropy = -torch.where(p > 0, p * logp_all, torch.zeros_like(p)).sum(-1)
    return logp, torch.where(valid, entropy, torch.zeros_like(entropy))


def _valid(targets, ignore_index):
    """Targets that are not ignore_index, compared in int64 (an int32 tensor would wrap an
    ignore_index outside int32's range: 2**32 would match id 0)."""
    return targets.long() != ignore_index


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
    num_items=None,
    return_metrics: bool = False,
    entropy_coef: float = 0.0,
    kl_coef: float = 0.0,
    ref_logprobs: Optional[torch.Tensor] = None,
    rollout_is_weights: Optional[torch.Tensor] = None,
    loss_agg_mode: str = "token-mean",
    importance_sampling: str = "token",
):
    need_entropy = return_metrics or entropy_coef != 0
    if need_entropy:
        logp, entropy = token_logprobs(logits, targets, ignore_index=ignore_index,
                                       temperature=temperature, with_entropy=True)
    else:
        logp = token_logprobs(logits, targets, ignore_index=ignore_index, temperature=temperature)
    valid = _valid(targets, ignore_index)
    dtype = logp.dtype

    def constant(t, fill=None):
        if t is None:
            return torch.full_like(logp, fill) if fill is not None else None
        t = t.detach().to(dtype) if isinstance(t, torch.Tensor) else t
        return torch.as_tensor(t, dtype=dtype, device=logp.device).expand(logp.shape)

    old = logp.detach() if old_logprobs is None else constant(old_logprobs)
    adv = constant(advantages)
    token_log_ratio = torch.clamp(logp - old, min=-20.0, max=20.0)
    if importance_sampling == "sequence":
        # GSPO (verl's compute_policy_loss_gspo): s = exp(min(sg[d_seq] + logp - sg[logp], 10)).
        seq_len = targets.shape[-1]
        mask = valid.to(dtype)
        diff = (logp - old) * mask
        d_seq = diff.sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = torch.clamp(logp - logp.detach() + d_seq.detach().expand(logp.shape),
                                max=10.0)
        assert logp.shape[-1] == seq_len
    else:
        log_ratio = token_log_ratio
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clip_active = clipped > unclipped
    loss = torch.where(clip_active, clipped, unclipped)
    dual_active = torch.zeros_like(clip_active)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual_active = (adv < 0) & (loss > cap)
        loss = torch.where(dual_active, cap, loss)
    if rollout_is_weights is not None:
        loss = loss * constant(rollout_is_weights)
    if kl_coef != 0:
        # verl's kl_penalty "low_var_kl" (k3), clamped as there.
        kl = torch.clamp(constant(ref_logprobs) - logp, min=-20.0, max=20.0)
        k3 = torch.clamp(torch.exp(kl) - kl - 1, min=-10.0, max=10.0)
        loss = loss + kl_coef * k3
    if entropy_coef != 0:
        loss = loss - entropy_coef * entropy
    loss = torch.where(valid, loss, torch.zeros_like(loss))

    num_tokens = valid.sum()
    if loss_agg_mode != "token-mean":
        out = _sequence_aggregate(loss, valid, loss_agg_mode, num_items)
    elif reduction == "none":
        out = loss
    elif reduction == "sum":
        out = loss.sum()
    elif reduction == "mean":
        denominator = num_tokens.clamp(min=1) if num_items is None else num_items
        if isinstance(denominator, torch.Tensor):
            denominator = denominator.to(device=loss.device, dtype=loss.dtype)
        out = loss.sum() / denominator
    else:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if not return_metrics:
        return out

    count = num_tokens.clamp(min=1).to(dtype)

    def token_mean(values):
        return (torch.where(valid, values.to(dtype), torch.zeros_like(logp)).sum()
                / count).detach()

    ppo_clip = clip_active & ~dual_active
    x = logits.detach().to(_compute_dtype(logits))
    safe_targets = torch.where(valid, targets.long(), 0)
    correct = x.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1) >= x.max(-1).values
    metrics = PSFTMetrics(
        nll=token_mean(-logp),
        entropy=token_mean(entropy),
        clip_fraction=token_mean(clip_active | dual_active),
        approx_kl=token_mean(-token_log_ratio),
        ratio_mean=token_mean(ratio),
        clip_fraction_high=token_mean(ppo_clip & (adv > 0)),
        clip_fraction_low=token_mean(ppo_clip & (adv < 0)),
        dual_clip_fraction=token_mean(dual_active),
        token_accuracy=token_mean(correct),
        num_tokens=num_tokens.to(dtype).detach(),
    )
    return out, metrics


def _sequence_aggregate(loss, valid, mode, num_items):
    """verl's ``agg_loss`` sequence modes over the rows of the last dimension."""
    mask = valid.to(loss.dtype)
    tokens = mask.sum(-1)
    seq_sums = (loss * mask).sum(-1)
    nonempty = (tokens > 0).to(loss.dtype)
    sequences = nonempty.sum().clamp(min=1) if num_items is None else num_items
    if mode == "seq-mean-token-mean":
        seq_losses = seq_sums / tokens.clamp(min=1)
    elif mode in ("seq-mean-token-sum", "seq-mean-token-sum-norm"):
        seq_losses = seq_sums
    else:
        raise ValueError(f"unknown loss_agg_mode {mode!r}")
    out = (seq_losses * nonempty).sum() / sequences
    if mode == "seq-mean-token-sum-norm":
        out = out / loss.shape[-1]
    return out
