"""``PSFTLoss``: the fused loss as an ``nn.Module`` holding its options."""

from typing import Optional

import torch
from torch import nn

from .loss import logits_loss
from .params import OPTION_NAMES, loss_params


class PSFTLoss(nn.Module):
    """:func:`psft_ext.psft_loss` with its options fixed at construction (defaults: the authors'
    recipe): ``PSFTLoss(clip_low=0.2, clip_high=0.28, reduction="mean", return_metrics=False,
    ...)``, any :class:`psft_ext.LossParams` field as a keyword. The options are read back as
    attributes (``loss_fn.clip_low``) and as one object, ``loss_fn.params``. ``inplace=True``:
    the gradient overwrites the logits (:func:`psft_ext.psft_loss`).

    ``forward(logits, targets, old_logprobs=None, advantages=1.0, num_items=None,
    rollout_is_weights=None, ref_logprobs=None)``.
    """

    def __init__(self, *, return_metrics: bool = False, inplace: bool = False, **options):
        super().__init__()
        self.params = loss_params("PSFTLoss", options)
        self.return_metrics = return_metrics
        self.inplace = inplace

    def __getattr__(self, name):
        params = self.__dict__.get("params")
        if params is not None and name in OPTION_NAMES:
            return getattr(params, name)
        return super().__getattr__(name)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor,
                old_logprobs: Optional[torch.Tensor] = None, advantages=1.0, num_items=None,
                rollout_is_weights: Optional[torch.Tensor] = None,
                ref_logprobs: Optional[torch.Tensor] = None):
        return logits_loss(logits, targets, old_logprobs, self.params, advantages, num_items,
                           self.return_metrics, fn="PSFTLoss",
                           rollout_is_weights=rollout_is_weights, ref_logprobs=ref_logprobs,
                           inplace=self.inplace)

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={getattr(self.params, name)!r}" for name in OPTION_NAMES)
