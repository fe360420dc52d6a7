"""Plain PyTorch PSFT loss: the ground truth for the tests and the baseline for the benchmarks.

Same signatures and semantics as :func:`psft_ext.psft_loss` and :func:`psft_ext.token_logprobs`,
written the straightforward way (full log-softmax over the vocabulary, autograd for the gradient).
The clipped surrogate follows verl's ``compute_policy_loss_vanilla``, the PSFT authors' code path:
log-ratio clamped to [-20, 20], ``-min(r A, clip(r) A)``, dual clip for A < 0, token-mean. Branches
are selected with ``torch.where`` on "the clip is active" (strictly), which gives verl's values and,
away from exact ties, its gradients; at a tie the unclipped branch is taken, as in the fused kernels.
Float64 logits are computed in float64 (the tests' ground truth); others in float32.
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
):
    if return_metrics:
        logp, entropy = token_logprobs(logits, targets, ignore_index=ignore_index,
                                       temperature=temperature, with_entropy=True)
    else:
        logp = token_logprobs(logits, targets, ignore_index=ignore_index, temperature=temperature)
    valid = _valid(targets, ignore_index)
    old = logp.detach() if old_logprobs is None else old_logprobs.detach().to(logp.dtype)
    adv = advantages.detach().to(logp.dtype) if isinstance(advantages, torch.Tensor) else advantages
    adv = torch.as_tensor(adv, dtype=logp.dtype, device=logp.device).expand(logp.shape)

    log_ratio = torch.clamp(logp - old, min=-20.0, max=20.0)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    clip_active = clipped > unclipped
    loss = torch.where(clip_active, clipped, unclipped)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual_active = (adv < 0) & (loss > cap)
        loss = torch.where(dual_active, cap, loss)
        clip_active = clip_active | dual_active
    loss = torch.where(valid, loss, torch.zeros_like(loss))

    num_tokens = valid.sum()
    if reduction == "none":
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

    count = num_tokens.clamp(min=1).to(logp.dtype)

    def token_mean(values):
        return (torch.where(valid, values, torch.zeros_like(values)).sum() / count).detach()

    metrics = PSFTMetrics(
        nll=token_mean(-logp),
        entropy=token_mean(entropy),
        clip_fraction=token_mean(clip_active.to(logp.dtype)),
        approx_kl=token_mean(-log_ratio),
        ratio_mean=token_mean(ratio),
        num_tokens=num_tokens.to(logp.dtype).detach(),
    )
    return out, metrics
