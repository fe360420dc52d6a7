"""``PSFTLoss``: the fused loss as an ``nn.Module`` holding its hyper-parameters."""

from typing import Optional

import torch
from torch import nn

from .loss import psft_loss


class PSFTLoss(nn.Module):
    """Holds the PSFT hyper-parameters (defaults: the authors' recipe) and calls
    :func:`psft_ext.psft_loss`.

    ``forward(logits, targets, old_logprobs=None, advantages=1.0, num_items=None)``.
    """

    def __init__(self, clip_low: float = 0.2, clip_high: float = 0.28,
                 dual_clip: Optional[float] = None, ignore_index: int = -100,
                 temperature: float = 1.0, reduction: str = "mean",
                 return_metrics: bool = False):
        super().__init__()
        self.clip_low = clip_low
        self.clip_high = clip_high
        self.dual_clip = dual_clip
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.reduction = reduction
        self.return_metrics = return_metrics

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                old_logprobs: Optional[torch.Tensor] = None, advantages=1.0, num_items=None):
        return psft_loss(
            logits, targets, old_logprobs, advantages=advantages, clip_low=self.clip_low,
            clip_high=self.clip_high, dual_clip=self.dual_clip, ignore_index=self.ignore_index,
            temperature=self.temperature, reduction=self.reduction, num_items=num_items,
            return_metrics=self.return_metrics)

    def extra_repr(self) -> str:
        return (f"clip_low={self.clip_low}, clip_high={self.clip_high}, "
                f"dual_clip={self.dual_clip}, ignore_index={self.ignore_index}, "
                f"temperature={self.temperature}, reduction={self.reduction!r}")
