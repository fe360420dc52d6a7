"""``PSFTMetrics``: the statistics of one loss call."""

from typing import NamedTuple

import torch

from ._ops import METRIC_NAMES


class PSFTMetrics(NamedTuple):
    """Token-mean statistics of one loss call (detached 0-d float32 tensors, non-ignored tokens).

    nll: mean -log p(target). entropy: mean entropy of the (temperature-scaled) distribution.
    clip_fraction: share of tokens whose clip (or dual clip) branch is active, i.e. that get no
    gradient from clipping. approx_kl: mean (old_logp - logp), the log-ratio clamped to [-20, 20]
    as in verl. ratio_mean: mean probability ratio (with importance_sampling="sequence", of each
    token's sequence ratio).
    clip_fraction_high / clip_fraction_low: the shares clipped at the trust region's upper bound
    (A > 0) and lower bound (A < 0); their sum is verl's pg_clipfrac. dual_clip_fraction: the
    share capped by the dual clip, verl's pg_clipfrac_lower. The three add up to clip_fraction.
    token_accuracy: share of tokens whose target is the argmax of the logits (TRL's
    mean_token_accuracy). num_tokens: number of non-ignored tokens.
    """

    nll: torch.Tensor
    entropy: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    ratio_mean: torch.Tensor
    clip_fraction_high: torch.Tensor
    clip_fraction_low: torch.Tensor
    dual_clip_fraction: torch.Tensor
    token_accuracy: torch.Tensor
    num_tokens: torch.Tensor


if PSFTMetrics._fields != METRIC_NAMES:
    raise ImportError(f"psft_ext._C computes the metrics {METRIC_NAMES}, not PSFTMetrics' "
                      f"{PSFTMetrics._fields}: the extension was built from other sources; "
                      f"rebuild it")
